// Host emulation of the CUDA merge kernels, for tests on machines without a GPU.
//
// Each CUDA thread of a block runs as an OS thread; __syncthreads is a std::barrier over
// the block's threads; blocks run one after another. Warp shuffles exchange values through
// one slot per thread, with a barrier over the lanes of the shuffle's segment (its width).
// A named barrier (barrier.sync id, threads) is a std::barrier of that many threads per id;
// __shared__ variables are static ones (one block runs at a time).
// The intrinsics map to plain float operations (built with -ffp-contract=off, so nothing
// is fused, as on the GPU), and the fp16/bf16/fp8 conversions take the headers' host paths.
// Built once per kernel configuration with -DATTNMERGE_MERGE_INSTANCE=<template arguments>
// (the two-partial kernel, emulate_merge) or -DATTNMERGE_PARTIALS_INSTANCE=<...> (the
// stacked/packed kernel, emulate_partials) and the csrc directory on the include path.
#include <barrier>
#include <memory>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct EmulatedDim3 {
  unsigned x, y, z;
};
static thread_local EmulatedDim3 threadIdx, blockIdx;
static std::barrier<>* block_barrier = nullptr;

static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
// A warp barrier as the block's: stronger (every thread of the block that has not
// returned reaches it, and the returned ones have dropped out of the barrier).
static inline void __syncwarp(unsigned) { block_barrier->arrive_and_wait(); }
static inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
static inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
// expf, exp2f, logf, log2f, fmaxf: the C library's, from <math.h> via <cmath>.
#include <math.h>

// Shuffles within segments of `width` lanes (every lane of a segment takes part in each).
static float shuffle_slots[1024];
static std::vector<std::unique_ptr<std::barrier<>>> segment_barriers[6];  // widths 1 .. 32

static std::barrier<>& segment_barrier(int width) {
  int w = 0;
  while ((1 << w) < width) ++w;
  return *segment_barriers[w][threadIdx.x / width];
}
static inline float shuffle_from(float v, int src_in_segment, int width) {
  std::barrier<>& bar = segment_barrier(width);
  shuffle_slots[threadIdx.x] = v;
  bar.arrive_and_wait();
  const float r = shuffle_slots[threadIdx.x / width * width + src_in_segment % width];
  bar.arrive_and_wait();
  return r;
}
static inline float __shfl_sync(unsigned, float v, int src, int width) {
  return shuffle_from(v, src, width);
}
static inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int width) {
  return shuffle_from(v, (threadIdx.x % width) ^ lane_mask, width);
}

// Named barriers of the running block, created by the first thread to reach each id.
static std::unique_ptr<std::barrier<>> named_barriers[16];
static std::mutex named_barriers_mutex;

static inline void emulated_barrier_sync(int id, int threads) {
  std::barrier<>* bar;
  {
    std::lock_guard<std::mutex> lock(named_barriers_mutex);
    if (!named_barriers[id]) named_barriers[id] = std::make_unique<std::barrier<>>(threads);
    bar = named_barriers[id].get();
  }
  bar->arrive_and_wait();
}

#define __global__
#define __shared__ static
#define __launch_bounds__(...)
#define ATTNMERGE_HOST_EMULATION 1
#include "partials.cuh"

// The kernel's parameter struct (the instance's: with the scales' strides where its store
// writes scales) read from the packed block.
template <typename Params>
static int emulate(const void* packed, unsigned grid, void (*kernel)(Params)) {
  constexpr unsigned kThreads = attnmerge::kBlockThreads;  // every block, every config
  const Params* params = static_cast<const Params*>(packed);
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> barrier(kThreads);
    block_barrier = &barrier;
    for (auto& named : named_barriers) named.reset();
    for (int w = 0; w < 6; ++w) {
      segment_barriers[w].clear();
      for (unsigned g = 0; g < (kThreads >> w); ++g) {
        segment_barriers[w].push_back(std::make_unique<std::barrier<>>(1 << w));
      }
    }
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (unsigned t = 0; t < kThreads; ++t) {
      threads.emplace_back([params, b, t, kernel] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        kernel(*params);
        // A thread that has returned drops out of the block's barrier, so that the early
        // exit of output-LSE kernels does not hold the others at their warp barrier
        // (whose mask holds only lanes that have not returned); no block barrier follows
        // an early exit in the kernel.
        block_barrier->arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
  }
  return 0;
}

#ifdef ATTNMERGE_MERGE_INSTANCE
extern "C" int emulate_merge(const void* params, unsigned grid) {
  return emulate(params, grid, attnmerge::attnmerge_merge);
}
#endif
#ifdef ATTNMERGE_PARTIALS_INSTANCE
extern "C" int emulate_partials(const void* params, unsigned grid) {
  return emulate(params, grid, attnmerge::attnmerge_merge_partials);
}
#endif
