// A yardstick, never a merge: it moves the bytes a two-state merge moves, with next to no
// arithmetic. Each row ([T, H] flattened) is read by a team of TEAM threads, VEC elements
// per access: both partials' elements and both LSEs. With WRITE, the output gets the
// partial of the larger LSE, scaled into the output type; without, nothing is written
// (a lower bound on any merge's time). Contiguous [T, H, D] partials and output, float32
// [H, T] LSEs, head sizes that are multiples of VEC. Self-contained: no CUDA headers.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

constexpr int kBlock = 128;

// Packed by benchmarks/yardsticks/stream_cuda.py: 6 pointers, 2 int64, 4 uint32, a float
// and padding.
struct Params {
  const void* prefix;
  const float* prefix_lse;
  const void* suffix;
  const float* suffix_lse;
  void* out;
  const float* scale;  // null: no FP8 scaling
  i64 num_rows;
  i64 num_tokens;
  u32 head_size;
  u32 num_heads;
  u32 heads_magic, heads_shift;  // row / num_heads without a hardware division
  float never;  // NaN, unknown to the compiler: the read-only store's condition never holds
  u32 unused;
};
static_assert(sizeof(Params) == 88, "the launcher packs 88 bytes");

struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

struct F16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ u16 store(float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

struct BF16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(u16 v) { return __uint_as_float((u32)v << 16); }
  static __device__ __forceinline__ u16 store(float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

// Round to nearest even, saturating at 448, as cvt.rn.satfinite does on sm_89 and later.
__device__ __forceinline__ u8 e4m3_in_software(float x) {
  const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
  const float a = fabsf(x);
  if (a != a) return 0x7f;
  u32 code;
  if (a < 0.015625f) {  // below the smallest normal: steps of 2^-9; 8 steps is that normal
    code = (u32)__float2int_rn(a * 512.0f);
  } else {
    const u32 bits = __float_as_uint(a);
    const int exponent = (int)(bits >> 23) - 127;
    if (exponent > 8) return (u8)(sign | 0x7eu);
    const u32 mantissa = bits & 0x7fffffu, rest = mantissa & 0xfffffu;
    u32 q = mantissa >> 20;
    q += rest > 0x80000u || (rest == 0x80000u && (q & 1u));
    code = ((u32)(exponent + 7) << 3) + q;
  }
  return (u8)(sign | (code > 0x7eu ? 0x7eu : code));
}

struct E4M3 {
  typedef u8 T;
  static __device__ __forceinline__ u8 store(float v) {
#if __CUDA_ARCH__ >= 890
    u16 pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(v));
    return (u8)(pair & 0xffu);
#else
    return e4m3_in_software(v);
#endif
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename P, typename O, int VEC, int TEAM, bool WRITE>
__device__ __forceinline__ void stream_rows(const Params& p) {
  typedef Pack<typename P::T, VEC> In;
  const i64 row = (i64)blockIdx.x * (kBlock / TEAM) + threadIdx.x / TEAM;
  if (row >= p.num_rows) return;
  const u32 r = (u32)row;
  const u32 t = (u32)(((u64)__umulhi(r, p.heads_magic) + r) >> p.heads_shift);
  const i64 lse_at = (i64)(r - t * p.num_heads) * p.num_tokens + t;
  const float lp = p.prefix_lse[lse_at], ls = p.suffix_lse[lse_at];
  const float inv_scale = p.scale ? 1.0f / *p.scale : 1.0f;
  float sink = lp + ls;  // read-only: every load feeds it, so that none is dropped
  for (u32 col = (threadIdx.x % TEAM) * VEC; col < p.head_size; col += TEAM * VEC) {
    const i64 at = row * p.head_size + col;
    const In a = *reinterpret_cast<const In*>(static_cast<const typename P::T*>(p.prefix) + at);
    const In b = *reinterpret_cast<const In*>(static_cast<const typename P::T*>(p.suffix) + at);
    Pack<typename O::T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float x = P::load(lp > ls ? a.v[i] : b.v[i]);
      o.v[i] = O::store(x * inv_scale);
      if (!WRITE) sink += P::load(a.v[i]) + P::load(b.v[i]);
    }
    if (WRITE || sink == p.never) {
      *reinterpret_cast<Pack<typename O::T, VEC>*>(static_cast<typename O::T*>(p.out) + at) = o;
    }
  }
}

#ifdef STREAM_TWO_INSTANCE
extern "C" __global__ void __launch_bounds__(kBlock) stream_two(const Params p) {
  stream_rows<STREAM_TWO_INSTANCE>(p);
}
#endif
