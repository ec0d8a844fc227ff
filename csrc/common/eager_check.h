// Argument checks of the eager CPU calls (`dwconv_bn_act_eval`, `squeeze_excite_eval`: mnet_ext.functional's
// layers in one C++ call each): the conditions and messages of the Python checks they stand in for
// (mnet_ext/functional.py), raised as ValueError, shapes and dtypes printed as Python prints them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace mnet {

// A shape as Python prints tuple(t.shape): (2, 3) and (4,).
inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline std::string py_dtype(at::ScalarType st) { return "torch." + std::string(c10::getDtypeNames(st).first); }

// mnet_ext.functional._check_input for the dtypes these calls serve (float64 goes to the reference backend before
// them). Returns x, or an NCHW copy of an x in neither supported layout.
inline at::Tensor eager_check_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D [N, C, H, W] tensor, got shape ", py_shape(x.sizes()));
  const auto st = x.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                    "x: expected dtype float32, float16, bfloat16 (or float64), got ", py_dtype(st));
  TORCH_CHECK_VALUE(x.size(1) > 0, "x: expected at least one channel, got shape ", py_shape(x.sizes()));
  // The dispatcher sent these calls here for any device (CompositeExplicitAutograd, so that a parameter on another
  // device gets the error below); the caller routes only CPU inputs to them.
  TORCH_CHECK(x.is_cpu(), "x: the eager fast path serves CPU tensors, got ", x.device());
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

inline void eager_check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " (that of x), got ",
                    t.device());
}

// t in fp32 without the dispatcher's `to` when it is fp32 already (a few hundred ns of a tiny layer's time).
inline at::Tensor as_fp32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

}  // namespace mnet
