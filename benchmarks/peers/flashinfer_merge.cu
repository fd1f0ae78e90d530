// A C interface to FlashInfer's K-way merge kernels, for the benchmarks (benchmarks/kway.py).
//
// FlashInfer's headers are not part of this repository: benchmarks/peers/fetch_flashinfer.py
// exports them into .peers/flashinfer/include and benchmarks/peers/flashinfer.py builds this
// file against them with nvcc into a shared library loaded with ctypes. The functions below
// instantiate FlashInfer's host-side launchers from include/flashinfer/attention/cascade.cuh:
//
//   MergeStates<DTypeIn, DTypeO>(v, s, v_merged, s_merged, num_index_sets, seq_len,
//                                num_heads, head_dim, stream)
//       v [seq_len, num_index_sets, num_heads, head_dim], s [seq_len, num_index_sets,
//       num_heads] float32 base-2 LSEs, v_merged [seq_len, num_heads, head_dim], s_merged
//       [seq_len, num_heads] or null; all dense (the kernels index with the shape alone).
//   VariableLengthMergeStates<DTypeIn, DTypeO, IdType>(v, s, indptr, v_merged, s_merged,
//       max_seq_len, seq_len_ptr, num_heads, head_dim, enable_pdl, stream)
//       v [nnz, num_heads, head_dim], s [nnz, num_heads], indptr [seq_len + 1]; position t
//       merges rows indptr[t] .. indptr[t + 1] - 1 (a persistent kernel).
//
// Input and output dtype are the same (bf16 or fp16), as in FlashInfer's own
// flashinfer.merge_states. Each function takes the tensors' sizes and element strides,
// checks that the strides are the dense ones the kernels assume, launches on `stream` and
// returns 0, a cudaError_t, or -1 for a refused argument or a C++ exception;
// fi_last_error() gives the message of the last failure on the calling thread.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <exception>

#include <flashinfer/attention/cascade.cuh>

namespace {

thread_local char g_error[512] = "";

int refuse(const char* what) {
  std::snprintf(g_error, sizeof(g_error), "%s", what);
  return -1;
}

int status(cudaError_t e, const char* launcher) {
  if (e == cudaSuccess) return 0;
  std::snprintf(g_error, sizeof(g_error), "%s: %s (%d)", launcher, cudaGetErrorString(e),
                static_cast<int>(e));
  return static_cast<int>(e);
}

// Row-major dense strides for `sizes` (dimensions of size 1 may have any stride).
bool dense(int ndim, const int64_t* sizes, const int64_t* strides) {
  int64_t expect = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (sizes[i] != 1 && strides[i] != expect) return false;
    expect *= sizes[i];
  }
  return true;
}

bool fits_u32(int64_t x) { return x >= 0 && x <= static_cast<int64_t>(UINT32_MAX); }

enum Dtype : int { kBF16 = 0, kFP16 = 1 };

template <typename T>
int merge_states(const void* v, const float* s, void* v_merged, float* s_merged, uint32_t k,
                 uint32_t t, uint32_t h, uint32_t d, cudaStream_t stream) {
  cudaError_t e = flashinfer::MergeStates<T, T>(
      const_cast<T*>(static_cast<const T*>(v)), const_cast<float*>(s), static_cast<T*>(v_merged),
      s_merged, k, t, h, d, stream);
  return status(e, "MergeStates");
}

template <typename T, typename I>
int variable_length(const void* v, const float* s, const void* indptr, void* v_merged,
                    float* s_merged, uint32_t t, uint32_t h, uint32_t d, cudaStream_t stream) {
  cudaError_t e = flashinfer::VariableLengthMergeStates<T, T, I>(
      const_cast<T*>(static_cast<const T*>(v)), const_cast<float*>(s),
      const_cast<I*>(static_cast<const I*>(indptr)), static_cast<T*>(v_merged), s_merged,
      /*max_seq_len=*/t, /*seq_len=*/nullptr, h, d, /*enable_pdl=*/false, stream);
  return status(e, "VariableLengthMergeStates");
}

}  // namespace

extern "C" {

const char* fi_last_error(void) { return g_error; }

// v [t, k, h, d] (v_strides[4]), s [t, k, h] (s_strides[3]), v_merged [t, h, d]
// (o_strides[3]), s_merged [t, h] (so_strides[2]) or null.
int fi_merge_states(int dtype, const void* v, const int64_t* v_strides, const float* s,
                    const int64_t* s_strides, void* v_merged, const int64_t* o_strides,
                    float* s_merged, const int64_t* so_strides, int64_t t, int64_t k, int64_t h,
                    int64_t d, cudaStream_t stream) {
  try {
    const int64_t v_sizes[4] = {t, k, h, d}, s_sizes[3] = {t, k, h};
    const int64_t o_sizes[3] = {t, h, d}, so_sizes[2] = {t, h};
    if (!fits_u32(t) || !fits_u32(k) || !fits_u32(h) || !fits_u32(d) || k < 1)
      return refuse("fi_merge_states: sizes out of range (k >= 1, all below 2^32)");
    if (!dense(4, v_sizes, v_strides) || !dense(3, s_sizes, s_strides) ||
        !dense(3, o_sizes, o_strides) || (s_merged && !dense(2, so_sizes, so_strides)))
      return refuse("fi_merge_states: FlashInfer's kernels take dense (contiguous) tensors");
    if (t == 0 || h == 0) return 0;
    switch (dtype) {
      case kBF16:
        return merge_states<__nv_bfloat16>(v, s, v_merged, s_merged, k, t, h, d, stream);
      case kFP16:
        return merge_states<__half>(v, s, v_merged, s_merged, k, t, h, d, stream);
      default:
        return refuse("fi_merge_states: dtype must be 0 (bf16) or 1 (fp16)");
    }
  } catch (const std::exception& e) {  // FlashInfer throws for a head_dim it does not dispatch
    return refuse(e.what());
  }
}

// v [nnz, h, d] (v_strides[3]), s [nnz, h] (s_strides[2]), indptr [t + 1] of int32
// (index_bits 32) or int64 (64), v_merged [t, h, d] (o_strides[3]), s_merged [t, h] or null.
int fi_variable_length_merge_states(int dtype, int index_bits, const void* v,
                                    const int64_t* v_strides, const float* s,
                                    const int64_t* s_strides, const void* indptr,
                                    void* v_merged, const int64_t* o_strides, float* s_merged,
                                    const int64_t* so_strides, int64_t nnz, int64_t t, int64_t h,
                                    int64_t d, cudaStream_t stream) {
  try {
    const int64_t v_sizes[3] = {nnz, h, d}, s_sizes[2] = {nnz, h};
    const int64_t o_sizes[3] = {t, h, d}, so_sizes[2] = {t, h};
    if (!fits_u32(nnz) || !fits_u32(t) || !fits_u32(h) || !fits_u32(d))
      return refuse("fi_variable_length_merge_states: sizes out of range (below 2^32)");
    if (!dense(3, v_sizes, v_strides) || !dense(2, s_sizes, s_strides) ||
        !dense(3, o_sizes, o_strides) || (s_merged && !dense(2, so_sizes, so_strides)))
      return refuse(
          "fi_variable_length_merge_states: FlashInfer's kernels take dense (contiguous) "
          "tensors");
    if (t == 0 || h == 0) return 0;
    const uint32_t t32 = t, h32 = h, d32 = d;
    if (index_bits != 32 && index_bits != 64)
      return refuse("fi_variable_length_merge_states: index_bits must be 32 or 64");
    switch (dtype) {
      case kBF16:
        return index_bits == 32 ? variable_length<__nv_bfloat16, int32_t>(
                                      v, s, indptr, v_merged, s_merged, t32, h32, d32, stream)
                                : variable_length<__nv_bfloat16, int64_t>(
                                      v, s, indptr, v_merged, s_merged, t32, h32, d32, stream);
      case kFP16:
        return index_bits == 32 ? variable_length<__half, int32_t>(v, s, indptr, v_merged,
                                                                  s_merged, t32, h32, d32, stream)
                                : variable_length<__half, int64_t>(v, s, indptr, v_merged,
                                                                  s_merged, t32, h32, d32, stream);
      default:
        return refuse("fi_variable_length_merge_states: dtype must be 0 (bf16) or 1 (fp16)");
    }
  } catch (const std::exception& e) {
    return refuse(e.what());
  }
}

}  // extern "C"
