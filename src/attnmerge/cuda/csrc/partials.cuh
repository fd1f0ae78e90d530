// attnmerge CUDA kernels: merge K partial attention states, stacked ([K, T, H, D] with
// [K, H, T] LSEs, any strides) or packed (rows [N, H, D] with [H, N] LSEs, token t taking
// rows indptr[t] <= n < indptr[t + 1]), and store the result through an output format's
// epilogue (a whole-token store through the token tile, merge_partial_tokens). The
// contract: docs/contract.md; the layout: docs/cuda-backend.md.
#pragma once

#include "merge.cuh"

namespace attnmerge {

// Kernel parameters (read by attnmerge/cuda/params.py: one field group per line, pointers
// and u32 only). Rows are (outer, inner) = (token, head), row = token * H + head.
struct PartialsParams {
  void* out;
  const void* partials;
  const float* lses;
  const void* indptr;          // packed rows: int32 or int64 [T + 1]; null when stacked
  const void* format_operand;  // OutputFormat.kernel_operand(), null without one
  float* out_lse;              // null unless the output LSE is written
  u32 num_rows;                // < 2^31
  u32 inner_count;
  u32 head_size;
  u32 num_partials;       // stacked: K; packed: the number of packed rows N
  u32 tokens_with_first;  // stacked: tokens from here on have no first partial
  u32 indptr_bytes;       // 0: stacked; 4 or 8: packed, with an int32 or int64 indptr
  u32 split;              // teams a row (merge_partial_rows): a power of two
  u32 inner_multiplier, inner_shift;  // row / inner_count as a multiply and shift
  u32 out_stride_outer, out_stride_inner;
  u32 partial_stride_k, partial_stride_outer, partial_stride_inner;
  u32 lse_stride_k, lse_stride_outer, lse_stride_inner;
  u32 out_lse_stride_outer, out_lse_stride_inner;
};

#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// Where a row's partials are: partial k's row starts at partials + row_offset + k *
// partial_stride_k, its LSE at lses + lse_offset + k * lse_stride_k; partials k < count
// exist, and the first only where has_first.
struct PartialRows {
  i64 row_offset, lse_offset;
  u32 count;
  bool has_first;
};

__device__ __forceinline__ PartialRows partial_rows(const PartialsParams& p, bool row_ok, u32 outer,
                                                    u32 inner) {
  PartialRows r;
  if (p.indptr_bytes == 0) {
    r.count = row_ok ? p.num_partials : 0;
    r.has_first = outer < p.tokens_with_first;
    r.row_offset = offset_of(outer, p.partial_stride_outer, inner, p.partial_stride_inner);
    r.lse_offset = offset_of(outer, p.lse_stride_outer, inner, p.lse_stride_inner);
    return r;
  }
  // Clamped into [0, N]: no indptr makes the kernel read outside the packed rows.
  i64 start = 0, end = 0;
  if (row_ok) {
    if (p.indptr_bytes == 8) {
      start = static_cast<const i64*>(p.indptr)[outer];
      end = static_cast<const i64*>(p.indptr)[outer + 1];
    } else {
      start = static_cast<const int*>(p.indptr)[outer];
      end = static_cast<const int*>(p.indptr)[outer + 1];
    }
  }
  const i64 n = p.num_partials;
  start = start < 0 ? 0 : start > n ? n : start;
  end = end < start ? start : end > n ? n : end;
  r.count = (u32)(end - start);
  r.has_first = true;
  r.row_offset = start * p.partial_stride_k + (i64)inner * p.partial_stride_inner;
  r.lse_offset = start * p.lse_stride_k + (i64)inner * p.lse_stride_inner;
  return r;
}

// Partial k's LSE, +inf read as -inf (empty), -inf for a partial that does not exist.
__device__ __forceinline__ float partial_lse(const PartialsParams& p, const PartialRows& r, u32 k) {
  const float inf = __int_as_float(0x7f800000);
  if (k >= r.count || (k == 0 && !r.has_first)) return -inf;
  const float l = p.lses[r.lse_offset + (i64)k * p.lse_stride_k];
  return l == inf ? -inf : l;
}

// The row chunks at column col of partials k0 .. k0 + B - 1 (zero bits for those that do not
// exist, the first where the row has none, and for col >= head_size). Every existing
// partial's row is read, whatever its weight: the loads do not wait for the LSEs.
template <typename P, int VEC, int B>
__device__ __forceinline__ void load_batch(Chunk<typename P::storage, VEC> (&batch)[B],
                                           const PartialsParams& p, const PartialRows& r, u32 k0,
                                           u32 col) {
#pragma unroll
  for (int j = 0; j < B; ++j) {
    const u32 k = k0 + j;
    batch[j] = Chunk<typename P::storage, VEC>();
    if (col < p.head_size && k < r.count && (k > 0 || r.has_first)) {
      batch[j] = load_row<P, VEC>(p.partials, r.row_offset + (i64)k * p.partial_stride_k + col);
    }
  }
}

// The LSEs of partials k0 .. k0 + B - 1 (partial_lse: -inf for those that do not exist).
template <int B>
__device__ __forceinline__ void load_lses(float (&l)[B], const PartialsParams& p,
                                          const PartialRows& r, u32 k0) {
#pragma unroll
  for (int j = 0; j < B; ++j) l[j] = partial_lse(p, r, k0 + j);
}

// exp(l - m), or 2^(l - m) in base 2.
template <bool LSE_BASE_2>
__device__ __forceinline__ float exponential(float l, float m) {
  const float gap = __fsub_rn(l, m);
  return LSE_BASE_2 ? exp2f(gap) : expf(gap);
}

// Lanes that compute a row's weights together: a team, or each warp of a wider team (it
// repeats the work of the team's other warps rather than wait for them at a barrier).
template <int TEAM>
struct WeightLanes {
  static constexpr int kCount = TEAM < kWarpSize ? TEAM : kWarpSize;
  int lane;  // this thread's lane among them
  u32 mask;  // the warp's lanes among them
  __device__ __forceinline__ WeightLanes() {
    const int warp_lane = threadIdx.x % kWarpSize;
    lane = warp_lane % kCount;
    mask = kCount == kWarpSize ? ~0u : ((1u << kCount) - 1u) << (warp_lane / kCount * kCount);
  }
  // v of lane `from`
  __device__ __forceinline__ float get(float v, int from) const {
    return __shfl_sync(mask, v, from, kCount);
  }
  // the maximum of v over the lanes, NaN winning
  __device__ __forceinline__ float max_all(float v) const {
#pragma unroll
    for (int offset = kCount / 2; offset > 0; offset /= 2) {
      v = max_nan(v, __shfl_xor_sync(mask, v, offset, kCount));
    }
    return v;
  }
};

// A team of TEAM threads merges one row; its lanes take VEC columns each, further chunks of
// TEAM * VEC columns where the head is wider. The row's weights are C32's formula
// (docs/contract.md), in the order of the reference: the maximum, the exponentials summed
// in order of k, each divided by the sum (IEEE division), so that two partials give the
// bits of merge_two_rows. The weight lanes share the work: lane j computes the exponential
// and weight of partials j, j + W, ... and passes them on by shuffles. The rows are added
// in order of k, in batches of B partials whose rows are loaded together; a thread asks
// for its first batch before it reads the LSEs and for each next one as soon as the last
// is added. (Two batches of eight ahead, every lane computing every weight, took 1.9x the
// time at K = 4, 4096 x 128: docs/perf-log.)
//
// p.split teams share a row where the launcher asks for it (a grid of few rows: more
// loads in flight, docs/cuda-backend.md): team s of the row adds the batches s, s + split,
// ... to the running sum, which passes from team to team through shared memory, so that
// the sum keeps the order of k; the row's first team stores it.
//
// AMAX: the kernel also reduces max |O| over the values it stores into *amax (AmaxReduction).
template <typename P, typename Store, int VEC, int TEAM, bool WRITE_LSE, bool LSE_BASE_2,
          bool AMAX = false>
__device__ __forceinline__ void merge_partial_rows(const PartialsParams& p,
                                                   const ScaleLayout& scale_layout = ScaleLayout(),
                                                   float* amax_out = nullptr) {
  static_assert(kBlockThreads % TEAM == 0, "a block of whole teams");
  typedef WeightLanes<TEAM> Lanes;
  typedef Chunk<typename P::storage, VEC> Rows;
  constexpr int W = Lanes::kCount;
  // Partials in a batch: four (a whole number of them per set of weight lanes).
  constexpr int B = W < 4 ? W : 4;
  const Lanes lanes;
  const u32 split = p.split;  // a power of two, at most kBlockThreads / TEAM
  const u32 team = threadIdx.x / TEAM;
  const u32 part = team % split;  // this team's share of its row
  const u32 row = blockIdx.x * (kBlockThreads / TEAM / split) + team / split;
  const int lane = threadIdx.x % TEAM;
  // A thread without a row stays: it takes part in its team's shuffles and barriers.
  const bool row_ok = row < p.num_rows;
  const u32 row_or_0 = row_ok ? row : 0;
  const u32 outer = outer_of(row_or_0, p.inner_multiplier, p.inner_shift);
  const u32 inner = row_or_0 - outer * p.inner_count;
  Store store(p.format_operand);
  // First, while little else is live: the store's setup may call the IEEE division's slow
  // path, around which live registers would be saved to local memory.
  store.ready();
  store.row(scale_layout, outer, inner);
  AmaxReduction<AMAX> amax;
  const PartialRows rows = partial_rows(p, row_ok, outer, inner);
  const float inf = __int_as_float(0x7f800000);
  // The running sums handed from team to team: one slot per lane of the block's rows.
  __shared__ float handed[kBlockThreads][VEC];
  float(&slot)[VEC] = handed[team / split * TEAM + lane];

  Rows batch[B];
  load_batch<P, VEC, B>(batch, p, rows, part * B, row_ok ? lane * VEC : p.head_size);

  float m = -inf;
  for (u32 base = 0; base < rows.count; base += W) {
    m = max_nan(m, partial_lse(p, rows, base + lanes.lane));
  }
  m = lanes.max_all(m);
  const bool empty = m == -inf;
  if (empty) m = 0.0f;
  // The partials past the count add exp(-inf) = +0, which changes no sum.
  float total = 0.0f;
  for (u32 base = 0; base < rows.count; base += W) {
    const float e = exponential<LSE_BASE_2>(partial_lse(p, rows, base + lanes.lane), m);
    const u32 n = rows.count - base < W ? rows.count - base : W;
    for (u32 i = 0; i < n; ++i) total = __fadd_rn(total, lanes.get(e, i));
  }

  const i64 out_row = offset_of(outer, p.out_stride_outer, inner, p.out_stride_inner);
  for (u32 col_base = 0; col_base < p.head_size; col_base += TEAM * VEC) {
    const u32 col = col_base + lane * VEC;
    const bool col_ok = row_ok && col < p.head_size;
    const u32 load_col = col_ok ? col : p.head_size;  // head_size: nothing is read
    if (col_base > 0) load_batch<P, VEC, B>(batch, p, rows, part * B, load_col);
    // -0 adds nothing (-0 + x is x): the sum is the reference's, term for term.
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = -0.0f;
    // The weight of partial weight_base + lanes.lane (none yet: no set starts at ~0).
    float weight = 0.0f;
    u32 weight_base = ~0u;
    // Adds the batch of partials k0 .. k0 + B - 1 (k0 < count) to acc, then asks for the
    // rows of this team's next batch.
    auto add_batch = [&](u32 k0) {
      const u32 base = k0 / W * W;  // the weight lanes' set that holds the batch
      if (base != weight_base) {
        const float e = exponential<LSE_BASE_2>(partial_lse(p, rows, base + lanes.lane), m);
        weight = empty ? 0.0f : __fdiv_rn(e, total);
        weight_base = base;
      }
#pragma unroll
      for (int j = 0; j < B; ++j) {
        const float w = lanes.get(weight, k0 - base + j);
        if (k0 + j < rows.count) {
          // A zero weight adds exactly 0 whatever its row holds (NaN kept).
          const bool keep = w != 0.0f;
#pragma unroll
          for (int c = 0; c < VEC; ++c) {
            acc[c] = __fadd_rn(acc[c], keep ? __fmul_rn(w, P::load(batch[j].get(c))) : 0.0f);
          }
        }
      }
      const u32 next = k0 + split * B;
      if (next < rows.count) load_batch<P, VEC, B>(batch, p, rows, next, load_col);
    };
    if (split == 1) {
      for (u32 k0 = 0; k0 < rows.count; k0 += B) add_batch(k0);
    } else {
      // A round: the row's teams add one batch each, in order, each behind the block's
      // barrier; rounds go on while a row of the block has batches left.
      for (u32 k0 = part * B; __syncthreads_or(k0 - part * B < rows.count); k0 += split * B) {
        for (u32 turn = 0; turn < split; ++turn) {
          if (turn == part && k0 < rows.count) {
            if (k0 > 0) {
#pragma unroll
              for (int c = 0; c < VEC; ++c) acc[c] = slot[c];
            }
            add_batch(k0);
#pragma unroll
            for (int c = 0; c < VEC; ++c) slot[c] = acc[c];
          }
          __syncthreads();
        }
      }
      // The last batch's team handed the row's sum on (a row without partials: none).
#pragma unroll
      for (int c = 0; c < VEC; ++c) acc[c] = rows.count > 0 ? slot[c] : -0.0f;
      __syncthreads();  // every read of the slots before the next chunk's rounds
    }
    // A row without partials (packed) added nothing: its 0 is +0, as in the reference.
    if (empty) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
    }
    if (col_ok && part == 0) {
      amax.add(acc);
      store.template store<VEC>(p.out, out_row + col, col, acc);
    }
  }
  if (WRITE_LSE) {
    // The output LSE may be the first partial's: every read of the row's LSEs (by all of
    // its teams' lanes) comes before the store.
    if (TEAM > kWarpSize || split > 1) {
      __syncthreads();
    } else {
      __syncwarp(lanes.mask);
    }
    if (lane == 0 && part == 0 && row_ok) {
      const float lse = empty ? -inf : __fadd_rn(m, LSE_BASE_2 ? log2f(total) : logf(total));
      p.out_lse[offset_of(outer, p.out_lse_stride_outer, inner, p.out_lse_stride_inner)] = lse;
    }
  }
  amax.commit(amax_out, ~0u);  // every thread of the block is here
}

// The merge state of one row of K partials, with merge_partial_rows's arithmetic in its
// order (the same bits): the maximum of the LSEs (NaN wins; 0 for an empty row, whose
// weights are 0 and LSE -inf) and the sum of the exponentials in order of k. Its loops stay
// rolled: a token tile inlines one state for each chunk a thread holds. `lse(k)` gives
// partial k's LSE as partial_lse does, for k < count.
template <bool LSE_BASE_2>
struct KPartialState {
  float max, total;
  bool empty;

  KPartialState() = default;
  template <typename Lse>
  __device__ __forceinline__ KPartialState(u32 count, const Lse& lse) {
    const float inf = __int_as_float(0x7f800000);
    float m = -inf;
#pragma unroll 1
    for (u32 k = 0; k < count; ++k) m = max_nan(m, lse(k));
    empty = m == -inf;
    max = empty ? 0.0f : m;
    total = 0.0f;
#pragma unroll 1
    for (u32 k = 0; k < count; ++k) total = __fadd_rn(total, exponential<LSE_BASE_2>(lse(k), max));
  }
  // The weight of a partial with LSE l (partial_lse).
  __device__ __forceinline__ float weight(float l) const {
    return empty ? 0.0f : __fdiv_rn(exponential<LSE_BASE_2>(l, max), total);
  }
  __device__ __forceinline__ float lse() const {
    const float inf = __int_as_float(0x7f800000);
    return empty ? -inf : __fadd_rn(max, LSE_BASE_2 ? log2f(total) : logf(total));
  }
};

// A token tile's LSEs in shared memory: partial k of head h at [h * count + k], as
// partial_lse reads it, where the token's heads times its partials fit (16 KB).
constexpr u32 kTokenLses = 4096;

// The rows of one token of stacked or packed partials, for store_token: the arithmetic of
// merge_partial_rows (KPartialState, the same sum), so the same bits. With the token's LSEs
// staged (`lses`), a thread's held chunks go through the partials together, 128 bytes of
// rows on their way at once, and their weights come from shared memory (not K round trips
// to memory for the LSEs of each chunk). Otherwise (scalar chunks, or more LSEs than
// kTokenLses) each chunk asks for the rows of its first B partials before it reads the
// LSEs, each next B as soon as the last are added.
template <typename P, bool LSE_BASE_2>
struct KPartialRows {
  const PartialsParams& p;
  u32 token;
  const float* lses;  // the token's staged LSEs, or null
  u32 count;          // partials a row of the token has (one count for all its heads)

  __device__ __forceinline__ KPartialState<LSE_BASE_2> state(const PartialRows& r,
                                                             u32 head) const {
    if (lses != nullptr) {
      const float* row = lses + head * count;
      return KPartialState<LSE_BASE_2>(count, [row](u32 k) { return row[k]; });
    }
    return KPartialState<LSE_BASE_2>(r.count, [&](u32 k) { return partial_lse(p, r, k); });
  }

  template <int VEC, int N>
  __device__ __forceinline__ void merge_chunks(const TokenChunks& chunks,
                                               float (&acc)[N][VEC]) const {
    if constexpr (VEC > 1) {
      if (lses != nullptr) return merge_staged<VEC, N>(chunks, acc);
    }
    merge_each_chunk<VEC, N>(*this, chunks, acc);
  }

  // merge_chunks with the token's LSEs staged: the held chunks C at a time (64 bytes of a
  // partial's rows: four bf16 chunks, four of a thread's eight fp32 ones; all eight fp32
  // chunks spilled registers at 512 threads), through the partials B at a time, so that
  // 128 bytes of rows are on their way a thread.
  template <int VEC, int N>
  __device__ __forceinline__ void merge_staged(const TokenChunks& chunks,
                                               float (&acc)[N][VEC]) const {
    constexpr int kChunkBytes = VEC * (int)sizeof(typename P::storage);
    constexpr int C = N * kChunkBytes > 64 ? 64 / kChunkBytes : N;
    static_assert(C >= 1 && N % C == 0, "whole sets of chunks");
#pragma unroll
    for (int first = 0; first < N; first += C) merge_staged_set<VEC, N, C>(chunks, first, acc);
  }

  // Held chunks first .. first + C - 1.
  template <int VEC, int N, int C>
  __device__ __forceinline__ void merge_staged_set(const TokenChunks& chunks, int first,
                                                   float (&acc)[N][VEC]) const {
    constexpr int kRoundBytes = C * VEC * (int)sizeof(typename P::storage);
    constexpr int B = kRoundBytes >= 128 ? 1 : 128 / kRoundBytes;
    // Every held chunk, those past the token's end as its last one (merged, not counted).
    const PartialRows r = partial_rows(p, true, token, 0);
    i64 row[C];
    u32 head[C];
    KPartialState<LSE_BASE_2> s[C];
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const u32 c = chunks.held_or_last(first + i);
      head[i] = chunks.head(c);
      row[i] = r.row_offset + (i64)head[i] * p.partial_stride_inner;
      row[i] += chunks.col<VEC>(c, head[i]);
      s[i] = state(r, head[i]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[first + i][e] = -0.0f;  // -0 + x is x: the sum's
    }
#pragma unroll 1
    for (u32 k0 = 0; k0 < count; k0 += B) {
      Chunk<typename P::storage, VEC> x[B][C];
#pragma unroll
      for (int j = 0; j < B; ++j) {
        const u32 k = k0 + j;
        const bool exists = k < count && (k > 0 || r.has_first);
#pragma unroll
        for (int i = 0; i < C; ++i) {
          x[j][i] = Chunk<typename P::storage, VEC>();
          if (exists) x[j][i] = load_row<P, VEC>(p.partials, row[i] + (i64)k * p.partial_stride_k);
        }
      }
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (k0 + j < count) {
#pragma unroll
          for (int i = 0; i < C; ++i) {
            const float w = s[i].weight(lses[head[i] * count + k0 + j]);
            const bool keep = w != 0.0f;  // a zero weight adds exactly 0 (NaN rows too)
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float term = keep ? __fmul_rn(w, P::load(x[j][i].get(e))) : 0.0f;
              acc[first + i][e] = __fadd_rn(acc[first + i][e], term);
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < C; ++i) {
      if (s[i].empty) {  // a row without partials added nothing: +0, as in the reference
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[first + i][e] = 0.0f;
      }
    }
  }

  template <int VEC>
  __device__ __forceinline__ void merge(u32 head, u32 col, float (&acc)[VEC]) const {
    // Partials whose rows are loaded together: four (eight held all 128 registers a thread
    // of 512 may have); one for scalar chunks, of which a thread inlines 32 (four: 115
    // registers instead of 73, and three times the build time).
    constexpr int B = VEC > 1 ? 4 : 1;
    const PartialRows r = partial_rows(p, true, token, head);
    Chunk<typename P::storage, VEC> batch[B];
    load_batch<P, VEC, B>(batch, p, r, 0, col);
    const KPartialState<LSE_BASE_2> s = state(r, head);
    // -0 adds nothing (-0 + x is x): the sum is the reference's, term for term.
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[c] = -0.0f;
#pragma unroll 1
    for (u32 k0 = 0; k0 < r.count; k0 += B) {
      float l[B];
      load_lses<B>(l, p, r, k0);
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (k0 + j < r.count) {
          const float w = s.weight(l[j]);
          // A zero weight adds exactly 0 whatever its row holds (NaN kept).
          const bool keep = w != 0.0f;
#pragma unroll
          for (int c = 0; c < VEC; ++c) {
            acc[c] = __fadd_rn(acc[c], keep ? __fmul_rn(w, P::load(batch[j].get(c))) : 0.0f);
          }
        }
      }
      if (k0 + B < r.count) load_batch<P, VEC, B>(batch, p, r, k0 + B, col);
    }
    // A row without partials (packed) added nothing: its 0 is +0, as in the reference.
    if (s.empty) {
#pragma unroll
      for (int c = 0; c < VEC; ++c) acc[c] = 0.0f;
    }
  }

  __device__ __forceinline__ void store_lse(u32 head) const {
    const PartialRows r = partial_rows(p, true, token, head);
    p.out_lse[offset_of(token, p.out_lse_stride_outer, head, p.out_lse_stride_inner)] =
        state(r, head).lse();
  }
};

// The token-tile kernel of stacked or packed partials: block b stores token b (store_token)
// with THREADS threads; rows token-major (inner = head), as the launcher passes them.
template <typename P, typename Store, int VEC, int THREADS, bool WRITE_LSE, bool LSE_BASE_2,
          bool AMAX>
__device__ __forceinline__ void merge_partial_tokens(const PartialsParams& p,
                                                     const typename Store::Layout& layout,
                                                     float* amax_out) {
  const Store store(p.format_operand);
  const u32 token = blockIdx.x, heads = p.inner_count;
  // Stage the token's LSEs (all its rows have one count of partials), one load a thread,
  // where they fit; the barrier also orders these reads before any output LSE is written.
  __shared__ float staged[kTokenLses];
  const u32 count = partial_rows(p, true, token, 0).count;
  const bool stage = VEC > 1 && (u64)heads * count <= kTokenLses;
  if (stage) {
    for (u32 i = threadIdx.x; i < heads * count; i += THREADS) {
      const u32 head = i / count;
      staged[i] = partial_lse(p, partial_rows(p, true, token, head), i - head * count);
    }
    __syncthreads();
  }
  const KPartialRows<P, LSE_BASE_2> rows{p, token, stage ? staged : nullptr, count};
  store_token<Store, VEC, THREADS, WRITE_LSE, AMAX>(rows, token, p.inner_count,
                                                    p.head_size, p.out, p.out_stride_outer,
                                                    p.out_stride_inner, store, layout, amax_out);
}

// The kernel of a store that writes scales or of one that reduces amax: its parameters are
// followed by the scales' layout and the amax output (WithOutputs). A whole-token store
// takes the token-tile kernel, with TEAM threads a block.
template <typename P, typename Store, int VEC, int TEAM, bool WRITE_LSE, bool LSE_BASE_2,
          bool AMAX = false, bool SCALES, bool AMAX_OUT, typename Layout>
__device__ __forceinline__ void merge_partial_rows(
    const WithOutputs<PartialsParams, SCALES, AMAX_OUT, Layout>& a) {
  static_assert(SCALES == Store::kWritesScales && AMAX_OUT == AMAX, "the instance's parameters");
  if constexpr (Store::kWholeTokens) {
    float* amax_out = nullptr;
    if constexpr (AMAX_OUT) amax_out = a.amax.amax;
    merge_partial_tokens<P, Store, VEC, TEAM, WRITE_LSE, LSE_BASE_2, AMAX>(
        a.params, a.scale_layout, amax_out);
  } else {
    ScaleLayout scale_layout;
    float* amax_out = nullptr;
    if constexpr (SCALES) scale_layout = a.scale_layout;
    if constexpr (AMAX_OUT) amax_out = a.amax.amax;
    merge_partial_rows<P, Store, VEC, TEAM, WRITE_LSE, LSE_BASE_2, AMAX>(a.params, scale_layout,
                                                                         amax_out);
  }
}

// The parameters of an instance of merge_partial_rows: PartialsParams, followed by the scales'
// layout where its store writes scales and by the amax output where it reduces amax; its
// block size (TEAM for a whole-token store) and launch bounds' minimum of blocks an SM.
template <typename P, typename Store, int VEC, int TEAM, bool WRITE_LSE, bool LSE_BASE_2,
          bool AMAX = false>
struct PartialsInstance {
  typedef KernelArgs<PartialsParams, Store::kWritesScales, AMAX, typename Store::Layout> Params;
  static constexpr int kThreads = Store::kWholeTokens ? TEAM : kBlockThreads;
  // At least one block per SM, no more asked for: without it, ptxas for sm_100a keeps some
  // configurations at 64 registers and spills a few bytes.
  static constexpr int kMinBlocks = 1;
};

#ifdef ATTNMERGE_PARTIALS_INSTANCE
// Constants, not the expressions: __launch_bounds__ is a macro, and the arguments hold commas.
constexpr int kPartialsThreads = PartialsInstance<ATTNMERGE_PARTIALS_INSTANCE>::kThreads;
constexpr int kPartialsMinBlocks = PartialsInstance<ATTNMERGE_PARTIALS_INSTANCE>::kMinBlocks;
extern "C" __global__ void __launch_bounds__(kPartialsThreads, kPartialsMinBlocks)
    attnmerge_merge_partials(const PartialsInstance<ATTNMERGE_PARTIALS_INSTANCE>::Params p) {
  merge_partial_rows<ATTNMERGE_PARTIALS_INSTANCE>(p);
}
#endif

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
