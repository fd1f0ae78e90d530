// attnmerge CUDA kernels: what every kernel shares. Element types (how a value of each
// storage type becomes float and back), aligned row chunks, vector stores.
//
// Framework-free and header-free: no torch, no CUDA runtime or fp16/bf16/fp8 headers
// (conversions are PTX or plain integer code), so the same source compiles with NVRTC at
// run time and with nvcc ahead of time, and its scalar helpers compile for the host too
// (tests run them on a CPU).
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

// Device code. Besides nvcc and NVRTC, a host build with ATTNMERGE_HOST_EMULATION (the
// tests' emulator, which supplies threadIdx, blockIdx, __syncthreads and the intrinsics)
// compiles it too, so its logic is tested on machines without a GPU.
#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// A block is kBlockThreads threads in teams of TEAM; a team merges one row.
constexpr int kBlockThreads = 128;
constexpr int kWarpSize = 32;

// The maximum of a and b where a NaN in either wins: the same for any order of operands.
__device__ __forceinline__ float max_nan(float a, float b) {
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
}

// The largest of two u32.
__device__ __forceinline__ u32 max_u32(u32 a, u32 b) { return a > b ? a : b; }

// The float32 bits of |x| at most, over v and in: |x|'s bits order like |x|, and a NaN's
// above +inf's, so an integer maximum is max |x| with a NaN winning (some NaN's bits).
template <int N>
__device__ __forceinline__ u32 max_abs_bits(u32 v, const float (&in)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) v = max_u32(v, float_bits(in[i]) & 0x7fffffffu);
  return v;
}

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
// Held as 32-bit words and taken apart where they are consumed: split into 16-bit values
// at the load, each needs a byte permute that makes the thread wait for that load before
// it issues the next one.
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

// Stores whole 32-bit words as 16-, 8- and 4-byte vector stores, written in PTX: left to
// the compiler, stores of converted words were not always vectorised.
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

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
