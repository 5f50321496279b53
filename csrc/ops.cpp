// Operator schemas of the mdarts namespace. One schema per op; the CPU kernels
// (cpu_kernels.cpp) and the CUDA kernels (cuda_kernels.cu) only add
// TORCH_LIBRARY_IMPL blocks. Fake (meta) kernels and autograd live in Python
// (mdarts_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

// An empty Python module: importing mdarts_kernels._C loads this library, which
// registers the schemas below and the kernels of the other files.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mdarts, m) {
  // out = sum_k weights[k] * outs[k]
  m.def("mixed_sum(Tensor[] outs, Tensor weights) -> Tensor");
  // (grad_outs, grad_weights)
  m.def("mixed_sum_backward(Tensor grad, Tensor[] outs, Tensor weights) -> (Tensor[], Tensor)");
  // (out, mean, rstd): out = residual + sign * sum_k w_k * LN_k(h + outs[k]);
  // mean, rstd are (K, N) row statistics of h + outs[k], N = numel / D, in the
  // accumulation dtype (float64 for float64 inputs, float32 otherwise).
  m.def(
      "mixed_ln_sum(Tensor h, Tensor[] outs, Tensor weights, Tensor ln_weight, Tensor ln_bias, "
      "float eps, Tensor? residual, float sign) -> (Tensor, Tensor, Tensor)");
  // (grad_h, grad_outs, grad_weights, grad_ln_weight, grad_ln_bias); grad of residual is grad.
  m.def(
      "mixed_ln_sum_backward(Tensor grad, Tensor h, Tensor[] outs, Tensor weights, "
      "Tensor ln_weight, Tensor ln_bias, Tensor mean, Tensor rstd, float sign) "
      "-> (Tensor, Tensor[], Tensor, Tensor, Tensor)");
  // elementwise max (first maximum wins the gradient) or mean of xs
  m.def("split_pool(Tensor[] xs, str mode) -> Tensor");
  m.def("split_pool_backward(Tensor grad, Tensor[] xs, str mode) -> Tensor[]");
  // x * keep / (1 - p), keep a pure function of (seed, element index) (dropout_hash.h);
  // also its own backward (applied to the gradient with the same seed)
  m.def("seeded_dropout(Tensor x, float p, int seed) -> Tensor");
}
