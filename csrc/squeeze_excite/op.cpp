// Torch boundary of the squeeze_excite primitives (see dwconv_bn_act/op.cpp for the pattern).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/check.h"
#include "squeeze_excite/launch.h"

namespace mnet {
namespace {

using at::Tensor;

SeParams make_params(const Tensor& t, const char* name) {
  check_activation(t, name);
  SeParams p;
  p.N = t.size(0), p.C = t.size(1), p.H = t.size(2), p.W = t.size(3);
  p.dtype = dtype_of(t);
  p.channels_last = is_channels_last(t);
  return p;
}

Tensor out_like(const SeParams& p, const Tensor& t) {
  return at::empty({p.N, p.C, p.H, p.W}, t.options().memory_format(memory_format_of(t)));
}

#ifdef WITH_CUDA
void* stream_of(const Tensor& x) { return (void*)c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
#define MNET_SE_RUN(NAME, t)                        \
  if constexpr (CUDA) {                             \
    const c10::cuda::CUDAGuard guard(t.device());   \
    NAME##_cuda(p, stream_of(t));                   \
  } else {                                          \
    NAME##_cpu(p);                                  \
  }
#else
#define MNET_SE_RUN(NAME, t) NAME##_cpu(p);
#endif

template <bool CUDA>
Tensor pool(const Tensor& x) {
  SeParams p = make_params(x, "x");
  Tensor out = at::empty({p.N, p.C}, x.options().dtype(at::kFloat));
  p.x = x.data_ptr();
  p.xs = strides4(x, p.channels_last);
  p.out = out.data_ptr<float>();
  MNET_SE_RUN(se_pool, x)
  return out;
}

template <bool CUDA>
Tensor scale(const Tensor& x, const Tensor& s) {
  SeParams p = make_params(x, "x");
  check_fp32(s, "s", {p.N, p.C}, x);
  Tensor y = out_like(p, x);
  p.x = x.data_ptr();
  p.xs = strides4(x, p.channels_last);
  p.s = s.data_ptr<float>();
  p.y = y.data_ptr();
  p.ys = strides4(y, p.channels_last);
  MNET_SE_RUN(se_scale, x)
  return y;
}

template <bool CUDA>
Tensor bwd_reduce(const Tensor& grad_y, const Tensor& x) {
  SeParams p = make_params(grad_y, "grad_y");  // grad_y's layout drives the loops
  check_activation(x, "x");
  check_like(x, "x", grad_y, "grad_y");
  TORCH_CHECK(x.sizes() == grad_y.sizes(), "x: expected the shape of grad_y ", grad_y.sizes(), ", got ", x.sizes());
  Tensor out = at::empty({p.N, p.C}, x.options().dtype(at::kFloat));
  // The kernels read x in grad_y's memory format (channel vectors); an x in the other format is copied once.
  const Tensor xx = x.contiguous(memory_format_of(grad_y));
  p.grad_y = grad_y.data_ptr();
  p.gs = strides4(grad_y, p.channels_last);
  p.x = xx.data_ptr();
  p.xs = strides4(xx, p.channels_last);
  p.out = out.data_ptr<float>();
  MNET_SE_RUN(se_bwd_reduce, grad_y)
  return out;
}

template <bool CUDA>
Tensor bwd_apply(const Tensor& grad_y, const Tensor& s, const Tensor& dpooled) {
  SeParams p = make_params(grad_y, "grad_y");
  check_fp32(s, "s", {p.N, p.C}, grad_y);
  check_fp32(dpooled, "dpooled", {p.N, p.C}, grad_y);
  Tensor dx = out_like(p, grad_y);
  p.grad_y = grad_y.data_ptr();
  p.gs = strides4(grad_y, p.channels_last);
  p.s = s.data_ptr<float>();
  p.dpooled = dpooled.data_ptr<float>();
  p.y = dx.data_ptr();
  p.ys = strides4(dx, p.channels_last);
  MNET_SE_RUN(se_bwd_apply, grad_y)
  return dx;
}

}  // namespace
}  // namespace mnet

TORCH_LIBRARY_IMPL(mnet_ext_cuda, CPU, m) {
  m.impl("se_pool", &mnet::pool<false>);
  m.impl("se_scale", &mnet::scale<false>);
  m.impl("se_bwd_reduce", &mnet::bwd_reduce<false>);
  m.impl("se_bwd_apply", &mnet::bwd_apply<false>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(mnet_ext_cuda, CUDA, m) {
  m.impl("se_pool", &mnet::pool<true>);
  m.impl("se_scale", &mnet::scale<true>);
  m.impl("se_bwd_reduce", &mnet::bwd_reduce<true>);
  m.impl("se_bwd_apply", &mnet::bwd_apply<true>);
}
#endif
