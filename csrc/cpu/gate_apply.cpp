// gate_apply: y[n, j', ...] = xi[n, j'] * pre[n, j', ...] over the alive units of a gate.
#include "ops.h"

namespace cadk::cpu {
namespace {

void check_gate_inputs(const Tensor& pre, const Tensor& theta, const Tensor& alive, const Tensor& seed) {
  check_cpu(pre, "pre");
  check_compute_dtype(pre, "pre");
  TORCH_CHECK(pre.dim() >= 2, "cadk gate_apply: pre must be [N, units, ...], got shape ", pre.sizes());
  check_vector(theta, theta.numel(), "theta");
  check_alive(alive, pre.size(1), theta.numel(), "alive");
  seed_value(seed);
}

}  // namespace

Tensor gate_apply_fwd(const Tensor& pre, const Tensor& theta, const Tensor& alive, const Tensor& seed,
                      bool training) {
  check_gate_inputs(pre, theta, alive, seed);
  const Tensor p = in_format(pre, format_of(pre));
  const Gates gates = make_gates(theta, alive, seed, p.size(0), training, p.scalar_type(), forward_pass());
  return std::get<0>(epilogue_forward(p, std::nullopt, gates, Act::kNone));  // no activation: p is only read
}

std::tuple<Tensor, Tensor> gate_apply_bwd(const Tensor& grad_y, const Tensor& pre, const Tensor& theta,
                                          const Tensor& alive, const Tensor& seed, bool training) {
  check_gate_inputs(pre, theta, alive, seed);
  TORCH_CHECK(grad_y.sizes() == pre.sizes() && grad_y.scalar_type() == pre.scalar_type(),
              "cadk gate_apply: grad_y must match pre in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " vs ", pre.sizes(), " ", pre.scalar_type());
  const auto fmt = format_of(pre);
  const Tensor p = in_format(pre, fmt);
  const Gates gates = make_gates(theta, alive, seed, p.size(0), training, p.scalar_type(), Pass::kBackward);
  EpilogueGrads g = epilogue_backward(in_format(grad_y, fmt), p, gates, Act::kNone, false, false);
  return {g.grad_z, scatter_vector(g.theta_sum, alive, theta.numel(), theta.scalar_type())};
}

}  // namespace cadk::cpu
