// Plain parameter struct for the dwconv_bn_act primitives: filled by op.cpp (the torch boundary), read by the
// host twin (cpu.cpp) and the CUDA kernels (kernels.cuh). No ATen.
//
// Shapes: x [N, C, H, W]; grad_y / y [N, C, Ho, Wo]; weight [C, 1, k, k] contiguous (tap t = kh * k + kw at
// weight[c * k*k + t]); per-channel vectors fp32 [C] contiguous. Every 4-D tensor is addressed through its
// own int64 element strides (s_n, s_c, s_h, s_w), so x, grad_y and the outputs may each be NCHW- or
// channels_last-contiguous independently. `channels_last` is x's memory format (picks the thread mapping).
#pragma once

#include <stdint.h>

#include "common/dispatch.h"

namespace mnet {

struct Strides4 {
  int64_t n, c, h, w;
};

struct DwParams {
  // inputs
  const void* x = nullptr;          // [N, C, H, W], dtype
  const void* weight = nullptr;     // [C, k*k], dtype
  const void* grad_y = nullptr;     // [N, C, Ho, Wo], dtype (bwd only)
  const float* mean = nullptr;      // [C]
  const float* invstd = nullptr;    // [C]
  const float* gamma = nullptr;     // [C]
  const float* beta = nullptr;      // [C]
  const float* mean_g = nullptr;    // [C] (bwd_apply)
  const float* mean_g_xhat = nullptr;  // [C] (bwd_apply)
  // outputs
  void* y = nullptr;                // fwd: [N, C, Ho, Wo]; bwd_apply: dx [N, C, H, W]; dtype
  void* dweight = nullptr;          // bwd_apply: [C, k*k], dtype
  float* out0 = nullptr;            // stats: mean; bwd_reduce: sum_g    [C]
  float* out1 = nullptr;            // stats: var;  bwd_reduce: sum_g_xhat [C]
  // scratch (CUDA: allocated by op.cpp from the caching allocator; size from *_workspace())
  float* work = nullptr;

  Strides4 xs{}, gs{}, ys{};        // element strides of x, grad_y, and the 4-D output (y or dx)
  int64_t N = 0, C = 0, H = 0, W = 0, Ho = 0, Wo = 0;
  int k = 3, stride = 1, dilation = 1, pad = 1;
  Act act = Act::None;
  DType dtype = DType::F32;
  bool channels_last = false;

  MNET_HD int64_t M() const { return N * Ho * Wo; }
};

}  // namespace mnet
