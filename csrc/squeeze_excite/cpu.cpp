// Host twin of the squeeze_excite primitives: two streaming passes (a per-(n, c) reduction; a per-(n, c) affine
// map). The loops (cpu_impl.h) run over the contiguous axis (channels in NHWC, the flattened plane in NCHW) with no
// dependence between iterations, so the compiler vectorises them; sums are formed in a fixed order that does not
// depend on the thread count (deterministic). Compiled for the baseline ISA and (x86-64, GCC) for AVX2+FMA and
// AVX-512, the copy chosen at runtime as for dwconv_bn_act (host_isa(), dwconv_bn_act/cpu.cpp).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "dwconv_bn_act/launch.h"
#include "squeeze_excite/launch.h"

namespace mnet {

#pragma GCC diagnostic ignored "-Wpsabi"

namespace se_base {
namespace {
#include "squeeze_excite/cpu_impl.h"
}  // namespace
}  // namespace se_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MNET_SE_ISA_COPIES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace se_avx2 {
namespace {
#include "squeeze_excite/cpu_impl.h"
}  // namespace
}  // namespace se_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace se_avx512 {
namespace {
#include "squeeze_excite/cpu_impl.h"
}  // namespace
}  // namespace se_avx512
#pragma GCC pop_options
#endif

namespace {

// The passes from the widest ISA copy host_isa() allows.
template <typename T, bool PROD>
void reduce(const SeParams& p, const T* a, const Strides4& as, const T* b, const Strides4& bs, float scale) {
#ifdef MNET_SE_ISA_COPIES
  const int isa = host_isa();
  if (isa == 2) return se_avx512::reduce_impl<T, PROD>(p, a, as, b, bs, scale);
  if (isa == 1) return se_avx2::reduce_impl<T, PROD>(p, a, as, b, bs, scale);
#endif
  se_base::reduce_impl<T, PROD>(p, a, as, b, bs, scale);
}

template <typename T>
void affine(const SeParams& p, const T* a, const Strides4& as, const float* s, const float* t, float tdiv) {
#ifdef MNET_SE_ISA_COPIES
  const int isa = host_isa();
  if (isa == 2) return se_avx512::affine_impl<T>(p, a, as, s, t, tdiv);
  if (isa == 1) return se_avx2::affine_impl<T>(p, a, as, s, t, tdiv);
#endif
  se_base::affine_impl<T>(p, a, as, s, t, tdiv);
}

}  // namespace

void se_pool_cpu(const SeParams& p) {
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T, [&] {
    const T* x = static_cast<const T*>(p.x);
    reduce<T, false>(p, x, p.xs, x, p.xs, 1.0f / (float)(p.H * p.W));
  });
}

void se_bwd_reduce_cpu(const SeParams& p) {
  // channels_last here is grad_y's layout (op.cpp): grad_y drives the loop, x is read through its strides
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T, [&] {
    reduce<T, true>(p, static_cast<const T*>(p.grad_y), p.gs, static_cast<const T*>(p.x), p.xs, 1.0f);
  });
}

void se_scale_cpu(const SeParams& p) {
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T,
                      [&] { affine<T>(p, static_cast<const T*>(p.x), p.xs, p.s, nullptr, 1.0f); });
}

void se_bwd_apply_cpu(const SeParams& p) {
  MNET_DISPATCH_DTYPE(p.dtype, c10::Half, c10::BFloat16, T, [&] {
    affine<T>(p, static_cast<const T*>(p.grad_y), p.gs, p.s, p.dpooled, (float)(p.H * p.W));
  });
}

}  // namespace mnet
