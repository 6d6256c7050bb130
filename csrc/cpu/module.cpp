// The Python module cadk._C: importing it loads this library, whose static initialisers register
// the op schemas (csrc/cadk_ops.cpp) and the kernels below. It exposes no Python functions.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY_IMPL(cadk, CPU, m) {
  m.impl("gate_apply_fwd", &cadk::cpu::gate_apply_fwd);
  m.impl("gate_apply_bwd", &cadk::cpu::gate_apply_bwd);
  m.impl("gated_linear_fwd", &cadk::cpu::gated_linear_fwd);
  m.impl("gated_linear_bwd", &cadk::cpu::gated_linear_bwd);
  m.impl("gated_conv2d_fwd", &cadk::cpu::gated_conv2d_fwd);
  m.impl("gated_conv2d_bwd", &cadk::cpu::gated_conv2d_bwd);
  m.impl("bn_gate_act_fwd", &cadk::cpu::bn_gate_act_fwd);
  m.impl("bn_gate_act_bwd", &cadk::cpu::bn_gate_act_bwd);
}
