// gated_linear: y = xi * act(x @ W[alive_out][:, alive_in]^T + b[alive_out]) on compact GEMMs.
#include "ops.h"

namespace cadk::cpu {
namespace {

void check_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& theta,
                  const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_compute_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "cadk gated_linear: x must be [N, alive_in.numel()], got shape ", x.sizes(),
              "; flatten leading dimensions first");
  TORCH_CHECK(weight.dim() == 2, "cadk gated_linear: weight must be [out_features, in_features], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "cadk gated_linear: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; cast one of them");
  check_vector(bias, weight.size(0), "bias");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(), "cadk gated_linear: bias dtype ",
              bias.has_value() ? bias->scalar_type() : x.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_vector(theta, weight.size(0), "theta");
  check_alive(alive_in, x.size(1), weight.size(1), "alive_in");
  check_alive(alive_out, alive_out.numel(), weight.size(0), "alive_out");
  seed_value(seed);
}

}  // namespace

std::tuple<Tensor, Tensor> gated_linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                            const OptTensor& theta, const Tensor& alive_in,
                                            const Tensor& alive_out, const Tensor& seed,
                                            c10::string_view activation, bool training) {
  check_linear(x, weight, bias, theta, alive_in, alive_out, seed);
  const Act act = parse_activation(activation);
  const Tensor w = gather_weight(weight, alive_in, alive_out, training ? forward_pass() : Pass::kAlone);
  const Tensor xc = x.contiguous();
  const Gates gates = make_gates(theta, alive_out, seed, x.size(0), training, x.scalar_type(), forward_pass());
  const OptTensor b = bias.has_value() ? OptTensor(gather_vector(*bias, alive_out)) : std::nullopt;
  auto [z, epilogue_bias] = gemm_leaving_bias(xc, w.t(), b);
  return epilogue_forward(std::move(z), epilogue_bias, gates, act);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_linear_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const OptTensor& theta,
    const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed, c10::string_view activation,
    bool training, bool has_bias, bool need_grad_x, bool need_grad_weight) {
  check_linear(x, weight, std::nullopt, theta, alive_in, alive_out, seed);
  const Act act = parse_activation(activation);
  const std::vector<int64_t> out_shape{x.size(0), alive_out.numel()};
  TORCH_CHECK(grad_y.sizes() == out_shape && pre.sizes() == out_shape, "cadk gated_linear: grad_y ",
              grad_y.sizes(), " and pre ", pre.sizes(), " must both be ", at::IntArrayRef(out_shape));
  const Gates gates = make_gates(theta, alive_out, seed, x.size(0), training, x.scalar_type(), Pass::kBackward);
  EpilogueGrads g;
  if (gates.defined() || act != Act::kNone) {
    g = epilogue_backward(grad_y.contiguous(), pre.contiguous(), gates, act, has_bias, true);
  } else {
    g.grad_z = grad_y.contiguous();
    if (has_bias) g.bias_sum = g.grad_z.sum(0, false, at::kDouble);
  }
  Tensor grad_x = no_grad_like(x);
  if (need_grad_x) {
    grad_x = at::mm(g.grad_z, gather_weight(weight, alive_in, alive_out, Pass::kBackward));
  } else {
    release_weight(weight, alive_in, alive_out);
  }
  // A frozen weight (requires_grad=False) gets no gradient: neither its GEMM nor the full-size scatter.
  const Tensor grad_w = need_grad_weight
                            ? scatter_weight(at::mm(g.grad_z.t(), x.contiguous()), weight, alive_in, alive_out)
                            : no_grad_like(x);
  const int64_t units = weight.size(0);
  Tensor grad_b = has_bias ? scatter_vector(g.bias_sum, alive_out, units, x.scalar_type()) : no_grad_like(x);
  Tensor grad_theta = gates.defined() ? scatter_vector(g.theta_sum, alive_out, units, theta->scalar_type())
                                      : no_grad_like(x);
  return {grad_x, grad_w, grad_b, grad_theta};
}

}  // namespace cadk::cpu
