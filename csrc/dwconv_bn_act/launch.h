// Entry points of the dwconv_bn_act implementations, called by op.cpp. No ATen.
#pragma once

#include <stdint.h>

#include "dwconv_bn_act/params.h"

namespace mnet {

// Host twin (cpu.cpp): the same math as the kernels, on CPU tensors.
void dw_fwd_cpu(const DwParams& p);
void dw_stats_cpu(const DwParams& p);
void dw_bwd_reduce_cpu(const DwParams& p);
void dw_bwd_apply_cpu(const DwParams& p);

#ifdef WITH_CUDA
// CUDA (fwd.cu, stats.cu, bwd_reduce.cu, bwd_apply.cu). `stream` is a cudaStream_t. Scratch buffers
// p.work / p.work2 must hold at least the number of floats returned by the matching *_workspace().
int64_t dw_stats_workspace(const DwParams& p);
int64_t dw_bwd_reduce_workspace(const DwParams& p);
int64_t dw_bwd_apply_workspace(const DwParams& p);   // p.work (dweight partials)
int64_t dw_bwd_apply_workspace2(const DwParams& p);  // p.work2 (dz, fp32, N*C*Ho*Wo)
void dw_fwd_cuda(const DwParams& p, void* stream);
void dw_stats_cuda(const DwParams& p, void* stream);
void dw_bwd_reduce_cuda(const DwParams& p, void* stream);
void dw_bwd_apply_cuda(const DwParams& p, void* stream);
#endif

}  // namespace mnet
