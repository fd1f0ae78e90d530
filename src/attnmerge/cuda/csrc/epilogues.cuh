// attnmerge CUDA kernels: the store of each output format (an epilogue).
//
// An epilogue is a functor template over the output element type, chosen by the kernel's
// template arguments (OutputFormat.cuda_epilogue names it):
//   Store(const void* operand)   reads the format's device operand (the launcher passes
//                                OutputFormat.kernel_operand(); null without one), as
//                                early as possible: a kernel constructs it first;
//   ready()                      derives what the store needs from the operand, once the
//                                kernel has asked for its rows;
//   row(strides, outer, inner)   the row (outer, inner) the thread stores, with the
//                                strides of the scales a store writes (ScaleStrides);
//   store<N>(base, offset, col, in)   stores N merged float32 values at element `offset`,
//                                the row's columns col .. col + N - 1;
//   KernelParams<Params>         the kernel's parameters: Params, followed by the
//                                scales' strides for a store that writes scales.
// Chunks of whole 32-bit words go out as vector stores; the scalar fallback's chunks as
// elements or pairs.
#pragma once

#include "common.cuh"

namespace attnmerge {

// The element strides of the scales a store writes (OutputFormat.epilogue_strides()), in
// the kernel's row order: per outer and inner index of a row, and per group of its columns.
struct ScaleStrides {
  u32 scale_stride_outer, scale_stride_inner;
  u32 scale_stride_group;
};

// The parameters of a kernel whose store writes scales: its own, then the scales' strides
// (a separate struct, so the other kernels' parameters keep their size).
template <typename Params>
struct WithScaleStrides {
  Params params;
  ScaleStrides strides;
};

#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// e4m3fn(saturate(in[i] * inv_scale)) for N values at dst, the conversion RNE and
// saturating (NaN kept). Four values make one 32-bit word, converted in pairs.
template <typename E, int N>
__device__ __forceinline__ void store_scaled_fp8(typename E::storage* dst, const float (&in)[N],
                                                 float inv_scale) {
  if constexpr (N % 4 == 0) {
    u32 w[N / 4];
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float* q = in + 4 * i;
      const u32 lo = E::store2(__fmul_rn(q[0], inv_scale), __fmul_rn(q[1], inv_scale));
      const u32 hi = E::store2(__fmul_rn(q[2], inv_scale), __fmul_rn(q[3], inv_scale));
      w[i] = lo | (hi << 16);
    }
    store_words(dst, w);
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      *reinterpret_cast<u16*>(dst + i) =
          E::store2(__fmul_rn(in[i], inv_scale), __fmul_rn(in[i + 1], inv_scale));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = E::store(__fmul_rn(in[i], inv_scale));
  }
}

// Plain float output, rounded to nearest even. Pairs of 2-byte elements are converted by
// one instruction (the same bits).
template <typename E>
struct PlainStore {
  typedef typename E::storage S;
  template <typename Params>
  using KernelParams = Params;
  __device__ __forceinline__ explicit PlainStore(const void*) {}
  __device__ __forceinline__ void ready() {}
  __device__ __forceinline__ void row(const ScaleStrides&, u32, u32) {}

  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, u32,
                                        const float (&in)[N]) const {
    S* dst = static_cast<S*>(base) + offset;
    if constexpr (sizeof(S) * N % 4 == 0) {
      constexpr int kPerWord = 4 / sizeof(S);
      u32 w[N / kPerWord];
#pragma unroll
      for (int i = 0; i < N / kPerWord; ++i) {
        if constexpr (sizeof(S) == 4) {
          w[i] = float_bits(E::store(in[i]));
        } else {
          w[i] = E::store2(in[2 * i], in[2 * i + 1]);
        }
      }
      store_words(dst, w);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) dst[i] = E::store(in[i]);
    }
  }
};

// Static per-tensor FP8: e4m3fn(saturate(x * (1 / scale))), the reciprocal an IEEE
// division in float32 as in vLLM's static quantisation.
template <typename E>
struct FP8StaticStore {
  typedef typename E::storage S;
  static_assert(sizeof(S) == 1, "FP8StaticStore stores 1-byte elements");
  template <typename Params>
  using KernelParams = Params;
  float scale, inv_scale;
  __device__ __forceinline__ explicit FP8StaticStore(const void* operand)
      : scale(*static_cast<const float*>(operand)) {}
  __device__ __forceinline__ void ready() { inv_scale = __fdiv_rn(1.0f, scale); }
  __device__ __forceinline__ void row(const ScaleStrides&, u32, u32) {}

  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, u32,
                                        const float (&in)[N]) const {
    store_scaled_fp8<E, N>(static_cast<S*>(base) + offset, in, inv_scale);
  }
};

// An output element type E stored in groups of GROUP consecutive columns of a row, each
// group with its own scale (UE8M0: a power of two): the element type of FP8GroupStore.
template <typename E, int GROUP, bool UE8M0>
struct Groups : E {
  static constexpr int kGroup = GROUP;
  static constexpr bool kUe8m0 = UE8M0;
};

// Waits for `threads` threads (whole warps) at the block's barrier `id` (1 to 15; 0 is
// __syncthreads'), so that the warps of one group wait only for each other.
__device__ __forceinline__ void sync_warps(int id, int threads) {
#ifdef __CUDA_ARCH__
  asm volatile("barrier.sync %0, %1;" : : "r"(id), "r"(threads) : "memory");
#else
  emulated_barrier_sync(id, threads);  // the tests' emulator
#endif
}

// The maximum of v over the kLanes consecutive lanes of a group (NaN wins), in each of
// them: xor shuffles within a warp; a group of several warps then exchanges each warp's
// maximum through shared memory, behind a barrier over the group's warps only.
template <int kLanes>
__device__ __forceinline__ float group_max(float v) {
  static_assert(kLanes > 1 && (kLanes & (kLanes - 1)) == 0, "a power of two of lanes");
  constexpr int kWarpLanes = kLanes < kWarpSize ? kLanes : kWarpSize;
  const int first_lane = threadIdx.x % kWarpSize / kWarpLanes * kWarpLanes;
  const u32 mask = kWarpLanes == kWarpSize ? ~0u : ((1u << kWarpLanes) - 1u) << first_lane;
#pragma unroll
  for (int m = 1; m < kWarpLanes; m <<= 1) {
    v = max_nan(v, __shfl_xor_sync(mask, v, m, kWarpLanes));
  }
  if constexpr (kLanes > kWarpSize) {
    constexpr int kWarps = kLanes / kWarpSize;
    __shared__ float warp_max[kBlockThreads / kWarpSize];
    const int warp = threadIdx.x / kWarpSize;
    const int first_warp = warp / kWarps * kWarps;
    const int barrier = 1 + threadIdx.x / kLanes;
    if (threadIdx.x % kWarpSize == 0) warp_max[warp] = v;
    sync_warps(barrier, kLanes);
    v = warp_max[first_warp];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = max_nan(v, warp_max[first_warp + w]);
    sync_warps(barrier, kLanes);  // every read before the group's next chunk writes
  }
  return v;
}

// Per-token-group FP8 (FP8PerTokenGroup, groups within a head), E = Groups<FP8E4M3, G,
// UE8M0>: per group of G columns, scale = max(max |x|, eps) / 448 (IEEE division; NaN if
// the group holds one), with UE8M0 rounded up to a power of two; q = e4m3fn(saturate(x *
// (1 / scale))), the reciprocal an IEEE division. The lanes holding a group (G / N
// consecutive lanes of a team) reduce its amax together; its first lane writes the scale
// at scales[outer * stride_outer + inner * stride_inner + group * stride_group]. A group's
// lanes leave early or store together: a row is a whole team, and the launcher's head
// size is a multiple of G (FP8PerTokenGroup.kernel_gap).
template <typename E>
struct FP8GroupStore {
  typedef typename E::storage S;
  static_assert(sizeof(S) == 1, "FP8GroupStore stores 1-byte elements");
  static constexpr int kGroup = E::kGroup;
  template <typename Params>
  using KernelParams = WithScaleStrides<Params>;
  float* scales;  // the format's operand: the scales this store writes
  i64 scale_row;
  u32 scale_stride_group;
  __device__ __forceinline__ explicit FP8GroupStore(const void* operand)
      : scales(static_cast<float*>(const_cast<void*>(operand))) {}
  __device__ __forceinline__ void ready() {}
  __device__ __forceinline__ void row(const ScaleStrides& s, u32 outer, u32 inner) {
    scale_row = (i64)((u64)outer * s.scale_stride_outer + (u64)inner * s.scale_stride_inner);
    scale_stride_group = s.scale_stride_group;
  }

  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, u32 col,
                                        const float (&in)[N]) const {
    static_assert(kGroup % N == 0, "a chunk lies within one group");
    float amax = fabsf(in[0]);
#pragma unroll
    for (int i = 1; i < N; ++i) amax = max_nan(amax, fabsf(in[i]));
    amax = group_max<kGroup / N>(amax);
    const float eps = __int_as_float(0x2edbe6ff);  // 1e-10 in float32 (FP8_GROUP_EPS)
    float scale = __fdiv_rn(max_nan(amax, eps), 448.0f);
    if constexpr (E::kUe8m0) {
      // 2^ceil(log2(max(scale, eps))), exactly: the exponent up by one where the mantissa
      // is not 0 (+inf keeps its bits; NaN stays NaN).
      const u32 bits = float_bits(fmaxf(scale, eps));
      u32 exponent = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
      exponent = exponent < 255u ? exponent : 255u;
      if (scale == scale) scale = bits_float(exponent << 23);
    }
    if (col % kGroup == 0) scales[scale_row + (i64)(col / kGroup) * scale_stride_group] = scale;
    store_scaled_fp8<E, N>(static_cast<S*>(base) + offset, in, __fdiv_rn(1.0f, scale));
  }
};

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
