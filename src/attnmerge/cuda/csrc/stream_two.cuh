// attnmerge CUDA stream kernel: a bench-only yardstick, never a backend.
//
// `attnmerge bench --providers stream-cuda` times it. It reads what the merge reads (both
// partials, both LSEs, the FP8 scale) and writes what the merge writes (the output, in
// the output's dtype), in the CUDA merge kernel's thread layout (teams of TEAM threads
// per row, VEC elements per access, 128-thread blocks, the same chunk rule), but each
// output element is only the partial of the larger LSE, scaled: no exp, division or
// combine. It bounds what the merge kernel's own arithmetic costs at each shape.
// Contiguous [T, H, D] partials and output, [H, T] LSEs, head sizes that are multiples
// of VEC. Compiled after merge_attn_states.cuh, whose element types it uses.
#pragma once

namespace attnmerge {

// The layout is fixed (6 pointers, 3 int64, 4 uint32 = 88 bytes): the launcher packs it
// byte by byte (attnmerge/cuda/stream.py).
struct StreamParams {
  void* out;
  const void* prefix;
  const float* prefix_lse;
  const void* suffix;
  const float* suffix_lse;
  const float* scale;  // FP8 only
  i64 num_rows;
  i64 num_tokens;
  i64 head_size;
  u32 num_heads;
  u32 heads_multiplier, heads_shift;  // see token_of
  u32 unused;
};
static_assert(sizeof(StreamParams) == 88, "StreamParams layout is shared with the launcher");

template <typename P, typename O, int VEC, int TEAM>
__device__ __forceinline__ void stream_two_rows(const StreamParams& p) {
  constexpr int kRows = kMaxDataThreads / TEAM;
  const u32 row = blockIdx.x * kRows + threadIdx.x / TEAM;
  const i64 col = (i64)(threadIdx.x % TEAM) * VEC;
  if (row >= (u32)p.num_rows || col >= p.head_size) return;
  const bool fp8 = sizeof(typename O::storage) == 1;
  const float scale = fp8 ? *p.scale : 1.0f;
  const u32 t = token_of(row, p.heads_multiplier, p.heads_shift);
  const i64 lse_at = (i64)(row - t * p.num_heads) * p.num_tokens + t;
  const float lp = p.prefix_lse[lse_at], ls = p.suffix_lse[lse_at];
  const i64 at = (i64)row * p.head_size + col;
  const Chunk<typename P::storage, VEC> po = load_row<P, VEC>(p.prefix, at);
  const Chunk<typename P::storage, VEC> so = load_row<P, VEC>(p.suffix, at);
  const float inv_scale = fp8 ? __fdiv_rn(1.0f, scale) : 1.0f;
  float x[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = lp > ls ? P::load(po.get(i)) : P::load(so.get(i));
  store_row<O, VEC>(p.out, at, x, inv_scale);
}

#ifdef ATTNMERGE_STREAM_TWO_INSTANCE
extern "C" __global__ void __launch_bounds__(kMaxDataThreads)
    attnmerge_stream_two(const StreamParams p) {
  stream_two_rows<ATTNMERGE_STREAM_TWO_INSTANCE>(p);
}
#endif

}  // namespace attnmerge
