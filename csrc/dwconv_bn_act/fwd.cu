// dwconv_bn_act_fwd: launch (fwd_kernel for 3 dtypes x 3 kernel sizes x 2 column patterns x 3 layout variants,
// and two strip widths in channels_last at column pattern 1).
#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {

void dw_fwd_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    const TilePlan t = dev::launch_plan(p, (int)sizeof(T));
    const dim3 grid(dev::fwd_blocks(t), (unsigned)t.lg.groups);
    const unsigned threads = (unsigned)(t.lg.lanes * t.lg.walkers);
    MNET_DISPATCH_KSIZE(p.k, K, [&] {
      const size_t smem = dev::param_smem_bytes(K, t.V, 2, t.lg.lanes);  // weights, scale, shift
      MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
        MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p, {p.x, p.y}), CL, FULL, [&] {
          constexpr int J = J2 ? 2 : 1;
          dev::launch_strips<CL, J, K>(t, [&](auto tw) {
            constexpr int TW = decltype(tw)::value;
            dev::allow_smem(dev::fwd_kernel<T, K, J, CL, FULL, TW>, smem);
            dev::fwd_kernel<T, K, J, CL, FULL, TW><<<grid, threads, smem, s>>>(p, t);
          });
        });
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
}

}  // namespace mnet
