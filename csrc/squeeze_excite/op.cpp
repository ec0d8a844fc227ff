// Torch boundary of the squeeze_excite primitives (see dwconv_bn_act/op.cpp for the pattern).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/hardsigmoid.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
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
#include <tuple>

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

// ---- whole layers in one call: the eager CPU path of mnet_ext.functional.squeeze_excite ------------------------
// Python's checks (same conditions and messages, eager_check.h), pool, the two FCs with their activations and the
// scale in one dispatcher call (eval; training: forward, and backward), instead of ~15 (eval) / ~40 (training)
// Python-level torch calls. The FCs and their derivatives are the Python path's torch ops
// (mnet_ext.ops.squeeze_excite._excite and backward, mnet_ext.reference.act_bwd), op for op: the results are
// bitwise the Python path's.

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

// A layer's checked arguments: x (an NCHW copy when it was in neither layout), the FC weights as [S, C] / [C, S].
struct SeLayer {
  Tensor x, w1, w2;
};

// The checks of mnet_ext.functional.squeeze_excite, in its order.
SeLayer check_layer(const Tensor& x_in, const Tensor& fc1_weight, const Tensor& fc1_bias, const Tensor& fc2_weight,
                    const Tensor& fc2_bias, std::string_view act, std::string_view gate) {
  SeLayer L;
  L.x = eager_check_input(x_in);
  const int64_t C = L.x.size(1);
  L.w1 = fc_matrix(fc1_weight, "fc1_weight", -1, C);
  const int64_t S = L.w1.size(0);
  L.w2 = fc_matrix(fc2_weight, "fc2_weight", C, S);
  TORCH_CHECK_VALUE(fc1_bias.dim() == 1 && fc1_bias.size(0) == S, "fc1_bias: expected shape [", S, "]");
  TORCH_CHECK_VALUE(fc2_bias.dim() == 1 && fc2_bias.size(0) == C, "fc2_bias: expected shape [", C, "]");
  check_fc(L.w1, "fc1_weight", L.x);
  check_fc(fc1_bias, "fc1_bias", L.x);
  check_fc(L.w2, "fc2_weight", L.x);
  check_fc(fc2_bias, "fc2_bias", L.x);
  TORCH_CHECK_VALUE(act == "relu" || act == "silu", "act: expected one of ('relu', 'silu'), got '", act, "'");
  TORCH_CHECK_VALUE(gate == "hardsigmoid" || gate == "sigmoid",
                    "gate: expected one of ('hardsigmoid', 'sigmoid'), got '", gate, "'");
  return L;
}

// mnet_ext.ops.squeeze_excite._excite: the FCs on the fp32 pooled means, every intermediate the backward needs.
struct Excite {
  Tensor a1, h, a2, s;
};

Excite excite(const Tensor& pooled, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
              std::string_view act, std::string_view gate) {
  Excite e;
  e.a1 = at::addmm(as_fp32(b1), pooled, as_fp32(w1).t());
  e.h = act == "relu" ? at::relu(e.a1) : at::silu(e.a1);
  e.a2 = at::addmm(as_fp32(b2), e.h, as_fp32(w2).t());
  e.s = gate == "hardsigmoid" ? at::hardsigmoid(e.a2) : at::sigmoid(e.a2);
  return e;
}

// mnet_ext.reference.act_bwd for the SE's activations and gates, op for op.
Tensor act_bwd(const Tensor& u, const Tensor& grad, std::string_view act) {
  if (act == "relu") return at::where(u.le(0), at::zeros_like(grad), grad);
  if (act == "hardsigmoid") return at::where(u.gt(-3).bitwise_and(u.lt(3)), grad.div(6), at::zeros_like(grad));
  const Tensor s = at::sigmoid(u);
  if (act == "silu") return grad.mul(s).mul(u.mul(at::rsub(s, 1)).add(1));
  return grad.mul(s).mul(at::rsub(s, 1));  // sigmoid
}

// Forward: (y, pooled), as mnet_ext.ops.squeeze_excite.forward.
std::tuple<Tensor, Tensor> train_in_one_call(const Tensor& x_in, const Tensor& fc1_weight, const Tensor& fc1_bias,
                                             const Tensor& fc2_weight, const Tensor& fc2_bias, c10::string_view act_in,
                                             c10::string_view gate_in) {
  const std::string_view act(act_in.data(), act_in.size()), gate(gate_in.data(), gate_in.size());
  const SeLayer L = check_layer(x_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate);
  // An empty x: mnet_ext.ops._common.new_output, and the mean of no pixels as native computes it (NaN)
  if (L.x.numel() == 0) return {at::empty_like(L.x), as_fp32(L.x).mean({2, 3})};
  const Tensor pooled = pool<false>(L.x);
  return {scale<false>(L.x, excite(pooled, L.w1, fc1_bias, L.w2, fc2_bias, act, gate).s), pooled};
}

Tensor eval_in_one_call(const Tensor& x, const Tensor& fc1_weight, const Tensor& fc1_bias, const Tensor& fc2_weight,
                        const Tensor& fc2_bias, c10::string_view act, c10::string_view gate) {
  return std::get<0>(train_in_one_call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate));
}

// Backward: (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias) in the parameters' shapes and dtypes, as
// mnet_ext.ops.squeeze_excite.backward computes them.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_in_one_call(
    const Tensor& grad_y, const Tensor& x_in, const Tensor& pooled, const Tensor& fc1_weight, const Tensor& fc1_bias,
    const Tensor& fc2_weight, const Tensor& fc2_bias, c10::string_view act_in, c10::string_view gate_in) {
  const std::string_view act(act_in.data(), act_in.size()), gate(gate_in.data(), gate_in.size());
  const Tensor x = eager_check_input(x_in);  // the forward's copy again when x was in neither layout
  const Tensor w1 = fc_matrix(fc1_weight, "fc1_weight", -1, x.size(1));
  const Tensor w2 = fc_matrix(fc2_weight, "fc2_weight", x.size(1), w1.size(0));
  const Excite e = excite(pooled, w1, fc1_bias, w2, fc2_bias, act, gate);
  const bool empty = x.numel() == 0;
  // mnet_ext.ops._common.dense_like: autograd may hand over any strides (a sum's gradient is expanded); the kernels
  // take either layout (grad_y's drives them)
  const bool dense = grad_y.is_contiguous() || grad_y.is_contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor gy = empty || dense ? grad_y : grad_y.contiguous(memory_format_of(x));
  const Tensor ds = empty ? at::zeros_like(pooled) : bwd_reduce<false>(gy, x);
  const Tensor da2 = act_bwd(e.a2, ds, gate);
  const Tensor da1 = act_bwd(e.a1, at::matmul(da2, as_fp32(w2)), act);
  const Tensor dx = empty ? at::empty_like(x) : bwd_apply<false>(gy, e.s, at::matmul(da1, as_fp32(w1)));
  return {dx, at::matmul(da1.t(), pooled).to(w1.scalar_type()).reshape(fc1_weight.sizes()),
          da1.sum(0).to(fc1_bias.scalar_type()), at::matmul(da2.t(), e.h).to(w2.scalar_type()).reshape(
          fc2_weight.sizes()), da2.sum(0).to(fc2_bias.scalar_type())};
}

}  // namespace
}  // namespace mnet

TORCH_LIBRARY_IMPL(mnet_ext_cuda, CompositeExplicitAutograd, m) {
  // any device: see eager_check_input
  m.impl("squeeze_excite_eval", &mnet::eval_in_one_call);
  m.impl("squeeze_excite_train_eager", &mnet::train_in_one_call);
  m.impl("squeeze_excite_backward_eager", &mnet::backward_in_one_call);
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
