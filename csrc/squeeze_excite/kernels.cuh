// CUDA kernels of the squeeze_excite primitives (plain CUDA, no ATen).
//   reductions (se_pool, se_bwd_reduce): one 256-thread block per (n, channel tile); NCHW: the block walks
//     the H*W positions of one channel (L = 1 lane, 256 walkers); channels_last: 32 channel lanes x 8 walkers.
//     Walkers combine by a fixed shared-memory tree: deterministic, one pass, no atomics.
//   elementwise (se_scale, se_bwd_apply): one thread per element in the output's memory order.
#pragma once

#include <stdint.h>

#include "dwconv_bn_act/kernels.cuh"
#include "squeeze_excite/params.h"

namespace mnet {
namespace dev {

// out[n, c] = scale * sum_hw a (* b). `a` drives the layout (CL); b is read through its own strides.
template <typename T, bool CL, bool PROD>
__global__ void __launch_bounds__(kThreads) se_reduce_kernel(const SeParams p, const T* __restrict__ a, Strides4 as,
                                                             const T* __restrict__ b, Strides4 bs, float scale) {
  constexpr int L = CL ? 32 : 1, WALK = kThreads / L;
  __shared__ float sh[kThreads];
  const int64_t ctiles = (p.C + L - 1) / L;
  const int64_t n = blockIdx.x / ctiles;
  const int lane = threadIdx.x % L, walker = threadIdx.x / L;
  const int64_t c = (blockIdx.x % ctiles) * L + lane;
  float acc = 0.0f;
  if (c < p.C) {
    const int64_t HW = p.H * p.W;
    for (int64_t i = walker; i < HW; i += WALK) {
      const int64_t h = i / p.W, w = i % p.W;
      const float v = to_f(a[off4(as, n, c, h, w)]);
      acc += PROD ? v * to_f(b[off4(bs, n, c, h, w)]) : v;
    }
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int s = WALK / 2; s >= 1; s >>= 1) {
    if (walker < s) sh[threadIdx.x] += sh[threadIdx.x + s * L];
    __syncthreads();
  }
  if (walker == 0 && c < p.C) p.out[n * p.C + c] = sh[threadIdx.x] * scale;
}

// y = a * s[n, c] + (t ? t[n, c] / tdiv : 0), y in p.ys, walked in a's layout (CL).
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) se_affine_kernel(const SeParams p, const T* __restrict__ a, Strides4 as,
                                                             const float* __restrict__ t, float tdiv) {
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t total = p.N * p.C * p.H * p.W;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, h, w;
    decompose<CL>(i, p.C, p.H, p.W, n, c, h, w);
    const int64_t nc = n * p.C + c;
    const float v = to_f(a[off4(as, n, c, h, w)]) * p.s[nc] + (t ? t[nc] / tdiv : 0.0f);
    y[off4(p.ys, n, c, h, w)] = from_f<T>(v);
  }
}

}  // namespace dev
}  // namespace mnet
