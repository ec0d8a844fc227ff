// dwconv_bn_act_fwd: launch (instantiations of fwd_kernel for 3 dtypes x 3 kernel sizes x 2 layouts).
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {

void dw_fwd_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = dev::elementwise_blocks(p.N * p.C * p.Ho * p.Wo);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      MNET_DISPATCH_BOOL(p.channels_last, CL, [&] { dev::fwd_kernel<T, K, CL><<<blocks, dev::kThreads, 0, s>>>(p); });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
