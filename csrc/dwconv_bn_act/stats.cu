// dwconv_bn_stats: per-(channel, chunk) Welford partials, then a deterministic Chan combine per channel.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {
namespace dev {

// One thread per channel: combine the chunk partials in chunk order (double), write mean and biased var.
__global__ void stats_final_kernel(const DwParams p, int64_t nchunks) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  WelfordD acc{0.0, 0.0, 0.0};
  for (int64_t j = 0; j < nchunks; ++j) {
    const float* q = p.work + (c * nchunks + j) * 3;
    acc = welford_combine(acc, (double)q[0], (double)q[1], (double)q[2]);
  }
  p.out0[c] = (float)acc.mean;
  p.out1[c] = acc.count > 0.0 ? (float)(acc.m2 / acc.count) : 0.0f;
}

}  // namespace dev

int64_t dw_stats_workspace(const DwParams& p) { return p.C * dev::num_chunks(p) * 3; }

void dw_stats_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t nchunks = dev::num_chunks(p);
  const unsigned blocks = (unsigned)dev::reduction_blocks(p, nchunks);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {
        dev::stats_partial_kernel<T, K, CL><<<blocks, dev::kThreads, 0, s>>>(p, nchunks);
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
  dev::stats_final_kernel<<<(unsigned)((p.C + 127) / 128), 128, 0, s>>>(p, nchunks);
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
