// Torch boundary of the dwconv_bn_act primitives: validate (messages name the argument), allocate outputs in
// x's dtype and memory format, fill DwParams, and run the host twin (CPU) or launch the kernels on the current
// CUDA stream (CUDA). Schemas live in csrc/mnet_ext.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/check.h"
#include "common/eager_check.h"
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

// ---- whole layers in one call: the eager CPU path of mnet_ext.functional.dwconv_bn_act -------------------------
// Python's checks (same conditions and messages, eager_check.h), BatchNorm's fold and the kernels in one dispatcher
// call per layer (eval; training: forward with the running statistics' update, and backward): the Python path (its
// checks, the fold and the update as torch calls, the backend's wrappers) cost ~20 us per layer, more than a small
// layer's kernels. The fold is the Python path's: invstd = 1 / sqrt(float(var) + float(eps)), IEEE square root and
// division as torch.rsqrt computes them; the update and the backward's finalize run the torch ops the Python path
// runs: the results are bitwise the op path's.

// mnet_ext.functional._check_vector; returns v as a contiguous fp32 tensor (v itself when it is one).
Tensor bn_vector(const Tensor& t, const char* name, int64_t C, const Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, name, ": expected shape (", C,
                    ",) (one value per channel of x), got ", py_shape(t.sizes()));
  eager_check_device(t, name, x);
  TORCH_CHECK_VALUE(t.is_floating_point(), name, ": expected a floating-point tensor, got ", py_dtype(t.scalar_type()));
  return as_fp32(t).contiguous();
}

// A layer's checked arguments: x (an NCHW copy when it was in neither layout), running_mean, running_var, gamma,
// beta as contiguous fp32 tensors (undefined where not given).
struct Layer {
  Tensor x;
  Tensor vec[4];
};

// The checks of mnet_ext.functional.dwconv_bn_act, in its order.
Layer check_layer(const Tensor& x_in, const Tensor& weight, const c10::optional<Tensor>& running_mean,
                  const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& bn_weight,
                  const c10::optional<Tensor>& bn_bias, int64_t stride, int64_t dilation, std::string_view act) {
  Layer L{eager_check_input(x_in), {}};
  const Tensor& x = L.x;
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, "x: expected a non-zero height and width, got shape ",
                    py_shape(x.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight: expected a 4-D [C, 1, k, k] tensor");
  const int64_t k = weight.size(3);
  TORCH_CHECK_VALUE(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == k && (k == 3 || k == 5 || k == 7),
                    "weight: expected a depthwise filter of shape (", C, ", 1, k, k) with k in (3, 5, 7) (groups = "
                    "channels = ", C, "), got ", py_shape(weight.sizes()));
  eager_check_device(weight, "weight", x);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride: expected one of (1, 2), got ", stride);
  TORCH_CHECK_VALUE(dilation == 1 || dilation == 2, "dilation: expected one of (1, 2), got ", dilation);
  TORCH_CHECK_VALUE(act == "none" || act == "relu" || act == "relu6" || act == "hardswish" || act == "silu",
                    "act: expected one of ('none', 'relu', 'relu6', 'hardswish', 'silu'), got '", act, "'");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", py_dtype(x.scalar_type()),
                    " (that of x), got ", py_dtype(weight.scalar_type()));
  const char* names[4] = {"running_mean", "running_var", "bn_weight", "bn_bias"};
  const c10::optional<Tensor>* given[4] = {&running_mean, &running_var, &bn_weight, &bn_bias};
  for (int i = 0; i < 4; ++i)
    if (given[i]->has_value()) L.vec[i] = bn_vector(**given[i], names[i], C, x);
  return L;
}

// mnet_ext.ops._common.new_output for an empty batch: x's strides when the shape is unchanged.
Tensor empty_output(const Tensor& x, const Tensor& weight, int64_t stride, int64_t dilation) {
  const int k = (int)weight.size(3);
  const int64_t ho = out_size(x.size(2), k, (int)stride, (int)dilation);
  const int64_t wo = out_size(x.size(3), k, (int)stride, (int)dilation);
  if (ho == x.size(2) && wo == x.size(3)) return at::empty_like(x);
  return at::empty({0, x.size(1), ho, wo}, x.options());
}

// Points p's BN vectors at mean, the fold of var (invstd) and gamma / beta (1 / 0 where not given); `folded` holds
// what is computed here and must outlive the kernel.
void fold_bn(DwParams& p, std::vector<float>& folded, const Tensor& mean, const Tensor& var, const Tensor& gamma,
             const Tensor& beta, double eps) {
  const int64_t C = p.C;
  folded.resize(3 * C);
  const float* v = var.data_ptr<float>();
  const float e = (float)eps;
  for (int64_t c = 0; c < C; ++c) folded[c] = 1.0f / std::sqrt(v[c] + e);
  std::fill(folded.begin() + C, folded.begin() + 2 * C, 1.0f);
  std::fill(folded.begin() + 2 * C, folded.end(), 0.0f);
  p.mean = mean.data_ptr<float>();
  p.invstd = folded.data();
  p.gamma = gamma.defined() ? gamma.data_ptr<float>() : folded.data() + C;
  p.beta = beta.defined() ? beta.data_ptr<float>() : folded.data() + 2 * C;
}

Tensor run_fwd(DwParams& p, const Tensor& x, std::string_view act) {
  p.act = parse_act(std::string(act), true);
  Tensor y = empty_like_layout(p, x, p.Ho, p.Wo);
  p.y = y.data_ptr();
  p.ys = strides4(y, p.channels_last);
  dw_fwd_cpu(p);
  return y;
}

Tensor eval_in_one_call(const Tensor& x_in, const Tensor& weight, const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& bn_weight,
                        const c10::optional<Tensor>& bn_bias, double eps, int64_t stride, int64_t dilation,
                        c10::string_view act_in) {
  const std::string_view act(act_in.data(), act_in.size());
  const Layer L = check_layer(x_in, weight, running_mean, running_var, bn_weight, bn_bias, stride, dilation, act);
  TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                    "running_mean/running_var: required when training=False");
  if (L.x.size(0) == 0) return empty_output(L.x, weight, stride, dilation);
  const Tensor w = weight.contiguous();
  DwParams p = make_params(L.x, w, stride, dilation);
  std::vector<float> folded;
  fold_bn(p, folded, L.vec[0], L.vec[1], L.vec[2], L.vec[3], eps);
  return run_fwd(p, L.x, act);
}

// Training forward: batch statistics, the forward with them, and (given running statistics) their update in place,
// exactly mnet_ext.functional._update_running_stats. Returns (y, batch mean, biased batch variance).
std::tuple<Tensor, Tensor, Tensor> train_in_one_call(const Tensor& x_in, const Tensor& weight,
                                                     const c10::optional<Tensor>& bn_weight,
                                                     const c10::optional<Tensor>& bn_bias,
                                                     const c10::optional<Tensor>& running_mean,
                                                     const c10::optional<Tensor>& running_var, double momentum,
                                                     double eps, int64_t stride, int64_t dilation,
                                                     c10::string_view act_in) {
  const std::string_view act(act_in.data(), act_in.size());
  const Layer L = check_layer(x_in, weight, running_mean, running_var, bn_weight, bn_bias, stride, dilation, act);
  const Tensor& x = L.x;
  const int k = (int)weight.size(3);
  const int64_t count = x.size(0) * out_size(x.size(2), k, (int)stride, (int)dilation) *
                        out_size(x.size(3), k, (int)stride, (int)dilation);
  TORCH_CHECK_VALUE(count != 1, "x: expected more than 1 value per channel when training, got input size ",
                    x.sizes());
  if (count == 0)  // as native: an empty result, the running statistics left alone
    return {empty_output(x, weight, stride, dilation), vec(x, x.size(1)).zero_(), vec(x, x.size(1)).zero_()};
  const Tensor w = weight.contiguous();
  DwParams p = make_params(x, w, stride, dilation);
  Tensor mean = vec(x, p.C), var = vec(x, p.C);
  p.out0 = mean.data_ptr<float>();
  p.out1 = var.data_ptr<float>();
  dw_stats_cpu(p);
  std::vector<float> folded;
  fold_bn(p, folded, mean, var, L.vec[2], L.vec[3], eps);
  Tensor y = run_fwd(p, x, act);
  if (running_mean.has_value() && running_var.has_value()) {
    const Tensor unbiased = var.mul((double)count / (double)(count - 1));
    for (const auto& [running, stat] : {std::pair{*running_mean, mean}, std::pair{*running_var, unbiased}})
      running.copy_(running.mul(1.0 - momentum).add_(stat.to(running.scalar_type()), momentum));
  }
  return {y, mean, var};
}

// Training backward from the saved (x, weight, batch mean, batch variance, gamma, beta): bwd_reduce, BatchNorm's
// mean terms, bwd_apply. Returns (dx, dweight, dgamma, dbeta) as mnet_ext.ops.dwconv_bn_act.backward does.
std::tuple<Tensor, Tensor, Tensor, Tensor> train_backward_in_one_call(
    const Tensor& grad_y, const Tensor& x_in, const Tensor& weight, const Tensor& mean, const Tensor& var,
    const c10::optional<Tensor>& bn_weight, const c10::optional<Tensor>& bn_bias, double eps, int64_t stride,
    int64_t dilation, c10::string_view act) {
  const Tensor x = eager_check_input(x_in);  // the forward's copy again when x was in neither layout
  if (x.numel() == 0) {
    const Tensor zero = vec(x, x.size(1)).zero_();
    return {at::empty_like(x), at::zeros(weight.sizes(), weight.options()), zero, zero.clone()};
  }
  const Tensor w = weight.contiguous();
  DwParams p = make_params(x, w, stride, dilation);
  const Tensor gamma = bn_weight.has_value() ? as_fp32(*bn_weight).contiguous() : Tensor();
  const Tensor beta = bn_bias.has_value() ? as_fp32(*bn_bias).contiguous() : Tensor();
  std::vector<float> folded;
  fold_bn(p, folded, mean, var, gamma, beta, eps);
  // autograd may hand over any strides (a sum's gradient is expanded): the kernels read x's layout
  const Tensor gy = set_grad_y(p, grad_y.contiguous(memory_format_of(x)), x);
  p.act = parse_act(std::string(act), true);
  Tensor sum_g = vec(x, p.C), sum_gx = vec(x, p.C);
  p.out0 = sum_g.data_ptr<float>();
  p.out1 = sum_gx.data_ptr<float>();
  dw_bwd_reduce_cpu(p);
  const int64_t count = p.N * p.Ho * p.Wo;
  const Tensor mean_g = sum_g.div(count), mean_gx = sum_gx.div(count);
  p.mean_g = mean_g.data_ptr<float>();
  p.mean_g_xhat = mean_gx.data_ptr<float>();
  Tensor dx = empty_like_layout(p, x, p.H, p.W);
  Tensor dweight = at::empty(w.sizes(), w.options());
  p.y = dx.data_ptr();
  p.ys = strides4(dx, p.channels_last);
  p.dweight = dweight.data_ptr();
  dw_bwd_apply_cpu(p);
  return {dx, dweight, sum_gx, sum_g};
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

TORCH_LIBRARY_IMPL(mnet_ext_cuda, CompositeExplicitAutograd, m) {
  m.impl("_dw_tile_coverage", &mnet::tile_coverage);
  // any device: see eager_check_input
  m.impl("dwconv_bn_act_eval", &mnet::eval_in_one_call);
  m.impl("dwconv_bn_act_train_eager", &mnet::train_in_one_call);
  m.impl("dwconv_bn_act_train_backward_eager", &mnet::train_backward_in_one_call);
}

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
