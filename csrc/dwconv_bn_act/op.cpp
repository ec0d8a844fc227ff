// Torch boundary of the dwconv_bn_act primitives: validate (messages name the argument), allocate outputs in
// x's dtype and memory format, fill DwParams, and run the host twin (CPU) or launch the kernels on the current
// CUDA stream (CUDA). Schemas live in csrc/mnet_ext.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/check.h"
#include "common/math.h"
#include "dwconv_bn_act/launch.h"

namespace mnet {
namespace {

using at::Tensor;

// Validates the arguments common to all four primitives and fills the geometry part of DwParams.
DwParams make_params(const Tensor& x, const Tensor& weight, int64_t stride, int64_t dilation) {
  check_activation(x, "x");
  const int k = check_weight(weight, x);
  check_geometry(stride, dilation);
  DwParams p;
  p.N = x.size(0), p.C = x.size(1), p.H = x.size(2), p.W = x.size(3);
  p.k = k, p.stride = (int)stride, p.dilation = (int)dilation, p.pad = padding_for(k, (int)dilation);
  p.Ho = out_size(p.H, k, p.stride, p.dilation);
  p.Wo = out_size(p.W, k, p.stride, p.dilation);
  p.channels_last = is_channels_last(x);
  p.xs = strides4(x, p.channels_last);
  p.dtype = dtype_of(x);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  return p;
}

void set_bn(DwParams& p, const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& gamma,
            const Tensor& beta) {
  check_fp32(mean, "mean", {p.C}, x);
  check_fp32(invstd, "invstd", {p.C}, x);
  check_fp32(gamma, "gamma", {p.C}, x);
  check_fp32(beta, "beta", {p.C}, x);
  p.mean = mean.data_ptr<float>();
  p.invstd = invstd.data_ptr<float>();
  p.gamma = gamma.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
}

// The kernels read grad_y in x's memory format (channel vectors); a grad_y in the other format is copied once.
Tensor set_grad_y(DwParams& p, const Tensor& grad_y_in, const Tensor& x) {
  check_activation(grad_y_in, "grad_y");
  const Tensor grad_y = grad_y_in.contiguous(memory_format_of(x));
  check_like(grad_y, "grad_y", x, "x");
  TORCH_CHECK(grad_y.size(0) == p.N && grad_y.size(1) == p.C && grad_y.size(2) == p.Ho && grad_y.size(3) == p.Wo,
              "grad_y: expected shape [", p.N, ", ", p.C, ", ", p.Ho, ", ", p.Wo, "] (the output of the conv), got ",
              grad_y.sizes());
  p.grad_y = grad_y.data_ptr();
  p.gs = strides4(grad_y, p.channels_last);
  return grad_y;
}

Tensor empty_like_layout(const DwParams& p, const Tensor& x, int64_t h, int64_t w) {
  return at::empty({p.N, p.C, h, w}, x.options().memory_format(memory_format_of(x)));
}

Tensor vec(const Tensor& x, int64_t C) { return at::empty({C}, x.options().dtype(at::kFloat)); }

#ifdef WITH_CUDA
void* stream_of(const Tensor& x) { return (void*)c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
Tensor scratch(const Tensor& x, int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, x.options().dtype(at::kFloat)); }
#endif

// ---- the four primitives; `cuda` selects the implementation --------------------------------------------
template <bool CUDA>
Tensor fwd(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& invstd, const Tensor& gamma,
           const Tensor& beta, int64_t stride, int64_t dilation, c10::string_view act) {
  DwParams p = make_params(x, weight, stride, dilation);
  set_bn(p, x, mean, invstd, gamma, beta);
  p.act = parse_act(std::string(act), true);
  Tensor y = empty_like_layout(p, x, p.Ho, p.Wo);
  p.y = y.data_ptr();
  p.ys = strides4(y, p.channels_last);
#ifdef WITH_CUDA
  if constexpr (CUDA) {
    const c10::cuda::CUDAGuard guard(x.device());
    dw_fwd_cuda(p, stream_of(x));
    return y;
  }
#endif
  dw_fwd_cpu(p);
  return y;
}

template <bool CUDA>
std::tuple<Tensor, Tensor> stats(const Tensor& x, const Tensor& weight, int64_t stride, int64_t dilation) {
  DwParams p = make_params(x, weight, stride, dilation);
  Tensor mean = vec(x, p.C), var = vec(x, p.C);
  p.out0 = mean.data_ptr<float>();
  p.out1 = var.data_ptr<float>();
#ifdef WITH_CUDA
  if constexpr (CUDA) {
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor work = scratch(x, dw_stats_workspace(p));
    p.work = work.data_ptr<float>();
    dw_stats_cuda(p, stream_of(x));
    return {mean, var};
  }
#endif
  dw_stats_cpu(p);
  return {mean, var};
}

template <bool CUDA>
std::tuple<Tensor, Tensor> bwd_reduce(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& mean,
                                      const Tensor& invstd, const Tensor& gamma, const Tensor& beta, int64_t stride,
                                      int64_t dilation, c10::string_view act) {
  DwParams p = make_params(x, weight, stride, dilation);
  set_bn(p, x, mean, invstd, gamma, beta);
  const Tensor gy = set_grad_y(p, grad_y, x);
  p.act = parse_act(std::string(act), true);
  Tensor sum_g = vec(x, p.C), sum_gx = vec(x, p.C);
  p.out0 = sum_g.data_ptr<float>();
  p.out1 = sum_gx.data_ptr<float>();
#ifdef WITH_CUDA
  if constexpr (CUDA) {
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor work = scratch(x, dw_bwd_reduce_workspace(p));
    p.work = work.data_ptr<float>();
    dw_bwd_reduce_cuda(p, stream_of(x));
    return {sum_g, sum_gx};
  }
#endif
  dw_bwd_reduce_cpu(p);
  return {sum_g, sum_gx};
}

template <bool CUDA>
std::tuple<Tensor, Tensor> bwd_apply(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& mean,
                                     const Tensor& invstd, const Tensor& gamma, const Tensor& beta,
                                     const Tensor& mean_g, const Tensor& mean_g_xhat, int64_t stride, int64_t dilation,
                                     c10::string_view act) {
  DwParams p = make_params(x, weight, stride, dilation);
  set_bn(p, x, mean, invstd, gamma, beta);
  const Tensor gy = set_grad_y(p, grad_y, x);
  check_fp32(mean_g, "mean_g", {p.C}, x);
  check_fp32(mean_g_xhat, "mean_g_xhat", {p.C}, x);
  p.mean_g = mean_g.data_ptr<float>();
  p.mean_g_xhat = mean_g_xhat.data_ptr<float>();
  p.act = parse_act(std::string(act), true);
  Tensor dx = empty_like_layout(p, x, p.H, p.W);
  Tensor dweight = at::empty(weight.sizes(), weight.options());
  p.y = dx.data_ptr();
  p.ys = strides4(dx, p.channels_last);
  p.dweight = dweight.data_ptr();
#ifdef WITH_CUDA
  if constexpr (CUDA) {
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor work = scratch(x, dw_bwd_apply_workspace(p));
    p.work = work.data_ptr<float>();
    dw_bwd_apply_cuda(p, stream_of(x));
    return {dx, dweight};
  }
#endif
  dw_bwd_apply_cpu(p);
  return {dx, dweight};
}

// The CUDA kernels' tile plan for x's shape, dtype and layout, run on the host (tests): int32 [N, C, Ho, Wo].
Tensor tile_coverage(const Tensor& x, const Tensor& weight, int64_t stride, int64_t dilation, int64_t threads) {
  const DwParams p = make_params(x, weight, stride, dilation);
  TORCH_CHECK(threads >= 1 && threads <= 1024, "threads: expected 1..1024, got ", threads);
  Tensor counts = at::zeros({p.N, p.C, p.Ho, p.Wo}, x.options().dtype(at::kInt).device(at::kCPU));
  dw_tile_coverage(p, (int)x.element_size(), (int)threads, counts.data_ptr<int32_t>());
  return counts;
}

}  // namespace
}  // namespace mnet

TORCH_LIBRARY_IMPL(mnet_ext_cuda, CompositeExplicitAutograd, m) { m.impl("_dw_tile_coverage", &mnet::tile_coverage); }

TORCH_LIBRARY_IMPL(mnet_ext_cuda, CPU, m) {
  m.impl("dwconv_bn_act_fwd", &mnet::fwd<false>);
  m.impl("dwconv_bn_stats", &mnet::stats<false>);
  m.impl("dwconv_bn_act_bwd_reduce", &mnet::bwd_reduce<false>);
  m.impl("dwconv_bn_act_bwd_apply", &mnet::bwd_apply<false>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(mnet_ext_cuda, CUDA, m) {
  m.impl("dwconv_bn_act_fwd", &mnet::fwd<true>);
  m.impl("dwconv_bn_stats", &mnet::stats<true>);
  m.impl("dwconv_bn_act_bwd_reduce", &mnet::bwd_reduce<true>);
  m.impl("dwconv_bn_act_bwd_apply", &mnet::bwd_apply<true>);
}
#endif
