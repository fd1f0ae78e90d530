// Registers vLLM's CUDA merge as torch.ops.vllm_peer.merge_attn_states.
//
// vLLM's csrc/attention/merge_attn_states.cu (exported into .peers/vllm by
// benchmarks/peers/fetch_vllm.py) defines the host function merge_attn_states on
// torch's stable ABI; vLLM registers it as torch.ops._C.merge_attn_states among its
// hundreds of other ops. This file, compiled and linked with that .cu alone by
// benchmarks/peers/vllm.py, registers the same function with the same schema under a
// namespace of ours, so that it never meets an installed vLLM's _C library.

#include <cstdint>
#include <optional>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

// Defined in vLLM's merge_attn_states.cu (global namespace, C++ linkage).
void merge_attn_states(torch::stable::Tensor& output,
                       std::optional<torch::stable::Tensor> output_lse,
                       const torch::stable::Tensor& prefix_output,
                       const torch::stable::Tensor& prefix_lse,
                       const torch::stable::Tensor& suffix_output,
                       const torch::stable::Tensor& suffix_lse,
                       std::optional<int64_t> prefill_tokens_with_context,
                       const std::optional<torch::stable::Tensor>& output_scale);

// vLLM's schema (csrc/torch_bindings.cpp): output and output_lse written in place,
// the optional token count and FP8 scale as vLLM passes them.
STABLE_TORCH_LIBRARY(vllm_peer, m) {
  m.def(
      "merge_attn_states(Tensor! output, Tensor!? output_lse, Tensor prefix_output, "
      "Tensor prefix_lse, Tensor suffix_output, Tensor suffix_lse, "
      "int!? prefill_tokens_with_context, Tensor? output_scale=None) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(vllm_peer, CUDA, m) {
  m.impl("merge_attn_states", TORCH_BOX(&merge_attn_states));
}
