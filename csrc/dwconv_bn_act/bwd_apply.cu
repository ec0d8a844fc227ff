// dwconv_bn_act_bwd_apply: workspace sizes and the dtype switch; kernels are instantiated per dtype in
// bwd_apply_{f32,f16,bf16}.cu.
#include "dwconv_bn_act/bwd_apply.cuh"

namespace mnet {

int64_t dw_bwd_apply_workspace(const DwParams& p) {
  return MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] {
    return band_plan(p, (int)sizeof(T)).nchunks * p.k * p.k * p.C;
  });
}

void dw_bwd_apply_cuda(const DwParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  MNET_DISPATCH_DTYPE(p.dtype, __half, __nv_bfloat16, T, [&] { dw_bwd_apply_launch<T>(p, s); });
}

}  // namespace mnet
