// Plain parameter struct for the squeeze_excite primitives (see dwconv_bn_act/params.h for conventions).
// x / grad_y / y [N, C, H, W] via int64 element strides; s, dpooled, pooled, sums fp32 [N, C] contiguous.
#pragma once

#include <stdint.h>

#include "common/dispatch.h"
#include "dwconv_bn_act/params.h"

namespace mnet {

struct SeParams {
  const void* x = nullptr;       // se_pool, se_scale, se_bwd_reduce
  const void* grad_y = nullptr;  // se_bwd_reduce, se_bwd_apply
  const float* s = nullptr;      // [N, C] gate
  const float* dpooled = nullptr;  // [N, C]
  void* y = nullptr;             // se_scale: y; se_bwd_apply: dx
  float* out = nullptr;          // se_pool: pooled; se_bwd_reduce: sums  [N, C]
  Strides4 xs{}, gs{}, ys{};
  int64_t N = 0, C = 0, H = 0, W = 0;
  DType dtype = DType::F32;
  bool channels_last = false;    // layout of the main 4-D input (picks the thread mapping)
};

}  // namespace mnet
