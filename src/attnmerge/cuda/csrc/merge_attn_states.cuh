// attnmerge CUDA kernels: merge two partial attention states, optionally storing FP8.
//
// Framework-free and header-free: raw pointers, sizes and strides in one parameter
// struct, no torch, no CUDA runtime or fp16/bf16/fp8 headers (conversions are PTX or
// plain integer code). The same source therefore compiles with NVRTC at run time and
// with nvcc ahead of time, and its scalar helpers compile for the host too (tests run
// them on a CPU). Semantics: see DESIGN.md, "Math and the semantics contract".
#pragma once

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif

namespace attnmerge {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Kernel parameters, passed by value as one struct. The layout is fixed (6 pointers,
// 16 uint32, then the output LSE's pointer and 2 uint32 = 128 bytes) because the Python
// launcher packs it byte by byte; keep it in sync with _PARAMS in
// attnmerge/cuda/backend.py.
//
// Its size is a latency cost. A kernel reads its parameters through the SM's constant
// cache, and every further cache line its critical path reads is one more miss to wait
// for: on an H200 the stream yardstick (csrc/stream_two.cuh) took 0.03 to 0.08 us longer
// per launch (1 x 4 to 64 x 128 rows) with the fields it reads first moved from below
// parameter byte 112 (constant offset 0x280 on sm_90) to just past it, and the same code
// with this struct's former 200-byte layout was 0.06 to 0.17 us slower than with the
// stream kernel's 88 bytes. So what every instance reads fits in the first 112 bytes:
// sizes and strides are 32-bit (in elements; the launcher checks that they fit and
// offsets are still computed in 64 bits), and the fields only output-LSE instances read
// come last.
struct MergeParams {
  void* out;
  const void* prefix;
  const float* prefix_lse;
  const void* suffix;
  const float* suffix_lse;
  const float* scale;  // FP8 dequantisation scale (1 element); unused otherwise
  u32 num_rows;        // tokens * heads, < 2^31
  // The rows' inner count: H (row = t * H + h), or T where the launcher orders the rows
  // head-major (head_major_rows in attnmerge/cuda/backend.py: it then swaps every
  // tensor's token and head strides, so "t" and "h" below are the head and the token).
  u32 num_heads;
  u32 head_size;
  // P x H: rows from here on (tokens t >= P) have no prefix. A row count, not P, so
  // that the test needs no division (see merge_two_rows). Head-major: 0 or num_rows.
  u32 rows_with_prefix;
  // row / num_heads as a multiply and shift (see token_of)
  u32 heads_multiplier;
  u32 heads_shift;
  u32 out_stride_t, out_stride_h;
  u32 prefix_stride_t, prefix_stride_h;
  u32 suffix_stride_t, suffix_stride_h;
  u32 prefix_lse_stride_h, prefix_lse_stride_t;
  u32 suffix_lse_stride_h, suffix_lse_stride_t;
  // read by instances that write the output LSE (WRITE_LSE) only
  float* out_lse;
  u32 out_lse_stride_h, out_lse_stride_t;
};
static_assert(sizeof(MergeParams) == 128, "MergeParams layout is shared with the launcher");

// The element offset of (token t, head h) in a tensor with strides st, sh: 32-bit
// operands, a 64-bit result (a product can pass 2^32).
__host__ __device__ __forceinline__ i64 offset_of(u32 t, u32 st, u32 h, u32 sh) {
  return (i64)((u64)t * st + (u64)h * sh);
}

// The token of a row (row / num_heads) for rows below 2^31, from the launcher's
// multiplier m = ceil(2^(31 + l) / num_heads) and shift l = ceil(log2(num_heads))
// (row_divisor in attnmerge/cuda/backend.py): floor(row * m / 2^(31 + l)) is the
// quotient, because m exceeds 2^(31 + l) / num_heads by less than 1, which adds less
// than row / 2^(31 + l) < 1 / num_heads to row / num_heads: never enough to reach the
// next integer. m fits in 32 bits; the high word of 2 row * m is floor(row * m / 2^31).
// The GPU's integer division takes ~25 dependent instructions before a thread can form
// its first address; this takes three, and no predicate (with four rows per team, one
// more predicate per row made a variant spill).
__host__ __device__ __forceinline__ u32 token_of(u32 row, u32 multiplier, u32 shift) {
#ifdef __CUDA_ARCH__
  return __umulhi(row << 1, multiplier) >> shift;
#else
  return (u32)(((unsigned long long)(row << 1) * multiplier) >> 32) >> shift;
#endif
}

__host__ __device__ __forceinline__ u32 float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  u32 u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}

__host__ __device__ __forceinline__ float bits_float(u32 u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
#endif
}

// A 32-bit word as a storage type: float keeps the bits, narrower types truncate.
template <typename S>
__host__ __device__ __forceinline__ S bits_as(u32 u) {
  return (S)u;
}
template <>
__host__ __device__ __forceinline__ float bits_as<float>(u32 u) {
  return bits_float(u);
}

__host__ __device__ __forceinline__ float round_half_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return __builtin_rintf(x);  // default rounding mode: to nearest, ties to even
#endif
}

// float32 -> float8 e4m3fn, round to nearest even, saturating to +-448; NaN -> 0x7F.
// The same bits as the GPU's cvt.rn.satfinite.e4m3x2.f32 (used on sm_89+); this integer
// version serves older GPUs and is tested on the host against torch's cast.
__host__ __device__ __forceinline__ u8 float_to_e4m3_satfinite(float x) {
  const u32 bits = float_bits(x);
  const u8 sign = (u8)((bits >> 24) & 0x80u);
  const u32 mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0x7f;           // NaN
  if (mag >= 0x43e00000u) return sign | 0x7e;   // >= 448 (and inf): saturate
  if (mag < 0x3c800000u) {                      // below 2^-6: e4m3 subnormal (or zero)
    // Multiples of 2^-9; scaling by 2^9 is exact, so rounding the product is RNE.
    return sign | (u8)round_half_even(bits_float(mag) * 512.0f);
  }
  // Normal: keep 3 of 23 mantissa bits, round half to even on the 20 dropped ones; a
  // carry out of the mantissa bumps the exponent, which is the right result.
  const u32 rounded = (mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20;
  return sign | (u8)(rounded - (120u << 3));  // rebias the exponent from 127 to 7
}

// The kernels. Besides nvcc and NVRTC, a host build with ATTNMERGE_HOST_EMULATION (the
// tests' emulator, which supplies threadIdx, blockIdx, __syncthreads and the intrinsics)
// compiles them too, so their logic is tested on machines without a GPU.
#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// A block is THREADS threads that move row data (a template argument, at most
// kMaxDataThreads), plus (WEIGHTS == kWeightWarp) one warp that computes the rows'
// weights (see merge_two_rows).
constexpr int kMaxDataThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWeightThreads = kWarpSize;
constexpr int kMaxThreadsPerBlock = kMaxDataThreads + kWeightThreads;

// Where a row's weights are computed: by every thread of the row's team (the launcher's
// default, the way a Triton program works), or by a separate warp of the block, shared
// through shared memory (a tuning variant). The launcher picks the mode, the chunk size
// and the rows per team from measurements (attnmerge/cuda/backend.py).
constexpr int kWeightWarp = 0;
constexpr int kWeightPerThread = 1;

// ---------------------------------------------------------------------------
// Element types: how a value of each storage type becomes float and back.

struct F32 {
  typedef float storage;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

struct F16 {
  typedef u16 storage;
  static __device__ __forceinline__ float load(u16 v) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    _Float16 h;
    __builtin_memcpy(&h, &v, 2);
    return (float)h;
#endif
  }
  static __device__ __forceinline__ u16 store(float v) {
#ifdef __CUDA_ARCH__
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    const _Float16 h = (_Float16)v;  // round to nearest even
    u16 bits;
    __builtin_memcpy(&bits, &h, 2);
    return bits;
#endif
  }
  // Two values in one instruction (lo in the low half, as stored in memory).
  static __device__ __forceinline__ u32 store2(float lo, float hi) {
#ifdef __CUDA_ARCH__
    u32 pair;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
    return pair;
#else
    return (u32)store(lo) | ((u32)store(hi) << 16);
#endif
  }
};

struct BF16 {
  typedef u16 storage;
  static __device__ __forceinline__ float load(u16 v) { return __uint_as_float((u32)v << 16); }
  static __device__ __forceinline__ u16 store(float v) {
#ifdef __CUDA_ARCH__
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    const u32 bits = float_bits(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)((bits >> 16) | 0x40u);  // quiet NaN
    return (u16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
#endif
  }
  static __device__ __forceinline__ u32 store2(float lo, float hi) {
#ifdef __CUDA_ARCH__
    u32 pair;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
    return pair;
#else
    return (u32)store(lo) | ((u32)store(hi) << 16);
#endif
  }
};

struct FP8E4M3 {
  typedef u8 storage;
  static __device__ __forceinline__ u8 store(float v) { return (u8)(store2(v, 0.0f) & 0xffu); }
  // Two values in one instruction on sm_89+ (lo in the low byte, as stored in memory).
  static __device__ __forceinline__ u16 store2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    u16 pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(hi), "f"(lo));
    return pair;
#else
    return (u16)(float_to_e4m3_satfinite(lo) | (float_to_e4m3_satfinite(hi) << 8));
#endif
  }
};

// N elements of T moved as aligned vector accesses (at most 16 bytes each: the launcher
// guarantees min(16, N * sizeof(T))-byte alignment of every row chunk).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

// N elements of storage type S as loaded from memory, kept in registers until used.
// Held as 32-bit words, not as N separate 16-bit values: split into halves, every
// element needs a byte permute right after the load, which makes the thread wait for
// that load before it can issue the next one (seen in the sm_90a SASS: a thread's
// loads went out one after another). Elements are extracted where they are consumed.
template <typename S, int N, bool kWords = (sizeof(S) * N) % 4 == 0>
struct Chunk {  // whole 32-bit words
  static constexpr int kWordsPerChunk = sizeof(S) * N / 4;
  struct alignas(sizeof(S) * N < 16 ? sizeof(S) * N : 16) Words {
    u32 w[kWordsPerChunk];
  };
  Words words;
  __device__ __forceinline__ void load(const S* p) { words = *reinterpret_cast<const Words*>(p); }
  __device__ __forceinline__ S get(int i) const {
    if (sizeof(S) == 4) return bits_as<S>(words.w[i]);
    return bits_as<S>(words.w[i / 2] >> (16 * (i % 2)));  // 2-byte elements, little-endian
  }
  // This chunk, or all zero bits (+0 in every element type) unless keep: one select
  // per word instead of one per element.
  __device__ __forceinline__ Chunk kept(bool keep) const {
    const u32 mask = keep ? ~0u : 0u;
    Chunk c;
#pragma unroll
    for (int i = 0; i < kWordsPerChunk; ++i) c.words.w[i] = words.w[i] & mask;
    return c;
  }
};

template <typename S, int N>
struct Chunk<S, N, false> {  // scalar 2-byte elements
  Vec<S, N> vec;
  __device__ __forceinline__ void load(const S* p) { vec = *reinterpret_cast<const Vec<S, N>*>(p); }
  __device__ __forceinline__ S get(int i) const { return vec.v[i]; }
  __device__ __forceinline__ Chunk kept(bool keep) const {
    Chunk c;
#pragma unroll
    for (int i = 0; i < N; ++i) c.vec.v[i] = keep ? vec.v[i] : (S)0;
    return c;
  }
};

template <typename E, int N>
__device__ __forceinline__ Chunk<typename E::storage, N> load_row(const void* base, i64 offset) {
  typedef typename E::storage S;
  Chunk<S, N> c;
  c.load(static_cast<const S*>(base) + offset);
  return c;
}

// Stores whole 32-bit words as 16-, 8- and 4-byte vector stores, written in PTX: left
// to the compiler, a store of converted words was not always vectorised (a bf16 -> bf16
// instance wrote its 32-byte chunk as one 16-byte store and seven 2- to 8-byte ones, an
// fp16 one its 16 bytes as four 4-byte stores, in the sm_90a code).
template <int kWords>
__device__ __forceinline__ void store_words(void* dst, const u32 (&w)[kWords]) {
#ifdef __CUDA_ARCH__
  const u64 p = (u64)dst;
#pragma unroll
  for (int i = 0; i + 4 <= kWords; i += 4) {
    asm volatile(
        "{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.v4.b32 [g], {%1, %2, %3, %4}; }"
        :
        : "l"(p + 4 * i), "r"(w[i]), "r"(w[i + 1]), "r"(w[i + 2]), "r"(w[i + 3])
        : "memory");
  }
  constexpr int i = kWords / 4 * 4;
  if constexpr (kWords - i >= 2) {
    asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.v2.b32 [g], {%1, %2}; }"
                 :
                 : "l"(p + 4 * i), "r"(w[i]), "r"(w[i + 1])
                 : "memory");
  }
  if constexpr ((kWords - i) % 2 == 1) {
    constexpr int last = kWords - 1;
    asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.b32 [g], %1; }"
                 :
                 : "l"(p + 4 * last), "r"(w[last])
                 : "memory");
  }
#else
  __builtin_memcpy(dst, w, sizeof(w));
#endif
}

// The 32-bit word of output elements that in[0], in[1], ... become (FP8: times inv_scale
// first). 1- and 2-byte elements are converted in pairs, one instruction per pair (half
// the conversions, the same bits).
template <typename E>
__device__ __forceinline__ u32 output_word(const float* in, float inv_scale) {
  typedef typename E::storage S;
  if constexpr (sizeof(S) == 4) {
    return float_bits(E::store(in[0]));
  } else if constexpr (sizeof(S) == 2) {
    return E::store2(in[0], in[1]);
  } else {
    const u32 lo = E::store2(__fmul_rn(in[0], inv_scale), __fmul_rn(in[1], inv_scale));
    const u32 hi = E::store2(__fmul_rn(in[2], inv_scale), __fmul_rn(in[3], inv_scale));
    return lo | (hi << 16);
  }
}

// Stores N output elements (FP8: times inv_scale first) at element offset `offset`.
// Chunks of whole 32-bit words go out as vector stores (store_words); the scalar
// fallback's chunks (one 2-byte element, one or two FP8 ones) as elements or a pair.
template <typename E, int N>
__device__ __forceinline__ void store_row(void* base, i64 offset, const float (&in)[N],
                                          float inv_scale) {
  typedef typename E::storage S;
  S* dst = static_cast<S*>(base) + offset;
  if constexpr (sizeof(S) * N % 4 == 0) {
    constexpr int kPerWord = 4 / sizeof(S);
    u32 w[N / kPerWord];
#pragma unroll
    for (int i = 0; i < N / kPerWord; ++i) w[i] = output_word<E>(in + i * kPerWord, inv_scale);
    store_words(dst, w);
  } else if constexpr (sizeof(S) == 1 && N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      *reinterpret_cast<u16*>(dst + i) =
          E::store2(__fmul_rn(in[i], inv_scale), __fmul_rn(in[i + 1], inv_scale));
    }
  } else {
    const bool fp8 = sizeof(S) == 1;
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = E::store(fp8 ? __fmul_rn(in[i], inv_scale) : in[i]);
  }
}

// The weights of one (token, head) row. Identical results to the Triton kernel and the
// torch reference: +inf means empty; NaN wins the max; all-empty rows get zero weights
// and LSE -inf; correctly rounded division (see divide_weight).
// The output LSE is left as its two terms (the max and the sum of exponentials; a sum of
// 0 marks an empty row) and finished by row_lse only where it is written: without an
// output LSE the logarithm would cost every thread its instructions for nothing.
struct RowWeights {
  float prefix, suffix, max, total;
  bool keep_prefix, keep_suffix;  // weight != 0 (or NaN), known before the weights are
};

// Pins a value to where it is computed: the compiler may not sink its computation past
// a later barrier into the branch that uses it (an empty asm that reads and writes it).
__device__ __forceinline__ void compute_here(float& v) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+f"(v));
#endif
}
__device__ __forceinline__ void compute_here(float*& v) {
#ifdef __CUDA_ARCH__
  u64 a = (u64)v;
  asm volatile("" : "+l"(a));
  v = (float*)a;
#endif
}

// An empty row has max -inf and total 0, whose logarithm is -inf: its LSE is -inf with no
// test, so the logarithm is not behind a branch (a NaN row has a NaN max and total).
__device__ __forceinline__ float row_lse(const RowWeights& w, bool base_2) {
  return __fadd_rn(w.max, base_2 ? log2f(w.total) : logf(w.total));
}

// 1 / b for b in [1, 2] to within an ulp (the approximate reciprocal and one Newton
// step), for divide_weight.
__device__ __forceinline__ float weight_reciprocal(float b) {
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(b));
  return __fmaf_rn(__fmaf_rn(-b, y, 1.0f), y, y);
#else
  return 1.0f / b;
#endif
}

// a / b rounded to nearest even, as __fdiv_rn, given y = weight_reciprocal(b), on the
// operands of a row's weights: b = 1 + e is the sum of the two exponentials, the larger
// being exactly 1, and a is 1 or e, with e in [0, 1] (or NaN). There, one quotient
// q = a * y and one remainder correction (Markstein's division, the fast path of the
// GPU's own IEEE division) are correctly rounded: for b > 1, e exceeds 2^-24 (else 1 + e
// rounds to 1), so no quotient or remainder leaves the normal range; for b = 1, y is 1
// and q is a, exactly, even a subnormal a. __fdiv_rn instead checks its operands
// (FCHK) and branches to a long exact routine where that check fails, as it does for a
// zero numerator (an empty partial): a warp with one such row waits for it. On an H200
// (5% of the LSEs +inf, FP8 out) this took bf16 1 x 128 from 1.81 to 1.70 us and
// 256 x 128 from 5.13 to 4.89 us (scripts/weight_math_cost.py, docs/performance.md).
__device__ __forceinline__ float divide_weight(float a, float b, float y) {
#ifdef __CUDA_ARCH__
  const float q = __fmul_rn(a, y);
  return __fmaf_rn(__fmaf_rn(-b, q, a), y, q);
#else
  (void)y;
  return a / b;
#endif
}

// 1 / b as divide_weight(1, b, y) computes it, one instruction shorter: its quotient
// 1 * y is y exactly.
__device__ __forceinline__ float reciprocal_weight(float b, float y) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(__fmaf_rn(-b, y, 1.0f), y, y);
#else
  (void)y;
  return 1.0f / b;
#endif
}

// One exponential per row: the larger LSE's is exp(0) = 1, exactly, so the reference's
// two exponentials are 1 and e = exp(lo - hi), and both weights share the denominator
// 1 + e and its reciprocal. With token_of and the early scale and LSE reads, this took
// bf16 -> FP8 on an H200 from 1.70 to 1.58 us at 1 x 128 and from 4.88 to 4.21 at
// 256 x 128 (same run; docs/performance.md).
//
// The weights are on a small grid's critical path (the rows arrive while they are
// computed), so the chain from the loaded LSEs to them is kept short:
//   - lo - hi is -|lp - ls| (IEEE subtraction rounds the same either way round), taken
//     from the LSEs as loaded: an empty partial (+inf or -inf) on either side makes it
//     -inf and e = 0, so the exponential does not wait for the empty-row tests. It is
//     NaN for a NaN LSE (as it must be) and for some all-empty rows, whose weights are
//     set to 0 below;
//   - which rows are kept (nonzero weight) follows from e: the larger LSE's weight is
//     1 / (1 + e) >= 1/2, the smaller's is zero exactly when e is (divide_weight of a
//     nonzero e is nonzero), and a NaN e keeps both; so the combine can clear a row
//     without waiting for the division.
// On an H200 (bf16 -> FP8, D = 128, 16-byte chunks, two runs of
// scripts/weight_math_cost.py --compare) this took 1 x 4 from 1.40 to 1.35 us, 1 x 128
// from 1.48 to 1.44 and 64 x 128 from 2.43 to 2.33; with 32-byte chunks 256 x 128 went
// from 4.17 to 4.25. Folding the clearing into taking bf16 words apart (a byte permute
// per value) saved nothing measurable on top.
__device__ __forceinline__ RowWeights row_weights(float lp, float ls, bool base_2) {
  const float inf = __int_as_float(0x7f800000);
  const float gap = -fabsf(__fsub_rn(lp, ls));
  const float e = base_2 ? exp2f(gap) : expf(gap);
  if (lp == inf) lp = -inf;
  if (ls == inf) ls = -inf;
  const bool prefix_larger = lp >= ls;  // either way for NaN: both weights are NaN then
  const bool empty = lp == -inf && ls == -inf;
  const float total = __fadd_rn(1.0f, e);
  const float y = weight_reciprocal(total);
  const float w_hi = reciprocal_weight(total, y);
  const float w_lo = divide_weight(e, total, y);
  const bool keep_lo = e != 0.0f;
  RowWeights w;
  w.prefix = empty ? 0.0f : prefix_larger ? w_hi : w_lo;
  w.suffix = empty ? 0.0f : prefix_larger ? w_lo : w_hi;
  w.keep_prefix = !empty && (prefix_larger || keep_lo);
  w.keep_suffix = !empty && (!prefix_larger || keep_lo);
  w.max = (lp != lp || ls != ls) ? __int_as_float(0x7fffffff) : fmaxf(lp, ls);
  w.total = empty ? 0.0f : total;
  return w;
}

// out[i] = wp * po[i] + ws * so[i], stored as O (FP8: times inv_scale first). A zero
// weight contributes exactly 0 whatever its row holds (NaN, inf, or nothing read: an
// absent prefix row, t >= P, has weight 0): its row's bits are cleared first (keep_p,
// keep_s false: see RowWeights), and 0 * +0 is the reference's +0. The inputs arrive in
// their storage type: held that way across the barrier, a bf16 row chunk takes 4
// registers, not 8.
template <typename P, typename S, typename O, int VEC>
__device__ __forceinline__ void combine_store(void* out, i64 offset, float wp, bool keep_p,
                                              const Chunk<typename P::storage, VEC>& po, float ws,
                                              bool keep_s,
                                              const Chunk<typename S::storage, VEC>& so,
                                              float inv_scale) {
  const Chunk<typename P::storage, VEC> pk = po.kept(keep_p);
  const Chunk<typename S::storage, VEC> sk = so.kept(keep_s);
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    acc[i] = __fadd_rn(__fmul_rn(wp, P::load(pk.get(i))), __fmul_rn(ws, S::load(sk.get(i))));
  }
  store_row<O, VEC>(out, offset, acc, inv_scale);
}

// A team's output LSEs, which may be the very input LSEs (in place): the team's first
// thread writes its rows' after a barrier that follows every read of the team's input
// LSEs. Only a row's own team reads them: teams within one warp need a warp barrier, not
// the block's (over the block's threads only, where a block is less than a warp).
template <int VEC, int TEAM, int ROWS>
__device__ __forceinline__ void store_output_lses(const MergeParams& p, int lane,
                                                  const bool (&row_ok)[ROWS],
                                                  float* const (&at)[ROWS],
                                                  const float (&lse)[ROWS]) {
  if (TEAM <= kWarpSize) {
    // the team's lanes with columns in the head; the others have left (kEarlyExit)
    const i64 chunks = ((i64)p.head_size + VEC - 1) / VEC;
    const int lanes = chunks < TEAM ? (int)chunks : TEAM;
    const u32 mask = lanes >= kWarpSize ? ~0u : (1u << lanes) - 1u;
    __syncwarp(mask << (threadIdx.x % kWarpSize / TEAM * TEAM));
  } else {
    __syncthreads();
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (row_ok[r]) store_words<1>(at[r], {float_bits(lse[r])});
    }
  }
}

// A block's THREADS data threads form THREADS / TEAM teams; a team of TEAM threads owns
// ROWS rows and walks them in chunks of VEC elements. The rows of a block are
// consecutive and interleaved over teams (row r of team k is block row r * teams + k),
// so each of the ROWS passes reads one contiguous stretch of memory.
//
// The merge is memory-bound only if enough bytes are in flight per SM, and that is
// bounded by registers. Computing a row's weights (two exponentials, three IEEE
// divisions, a logarithm) in every thread that moves its data made the kernel
// instruction- and register-bound: bf16 4096x128 took 140 us on an H200, against
// 79 us for the Triton kernel; doing it once per row while the data threads waited
// still kept the math's registers live next to the loaded data (135 us). With
// WEIGHTS == kWeightWarp the roles are split between warps, whose registers never
// overlap (84 us at 4 rows per team):
//   - the data threads issue the loads of their rows' first chunk, wait at the block
//     barrier, then combine with the weights from shared memory and store;
//   - the weight warp reads each block row's LSEs, computes its weights into shared
//     memory and writes its output LSE, then arrives at the barrier.
// A row's input LSEs are read and its output LSE written by the same thread, so
// output_lse may alias prefix_lse or suffix_lse.
// The two roles reach the block barrier from different places in the code; that is
// one barrier (bar.sync 0, which counts arriving threads, whatever their program
// counter: sm_70 and later, as in warp-specialised attention kernels), reached once by
// every thread of the block.
//
// WEIGHTS == kWeightPerThread: no weight warp; every thread loads its rows' LSEs with
// their data and computes the weights itself. A row's output LSE is written by its
// team's first thread after a barrier (the warp's, or the block's for teams wider than
// a warp) that follows every read of the team's input LSEs (store_output_lses), before
// the combine or after it (kLseFirst in merge_two_rows).
// The 140 us above predate holding loaded chunks as 32-bit words (see Chunk), when a
// thread's loads went out one after another. Since then, with 32-byte chunks and one
// row per team, this mode is the fastest on an H200: bf16 4096x128 in 78.8 us, the
// Triton kernel's time (the launcher's default).
//
// What a call does not need is not compiled into its instance, because code that never
// runs still cost time in a latency-bound grid: whether the output LSE is written is a
// template argument (WRITE_LSE), and only teams of kMaxDataThreads get the loop over
// further column chunks (the launcher sizes any narrower team to cover the head size in
// one pass). With both as run-time tests, the sm_90a code of the bf16 -> FP8 instance
// for small grids was 504 instructions, not 304, and a thread's exit sat 114 of them
// past its store, behind the loop and LSE code it skipped. On an H200 (D = 128, same
// run, scripts/weight_math_cost.py --compare) this took 1 x 128 from 1.53 to 1.48 us,
// 16 x 128 from 1.81 to 1.75, and (32-byte chunks) 256 x 128 from 4.29 to 4.16. A
// single kernel with one body per case, picked by a uniform branch, was slower.
// The LSE base is a template argument too (BASE_2): as a run-time flag its two
// exponentials sat behind a branch in every thread's weight chain, which cost 0.01 to
// 0.04 us (H200, scripts/merge_cost.py, 1 x 4 to 64 x 128: 1.28 -> 1.26, 1.36 -> 1.32,
// 1.62 -> 1.58 and 2.24 -> 2.23 us).
template <typename P, typename S, typename O, int VEC, int TEAM, int ROWS, int WEIGHTS,
          int THREADS, bool WRITE_LSE, bool BASE_2>
__device__ __forceinline__ void merge_two_rows(const MergeParams& p) {
  static_assert(WEIGHTS == kWeightWarp || WEIGHTS == kWeightPerThread, "weights mode");
  static_assert(THREADS % TEAM == 0 && THREADS <= kMaxDataThreads, "block of whole teams");
  constexpr bool kWarp = WEIGHTS == kWeightWarp;
  constexpr bool kWideRows = TEAM == kMaxDataThreads;  // head sizes over TEAM * VEC
  constexpr int kTeams = THREADS / TEAM;
  constexpr int kBlockRows = kTeams * ROWS;
  __shared__ float weight_prefix[kWarp ? kBlockRows : 1], weight_suffix[kWarp ? kBlockRows : 1];
  // Row indices are 32-bit: the launcher keeps num_rows below 2^31, so even the rows past
  // the end of the last block fit (and one compare per row, not two, checks them).
  const u32 first_row = blockIdx.x * kBlockRows, num_rows = p.num_rows;
  const u32 heads = p.num_heads;
  const bool base_2 = BASE_2;
  const bool fp8 = sizeof(typename O::storage) == 1;

  if (kWarp && threadIdx.x >= THREADS) {  // the weight warp
    for (int i = threadIdx.x - THREADS; i < kBlockRows; i += kWeightThreads) {
      const u32 r32 = first_row + i;
      if (r32 >= num_rows) break;
      const u32 t = token_of(r32, p.heads_multiplier, p.heads_shift), h = r32 - t * heads;
      const float inf = __int_as_float(0x7f800000);
      const float lp =
          r32 < p.rows_with_prefix
              ? p.prefix_lse[offset_of(t, p.prefix_lse_stride_t, h, p.prefix_lse_stride_h)]
              : -inf;
      const float ls = p.suffix_lse[offset_of(t, p.suffix_lse_stride_t, h, p.suffix_lse_stride_h)];
      const RowWeights w = row_weights(lp, ls, base_2);
      weight_prefix[i] = w.prefix;
      weight_suffix[i] = w.suffix;
      if (WRITE_LSE) {
        p.out_lse[offset_of(t, p.out_lse_stride_t, h, p.out_lse_stride_h)] = row_lse(w, base_2);
      }
    }
    __syncthreads();
    return;
  }

  // Data threads: the first chunk of each of this thread's rows (and, weights per
  // thread, the rows' LSEs). What the math waits for is asked for first: the FP8 scale,
  // then the LSEs, then the rows, so that the reciprocal and the weights are computed
  // while the rows are still on their way.
  const int team = threadIdx.x / TEAM;
  const int lane = threadIdx.x % TEAM;
  const i64 col0 = (i64)lane * VEC;
  // A thread with no row, or none of whose columns are in the head, leaves at once where
  // no block barrier follows: weights per thread, and no output LSE or one written after
  // a barrier of the row's team within one warp, over the team's lanes that have
  // columns (a whole team leaves when its first row does not exist, so every lane of that
  // barrier's mask reaches it). Its rows come in increasing order, so a thread past the
  // test has its first row and columns, and the compiler issues that row's loads
  // unconditionally and early, not behind a branch on a per-row predicate. With the prefix test on the row (rows_with_prefix, not t < P,
  // which waits for the token), this took bf16 -> FP8 on an H200 from 1.30 to 1.24 us at
  // 1 x 64, 1.31 to 1.25 at 1 x 128, 1.59 to 1.50 at 16 x 128 and 2.30 to 2.09 at
  // 64 x 128 (scripts/merge_cost.py, means of 6 rounds in one run).
  constexpr bool kEarlyExit = !kWarp && (!WRITE_LSE || TEAM <= kWarpSize);
  if (kEarlyExit && (first_row + team >= num_rows || col0 >= p.head_size)) return;
  const float scale = fp8 ? *p.scale : 1.0f;
  bool row_ok[ROWS], has_prefix[ROWS];
  u32 tok32[ROWS], head32[ROWS];
  i64 o_row[ROWS];
  float lp[ROWS], ls[ROWS];
  Chunk<typename P::storage, VEC> po[ROWS];
  Chunk<typename S::storage, VEC> so[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const u32 row = first_row + r * kTeams + team;
    row_ok[r] = row < num_rows;
    const u32 row_or_0 = row_ok[r] ? row : 0;
    const u32 t = token_of(row_or_0, p.heads_multiplier, p.heads_shift);
    const u32 h = row_or_0 - t * heads;
    tok32[r] = t;
    head32[r] = h;
    has_prefix[r] = row < p.rows_with_prefix;
    o_row[r] = offset_of(t, p.out_stride_t, h, p.out_stride_h);
    if (!kWarp) {
      const float inf = __int_as_float(0x7f800000);
      lp[r] = row_ok[r] && has_prefix[r]
                  ? p.prefix_lse[offset_of(t, p.prefix_lse_stride_t, h, p.prefix_lse_stride_h)]
                  : -inf;
      ls[r] = row_ok[r]
                  ? p.suffix_lse[offset_of(t, p.suffix_lse_stride_t, h, p.suffix_lse_stride_h)]
                  : -inf;
    }
    if (row_ok[r] && col0 < p.head_size) {
      if (has_prefix[r]) {
        po[r] = load_row<P, VEC>(p.prefix,
                                 offset_of(t, p.prefix_stride_t, h, p.prefix_stride_h) + col0);
      }
      so[r] =
          load_row<S, VEC>(p.suffix, offset_of(t, p.suffix_stride_t, h, p.suffix_stride_h) + col0);
    }
  }
  const float inv_scale = fp8 ? __fdiv_rn(1.0f, scale) : 1.0f;
  RowWeights weights[ROWS];  // weights per thread
  float out_lse[ROWS];       // and each row's output LSE, with where it goes
  float* out_lse_at[ROWS];
  if (kWarp) __syncthreads();
  // Output-LSE instances with 32-byte chunks, which the launcher gives grids past the
  // small-grid tiers (chunk_bytes_for), weigh every row and store the output LSEs before
  // the combine, while the rows are still on their way; the others store them after it
  // (their weights and LSEs are computed in the combine loop: written out there again,
  // not shared, so that the sm_90a code of those instances stays what was measured). On
  // an H200 (-> FP8, D = 128, scripts/lse_cost.py, one run, bit-identical outputs) the
  // LSE first took bf16 64 x 128 from 2.34 to 2.22 us, 256 x 64 from 3.00 to 2.84, fp32
  // 64 x 64 from 2.15 to 2.05 and 256 x 64 from 3.76 to 3.56 (32-byte chunks), but
  // bf16 1 x 4 from 1.31 to 1.35 and fp32 16 x 16 from 1.36 to 1.40 (16-byte chunks).
  constexpr int kWidestBytes = sizeof(typename P::storage) > sizeof(typename S::storage)
                                   ? sizeof(typename P::storage)
                                   : sizeof(typename S::storage);
  constexpr bool kLseFirst = !kWarp && WRITE_LSE && VEC * kWidestBytes >= 32;
  if (kLseFirst) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (!row_ok[r] || col0 >= p.head_size) continue;
      weights[r] = row_weights(lp[r], ls[r], base_2);
      out_lse[r] = row_lse(weights[r], base_2);
      out_lse_at[r] =
          p.out_lse + offset_of(tok32[r], p.out_lse_stride_t, head32[r], p.out_lse_stride_h);
    }
    store_output_lses<VEC, TEAM, ROWS>(p, lane, row_ok, out_lse_at, out_lse);
  }

  // Combine and store; head sizes over TEAM * VEC take further chunks.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (!row_ok[r] || col0 >= p.head_size) continue;
    float wp, ws;
    bool keep_p, keep_s;
    if (kWarp) {
      wp = weight_prefix[r * kTeams + team];
      ws = weight_suffix[r * kTeams + team];
      keep_p = wp != 0.0f;
      keep_s = ws != 0.0f;
    } else {
      if (!kLseFirst) weights[r] = row_weights(lp[r], ls[r], base_2);
      wp = weights[r].prefix;  // lane 0 (col0 = 0) always gets here for a valid row
      ws = weights[r].suffix;
      keep_p = weights[r].keep_prefix;
      keep_s = weights[r].keep_suffix;
      if (WRITE_LSE && !kLseFirst) {
        // The logarithm and the address now, while the rows are still on their way: left
        // to itself, the compiler computed both after the team barrier, in the one lane
        // that stores them, so that the LSE store waited for the logarithm's ~25
        // dependent instructions and for parameters in a further constant-cache line.
        out_lse[r] = row_lse(weights[r], base_2);
        out_lse_at[r] =
            p.out_lse + offset_of(tok32[r], p.out_lse_stride_t, head32[r], p.out_lse_stride_h);
        compute_here(out_lse[r]);
        compute_here(out_lse_at[r]);
      }
    }
    combine_store<P, S, O, VEC>(p.out, o_row[r] + col0, wp, keep_p, po[r], ws, keep_s, so[r],
                                inv_scale);
    if (!kWideRows) continue;
    for (i64 col = col0 + TEAM * VEC; col < p.head_size; col += TEAM * VEC) {
      const u32 t = tok32[r], h = head32[r];
      const i64 p_off = offset_of(t, p.prefix_stride_t, h, p.prefix_stride_h) + col;
      const i64 s_off = offset_of(t, p.suffix_stride_t, h, p.suffix_stride_h) + col;
      if (has_prefix[r]) po[r] = load_row<P, VEC>(p.prefix, p_off);
      so[r] = load_row<S, VEC>(p.suffix, s_off);
      combine_store<P, S, O, VEC>(p.out, o_row[r] + col, wp, keep_p, po[r], ws, keep_s, so[r],
                                  inv_scale);
    }
  }
  if (!kWarp && WRITE_LSE && !kLseFirst) {
    store_output_lses<VEC, TEAM, ROWS>(p, lane, row_ok, out_lse_at, out_lse);
  }
}

// Threads per block of an instance: the data threads, plus the weight warp if any.
template <typename P, typename S, typename O, int VEC, int TEAM, int ROWS, int WEIGHTS,
          int THREADS, bool WRITE_LSE, bool BASE_2>
__host__ __device__ constexpr int block_threads() {
  return WEIGHTS == kWeightWarp ? THREADS + kWeightThreads : THREADS;
}

template <typename P, typename S, typename O, int VEC, int TEAM, int ROWS, int WEIGHTS,
          int THREADS, bool WRITE_LSE, bool BASE_2>
__global__ void __launch_bounds__(kMaxThreadsPerBlock) merge_two_kernel(const MergeParams p) {
  merge_two_rows<P, S, O, VEC, TEAM, ROWS, WEIGHTS, THREADS, WRITE_LSE, BASE_2>(p);
}

// For run-time compilation: one instantiation under a fixed, unmangled name, so the
// launcher finds it without name mangling. Defined by the build before including this.
#ifdef ATTNMERGE_MERGE_TWO_INSTANCE
extern "C" __global__ void __launch_bounds__(kMaxThreadsPerBlock)
    attnmerge_merge_two(const MergeParams p) {
  merge_two_rows<ATTNMERGE_MERGE_TWO_INSTANCE>(p);
}
#endif

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
