// The host cost of one kernel launch with no Python at all: the floor under any eager
// call of the cuda backend on a given machine (docs/host-overhead.md).
//
//   nvcc -O2 -o /tmp/launch_floor benchmarks/launch_floor.cu && /tmp/launch_floor
//
// An empty kernel with a 128-byte by-value parameter struct (the size of the merge
// kernel's MergeParams) is launched through the driver API (cuLaunchKernel, as the cuda
// backend does) and through the runtime (cudaLaunchKernel, as torch's own ops do), on a
// non-default stream, 16 blocks of 128 threads (the merge's grid at T = 1, H = 128).
// Each round enqueues kLaunches launches and reads the host clock before synchronising,
// so the figure is host time per launch as long as the GPU keeps up (an empty kernel
// runs in about a microsecond).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

struct Params {
  char bytes[128];
};

__global__ void empty_kernel(const Params p) {
  if (p.bytes[0] == 123 && threadIdx.x == 1000) asm volatile("trap;");
}

#define CHECK(call)                                                       \
  do {                                                                    \
    auto _e = (call);                                                     \
    if (_e != 0) {                                                        \
      std::printf("%s failed: %d (line %d)\n", #call, (int)_e, __LINE__); \
      return 1;                                                           \
    }                                                                     \
  } while (0)

constexpr int kLaunches = 500;
constexpr int kRounds = 41;

template <typename F>
double median_us_per_launch(F launch, cudaStream_t stream) {
  std::vector<double> per_launch;
  for (int round = 0; round < kRounds; ++round) {
    cudaStreamSynchronize(stream);
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kLaunches; ++i) launch();
    const auto t1 = std::chrono::steady_clock::now();
    per_launch.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / kLaunches);
  }
  cudaStreamSynchronize(stream);
  std::sort(per_launch.begin(), per_launch.end());
  return per_launch[per_launch.size() / 2];
}

int main() {
  CHECK(cudaSetDevice(0));
  CHECK(cudaFree(nullptr));  // create the primary context
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaFunction_t runtime_fn;
  CHECK(cudaGetFuncBySymbol(&runtime_fn, (const void*)empty_kernel));
  CUfunction fn = (CUfunction)runtime_fn;
  // cuLaunchKernel from the driver the runtime loaded (no link against libcuda needed).
  decltype(&cuLaunchKernel) cu_launch = nullptr;
  cudaDriverEntryPointQueryResult found;
  CHECK(cudaGetDriverEntryPointByVersion("cuLaunchKernel", (void**)&cu_launch, 12000,
                                         cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess) return 1;
  Params params = {};
  void* args[] = {&params};
  const dim3 grid(16), block(128);

  const double driver_us = median_us_per_launch(
      [&] { cu_launch(fn, 16, 1, 1, 128, 1, 1, 0, (CUstream)stream, args, nullptr); },
      stream);
  const double runtime_us = median_us_per_launch(
      [&] { cudaLaunchKernel((const void*)empty_kernel, grid, block, args, 0, stream); }, stream);
  CHECK(cudaGetLastError());
  CHECK(cudaStreamSynchronize(stream));

  // The GPU side, for reference: the same launches, timed from first to last by events.
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < kLaunches; ++i) {
    cu_launch(fn, 16, 1, 1, 128, 1, 1, 0, (CUstream)stream, args, nullptr);
  }
  CHECK(cudaEventRecord(stop, stream));
  CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));

  std::printf("launch floor: cuLaunchKernel %.2f us, cudaLaunchKernel %.2f us host time per "
              "launch (median of %d rounds of %d); device time per back-to-back launch %.2f us\n",
              driver_us, runtime_us, kRounds, kLaunches, 1000.0 * ms / kLaunches);
  return 0;
}
