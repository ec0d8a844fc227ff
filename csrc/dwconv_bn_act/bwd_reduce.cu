// dwconv_bn_act_bwd_reduce: per-(channel, chunk) partial sums of g and g*xhat, then a fixed-order sum.
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {
namespace dev {

__global__ void bwd_reduce_final_kernel(const DwParams p, int64_t nchunks) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  double a = 0.0, b = 0.0;
  for (int64_t j = 0; j < nchunks; ++j) {
    const float* q = p.work + (c * nchunks + j) * 2;
    a += q[0];
    b += q[1];
  }
  p.out0[c] = (float)a;
  p.out1[c] = (float)b;
}

}  // namespace dev

int64_t dw_bwd_reduce_workspace(const DwParams& p) { return p.C * dev::num_chunks(p) * 2; }

void dw_bwd_reduce_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t nchunks = dev::num_chunks(p);
  const unsigned blocks = (unsigned)dev::reduction_blocks(p, nchunks);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {
        dev::bwd_reduce_partial_kernel<T, K, CL><<<blocks, dev::kThreads, 0, s>>>(p, nchunks);
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
  dev::bwd_reduce_final_kernel<<<(unsigned)((p.C + 127) / 128), 128, 0, s>>>(p, nchunks);
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
