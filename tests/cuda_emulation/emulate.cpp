// Host emulation of the CUDA merge kernels, for tests on machines without a GPU.
//
// Each CUDA thread of a block runs as an OS thread; __syncthreads is a std::barrier over
// the block's threads (128, or a token tile's 128 to 1024, as the launch says); blocks run
// one after another. Warp shuffles exchange values through
// one slot per thread, with a barrier over the lanes of the shuffle's segment (its width).
// A named barrier (barrier.sync id, threads) is a std::barrier of that many threads per id;
// __shared__ variables are static ones (one block runs at a time). A warp's redux over a mask
// of lanes waits for exactly those lanes (and fails the launch if a lane outside the mask
// calls, the lanes disagree on the mask or one never comes); an atomic max takes a mutex,
// and the launch counts them.
// The intrinsics map to plain float operations (built with -ffp-contract=off, so nothing
// is fused, as on the GPU), and the fp16/bf16/fp8 conversions take the headers' host paths.
// Built once per kernel configuration with -DATTNMERGE_MERGE_INSTANCE=<template arguments>
// (the two-partial kernel, emulate_merge) or -DATTNMERGE_PARTIALS_INSTANCE=<...> (the
// stacked/packed kernel, emulate_partials) and the csrc directory on the include path.
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct EmulatedDim3 {
  unsigned x, y, z;
};
static thread_local EmulatedDim3 threadIdx, blockIdx;
static std::barrier<>* block_barrier = nullptr;

static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
// __syncthreads_or: the votes of one call gather in a flag that the barriers around it
// keep apart from the call before and the call after.
static std::mutex vote_mutex;
static int vote_or = 0;
static inline int __syncthreads_or(int predicate) {
  block_barrier->arrive_and_wait();  // the last call's reads are done
  if (predicate) {
    std::lock_guard<std::mutex> lock(vote_mutex);
    vote_or = 1;
  }
  block_barrier->arrive_and_wait();
  const int result = vote_or;
  block_barrier->arrive_and_wait();
  if (threadIdx.x == 0) vote_or = 0;  // before thread 0 reaches the next call's barrier
  return result;
}
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

static inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

// What went wrong in the running launch (empty: nothing); emulate() then returns 1.
static std::string emulation_error;
static std::mutex emulation_error_mutex;
static void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(emulation_error_mutex);
  if (emulation_error.empty()) emulation_error = what;
}

// redux.sync.max.u32 over the lanes of `mask` in the caller's warp.
struct WarpRedux {
  std::mutex m;
  std::condition_variable cv;
  unsigned mask = 0, value = 0, result = 0;
  int arrived = 0;
  unsigned long generation = 0;
};
static WarpRedux warp_redux[32];

static inline unsigned emulated_redux_max(unsigned v, unsigned mask) {
  const unsigned lane = threadIdx.x % 32;
  WarpRedux& r = warp_redux[threadIdx.x / 32];
  if (!(mask >> lane & 1u)) {
    fail("redux: lane " + std::to_string(threadIdx.x) + " is not in its mask");
    return v;
  }
  std::unique_lock<std::mutex> lock(r.m);
  if (r.arrived == 0) {
    r.mask = mask;
    r.value = 0;
  } else if (r.mask != mask) {
    fail("redux: the lanes of warp " + std::to_string(threadIdx.x / 32) + " disagree on the mask");
  }
  r.value = r.value > v ? r.value : v;
  const unsigned long generation = r.generation;
  if (++r.arrived == __builtin_popcount(mask)) {
    r.result = r.value;
    r.arrived = 0;
    ++r.generation;
    r.cv.notify_all();
    return r.result;
  }
  if (!r.cv.wait_for(lock, std::chrono::seconds(20), [&] { return r.generation != generation; })) {
    fail("redux: a lane of the mask of warp " + std::to_string(threadIdx.x / 32) + " never came");
    r.arrived = 0;
    ++r.generation;
    r.cv.notify_all();
  }
  return r.result;
}

static std::mutex atomics_mutex;
static unsigned long atomics_count = 0;
static inline void emulated_atomic_max(unsigned* at, unsigned v) {
  std::lock_guard<std::mutex> lock(atomics_mutex);
  *at = *at > v ? *at : v;
  ++atomics_count;
}

#define __global__
#define __shared__ static
#define __launch_bounds__(...)
#define ATTNMERGE_HOST_EMULATION 1
#include "partials.cuh"

// The kernel's parameter struct (the instance's: with the scales' strides where its store
// writes scales) read from the packed block; `threads` a block, as the launcher's.
template <typename Params>
static int emulate(const void* packed, unsigned grid, unsigned threads, void (*kernel)(Params)) {
  const unsigned kThreads = threads;
  if (kThreads % 32 != 0 || kThreads > 1024) {
    std::fprintf(stderr, "emulated launch failed: %u threads a block\n", kThreads);
    return 1;
  }
  const Params* params = static_cast<const Params*>(packed);
  emulation_error.clear();
  atomics_count = 0;
  for (unsigned b = 0; b < grid; ++b) {
    for (auto& r : warp_redux) r.arrived = 0;
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
  if (!emulation_error.empty()) {
    std::fprintf(stderr, "emulated launch failed: %s\n", emulation_error.c_str());
    return 1;
  }
  return 0;
}

// The atomic operations of the last launch.
extern "C" unsigned long emulated_atomics() { return atomics_count; }

#ifdef ATTNMERGE_MERGE_INSTANCE
extern "C" int emulate_merge(const void* params, unsigned grid, unsigned threads) {
  return emulate(params, grid, threads, attnmerge::attnmerge_merge);
}
#endif
#ifdef ATTNMERGE_PARTIALS_INSTANCE
extern "C" int emulate_partials(const void* params, unsigned grid, unsigned threads) {
  return emulate(params, grid, threads, attnmerge::attnmerge_merge_partials);
}
#endif
