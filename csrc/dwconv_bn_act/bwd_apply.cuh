// dwconv_bn_act_bwd_apply launch for one dtype: (A) dz + per-chunk dweight partials, (B) dx gathered from dz,
// (C) dweight combine. Included by bwd_apply_{f32,f16,bf16}.cu, one dtype per file to keep the compile of
// each translation unit short (the K=7 dweight kernel dominates).
#pragma once

#include "common/cuda_check.cuh"
#include "common/dispatch.h"
#include "dwconv_bn_act/kernels.cuh"
#include "dwconv_bn_act/launch.h"

namespace mnet {

template <typename T>
void dw_bwd_apply_launch(const DwParams& p, cudaStream_t s) {
  const int64_t nchunks = dev::num_chunks(p);
  const unsigned red_blocks = (unsigned)dev::reduction_blocks(p, nchunks);
  const unsigned dx_blocks = dev::elementwise_blocks(p.N * p.C * p.H * p.W);
  const unsigned dw_blocks = (unsigned)((p.C * p.k * p.k + 127) / 128);
  MNET_DISPATCH_KSIZE(p.k, K, [&] {
    MNET_DISPATCH_BOOL(p.channels_last, CL, [&] {
      constexpr size_t smem = dev::bwd_apply_dz_smem<K, CL>();
      if (smem > 48 * 1024)
        MNET_CUDA_CHECK(cudaFuncSetAttribute(dev::bwd_apply_dz_kernel<T, K, CL>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      dev::bwd_apply_dz_kernel<T, K, CL><<<red_blocks, dev::kThreads, smem, s>>>(p, nchunks);
      MNET_CUDA_CHECK_LAUNCH();
      dev::bwd_apply_dx_kernel<T, K, CL><<<dx_blocks, dev::kThreads, 0, s>>>(p);
      MNET_CUDA_CHECK_LAUNCH();
    });
  });
  dev::bwd_apply_dw_final_kernel<T><<<dw_blocks, 128, 0, s>>>(p, nchunks);
  MNET_CUDA_CHECK_LAUNCH();
}

// Explicit instantiations live in bwd_apply_{f32,f16,bf16}.cu.
extern template void dw_bwd_apply_launch<float>(const DwParams&, cudaStream_t);
extern template void dw_bwd_apply_launch<__half>(const DwParams&, cudaStream_t);
extern template void dw_bwd_apply_launch<__nv_bfloat16>(const DwParams&, cudaStream_t);

}  // namespace mnet
