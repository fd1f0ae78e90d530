// attnmerge CUDA kernels: merge two partial attention states and store the result through
// an output format's epilogue (epilogues.cuh). The contract they implement:
// docs/contract.md; their layout and tuning: docs/cuda-backend.md.
#pragma once

#include "epilogues.cuh"

namespace attnmerge {

// Kernel parameters, passed by value as one struct. The launcher derives its packing from
// this declaration (attnmerge/cuda/params.py reads the fields below: keep one field
// group per line, pointers and u32 only). What every kernel reads first fits in the first
// 112 bytes, one constant-cache line less to wait for; fields only output-LSE kernels read
// come last. Sizes and strides are 32-bit elements (the launcher checks that they fit;
// offsets are computed in 64 bits).
//
// A row is (outer, inner) = (token, head), row = token * H + head, or, where the launcher
// orders the rows head-major, (head, token): it then passes T as the inner count and
// swaps every tensor's two strides, so the same code walks the rows head by head.
struct MergeParams {
  void* out;
  const void* partial0;
  const float* lse0;
  const void* partial1;
  const float* lse1;
  const void* format_operand;  // OutputFormat.kernel_operand(), null without one
  u32 num_rows;                // < 2^31
  u32 inner_count;
  u32 head_size;
  // Rows from here on have no first partial: P x H, a row count so the test needs no
  // division (head-major: 0 or num_rows).
  u32 rows_with_first;
  u32 inner_multiplier, inner_shift;  // row / inner_count as a multiply and shift
  u32 out_stride_outer, out_stride_inner;
  u32 partial0_stride_outer, partial0_stride_inner;
  u32 partial1_stride_outer, partial1_stride_inner;
  u32 lse0_stride_inner, lse0_stride_outer;
  u32 lse1_stride_inner, lse1_stride_outer;
  float* out_lse;  // read only by kernels that write the output LSE
  u32 out_lse_stride_inner, out_lse_stride_outer;
};
static_assert(sizeof(MergeParams) == 128, "the launcher packs 128 bytes");

// The element offset of (outer o, inner i) in a tensor with strides so, si: 32-bit
// operands, a 64-bit result (a product can pass 2^32).
__host__ __device__ __forceinline__ i64 offset_of(u32 o, u32 so, u32 i, u32 si) {
  return (i64)((u64)o * so + (u64)i * si);
}

// row / n for rows below 2^31, from the launcher's multiplier m = ceil(2^(31 + l) / n) and
// shift l = ceil(log2(n)) (row_divisor in attnmerge/cuda/backend.py): m exceeds
// 2^(31 + l) / n by less than 1, which adds less than row / 2^(31 + l) < 1 / n to row / n,
// never enough to reach the next integer. m fits in 32 bits; the high word of 2 row * m is
// floor(row * m / 2^31). Three instructions instead of the ~25 of an integer division.
__host__ __device__ __forceinline__ u32 outer_of(u32 row, u32 multiplier, u32 shift) {
#ifdef __CUDA_ARCH__
  return __umulhi(row << 1, multiplier) >> shift;
#else
  return (u32)(((unsigned long long)(row << 1) * multiplier) >> 32) >> shift;
#endif
}

#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// The merge state of one row's two partials, with the same results as the Triton kernel
// and the torch reference: +inf means empty; NaN wins the max; an all-empty row gets zero
// weights and LSE -inf; weights correctly rounded (see divide_weight). The output LSE is
// kept as its two terms (max and sum of exponentials; a sum of 0 marks an empty row) and
// finished by row_lse only where it is written.
struct TwoPartialState {
  float weight0, weight1, max, total;
  bool keep0, keep1;  // weight != 0 (or NaN), known before the weights are
};

// Pins a value to where it is computed: the compiler may not sink its computation past a
// later barrier into the branch that uses it (an empty asm that reads and writes it).
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
__device__ __forceinline__ float row_lse(const TwoPartialState& s, bool base_2) {
  return __fadd_rn(s.max, base_2 ? log2f(s.total) : logf(s.total));
}

// 1 / b for b in [1, 2] to within an ulp (the approximate reciprocal and one Newton step),
// for divide_weight.
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
// q = a * y and one remainder correction (Markstein's division, the fast path of the GPU's
// own IEEE division) are correctly rounded: for b > 1, e exceeds 2^-24 (else 1 + e rounds
// to 1), so no quotient or remainder leaves the normal range; for b = 1, y is 1 and q is
// a, exactly, even a subnormal a. __fdiv_rn instead checks its operands and branches to a
// long exact routine for a zero numerator (an empty partial), which a warp waits for.
__device__ __forceinline__ float divide_weight(float a, float b, float y) {
#ifdef __CUDA_ARCH__
  const float q = __fmul_rn(a, y);
  return __fmaf_rn(__fmaf_rn(-b, q, a), y, q);
#else
  (void)y;
  return a / b;
#endif
}

// 1 / b as divide_weight(1, b, y) computes it, one instruction shorter: its quotient 1 * y
// is y exactly.
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
// 1 + e and its reciprocal. The chain from the loaded LSEs to the weights is on a small
// grid's critical path, so it is kept short:
//   - lo - hi is -|l0 - l1| (IEEE subtraction rounds the same either way round), taken
//     from the LSEs as loaded: an empty partial (+inf or -inf) on either side makes it
//     -inf and e = 0, so the exponential does not wait for the empty-row tests. It is NaN
//     for a NaN LSE (as it must be) and for some all-empty rows, whose weights are set to
//     0 below;
//   - which rows are kept (nonzero weight) follows from e: the larger LSE's weight is
//     1 / (1 + e) >= 1/2, the smaller's is zero exactly when e is (divide_weight of a
//     nonzero e is nonzero), and a NaN e keeps both; so the combine can clear a row
//     without waiting for the division.
//
// A row without a first partial (tokens past vLLM's prefill_tokens_with_context) is the
// second partial copied: weight 1 whatever its LSE holds (the kernel stores that LSE as
// the row's: row_lse does not apply).
__device__ __forceinline__ TwoPartialState two_partial_state(float l0, float l1, bool has_first,
                                                             bool base_2) {
  const float inf = __int_as_float(0x7f800000);
  const float gap = -fabsf(__fsub_rn(l0, l1));
  const float e = base_2 ? exp2f(gap) : expf(gap);
  if (l0 == inf) l0 = -inf;
  if (l1 == inf) l1 = -inf;
  const bool first_larger = l0 >= l1;  // either way for NaN: both weights are NaN then
  const bool empty = l0 == -inf && l1 == -inf;
  const float total = __fadd_rn(1.0f, e);
  const float y = weight_reciprocal(total);
  const float w_hi = reciprocal_weight(total, y);
  const float w_lo = divide_weight(e, total, y);
  const bool keep_lo = e != 0.0f;
  TwoPartialState s;
  s.weight0 = empty ? 0.0f : first_larger ? w_hi : w_lo;
  s.weight1 = empty ? 0.0f : first_larger ? w_lo : w_hi;
  s.keep0 = !empty && (first_larger || keep_lo);
  s.keep1 = !empty && (!first_larger || keep_lo);
  s.max = (l0 != l0 || l1 != l1) ? __int_as_float(0x7fffffff) : fmaxf(l0, l1);
  s.total = empty ? 0.0f : total;
  if (!has_first) {
    s.weight0 = 0.0f;
    s.weight1 = 1.0f;
    s.keep0 = false;
    s.keep1 = true;
  }
  return s;
}

// out[i] = w0 * x0[i] + w1 * x1[i], stored through the epilogue. A zero weight contributes
// exactly 0 whatever its row holds (NaN, inf, or nothing read: t >= P has weight 0): its
// row's bits are cleared first (keep0, keep1 false), and 0 * +0 is the reference's +0.
// The inputs arrive in their storage type: a bf16 chunk held across the barrier takes
// half the registers.
template <typename P0, typename P1, int VEC>
__device__ __forceinline__ void combine(float (&acc)[VEC], float w0, bool keep0,
                                        const Chunk<typename P0::storage, VEC>& x0, float w1,
                                        bool keep1, const Chunk<typename P1::storage, VEC>& x1) {
  const Chunk<typename P0::storage, VEC> k0 = x0.kept(keep0);
  const Chunk<typename P1::storage, VEC> k1 = x1.kept(keep1);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    acc[i] = __fadd_rn(__fmul_rn(w0, P0::load(k0.get(i))), __fmul_rn(w1, P1::load(k1.get(i))));
  }
}

template <typename P0, typename P1, typename Store, int VEC, typename Amax>
__device__ __forceinline__ void combine_store(void* out, i64 offset, u32 col, float w0, bool keep0,
                                              const Chunk<typename P0::storage, VEC>& x0,
                                              float w1, bool keep1,
                                              const Chunk<typename P1::storage, VEC>& x1,
                                              const Store& store, Amax& amax) {
  float acc[VEC];
  combine<P0, P1, VEC>(acc, w0, keep0, x0, w1, keep1, x1);
  amax.add(acc);
  store.template store<VEC>(out, offset, col, acc);
}

// The lanes of the calling thread's warp that did not leave merge_two_rows early (kEarlyExit):
// those with a row (rows are a prefix of the block's teams) and a column (a prefix of each
// team's lanes). The caller is one of them.
template <int VEC, int TEAM>
__device__ __forceinline__ u32 lanes_with_rows_and_columns(u32 first_row, u32 num_rows,
                                                           u32 head_size) {
  const u32 warp_first = threadIdx.x / kWarpSize * kWarpSize;
  const u32 chunks = head_size / VEC + (head_size % VEC != 0 ? 1u : 0u);
  auto prefix = [](u32 n) { return n >= (u32)kWarpSize ? ~0u : (1u << n) - 1u; };
  if constexpr (TEAM >= kWarpSize) {
    const u32 offset = warp_first % TEAM;  // of the warp's first lane in its team (one row)
    return prefix(chunks > offset ? chunks - offset : 0u);
  } else {
    constexpr u32 kTeams = kWarpSize / TEAM;
    u32 team_starts = 0;  // a bit at each team's first lane
#pragma unroll
    for (u32 t = 0; t < kTeams; ++t) team_starts |= 1u << (t * TEAM);
    const u32 per_team = prefix(chunks < (u32)TEAM ? chunks : (u32)TEAM);
    const u32 teams = num_rows - (first_row + warp_first / TEAM);  // >= 1: the caller's row
    // per_team < 2^TEAM: the product puts a copy at each team's first lane, no carries.
    return per_team * team_starts & prefix(teams < kTeams ? teams * TEAM : (u32)kWarpSize);
  }
}

// A row's output LSE, which may be the very input LSE (in place): the team's first thread
// writes it after a barrier that follows every read of the team's input LSEs. Only a row's
// own team reads them: teams within one warp need a warp barrier, not the block's. Every
// thread that did not leave early reaches the barrier, with a row or without.
template <int VEC, int TEAM>
__device__ __forceinline__ void store_output_lse(const MergeParams& p, int lane, bool row_ok,
                                                 float* at, float lse) {
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
    if (row_ok) store_words<1>(at, {float_bits(lse)});
  }
}

// A block's teams of TEAM threads take consecutive rows; a team walks its row in chunks of
// VEC elements (only teams of a whole block take further chunks: the launcher sizes any
// narrower team to cover the head size in one pass). What a call does not need is not
// compiled into its kernel (the output LSE, the LSE base, the format: template
// arguments), because code that never runs still costs time in a latency-bound grid.
//
// AMAX: the kernel also reduces max |O| over the values it stores into *amax (AmaxReduction).
template <typename P0, typename P1, typename Store, int VEC, int TEAM, bool WRITE_LSE,
          bool LSE_BASE_2, bool AMAX = false>
__device__ __forceinline__ void merge_two_rows(const MergeParams& p,
                                               const ScaleLayout& scale_layout = ScaleLayout(),
                                               float* amax_out = nullptr) {
  static_assert(kBlockThreads % TEAM == 0, "a block of whole teams");
  constexpr bool kWideRows = TEAM == kBlockThreads;  // head sizes over TEAM * VEC
  constexpr int kTeams = kBlockThreads / TEAM;
  // Row indices are 32-bit: the launcher keeps num_rows below 2^31, so even the rows past
  // the end of the last block fit.
  const u32 first_row = blockIdx.x * kTeams, num_rows = p.num_rows;
  const u32 inner_count = p.inner_count;
  const int team = threadIdx.x / TEAM;
  const int lane = threadIdx.x % TEAM;
  const i64 col0 = (i64)lane * VEC;
  // A thread with no row, or none of whose columns are in the head, leaves at once where
  // no block barrier follows (no output LSE, or one written after a warp barrier over the
  // team's lanes that have columns). A thread past the test has its row and columns, so
  // the compiler issues its loads unconditionally and early.
  constexpr bool kEarlyExit = !WRITE_LSE || TEAM <= kWarpSize;
  if (kEarlyExit && (first_row + team >= num_rows || col0 >= p.head_size)) return;

  // What the math waits for is asked for first: the format's operand, then the LSEs, then
  // the rows, so the weights are computed while the rows are on their way.
  Store store(p.format_operand);
  const u32 row = first_row + team;
  const bool row_ok = row < num_rows;
  const u32 row_or_0 = row_ok ? row : 0;
  const u32 outer = outer_of(row_or_0, p.inner_multiplier, p.inner_shift);
  const u32 inner = row_or_0 - outer * inner_count;
  store.row(scale_layout, outer, inner);
  AmaxReduction<AMAX> amax;
  // The first-partial test is on the row, not on the token, so it does not wait for it.
  const bool has_first = row < p.rows_with_first;
  const i64 out_row = offset_of(outer, p.out_stride_outer, inner, p.out_stride_inner);
  const float inf = __int_as_float(0x7f800000);
  const float l0 = row_ok && has_first
                       ? p.lse0[offset_of(outer, p.lse0_stride_outer, inner, p.lse0_stride_inner)]
                       : -inf;
  const float l1 =
      row_ok ? p.lse1[offset_of(outer, p.lse1_stride_outer, inner, p.lse1_stride_inner)] : -inf;
  Chunk<typename P0::storage, VEC> x0;
  Chunk<typename P1::storage, VEC> x1;
  if (row_ok && col0 < p.head_size) {
    if (has_first) {
      x0 = load_row<P0, VEC>(p.partial0, offset_of(outer, p.partial0_stride_outer, inner,
                                                   p.partial0_stride_inner) +
                                             col0);
    }
    x1 = load_row<P1, VEC>(p.partial1, offset_of(outer, p.partial1_stride_outer, inner,
                                                 p.partial1_stride_inner) +
                                           col0);
  }
  store.ready();
  TwoPartialState state;
  float out_lse;
  float* out_lse_at;
  // Output-LSE kernels with 32-byte chunks (grids past the small-grid tiers) store the
  // output LSE before the combine, while the rows are still on their way; the others
  // after it (docs/cuda-backend.md).
  constexpr int kWidestBytes = sizeof(typename P0::storage) > sizeof(typename P1::storage)
                                   ? sizeof(typename P0::storage)
                                   : sizeof(typename P1::storage);
  constexpr bool kLseFirst = WRITE_LSE && VEC * kWidestBytes >= 32;
  if (kLseFirst) {
    if (row_ok && col0 < p.head_size) {
      state = two_partial_state(l0, l1, has_first, LSE_BASE_2);
      out_lse = has_first ? row_lse(state, LSE_BASE_2) : __fadd_rn(l1, 0.0f);
      out_lse_at =
          p.out_lse + offset_of(outer, p.out_lse_stride_outer, inner, p.out_lse_stride_inner);
    }
    store_output_lse<VEC, TEAM>(p, lane, row_ok, out_lse_at, out_lse);
  }

  // Combine and store; head sizes over TEAM * VEC take further chunks.
  if (row_ok && col0 < p.head_size) {
    if (!kLseFirst) state = two_partial_state(l0, l1, has_first, LSE_BASE_2);
    const float w0 = state.weight0, w1 = state.weight1;
    const bool keep0 = state.keep0, keep1 = state.keep1;
    if (WRITE_LSE && !kLseFirst) {
      // The logarithm and the address now, while the rows are still on their way: left to
      // itself, the compiler computed both after the barrier, in the one lane that stores.
      // Not the address where a column loop follows (scalar accesses, teams of a block),
      // which would hold it in a spilled register (sm_80).
      out_lse = has_first ? row_lse(state, LSE_BASE_2) : __fadd_rn(l1, 0.0f);
      out_lse_at =
          p.out_lse + offset_of(outer, p.out_lse_stride_outer, inner, p.out_lse_stride_inner);
      compute_here(out_lse);
      if (VEC > 1 && !kWideRows) compute_here(out_lse_at);
    }
    combine_store<P0, P1, Store, VEC>(p.out, out_row + col0, (u32)col0, w0, keep0, x0, w1, keep1,
                                      x1, store, amax);
    if (kWideRows) {
      for (i64 col = col0 + TEAM * VEC; col < p.head_size; col += TEAM * VEC) {
        const i64 off0 =
            offset_of(outer, p.partial0_stride_outer, inner, p.partial0_stride_inner) + col;
        const i64 off1 =
            offset_of(outer, p.partial1_stride_outer, inner, p.partial1_stride_inner) + col;
        if (has_first) x0 = load_row<P0, VEC>(p.partial0, off0);
        x1 = load_row<P1, VEC>(p.partial1, off1);
        combine_store<P0, P1, Store, VEC>(p.out, out_row + col, (u32)col, w0, keep0, x0, w1,
                                          keep1, x1, store, amax);
      }
    }
  }
  if (WRITE_LSE && !kLseFirst) store_output_lse<VEC, TEAM>(p, lane, row_ok, out_lse_at, out_lse);
  if (AMAX) {
    // Without the early exit every lane is here (those without a row or column add 0).
    const u32 lanes = kEarlyExit ? lanes_with_rows_and_columns<VEC, TEAM>(first_row, num_rows,
                                                                          p.head_size)
                                 : ~0u;
    amax.commit(amax_out, lanes);
  }
}

// Values of a token a thread of a token-tile kernel keeps in registers between its merge
// and its store (the launcher's TOKEN_TILE_VALUES); a token of more than THREADS times as
// many is merged twice past them, once for its absmax and once for the store.
constexpr int kTokenTileValues = 32;

// The chunks of a token a thread of a token tile holds: chunk c is VEC columns from
// col(c) of row head(c); the thread's i-th is held(i), for i < kTokenTileValues / VEC.
struct TokenChunks {
  u32 first, stride;  // the thread's first chunk, and the block's threads
  u32 per_row, count;  // chunks a row, and the token's
  __device__ __forceinline__ u32 held(int i) const { return first + (u32)i * stride; }
  // held(i), or the token's last chunk where held(i) is past its end
  __device__ __forceinline__ u32 held_or_last(int i) const {
    return held(i) < count ? held(i) : count - 1;
  }
  __device__ __forceinline__ u32 head(u32 c) const { return c / per_row; }
  template <int VEC>
  __device__ __forceinline__ u32 col(u32 c, u32 head) const {
    return (c - head * per_row) * VEC;
  }
};

// A thread's held chunks (TokenChunks) merged one by one (Rows::merge), those past the
// token's end left unmerged.
template <int VEC, int N, typename Rows>
__device__ __forceinline__ void merge_each_chunk(const Rows& rows, const TokenChunks& chunks,
                                                 float (&acc)[N][VEC]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const u32 c = chunks.held(i);
    if (c < chunks.count) {
      const u32 head = chunks.head(c);
      rows.template merge<VEC>(head, chunks.col<VEC>(c, head), acc[i]);
    }
  }
}

// One token of `heads` rows of `head_size` columns, merged by `rows` and stored by a
// whole-token store (Store::kWholeTokens) from a block of THREADS threads (the token-tile
// kernels: block b holds token b). The token's values are chunks of VEC columns of one row,
// chunk c of thread c % THREADS; a thread keeps its first kTokenTileValues / VEC chunks'
// merged values in registers; chunks past THREADS times as many are merged again for the
// store. The held chunks are merged together (Rows::merge_chunks), so that their loads are
// in flight at once. A per-token store (Store::kTokenScale): the block's absmax (one redux
// a warp, shared memory, the block's barrier) gives the token's scale; thread 0 writes it
// and adds the absmax to amax (one atomic a block). A group store (groups that span heads
// unevenly): each chunk is stored as merged, at its column c * VEC of the token, the
// group's lanes reducing its scale; with AMAX the block then reduces the absmax once. With
// WRITE_LSE every row's output LSE is stored after a last block barrier, which follows
// every read of the token's input LSEs (the output LSE may be an input LSE).
//
// Rows: merge_chunks<VEC, N>(chunks, acc) the merged values of a thread's N held chunks
// (TokenChunks; those past the token's end are not counted and may be left unmerged),
// merge<VEC>(head, col, acc) those of one chunk; store_lse(head) a row's output LSE. Every
// thread of the block runs this to its end (the barriers).
template <typename Store, int VEC, int THREADS, bool WRITE_LSE, bool AMAX, typename Rows>
__device__ __forceinline__ void store_token(const Rows& rows, u32 token, u32 heads,
                                            u32 head_size, void* out, u32 out_stride_token,
                                            u32 out_stride_head, Store store,
                                            const typename Store::Layout& layout,
                                            float* amax_out) {
  constexpr int kChunks = kTokenTileValues / VEC > 0 ? kTokenTileValues / VEC : 1;
  constexpr u32 kHeld = (u32)kChunks * THREADS;  // chunks a block holds in registers
  const u32 per_row = head_size / VEC;  // the launcher's VEC divides the head size
  const u32 chunks = heads * per_row;
  if constexpr (Store::kTokenScale) {
    store.load_bound(layout);
  } else {
    store.row(layout, token, 0);  // the token's scales; a chunk's column is the token's
  }
  float held[kChunks][VEC];
  rows.template merge_chunks<VEC, kChunks>(TokenChunks{threadIdx.x, THREADS, per_row, chunks},
                                           held);
  u32 bits = 0;
  if (Store::kTokenScale || AMAX) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      if (threadIdx.x + (u32)i * THREADS < chunks) bits = max_abs_bits<VEC>(bits, held[i]);
    }
  }
  const i64 out_token = (i64)((u64)token * out_stride_token);
  // Chunk c's element offset in the output, and its column within the token (c * VEC).
  auto offset_of_chunk = [&](u32 c) {
    const u32 head = c / per_row;
    return out_token + (i64)((u64)head * out_stride_head) + (c - head * per_row) * VEC;
  };
  if constexpr (Store::kTokenScale) {
    for (u32 c = kHeld + threadIdx.x; c < chunks; c += THREADS) {
      float acc[VEC];
      const u32 head = c / per_row;
      rows.template merge<VEC>(head, (c - head * per_row) * VEC, acc);
      bits = max_abs_bits<VEC>(bits, acc);
    }
    bits = block_max_u32<THREADS>(bits);
    const u32 amax_bits = bits > 0x7f800000u ? 0x7fc00000u : bits;  // NaN made canonical
    if (AMAX && threadIdx.x == 0) atomic_max_u32(amax_out, amax_bits);
    const float scale = store.scale_of(bits_float(amax_bits));
    if (threadIdx.x == 0) store.write_scale(layout, token, scale);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const u32 c = threadIdx.x + (u32)i * THREADS;
      if (c < chunks) store.template store<VEC>(out, offset_of_chunk(c), held[i], scale);
    }
    for (u32 c = kHeld + threadIdx.x; c < chunks; c += THREADS) {
      float acc[VEC];
      const u32 head = c / per_row;
      rows.template merge<VEC>(head, (c - head * per_row) * VEC, acc);
      store.template store<VEC>(out, offset_of_chunk(c), acc, scale);
    }
  } else {
    // Groups: a group's chunks are consecutive (G / VEC lanes), all in the token or none.
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const u32 c = threadIdx.x + (u32)i * THREADS;
      if (c < chunks) store.template store<VEC, THREADS>(out, offset_of_chunk(c), c * VEC, held[i]);
    }
    for (u32 c = kHeld + threadIdx.x; c < chunks; c += THREADS) {
      float acc[VEC];
      const u32 head = c / per_row;
      rows.template merge<VEC>(head, (c - head * per_row) * VEC, acc);
      if (AMAX) bits = max_abs_bits<VEC>(bits, acc);
      store.template store<VEC, THREADS>(out, offset_of_chunk(c), c * VEC, acc);
    }
    if (AMAX) {
      bits = block_max_u32<THREADS>(bits);
      if (threadIdx.x == 0) atomic_max_u32(amax_out, bits > 0x7f800000u ? 0x7fc00000u : bits);
    }
  }
  if (WRITE_LSE) {
    __syncthreads();
    for (u32 head = threadIdx.x; head < heads; head += THREADS) rows.store_lse(head);
  }
}

// The rows of one token of two separate partials, for store_token: the same merge state
// and arithmetic as merge_two_rows, so the same bits.
template <typename P0, typename P1, bool LSE_BASE_2>
struct TwoPartialRows {
  const MergeParams& p;
  u32 token;

  __device__ __forceinline__ TwoPartialState state(u32 head, bool has_first) const {
    const float inf = __int_as_float(0x7f800000);
    const float l0 =
        has_first ? p.lse0[offset_of(token, p.lse0_stride_outer, head, p.lse0_stride_inner)]
                  : -inf;
    const float l1 = p.lse1[offset_of(token, p.lse1_stride_outer, head, p.lse1_stride_inner)];
    return two_partial_state(l0, l1, has_first, LSE_BASE_2);
  }

  // A chunk's inputs: its rows and both LSEs.
  template <int VEC>
  struct Loaded {
    Chunk<typename P0::storage, VEC> x0;
    Chunk<typename P1::storage, VEC> x1;
    float l0, l1;
    bool has_first;
  };

  template <int VEC>
  __device__ __forceinline__ Loaded<VEC> load(u32 head, u32 col) const {
    const float inf = __int_as_float(0x7f800000);
    Loaded<VEC> in;
    in.has_first = token * p.inner_count + head < p.rows_with_first;
    in.x0 = Chunk<typename P0::storage, VEC>();
    in.l0 = -inf;
    if (in.has_first) {
      in.l0 = p.lse0[offset_of(token, p.lse0_stride_outer, head, p.lse0_stride_inner)];
      in.x0 = load_row<P0, VEC>(
          p.partial0,
          offset_of(token, p.partial0_stride_outer, head, p.partial0_stride_inner) + col);
    }
    in.l1 = p.lse1[offset_of(token, p.lse1_stride_outer, head, p.lse1_stride_inner)];
    in.x1 = load_row<P1, VEC>(
        p.partial1, offset_of(token, p.partial1_stride_outer, head, p.partial1_stride_inner) + col);
    return in;
  }

  template <int VEC>
  __device__ __forceinline__ void merge_loaded(const Loaded<VEC>& in, float (&acc)[VEC]) const {
    const TwoPartialState s = two_partial_state(in.l0, in.l1, in.has_first, LSE_BASE_2);
    combine<P0, P1, VEC>(acc, s.weight0, s.keep0, in.x0, s.weight1, s.keep1, in.x1);
  }

  template <int VEC>
  __device__ __forceinline__ void merge(u32 head, u32 col, float (&acc)[VEC]) const {
    merge_loaded<VEC>(load<VEC>(head, col), acc);
  }

  // The inputs of up to 128 bytes of rows (four bf16 chunks, two fp32) are asked for
  // before any of them is combined, the uncounted ones too (left to itself, ptxas loaded
  // each chunk after the previous one's weights: one chunk in flight; predicated loads
  // took more registers); scalar chunks, 32 a thread, one after another.
  template <int VEC, int N>
  __device__ __forceinline__ void merge_chunks(const TokenChunks& chunks,
                                               float (&acc)[N][VEC]) const {
    if constexpr (VEC > 1) {
      constexpr int kPairBytes =
          VEC * (int)(sizeof(typename P0::storage) + sizeof(typename P1::storage));
      constexpr int kTogether = kPairBytes >= 128 ? 1 : 128 / kPairBytes;  // chunks a round
      static_assert(N % kTogether == 0, "whole rounds of chunks");
#pragma unroll
      for (int first = 0; first < N; first += kTogether) {
        Loaded<VEC> in[kTogether];
#pragma unroll
        for (int i = 0; i < kTogether; ++i) {
          const u32 c = chunks.held_or_last(first + i);
          const u32 head = chunks.head(c);
          in[i] = load<VEC>(head, chunks.col<VEC>(c, head));
        }
#pragma unroll
        for (int i = 0; i < kTogether; ++i) merge_loaded<VEC>(in[i], acc[first + i]);
      }
    } else {
      merge_each_chunk<VEC, N>(*this, chunks, acc);
    }
  }

  __device__ __forceinline__ void store_lse(u32 head) const {
    const bool has_first = token * p.inner_count + head < p.rows_with_first;
    const TwoPartialState s = state(head, has_first);
    const float l1 = p.lse1[offset_of(token, p.lse1_stride_outer, head, p.lse1_stride_inner)];
    p.out_lse[offset_of(token, p.out_lse_stride_outer, head, p.out_lse_stride_inner)] =
        has_first ? row_lse(s, LSE_BASE_2) : __fadd_rn(l1, 0.0f);
  }
};

// The token-tile kernel of two separate partials: block b stores token b (store_token) with
// THREADS threads. The launcher orders the rows token-major (inner = head).
template <typename P0, typename P1, typename Store, int VEC, int THREADS, bool WRITE_LSE,
          bool LSE_BASE_2, bool AMAX>
__device__ __forceinline__ void merge_two_tokens(const MergeParams& p,
                                                 const typename Store::Layout& layout,
                                                 float* amax_out) {
  const Store store(p.format_operand);
  const TwoPartialRows<P0, P1, LSE_BASE_2> rows{p, blockIdx.x};
  store_token<Store, VEC, THREADS, WRITE_LSE, AMAX>(rows, blockIdx.x, p.inner_count,
                                                    p.head_size, p.out, p.out_stride_outer,
                                                    p.out_stride_inner, store, layout, amax_out);
}

// The kernel of a store that writes scales or of one that reduces amax: its parameters are
// followed by the scales' layout and the amax output (WithOutputs). A whole-token store
// takes the token-tile kernel, with TEAM threads a block.
template <typename P0, typename P1, typename Store, int VEC, int TEAM, bool WRITE_LSE,
          bool LSE_BASE_2, bool AMAX = false, bool SCALES, bool AMAX_OUT, typename Layout>
__device__ __forceinline__ void merge_two_rows(
    const WithOutputs<MergeParams, SCALES, AMAX_OUT, Layout>& a) {
  static_assert(SCALES == Store::kWritesScales && AMAX_OUT == AMAX, "the instance's parameters");
  float* amax_out = nullptr;
  if constexpr (AMAX_OUT) amax_out = a.amax.amax;
  if constexpr (Store::kWholeTokens) {
    merge_two_tokens<P0, P1, Store, VEC, TEAM, WRITE_LSE, LSE_BASE_2, AMAX>(
        a.params, a.scale_layout, amax_out);
  } else {
    ScaleLayout scale_layout;
    if constexpr (SCALES) scale_layout = a.scale_layout;
    merge_two_rows<P0, P1, Store, VEC, TEAM, WRITE_LSE, LSE_BASE_2, AMAX>(a.params, scale_layout,
                                                                          amax_out);
  }
}

// The parameters of an instance of merge_two_rows: MergeParams, followed by the scales' layout
// where its store writes scales and by the amax output where it reduces amax; its block
// size (TEAM for a whole-token store) and launch bounds' minimum of blocks an SM.
template <typename P0, typename P1, typename Store, int VEC, int TEAM, bool WRITE_LSE,
          bool LSE_BASE_2, bool AMAX = false>
struct MergeInstance {
  typedef KernelArgs<MergeParams, Store::kWritesScales, AMAX, typename Store::Layout> Params;
  static constexpr int kThreads = Store::kWholeTokens ? TEAM : kBlockThreads;
  // A token tile of 2-byte partials in vector accesses: two blocks of 512 threads an SM (64
  // registers), so that one block's loads overlap the other's barrier and stores; else one
  // (ptxas spills at 64, and for sm_100a without a minimum). 0 (none asked for) for the
  // others: the same PTX as no minimum.
  static constexpr bool kTwoTilesAnSm =
      sizeof(typename P0::storage) <= 2 && sizeof(typename P1::storage) <= 2 && VEC > 1;
  static constexpr int kMinBlocks = Store::kWholeTokens ? (kTwoTilesAnSm ? 1024 / TEAM : 1) : 0;
};

// For run-time compilation: one instantiation under a fixed, unmangled name, so the
// launcher finds it without name mangling. The build defines ATTNMERGE_MERGE_INSTANCE
// (the template arguments, KernelConfig.template_arguments in attnmerge/cuda/backend.py).
#ifdef ATTNMERGE_MERGE_INSTANCE
// Constants, not the expressions: __launch_bounds__ is a macro, and the arguments hold commas.
constexpr int kMergeThreads = MergeInstance<ATTNMERGE_MERGE_INSTANCE>::kThreads;
constexpr int kMergeMinBlocks = MergeInstance<ATTNMERGE_MERGE_INSTANCE>::kMinBlocks;
extern "C" __global__ void __launch_bounds__(kMergeThreads, kMergeMinBlocks)
    attnmerge_merge(const MergeInstance<ATTNMERGE_MERGE_INSTANCE>::Params p) {
  merge_two_rows<ATTNMERGE_MERGE_INSTANCE>(p);
}
#endif

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
