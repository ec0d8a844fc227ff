// Activation forward / derivative shared by the host twin and the CUDA kernels (fp32 math).
// Derivatives at the kinks, and for a NaN u, follow PyTorch's backward kernels, exactly as
// mnet_ext.reference.act_bwd (each written with PyTorch's own comparison, so a NaN takes PyTorch's branch):
//   relu        0 where u <= 0, else grad (NaN passes)       threshold_backward
//   relu6       0 where u <= 0 or u >= 6, else grad (NaN passes) hardtanh_backward
//   hardswish   0 for u <= -3, grad (u/3 + 1/2) for -3 < u < 3, grad from 3 (NaN passes) hardswish_backward
//   hardsigmoid grad/6 strictly inside (-3, 3), else 0 (NaN gives 0) hardsigmoid_backward
#pragma once

#include <math.h>

#include "common/macros.h"

namespace mnet {

// Values are part of the ABI between op.cpp (parses the string) and the kernels (template/switch).
enum class Act : int { None = 0, Relu = 1, Relu6 = 2, Hardswish = 3, Silu = 4, Hardsigmoid = 5, Sigmoid = 6 };

MNET_HD float sigmoidf_(float u) { return 1.0f / (1.0f + expf(-u)); }

// max / min that return NaN when an operand is NaN (torch.clamp and torch.relu keep a NaN; fmaxf/fminf drop it).
// On sm_80+ one instruction each (`max.NaN.f32`: FMNMX.NAN); elsewhere, and on the host, comparisons, which
// vectorise without -ffast-math. A comparison pair costs two SASS instructions (FSETP + FSEL) per bound: the
// static report's activation probe (bench/act_cost.cu) measures relu 1, relu6 2 per element on sm_90 (2, 3 with
// comparisons); hardswish 2 (FFMA.SAT + FMUL: u * sat(u / 6 + 1/2), below).
MNET_HD float max_nan_(float u, float lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(u), "f"(lo));
  return r;
#else
  return u < lo ? lo : u;
#endif
}
MNET_HD float min_nan_(float u, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(u), "f"(hi));
  return r;
#else
  return u > hi ? hi : u;
#endif
}
MNET_HD float clampf_(float u, float lo, float hi) { return min_nan_(max_nan_(u, lo), hi); }
// t clamped to [0, 1]. On the device __saturatef, which nvcc folds into the FMA that makes t (FFMA.SAT), and which
// gives 0 for a NaN t; on the host comparisons, which keep a NaN: either way hardswish's u * sat(u / 6 + 1/2) is NaN
// for a NaN u, as torch's.
MNET_HD float sat_(float t) {
#if defined(__CUDA_ARCH__)
  return __saturatef(t);
#else
  return t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
#endif
}

template <Act A>
MNET_HD float act_fwd(float u) {
  if constexpr (A == Act::None) {
    return u;
  } else if constexpr (A == Act::Relu) {
    return max_nan_(u, 0.0f);  // NaN stays NaN, as torch.relu
  } else if constexpr (A == Act::Relu6) {
    return clampf_(u, 0.0f, 6.0f);
  } else if constexpr (A == Act::Hardswish) {
    // u * clamp(u + 3, 0, 6) / 6 as u * sat(u / 6 + 1/2): 2 instructions instead of 5 on the device, exact on the
    // kinks (-3: -3 * fl(1/6) + 1/2 is 0, or a hair below with an FMA, saturated to 0; 3: it rounds to 1) and NaN
    // for a NaN u.
    return u * sat_(u * (1.0f / 6.0f) + 0.5f);
  } else if constexpr (A == Act::Silu) {
    return u * sigmoidf_(u);
  } else if constexpr (A == Act::Hardsigmoid) {
    return clampf_(u + 3.0f, 0.0f, 6.0f) * (1.0f / 6.0f);
  } else {
    return sigmoidf_(u);
  }
}

// d act(u)/du * grad.
template <Act A>
MNET_HD float act_bwd(float u, float grad) {
  if constexpr (A == Act::None) {
    return grad;
  } else if constexpr (A == Act::Relu) {
    return u <= 0.0f ? 0.0f : grad;
  } else if constexpr (A == Act::Relu6) {
    return (u <= 0.0f || u >= 6.0f) ? 0.0f : grad;
  } else if constexpr (A == Act::Hardswish) {
    return u <= -3.0f ? 0.0f : (u < 3.0f ? grad * (u * (1.0f / 3.0f) + 0.5f) : grad);
  } else if constexpr (A == Act::Silu) {
    const float s = sigmoidf_(u);
    return grad * s * (1.0f + u * (1.0f - s));
  } else if constexpr (A == Act::Hardsigmoid) {
    return (u > -3.0f && u < 3.0f) ? grad * (1.0f / 6.0f) : 0.0f;
  } else {
    const float s = sigmoidf_(u);
    return grad * s * (1.0f - s);
  }
}

// Runtime-act versions (uniform branch; used where the act is not a template parameter).
MNET_HD float act_fwd(Act a, float u) {
  switch (a) {
    case Act::Relu: return act_fwd<Act::Relu>(u);
    case Act::Relu6: return act_fwd<Act::Relu6>(u);
    case Act::Hardswish: return act_fwd<Act::Hardswish>(u);
    case Act::Silu: return act_fwd<Act::Silu>(u);
    case Act::Hardsigmoid: return act_fwd<Act::Hardsigmoid>(u);
    case Act::Sigmoid: return act_fwd<Act::Sigmoid>(u);
    default: return u;
  }
}

MNET_HD float act_bwd(Act a, float u, float grad) {
  switch (a) {
    case Act::Relu: return act_bwd<Act::Relu>(u, grad);
    case Act::Relu6: return act_bwd<Act::Relu6>(u, grad);
    case Act::Hardswish: return act_bwd<Act::Hardswish>(u, grad);
    case Act::Silu: return act_bwd<Act::Silu>(u, grad);
    case Act::Hardsigmoid: return act_bwd<Act::Hardsigmoid>(u, grad);
    case Act::Sigmoid: return act_bwd<Act::Sigmoid>(u, grad);
    default: return grad;
  }
}

}  // namespace mnet
