// Entry points of the squeeze_excite implementations, called by op.cpp. No ATen.
#pragma once

#include "squeeze_excite/params.h"

namespace mnet {

void se_pool_cpu(const SeParams& p);
void se_scale_cpu(const SeParams& p);
void se_bwd_reduce_cpu(const SeParams& p);
void se_bwd_apply_cpu(const SeParams& p);

#ifdef WITH_CUDA
void se_pool_cuda(const SeParams& p, void* stream);
void se_scale_cuda(const SeParams& p, void* stream);
void se_bwd_reduce_cuda(const SeParams& p, void* stream);
void se_bwd_apply_cuda(const SeParams& p, void* stream);
#endif

}  // namespace mnet
