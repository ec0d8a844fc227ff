// dwconv_bn_act_bwd_apply kernels for dtype __half (see bwd_apply.cuh).
#include "dwconv_bn_act/bwd_apply.cuh"

namespace mnet {
template void dw_bwd_apply_launch<__half>(const DwParams&, cudaStream_t);
}  // namespace mnet
