// Input validation at the torch boundary (op.cpp files only; includes ATen). Every message names the argument
// and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/activations.h"
#include "common/dispatch.h"
#include "dwconv_bn_act/params.h"

namespace mnet {

// mnet_ext.reference.memory_format_of: channels_last when channels_last-contiguous and not NCHW-contiguous.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Canonical element strides of a [N, C, H, W] tensor in the given layout (size-1 dims index with 0, so
// canonical and actual strides address the same elements).
inline Strides4 strides4(const at::Tensor& t, bool channels_last) {
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  if (channels_last) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: return DType::F32;
  }
}

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D [N, C, H, W] tensor, got ", t.dim(), "-D with shape ",
              t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              ": expected dtype float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              ": expected an NCHW-contiguous or channels_last-contiguous tensor, got strides ", t.strides(),
              " for shape ", t.sizes());
  TORCH_CHECK(t.size(0) >= 1 && t.size(1) >= 1 && t.size(2) >= 1 && t.size(3) >= 1, name,
              ": expected N, C, H, W >= 1, got shape ", t.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (the dtype of ",
              ref_name, "), got ", t.scalar_type());
}

// A contiguous fp32 tensor of the given shape on ref's device ([C] or [N, C]).
inline void check_fp32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline int check_weight(const at::Tensor& w, const at::Tensor& x) {
  check_like(w, "weight", x, "x");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3), "weight",
              ": expected shape [C, 1, k, k] with C = ", x.size(1), " (channels of x), got ", w.sizes());
  const int64_t k = w.size(2);
  TORCH_CHECK(k == 3 || k == 5 || k == 7, "weight: kernel size k must be 3, 5 or 7, got k = ", k);
  TORCH_CHECK(w.is_contiguous(), "weight: expected a contiguous tensor");
  return (int)k;
}

inline void check_geometry(int64_t stride, int64_t dilation) {
  TORCH_CHECK(stride == 1 || stride == 2, "stride: expected 1 or 2, got ", stride);
  TORCH_CHECK(dilation == 1 || dilation == 2, "dilation: expected 1 or 2, got ", dilation);
}

inline Act parse_act(const std::string& s, bool conv) {
  if (conv) {
    if (s == "none") return Act::None;
    if (s == "relu") return Act::Relu;
    if (s == "relu6") return Act::Relu6;
    if (s == "hardswish") return Act::Hardswish;
    if (s == "silu") return Act::Silu;
    TORCH_CHECK(false, "act: expected one of 'none', 'relu', 'relu6', 'hardswish', 'silu', got '", s, "'");
  }
  TORCH_CHECK(false, "act: unknown activation '", s, "'");
}

}  // namespace mnet
