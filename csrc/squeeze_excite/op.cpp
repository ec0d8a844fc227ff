// Torch boundary of the squeeze_excite primitives (see dwconv_bn_act/op.cpp for the pattern).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/hardsigmoid.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/check.h"
#include "common/eager_check.h"
#include "squeeze_excite/launch.h"

#include <string>
#include <string_view>

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

// ---- the eval forward in one call: the eager CPU path of mnet_ext.functional.squeeze_excite -------------------
// Python's checks (same conditions and messages, eager_check.h), pool, the two FCs with their activations and the
// scale in one dispatcher call instead of ~15 Python-level torch calls. The FCs are the Python path's torch ops
// (addmm on the fp32 pooled means; the activations in place, same values), so the results are bitwise its results.

// fc_weight as [rows, cols] ([rows, cols, 1, 1] is a 1x1 conv's weight), checked as mnet_ext.functional does;
// rows < 0: any number of rows, named S in the message.
Tensor fc_matrix(const Tensor& w, const char* name, int64_t rows, int64_t cols) {
  const Tensor m = w.dim() == 2 || w.dim() == 0 ? w : w.reshape({w.size(0), -1});
  const std::string r = rows < 0 ? std::string("S") : std::to_string(rows);
  TORCH_CHECK_VALUE(m.dim() == 2 && (rows < 0 || m.size(0) == rows) && m.size(1) == cols, name, ": expected shape [",
                    r, ", ", cols, "] or [", r, ", ", cols, ", 1, 1], got ", py_shape(w.sizes()));
  return m;
}

void check_fc(const Tensor& t, const char* name, const Tensor& x) {
  eager_check_device(t, name, x);
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, name,
                    ": expected a float32/float16/bfloat16 tensor, got ", py_dtype(st));
}

Tensor eval_in_one_call(const Tensor& x_in, const Tensor& fc1_weight, const Tensor& fc1_bias, const Tensor& fc2_weight,
                        const Tensor& fc2_bias, c10::string_view act, c10::string_view gate) {
  const Tensor x = eager_check_input(x_in);
  const int64_t C = x.size(1);
  const Tensor w1 = fc_matrix(fc1_weight, "fc1_weight", -1, C);
  const int64_t S = w1.size(0);
  const Tensor w2 = fc_matrix(fc2_weight, "fc2_weight", C, S);
  TORCH_CHECK_VALUE(fc1_bias.dim() == 1 && fc1_bias.size(0) == S, "fc1_bias: expected shape [", S, "]");
  TORCH_CHECK_VALUE(fc2_bias.dim() == 1 && fc2_bias.size(0) == C, "fc2_bias: expected shape [", C, "]");
  check_fc(w1, "fc1_weight", x);
  check_fc(fc1_bias, "fc1_bias", x);
  check_fc(w2, "fc2_weight", x);
  check_fc(fc2_bias, "fc2_bias", x);
  const std::string_view a(act.data(), act.size()), g(gate.data(), gate.size());
  TORCH_CHECK_VALUE(a == "relu" || a == "silu", "act: expected one of ('relu', 'silu'), got '", a, "'");
  TORCH_CHECK_VALUE(g == "hardsigmoid" || g == "sigmoid", "gate: expected one of ('hardsigmoid', 'sigmoid'), got '",
                    g, "'");
  if (x.numel() == 0) return at::empty_like(x);  // mnet_ext.ops._common.new_output of an empty x
  const Tensor pooled = pool<false>(x);
  Tensor h = at::addmm(as_fp32(fc1_bias), pooled, as_fp32(w1).t());
  if (a == "relu") at::relu_(h);
  else at::silu_(h);
  Tensor s = at::addmm(as_fp32(fc2_bias), h, as_fp32(w2).t());
  if (g == "hardsigmoid") at::hardsigmoid_(s);
  else at::sigmoid_(s);
  return scale<false>(x, s);
}

}  // namespace
}  // namespace mnet

TORCH_LIBRARY_IMPL(mnet_ext_cuda, CompositeExplicitAutograd, m) {
  m.impl("squeeze_excite_eval", &mnet::eval_in_one_call);  // any device: see eager_check_input
}

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
