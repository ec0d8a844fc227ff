// dwconv_bn_act_bwd_apply launch for one dtype: bwd_apply_kernel (dz on chip -> dx + dweight partials), then
// dweight_final_kernel. Included by bwd_apply_{f32,f16,bf16}.cu, one dtype per file to keep the compile of each
// translation unit short.
#pragma once

#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {

template <typename T>
void dw_bwd_apply_launch(const DwParams& p, cudaStream_t s) {
  const BandPlan b = band_plan(p, (int)sizeof(T));
  dev::check_strides(p, b.TW);
  if (b.groups > 65535)
    throw std::runtime_error("mnet_ext: too many channels for the CUDA backward (more than 65535 channel groups)");
  const size_t smem = (size_t)b.smem_floats(p.k) * sizeof(float);  // kSmemTwoBlocks unless rows of 1 exceed it
  if (smem > 227 * 1024)
    throw std::runtime_error("mnet_ext: the image is too wide for the CUDA backward (a band of dz rows needs " +
                             std::to_string(smem) + " bytes of shared memory, at most 232448)");
  const dim3 grid((unsigned)b.nchunks, (unsigned)b.groups);
  MNET_DISPATCH_KSIZE(p.k, K, [&] {
    MNET_DISPATCH_BOOL(strip_j(p.stride, p.dilation) == 2, J2, [&] {
      MNET_DISPATCH_LAYOUT(p.channels_last, dev::full_vectors<T>(p, {p.x, p.grad_y, p.y}), CL, FULL, [&] {
        constexpr int J = J2 ? 2 : 1;
        dev::allow_smem(dev::bwd_apply_kernel<T, K, J, CL, FULL>, smem);
        dev::bwd_apply_kernel<T, K, J, CL, FULL><<<grid, dev::kThreads, smem, s>>>(p, b);
      });
    });
  });
  MNET_CUDA_CHECK_LAUNCH();
  const int kk = p.k * p.k;
  dev::dweight_final_kernel<T><<<dev::final_blocks(p.C * kk), dev::kFinalLanes * dev::kFinalWalkers, 0, s>>>(
      p.work, b.nchunks, p.C, kk, static_cast<T*>(p.dweight));
  MNET_CUDA_CHECK_LAUNCH();
}

// Explicit instantiations live in bwd_apply_{f32,f16,bf16}.cu.
extern template void dw_bwd_apply_launch<float>(const DwParams&, cudaStream_t);
extern template void dw_bwd_apply_launch<__half>(const DwParams&, cudaStream_t);
extern template void dw_bwd_apply_launch<__nv_bfloat16>(const DwParams&, cudaStream_t);

}  // namespace mnet
