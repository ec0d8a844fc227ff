// Kernels with the defects the emulator must report (tests/test_cuda_emulator.py: test_emulator_reports_defects):
// `emu --selftest NAME` runs one; its errors go to stderr like a real kernel's.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/device.cuh"
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
// Half the warp at an ldmatrix the other half never reaches.
__global__ void divergent_ldmatrix(float* out) {
  MNET_DYNAMIC_SMEM(float, sh);
  sh[threadIdx.x] = 0.0f;
  mnet::dev::syncwarp();
  if (threadIdx.x % 32 < 16) {
    uint32_t r[1];
    mnet::dev::ldmatrix<1>(r, mnet::dev::smem_addr(sh));
  }
  out[threadIdx.x] = 1.0f;
}

// The fragment self-test: D = C + A B through the emulated mma.m16n8k{16,8}, its operands built either by
// ldmatrix from A and B^T in shared memory or per lane from the PTX ISA's fragment tables (device.cuh: mma), D read
// back by the same table; the host compares with a plain matmul. A (16x16), Bt (8x16: B transposed) 16-bit
// patterns, C and D 16x8 fp32.
template <typename T>
__global__ void mma_fragments(const uint16_t* A, const uint16_t* Bt, const float* C, float* D, int kd, int ldsm) {
  MNET_DYNAMIC_SMEM(uint16_t, sh);  // A [16][16], then Bt [8][16]
  const int l = (int)threadIdx.x, g = l >> 2, t = l & 3;
  for (int i = l; i < 16 * 16 + 8 * 16; i += 32) sh[i] = i < 256 ? A[i] : Bt[i - 256];
  mnet::dev::syncwarp();
  const auto pair = [](const uint16_t* m, int row, int col) {
    return (uint32_t)m[row * 16 + col] | (uint32_t)m[row * 16 + col + 1] << 16;
  };
  uint32_t a[4], b[2];
  if (ldsm) {
    // A: lanes 0-15 give rows 0-15 at columns 0-7 (matrices 0, 1), lanes 16-31 the same rows at columns 8-15
    // (matrices 2, 3); B^T: lanes 0-7 its rows (B's columns) at k 0-7, lanes 8-15 at k 8-15.
    const mnet::dev::SmemAddr base = mnet::dev::smem_addr(sh);
    mnet::dev::ldmatrix<4>(a, base + (uint32_t)((l & 15) * 16 + (l >> 4) * 8) * 2);
    mnet::dev::ldmatrix<2>(b, base + (uint32_t)(256 + (l & 7) * 16 + ((l >> 3) & 1) * 8) * 2);
  } else {
    a[0] = pair(A, g, 2 * t);
    a[1] = pair(A, g + 8, 2 * t);
    a[2] = pair(A, g, 2 * t + 8);
    a[3] = pair(A, g + 8, 2 * t + 8);
    b[0] = pair(Bt, g, 2 * t);
    b[1] = pair(Bt, g, 2 * t + 8);
  }
  float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  if (kd == 16) {
    mnet::dev::mma<T, 16>(d, a, b);
  } else {
    const uint32_t a8[2] = {a[0], a[1]}, b8[1] = {b[0]};
    mnet::dev::mma<T, 8>(d, a8, b8);
  }
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Random small multiples of 1/4 (exact in bf16 and fp16, and every product and sum exact in fp32): D must equal the
// plain matmul bit for bit.
void run_mma_fragments() {
  std::mt19937 rng(12);
  std::uniform_int_distribution<int> q(-12, 12);
  for (const bool bf16 : {true, false})
    for (const int kd : {16, 8})
      for (const int ldsm : {0, 1}) {
        std::vector<uint16_t> A(256), Bt(128);
        std::vector<float> a(256), bt(128), C(128), D(128, NAN);
        const auto bits = [&](float v) {
          if (bf16) {
            uint32_t u;
            std::memcpy(&u, &v, 4);
            return (uint16_t)(u >> 16);
          }
          const __half h = __float2half_rn(v);
          uint16_t u;
          std::memcpy(&u, &h, 2);
          return u;
        };
        for (int i = 0; i < 256; ++i) A[i] = bits(a[i] = q(rng) * 0.25f);
        for (int i = 0; i < 128; ++i) Bt[i] = bits(bt[i] = q(rng) * 0.25f);
        for (float& v : C) v = q(rng) * 0.5f;
        emu::g_buffers.assign({{A.data(), 512}, {Bt.data(), 256}, {C.data(), 512}, {D.data(), 512}});
        if (bf16)
          ::emu::Launch(1, 32, 768)(mma_fragments<__nv_bfloat16>, A.data(), Bt.data(), C.data(), D.data(), kd, ldsm);
        else
          ::emu::Launch(1, 32, 768)(mma_fragments<__half>, A.data(), Bt.data(), C.data(), D.data(), kd, ldsm);
        for (int m = 0; m < 16; ++m)
          for (int n = 0; n < 8; ++n) {
            float want = C[m * 8 + n];
            for (int k = 0; k < kd; ++k) want += a[m * 16 + k] * bt[n * 16 + k];
            if (D[m * 8 + n] != want) {
              emu::g_errors.push_back("mma fragments (" + std::string(bf16 ? "bf16" : "fp16") + ", k" +
                                      std::to_string(kd) + (ldsm ? ", ldmatrix" : ", per lane") + "): D[" +
                                      std::to_string(m) + "][" + std::to_string(n) + "] = " +
                                      std::to_string(D[m * 8 + n]) + ", the matmul gives " + std::to_string(want));
              return;
            }
          }
      }
}
}  // namespace

int run_selftest(const std::string& name) {
  if (name == "mma_fragments") {
    run_mma_fragments();
    return 0;
  }
  const unsigned n = 64;
  std::vector<float> out(n, 0.0f);
  emu::g_buffers.push_back({out.data(), n * sizeof(float)});
  void (*kernels[])(float*) = {divergent_barrier, mismatched_barriers, missing_barrier, smem_overrun, bad_loads,
                               divergent_ldmatrix};
  const char* names[] = {"divergent_barrier", "mismatched_barriers", "missing_barrier", "smem_overrun", "bad_loads",
                         "divergent_ldmatrix"};
  for (int i = 0; i < 6; ++i)
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
