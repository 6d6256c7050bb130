// The Python module cadk._C: importing it loads this library, whose static initialisers register
// the op schemas (csrc/cadk_ops.cpp) and the kernels below. Its one Python function frees the CPU
// kernels' cached memory (cadk.kernels.release_cached_memory).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace {

PyObject* release_cached_memory(PyObject*, PyObject*) {
  cadk::cpu::release_cached_memory();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"release_cached_memory", release_cached_memory, METH_NOARGS,
     "Free the memory cadk's CPU kernels keep for reuse and do not use now."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY_IMPL(cadk, CPU, m) {
  m.impl("gate_apply_fwd", &cadk::cpu::gate_apply_fwd);
  m.impl("gate_apply_bwd", &cadk::cpu::gate_apply_bwd);
  m.impl("gated_residual_fwd", &cadk::cpu::gated_residual_fwd);
  m.impl("gated_residual_bwd", &cadk::cpu::gated_residual_bwd);
  m.impl("gated_linear_fwd", &cadk::cpu::gated_linear_fwd);
  m.impl("gated_linear_bwd", &cadk::cpu::gated_linear_bwd);
  m.impl("gated_conv2d_fwd", &cadk::cpu::gated_conv2d_fwd);
  m.impl("gated_conv2d_bwd", &cadk::cpu::gated_conv2d_bwd);
  m.impl("bn_gate_act_fwd", &cadk::cpu::bn_gate_act_fwd);
  m.impl("bn_gate_act_bwd", &cadk::cpu::bn_gate_act_bwd);
  m.impl("bn_running_stats_", &cadk::cpu::bn_running_stats_);
}
