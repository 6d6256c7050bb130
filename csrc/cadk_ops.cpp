// Schemas of cadk's ops. Importing the built extension (cadk._C) runs these registrations;
// kernels register per device in csrc/cpu (CPU) and csrc/cuda (CUDA), autograd in csrc/autograd.cpp,
// and Python adds the fake (meta) implementations in cadk/kernels/cpp_backend.py.
//
// Conventions (see cadk/kernels/reference.py, the definition every kernel is tested against):
// full-size parameters, compact activations over sorted int64 alive index lists, gates regenerated
// from `seed` (a 0-dim int64 tensor) with Philox4x32-10 (csrc/philox.h), theta optional (no gate).
// Forward ops return the pre-gate output `pre` as well: backward needs it for the theta gradient
// and the ReLU derivative (pre > 0), and regenerates the gate instead of storing it.
// Backward ops return full-size grads, zero outside alive rows/columns; grads of absent optional
// inputs (bias, theta) come back as empty tensors, and so does grad_x when need_grad_x is false (an
// input layer's data needs none).
#include <torch/library.h>

TORCH_LIBRARY(cadk, m) {
  m.def("gate_apply_fwd(Tensor pre, Tensor theta, Tensor alive, Tensor seed, bool training) -> Tensor");
  m.def("gate_apply_bwd(Tensor grad_y, Tensor pre, Tensor theta, Tensor alive, Tensor seed, bool training)"
        " -> (Tensor, Tensor)");
  // A residual block's output relu(shortcut + xi[n] * branch), xi the block's layer gate (one unit).
  // Backward takes the output y (ReLU's derivative) and returns grads of shortcut, branch and theta.
  m.def("gated_residual_fwd(Tensor shortcut, Tensor branch, Tensor theta, Tensor alive, Tensor seed,"
        " bool training) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad_y, Tensor y, Tensor branch, Tensor theta, Tensor alive, Tensor seed,"
        " bool training) -> (Tensor, Tensor, Tensor)");
  m.def("gated_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? theta, Tensor alive_in,"
        " Tensor alive_out, Tensor seed, str activation, bool training) -> (Tensor, Tensor)");
  m.def("gated_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor pre, Tensor? theta,"
        " Tensor alive_in, Tensor alive_out, Tensor seed, str activation, bool training, bool has_bias,"
        " bool need_grad_x=True, bool need_grad_weight=True)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? theta, Tensor alive_in,"
        " Tensor alive_out, Tensor seed, int[2] stride, int[2] padding, int[2] dilation, str activation,"
        " bool training) -> (Tensor, Tensor)");
  m.def("gated_conv2d_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor pre, Tensor? theta,"
        " Tensor alive_in, Tensor alive_out, Tensor seed, int[2] stride, int[2] padding, int[2] dilation,"
        " str activation, bool training, bool has_bias, bool need_grad_x=True, bool need_grad_weight=True)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // BN over alive channels. Returns (y, pre, mean, var): in training the batch mean and biased
  // variance of the alive channels, which the caller folds into the running statistics (the op
  // itself mutates nothing); in eval the running statistics it used.
  m.def("bn_gate_act_fwd(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var,"
        " Tensor? theta, Tensor alive, Tensor seed, float eps, str activation, bool training)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_gate_act_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor pre, Tensor mean, Tensor var,"
        " Tensor? theta, Tensor alive, Tensor seed, float eps, str activation, bool training)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // nn.BatchNorm's running-statistics update at the alive entries only, from bn_gate_act_fwd's batch
  // mean and biased variance over `count` values per channel: running = lerp(running, batch, momentum),
  // with the variance made unbiased (count / (count - 1)). One kernel where the unfused update of a
  // pruned layer costs six small ops.
  m.def("bn_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor alive, Tensor mean,"
        " Tensor var, float momentum, SymInt count) -> ()");
}
