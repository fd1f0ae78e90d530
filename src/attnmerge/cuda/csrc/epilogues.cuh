// attnmerge CUDA kernels: the store of each output format (an epilogue).
//
// An epilogue is a functor template over the output element type, chosen by the kernel's
// template arguments (OutputFormat.cuda_epilogue names it):
//   Store(const void* operand)   reads the format's device operand (the launcher passes
//                                OutputFormat.kernel_operand(); null without one), as
//                                early as possible: a kernel constructs it first;
//   ready()                      derives what the store needs from the operand, once the
//                                kernel has asked for its rows;
//   store<N>(base, offset, in)   stores N merged float32 values at element `offset`.
// Chunks of whole 32-bit words go out as vector stores; the scalar fallback's chunks as
// elements or pairs.
#pragma once

#include "common.cuh"

namespace attnmerge {

#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// Plain float output, rounded to nearest even. Pairs of 2-byte elements are converted by
// one instruction (the same bits).
template <typename E>
struct PlainStore {
  typedef typename E::storage S;
  __device__ __forceinline__ explicit PlainStore(const void*) {}
  __device__ __forceinline__ void ready() {}

  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, const float (&in)[N]) const {
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
// division in float32 as in vLLM's static quantisation, the conversion RNE and saturating
// (NaN kept). Four values make one 32-bit word, converted in pairs.
template <typename E>
struct FP8StaticStore {
  typedef typename E::storage S;
  static_assert(sizeof(S) == 1, "FP8StaticStore stores 1-byte elements");
  float scale, inv_scale;
  __device__ __forceinline__ explicit FP8StaticStore(const void* operand)
      : scale(*static_cast<const float*>(operand)) {}
  __device__ __forceinline__ void ready() { inv_scale = __fdiv_rn(1.0f, scale); }

  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, const float (&in)[N]) const {
    S* dst = static_cast<S*>(base) + offset;
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
};

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
