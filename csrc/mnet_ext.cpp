// The extension module mnet_ext._C: importing it runs the operator registrations of this library (schemas
// below, CPU / CUDA implementations in csrc/*/op.cpp). The module itself only exposes two build facts:
//   WITH_CUDA: bool   CUDA kernels were compiled in
//   CUDA_ARCHS: str   the TORCH_CUDA_ARCH_LIST they were compiled for ("" without CUDA)
#include <Python.h>
#include <torch/library.h>

#include "common/macros.h"

#ifndef MNET_EXT_CUDA_ARCHS
#define MNET_EXT_CUDA_ARCHS none
#endif

// Schemas: names and argument order exactly as in docs/op_contract.md and mnet_ext/reference.py.
TORCH_LIBRARY(mnet_ext_cuda, m) {
  m.def(
      "dwconv_bn_act_fwd(Tensor x, Tensor weight, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, "
      "int stride, int dilation, str act) -> Tensor");
  m.def("dwconv_bn_stats(Tensor x, Tensor weight, int stride, int dilation) -> (Tensor, Tensor)");
  m.def(
      "dwconv_bn_act_bwd_reduce(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor invstd, "
      "Tensor gamma, Tensor beta, int stride, int dilation, str act) -> (Tensor, Tensor)");
  m.def(
      "dwconv_bn_act_bwd_apply(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor invstd, "
      "Tensor gamma, Tensor beta, Tensor mean_g, Tensor mean_g_xhat, int stride, int dilation, str act) "
      "-> (Tensor, Tensor)");
  // Test hook: the CUDA kernels' tile plan run on the host (tile_check.cpp).
  m.def("_dw_tile_coverage(Tensor x, Tensor weight, int stride, int dilation, int threads) -> Tensor");
  m.def("se_pool(Tensor x) -> Tensor");
  m.def("se_scale(Tensor x, Tensor s) -> Tensor");
  m.def("se_bwd_reduce(Tensor grad_y, Tensor x) -> Tensor");
  m.def("se_bwd_apply(Tensor grad_y, Tensor s, Tensor dpooled) -> Tensor");
  // Eager CPU calls of mnet_ext.functional (a whole eval layer: checks, BN fold or FCs, kernels); not primitives.
  m.def(
      "dwconv_bn_act_eval(Tensor x, Tensor weight, Tensor? running_mean, Tensor? running_var, Tensor? bn_weight, "
      "Tensor? bn_bias, float eps, int stride, int dilation, str act) -> Tensor");
  m.def(
      "dwconv_bn_act_train_eager(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, int stride, int dilation, "
      "str act) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dwconv_bn_act_train_backward_eager(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor var, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, int stride, int dilation, str act) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "squeeze_excite_eval(Tensor x, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, "
      "str act, str gate) -> Tensor");
  m.def(
      "squeeze_excite_train_eager(Tensor x, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, "
      "str act, str gate) -> (Tensor, Tensor)");
  m.def(
      "squeeze_excite_backward_eager(Tensor grad_y, Tensor x, Tensor pooled, Tensor fc1_weight, Tensor fc1_bias, "
      "Tensor fc2_weight, Tensor fc2_bias, str act, str gate) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mnet_ext C++/CUDA extension (registers torch.ops.mnet_ext_cuda)",
                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyObject* with_cuda = Py_True;
  const char* archs = MNET_STR(MNET_EXT_CUDA_ARCHS);
#else
  PyObject* with_cuda = Py_False;
  const char* archs = "";
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(m, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCHS", archs) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
