// attnmerge CUDA kernels: the store of each output format (an epilogue), and the amax
// output every format may have.
//
// An epilogue is a functor template over the output element type, chosen by the kernel's
// template arguments (OutputFormat.cuda_epilogue names it):
//   Store(const void* operand)   reads the format's device operand (the launcher passes
//                                OutputFormat.kernel_operand(); null without one), as
//                                early as possible: a kernel constructs it first;
//   ready()                      derives what the store needs from the operand, once the
//                                kernel has asked for its rows;
//   row(layout, outer, inner)    the row (outer, inner) the thread stores, with where the
//                                store's scales go (ScaleLayout);
//   store<N>(base, offset, col, in)   stores N merged float32 values at element `offset`,
//                                the row's columns col .. col + N - 1;
//   kWritesScales                whether the kernel's parameters carry a scale layout;
//   Layout                       which one (ScaleLayout, or TokenScaleLayout);
//   kWholeTokens                 whether a block stores whole tokens (the token-tile
//                                kernels, store_token in merge.cuh) rather than rows;
//   kTokenScale                  (token tiles) whether the store scales a token by the
//                                absmax of all its values, which the block reduces first.
// Chunks of whole 32-bit words go out as vector stores; the scalar fallback's chunks as
// elements or pairs.
#pragma once

#include "common.cuh"

namespace attnmerge {

// Where a group store writes its scales (the launcher's _scale_layout), in the kernel's row
// order. A row's token starts at outer * scale_stride_outer + inner * scale_stride_inner
// (float32 elements; bytes for packed UE8M0 scales), its first column within the token's
// H * D values is outer * first_col_outer + inner * first_col_inner (head * D), column c of
// the token is in group c / G, and group g of a token is g * scale_stride_group further
// (packed: column g / 4, in bytes, then byte g % 4).
// The last three fields serve packed scales only: the bytes of a column past group G - 1
// are written 0, and so are the padding tokens after token T - 1 (at last_token_offset) in
// every column but the last.
struct ScaleLayout {
  u32 scale_stride_outer, scale_stride_inner;
  u32 first_col_outer, first_col_inner;
  u32 scale_stride_group;
  u32 num_groups;
  u32 last_token_offset, padding_tokens;
};

// Where a per-token store (FP8TokenStore) writes its scales and what bounds them: token t's
// scale at t * scale_stride_token (float32 elements, 0 for one token), scale_ub the format's
// bound (read only by stores with TokenScales<..., true>; null without).
struct TokenScaleLayout {
  const float* scale_ub;
  u32 scale_stride_token;
};

// The amax output (docs/contract.md C39): the caller's float32 scalar, zeroed by the launcher
// before the kernel runs.
struct AmaxOutput {
  float* amax;
};

// The parameters of a kernel whose store writes scales (SCALES) or that reduces amax
// (AMAX): its own, then the scales' layout (Layout: the store's), then the amax output.
// Separate structs, so the other kernels' parameters keep their size (KernelArgs picks
// Params itself for them).
template <typename Params, bool SCALES, bool AMAX, typename Layout = ScaleLayout>
struct WithOutputs {
  Params params;
  Layout scale_layout;
  AmaxOutput amax;
};
template <typename Params, typename Layout>
struct WithOutputs<Params, true, false, Layout> {
  Params params;
  Layout scale_layout;
};
template <typename Params, typename Layout>
struct WithOutputs<Params, false, true, Layout> {
  Params params;
  AmaxOutput amax;
};

// A where C holds, else B (std::conditional; the sources include no standard headers).
template <bool C, typename A, typename B>
struct Pick {
  typedef A type;
};
template <typename A, typename B>
struct Pick<false, A, B> {
  typedef B type;
};

template <typename Params, bool SCALES, bool AMAX, typename Layout = ScaleLayout>
using KernelArgs =
    typename Pick<SCALES || AMAX, WithOutputs<Params, SCALES, AMAX, Layout>, Params>::type;

#if defined(__CUDACC__) || defined(ATTNMERGE_HOST_EMULATION)

// x * factor, or with DIVIDE x / factor (IEEE division), rounded to nearest even.
template <bool DIVIDE>
__device__ __forceinline__ float scaled(float x, float factor) {
  return DIVIDE ? __fdiv_rn(x, factor) : __fmul_rn(x, factor);
}

// e4m3fn(saturate(in[i] * inv_scale)) for N values at dst (with DIVIDE in[i] / inv_scale),
// the conversion RNE and saturating (NaN kept). Four values make one 32-bit word,
// converted in pairs.
template <typename E, int N, bool DIVIDE = false>
__device__ __forceinline__ void store_scaled_fp8(typename E::storage* dst, const float (&in)[N],
                                                 float inv_scale) {
  if constexpr (N % 4 == 0) {
    u32 w[N / 4];
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float* q = in + 4 * i;
      const u32 lo =
          E::store2(scaled<DIVIDE>(q[0], inv_scale), scaled<DIVIDE>(q[1], inv_scale));
      const u32 hi =
          E::store2(scaled<DIVIDE>(q[2], inv_scale), scaled<DIVIDE>(q[3], inv_scale));
      w[i] = lo | (hi << 16);
    }
    store_words(dst, w);
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      *reinterpret_cast<u16*>(dst + i) =
          E::store2(scaled<DIVIDE>(in[i], inv_scale), scaled<DIVIDE>(in[i + 1], inv_scale));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = E::store(scaled<DIVIDE>(in[i], inv_scale));
  }
}

// Plain float output, rounded to nearest even. Pairs of 2-byte elements are converted by
// one instruction (the same bits).
template <typename E>
struct PlainStore {
  typedef typename E::storage S;
  static constexpr bool kWritesScales = false;
  static constexpr bool kWholeTokens = false;
  typedef ScaleLayout Layout;
  __device__ __forceinline__ explicit PlainStore(const void*) {}
  __device__ __forceinline__ void ready() {}
  __device__ __forceinline__ void row(const ScaleLayout&, u32, u32) {}

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
  static constexpr bool kWritesScales = false;
  static constexpr bool kWholeTokens = false;
  typedef ScaleLayout Layout;
  float scale, inv_scale;
  __device__ __forceinline__ explicit FP8StaticStore(const void* operand)
      : scale(*static_cast<const float*>(operand)) {}
  __device__ __forceinline__ void ready() { inv_scale = __fdiv_rn(1.0f, scale); }
  __device__ __forceinline__ void row(const ScaleLayout&, u32, u32) {}

  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, u32,
                                        const float (&in)[N]) const {
    store_scaled_fp8<E, N>(static_cast<S*>(base) + offset, in, inv_scale);
  }
};

// An output element type E stored in groups of GROUP consecutive columns of a token, each
// group with its own scale (UE8M0: a power of two; PACKED: its biased exponent in one byte,
// four groups to an int32, DeepGEMM's layout): the element type of FP8GroupStore. TILED:
// stored by the token-tile kernels (groups that span heads without being whole heads).
template <typename E, int GROUP, bool UE8M0, bool PACKED = false, bool TILED = false>
struct Groups : E {
  static_assert(UE8M0 || !PACKED, "packed scales are UE8M0");
  static constexpr int kGroup = GROUP;
  static constexpr bool kUe8m0 = UE8M0;
  static constexpr bool kPacked = PACKED;
  static constexpr bool kTiled = TILED;
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

// The maximum of v, float32 bits of |x| (max_abs_bits: NaN wins), over the kLanes
// consecutive lanes of a group, in each of them: xor shuffles within a warp, an integer
// maximum a step; a group of several warps then exchanges each warp's maximum through
// shared memory, behind a barrier over the group's warps only (blocks of THREADS threads,
// at most 15 groups a block).
template <int kLanes, int THREADS = kBlockThreads>
__device__ __forceinline__ u32 group_max_bits(u32 v) {
  static_assert(kLanes > 1 && (kLanes & (kLanes - 1)) == 0, "a power of two of lanes");
  constexpr int kWarpLanes = kLanes < kWarpSize ? kLanes : kWarpSize;
  const int first_lane = threadIdx.x % kWarpSize / kWarpLanes * kWarpLanes;
  const u32 mask = kWarpLanes == kWarpSize ? ~0u : ((1u << kWarpLanes) - 1u) << first_lane;
#pragma unroll
  for (int m = 1; m < kWarpLanes; m <<= 1) {
    // (shuffled as a float, which the tests' emulator exchanges: the bits are unchanged)
    v = max_u32(v, float_bits(__shfl_xor_sync(mask, bits_float(v), m, kWarpLanes)));
  }
  if constexpr (kLanes > kWarpSize) {
    constexpr int kWarps = kLanes / kWarpSize;
    static_assert(THREADS / kLanes <= 15, "a named barrier a group");
    __shared__ u32 warp_max[THREADS / kWarpSize];
    const int warp = threadIdx.x / kWarpSize;
    const int first_warp = warp / kWarps * kWarps;
    const int barrier = 1 + threadIdx.x / kLanes;
    if (threadIdx.x % kWarpSize == 0) warp_max[warp] = v;
    sync_warps(barrier, kLanes);
    v = warp_max[first_warp];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = max_u32(v, warp_max[first_warp + w]);
    sync_warps(barrier, kLanes);  // every read before the group's next chunk writes
  }
  return v;
}

// Per-token-group FP8 (FP8PerTokenGroup), E = Groups<FP8E4M3, G,
// UE8M0, PACKED>: per group of G columns, scale = max(max |x|, eps) / 448 (IEEE division;
// NaN if the group holds one), with UE8M0 rounded up to a power of two; q = e4m3fn(saturate(
// x * (1 / scale))), the reciprocal an IEEE division. The lanes holding a group (G / N
// consecutive lanes) reduce its amax together; its first lane writes the scale where the
// ScaleLayout puts it. A group's lanes leave early or store together: a group lies within
// a row, a whole team, or (head sizes a power of two dividing G, FP8PerTokenGroup.
// kernel_gap) is the rows of G / D heads of a token, consecutive teams of whole rows where
// the launcher orders rows token-major with one team a row. Groups that span heads
// otherwise are TILED: a block stores a token, chunk c of VEC columns at column c * VEC of
// the token and on thread c % THREADS, so a group is G / VEC consecutive chunks on
// consecutive lanes, whatever the heads (the launcher's row is the token's, col the
// column within the token).
//
// Packed scales (int32 [T, ceil(G / 4)], strides (1, round_up(T, 4))) are written byte by
// byte, each byte by one lane, so lanes need no atomics: the lane of group g of token t
// writes byte g % 4 of element [t, g / 4]; the lane of group G - 1 also the bytes after it
// in that element (0); and the lanes of token T - 1 also their byte in the padding tokens
// T .. round_up(T, 4) - 1 of every column but the last (0), which exist in its storage.
template <typename E>
struct FP8GroupStore {
  typedef typename E::storage S;
  static_assert(sizeof(S) == 1, "FP8GroupStore stores 1-byte elements");
  static constexpr int kGroup = E::kGroup;
  static constexpr bool kWritesScales = true;
  static constexpr bool kWholeTokens = E::kTiled;
  static constexpr bool kTokenScale = false;
  typedef ScaleLayout Layout;
  void* scales;  // the format's operand: the scales this store writes
  i64 scale_row;
  u32 first_col, scale_stride_group;
  u32 num_groups, padding_tokens;  // packed scales only
  __device__ __forceinline__ explicit FP8GroupStore(const void* operand)
      : scales(const_cast<void*>(operand)) {}
  __device__ __forceinline__ void ready() {}
  __device__ __forceinline__ void row(const ScaleLayout& s, u32 outer, u32 inner) {
    scale_row = (i64)((u64)outer * s.scale_stride_outer + (u64)inner * s.scale_stride_inner);
    first_col = outer * s.first_col_outer + inner * s.first_col_inner;
    scale_stride_group = s.scale_stride_group;
    if constexpr (E::kPacked) {
      num_groups = s.num_groups;
      padding_tokens = scale_row == (i64)s.last_token_offset ? s.padding_tokens : 0u;
    }
  }

  // Group g's scale (packed: its UE8M0 byte) and, for packed scales, the zeros this lane owns.
  __device__ __forceinline__ void write_scale(u32 g, float scale, u32 exponent) const {
    if constexpr (!E::kPacked) {
      static_cast<float*>(scales)[scale_row + (i64)g * scale_stride_group] = scale;
    } else {
      u8* word = static_cast<u8*>(scales) + scale_row + (i64)(g >> 2) * scale_stride_group;
      const u32 byte = g & 3u;
      word[byte] = (u8)exponent;
      if (g + 1u == num_groups) {
        for (u32 b = byte + 1u; b < 4u; ++b) word[b] = 0;  // no group: 0
      }
      if ((g >> 2) < ((num_groups - 1u) >> 2)) {
        // Token t + 1 of a column lies 4 bytes after token t (the token stride is 1 int32).
        for (u32 t = 1; t <= padding_tokens; ++t) word[4u * t + byte] = 0;
      }
    }
  }

  // THREADS: the block's (a token tile's may exceed kBlockThreads).
  template <int N, int THREADS = kBlockThreads>
  __device__ __forceinline__ void store(void* base, i64 offset, u32 col,
                                        const float (&in)[N]) const {
    static_assert(kGroup % N == 0, "a chunk lies within one group");
    // max |x| of the group, some NaN where it holds one (max_nan then makes it the NaN).
    const float amax = bits_float(group_max_bits<kGroup / N, THREADS>(max_abs_bits<N>(0u, in)));
    const float eps = __int_as_float(0x2edbe6ff);  // 1e-10 in float32 (FP8_GROUP_EPS)
    float scale = __fdiv_rn(max_nan(amax, eps), 448.0f);
    u32 exponent = 0;
    if constexpr (E::kUe8m0) {
      // 2^ceil(log2(max(scale, eps))), exactly: the exponent up by one where the mantissa
      // is not 0 (+inf keeps its bits, byte 0xFF; NaN stays NaN, byte 0xFF).
      const u32 bits = float_bits(fmaxf(scale, eps));
      exponent = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
      exponent = exponent < 255u ? exponent : 255u;
      if (scale == scale) {
        scale = bits_float(exponent << 23);
      } else {
        exponent = 255u;
      }
    }
    const u32 token_col = first_col + col;  // a group's first lane writes its scale
    if (token_col % kGroup == 0) write_scale(token_col / kGroup, scale, exponent);
    store_scaled_fp8<E, N>(static_cast<S*>(base) + offset, in, __fdiv_rn(1.0f, scale));
  }
};

// The minimum of a and b where a NaN in either wins (torch.minimum).
__device__ __forceinline__ float min_nan(float a, float b) {
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fminf(a, b);
}

// An output element type E whose scales are per token, bounded by scale_ub where BOUND (the
// element type of FP8TokenStore).
template <typename E, bool BOUND>
struct TokenScales : E {
  static constexpr bool kBound = BOUND;
};

// Dynamic per-token FP8 (FP8PerToken, docs/contract.md C36, C38), E = TokenScales<FP8E4M3,
// BOUND>: per token over its H * D values, a = max |x| (NaN if it holds one), with BOUND
// a = min(a, *scale_ub) (NaN wins), scale = max(a / 448, 1 / (448 * 512)) (IEEE division;
// NaN stays), q = e4m3fn(saturate(x / scale)) with an IEEE division per value, as vLLM's
// dynamic_per_token_scaled_fp8_quant divides. A block holds a whole token (kWholeTokens):
// the kernel reduces a over it (store_token in merge.cuh) before any value is stored.
template <typename E>
struct FP8TokenStore {
  typedef typename E::storage S;
  static_assert(sizeof(S) == 1, "FP8TokenStore stores 1-byte elements");
  static constexpr bool kWritesScales = true;
  static constexpr bool kWholeTokens = true;
  static constexpr bool kTokenScale = true;
  typedef TokenScaleLayout Layout;
  float* scales;  // the format's operand: the scales this store writes
  float bound;    // *scale_ub, read first (BOUND only)
  __device__ __forceinline__ explicit FP8TokenStore(const void* operand)
      : scales(static_cast<float*>(const_cast<void*>(operand))), bound(0.0f) {}
  __device__ __forceinline__ void load_bound(const TokenScaleLayout& s) {
    if constexpr (E::kBound) bound = *s.scale_ub;
  }
  // The token's scale from the absmax of its values.
  __device__ __forceinline__ float scale_of(float amax) const {
    if constexpr (E::kBound) amax = min_nan(amax, bound);
    const float smallest = __int_as_float(0x36924925);  // 1 / (448 * 512): FP8_MIN_TOKEN_SCALE
    return max_nan(__fdiv_rn(amax, 448.0f), smallest);
  }
  __device__ __forceinline__ void write_scale(const TokenScaleLayout& s, u32 token,
                                              float scale) const {
    scales[(i64)((u64)token * s.scale_stride_token)] = scale;
  }
  template <int N>
  __device__ __forceinline__ void store(void* base, i64 offset, const float (&in)[N],
                                        float scale) const {
    store_scaled_fp8<E, N, true>(static_cast<S*>(base) + offset, in, scale);
  }
};

// The maximum of v over the lanes of `lanes` (a mask of the calling warp that holds the
// caller; every lane in it calls with the same mask): one redux instruction (sm_80+).
__device__ __forceinline__ u32 lanes_max(u32 v, u32 lanes) {
#ifdef __CUDA_ARCH__
  u32 r;
  asm volatile("redux.sync.max.u32 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(lanes));
  return r;
#else
  return emulated_redux_max(v, lanes);  // the tests' emulator
#endif
}

// *at = max(*at, v), atomically, as unsigned integers.
__device__ __forceinline__ void atomic_max_u32(void* at, u32 v) {
#ifdef __CUDA_ARCH__
  asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %0; red.global.max.u32 [g], %1; }"
               :
               : "l"((u64)at), "r"(v)
               : "memory");
#else
  emulated_atomic_max(static_cast<u32*>(at), v);  // the tests' emulator
#endif
}

// The amax output of a kernel (AMAX), reduced as float32 bit patterns: the bits of |x|
// order as |x| does (non-negative floats order like their bits, NaN of any payload above
// +inf), so a maximum of integers needs no NaN tests. A thread takes the maximum of every
// value it stores, then each warp's lanes one maximum and its first lane one atomic max
// into the output, NaN made 0x7FC00000 first (the canonical NaN of the reference).
template <bool AMAX>
struct AmaxReduction {
  u32 bits = 0;
  template <int N>
  __device__ __forceinline__ void add(const float (&in)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) bits = max_u32(bits, float_bits(in[i]) & 0x7fffffffu);
  }
  // `lanes`: the lanes of the caller's warp that call this, each with the same mask.
  __device__ __forceinline__ void commit(float* amax, u32 lanes) const {
    u32 m = lanes_max(bits, lanes);
    m = m > 0x7f800000u ? 0x7fc00000u : m;
    if (threadIdx.x % kWarpSize == (u32)(__ffs(lanes) - 1)) atomic_max_u32(amax, m);
  }
};
template <>
struct AmaxReduction<false> {
  template <int N>
  __device__ __forceinline__ void add(const float (&)[N]) {}
  __device__ __forceinline__ void commit(float*, u32) const {}
};

// The maximum of v over the block's THREADS threads, in each of them (every thread of the
// block calls it, once per launch): one redux a warp, then the warps' maxima through shared
// memory behind the block's barrier.
template <int THREADS>
__device__ __forceinline__ u32 block_max_u32(u32 v) {
  static_assert(THREADS % kWarpSize == 0, "a block of whole warps");
  constexpr int kWarps = THREADS / kWarpSize;
  __shared__ u32 warp_max[kWarps];
  v = lanes_max(v, ~0u);
  if (threadIdx.x % kWarpSize == 0) warp_max[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  v = warp_max[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = max_u32(v, warp_max[w]);
  return v;
}

#endif  // __CUDACC__ || ATTNMERGE_HOST_EMULATION

}  // namespace attnmerge
