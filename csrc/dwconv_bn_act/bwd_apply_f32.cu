// dwconv_bn_act_bwd_apply kernels for dtype float (see bwd_apply.cuh).
#include "dwconv_bn_act/bwd_apply.cuh"

namespace mnet {
template void dw_bwd_apply_launch<float>(const DwParams&, cudaStream_t);
}  // namespace mnet
