// Kernels with the defects the emulator must report (tests/test_cuda_emulator.py: test_emulator_reports_defects):
// `emu --selftest NAME` runs one; its errors go to stderr like a real kernel's.
#include <cmath>
#include <string>
#include <vector>

#include "emu_runtime.h"

namespace {
// Threads below 32 wait at a barrier the others never reach.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Two barrier sites: even threads at one, odd threads at the other.
__global__ void mismatched_barriers(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Reads a neighbour's shared-memory slot without a barrier: in any thread order some thread reads a slot no thread
// has written yet (NaN).
__global__ void missing_barrier(float* out) {
  MNET_DYNAMIC_SMEM(float, sh);
  sh[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x] + sh[(threadIdx.x + blockDim.x - 1) % blockDim.x];
}

// Writes one float past the launch's dynamic shared memory.
__global__ void smem_overrun(float* out) {
  MNET_DYNAMIC_SMEM(float, sh);
  sh[threadIdx.x + 1] = 0.0f;
  out[threadIdx.x] = 1.0f;
}

// A 16-byte load that starts 4 bytes into a buffer, and one past its end.
__global__ void bad_loads(float* out) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(out + 1));
  const uint4 b = __ldg(reinterpret_cast<const uint4*>(out + blockDim.x));
  out[threadIdx.x] = (float)(a.x + b.x);
}
}  // namespace

int run_selftest(const std::string& name) {
  const unsigned n = 64;
  std::vector<float> out(n, 0.0f);
  emu::g_buffers.push_back({out.data(), n * sizeof(float)});
  void (*kernels[])(float*) = {divergent_barrier, mismatched_barriers, missing_barrier, smem_overrun, bad_loads};
  const char* names[] = {"divergent_barrier", "mismatched_barriers", "missing_barrier", "smem_overrun", "bad_loads"};
  for (int i = 0; i < 5; ++i)
    if (name == names[i]) {
      ::emu::Launch(1, n, n * sizeof(float))(kernels[i], out.data());
      for (const float v : out)
        if (!std::isfinite(v)) {
          emu::g_errors.push_back("a NaN in the output (a read of shared memory no thread wrote)");
          break;
        }
      return 0;
    }
  emu::g_errors.push_back("unknown selftest " + name);
  return 0;
}
