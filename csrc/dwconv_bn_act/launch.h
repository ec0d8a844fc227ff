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
// The widest ISA copy of the host twins (this file's and squeeze_excite's) this CPU runs, capped by
// MNET_EXT_CPU_ISA: 0 baseline, 1 AVX2+FMA, 2 AVX-512 (cpu.cpp).
int host_isa();

// The CUDA tile plan run on the host (tile_check.cpp): counts [N, C, Ho, Wo] of work items per output.
void dw_tile_coverage(const DwParams& p, int elem_size, int threads, int32_t* counts);

#ifdef WITH_CUDA
// CUDA (fwd.cu, stats.cu, bwd_reduce.cu, bwd_apply.cu). `stream` is a cudaStream_t. The scratch buffer p.work
// must hold at least the number of floats returned by the matching *_workspace() (per-chunk partial sums).
int64_t dw_stats_workspace(const DwParams& p);
int64_t dw_bwd_reduce_workspace(const DwParams& p);
int64_t dw_bwd_apply_workspace(const DwParams& p);  // dweight partials
void dw_fwd_cuda(const DwParams& p, void* stream);
void dw_stats_cuda(const DwParams& p, void* stream);
void dw_bwd_reduce_cuda(const DwParams& p, void* stream);
void dw_bwd_apply_cuda(const DwParams& p, void* stream);
#endif

}  // namespace mnet
