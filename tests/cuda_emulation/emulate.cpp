// Host emulation of the CUDA merge kernel, for tests on machines without a GPU.
//
// Each CUDA thread of a block runs as an OS thread; __syncthreads is a std::barrier over
// the block's threads; blocks run one after another. The intrinsics map to plain float
// operations (built with -ffp-contract=off, so nothing is fused, as on the GPU), and the
// fp16/bf16/fp8 conversions take the headers' host paths. Built once per kernel
// configuration with -DATTNMERGE_MERGE_INSTANCE=<KernelConfig.template_arguments()> and the
// csrc directory on the include path (merge.cuh includes epilogues.cuh and common.cuh).
#include <barrier>
#include <cmath>
#include <cstring>
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

#define __global__
#define __launch_bounds__(n)
#define ATTNMERGE_HOST_EMULATION 1
#include "merge.cuh"

extern "C" int emulate_merge(const attnmerge::MergeParams* params, unsigned grid) {
  constexpr unsigned kThreads = attnmerge::kBlockThreads;  // every block, every config
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> barrier(kThreads);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (unsigned t = 0; t < kThreads; ++t) {
      threads.emplace_back([params, b, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        attnmerge::attnmerge_merge(*params);
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
