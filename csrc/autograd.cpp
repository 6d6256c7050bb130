// Autograd of cadk's ops, registered for every device at the Autograd dispatch key: each forward
// op's backward is the matching *_bwd op, so forward and backward both trace under torch.compile.
//
// In C++ rather than torch.library.register_autograd: the Python path costs about 60 us of host
// time per op call (forward + backward), more than a small layer's kernels, and on a GPU the host
// is what a small network's training step waits for.
//
// Saved for backward: the inputs the *_bwd op takes and `pre` (or `y` when there is no gate: then
// the op returns an empty `pre` and y equals it; neither without an activation, see pre_to_save).
// Gradients are not materialised for `pre`, mean and var, which are outputs only for the backward;
// they are not marked non-differentiable either, since compiled autograd rejects Functions that
// mark outputs so.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "backward_expected.h"

namespace cadk {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The *_bwd ops have no derivatives of their own.
void check_first_order() {
  TORCH_CHECK(!at::GradMode::is_enabled(), "cadk ops have no second derivatives: backward with "
              "create_graph=True (double backward) is not supported");
}
Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
Tensor if_needed(bool needed, const Tensor& grad) { return needed ? grad : Tensor(); }

using Grads4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The `pre` a backward op reads: pre with a gate, else y (its ReLU mask). Without either it reads
// none, and saving y would refuse an in-place update of the output (out += shortcut), which a plain
// convolution or batch norm allows; the backward then passes grad_y, of the same shape, in its place.
Tensor pre_to_save(const OptTensor& theta, const std::string& activation, const Tensor& y, const Tensor& pre) {
  if (theta) return pre;
  return activation == "none" ? Tensor() : y;
}
Tensor saved_pre(const Tensor& saved, const Tensor& grad_y) { return saved.defined() ? saved : grad_y; }

// What the linear and conv layers' backward ops need besides their geometry.
void save_layer(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& y, const Tensor& pre,
                const OptTensor& theta, const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed,
                const std::string& activation, bool training, bool has_bias) {
  ctx->set_materialize_grads(false);
  ctx->save_for_backward(
      {x, weight, pre_to_save(theta, activation, y, pre), or_undefined(theta), alive_in, alive_out, seed});
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["training"] = training;
  ctx->saved_data["has_bias"] = has_bias;
}

// Grads of a layer's `count` inputs: x, weight, bias, theta, then non-differentiable ones.
variable_list layer_grads(size_t count, const Grads4& g, bool need_grad_x, bool need_grad_weight, bool has_bias,
                          bool has_theta) {
  variable_list out(count);
  out[0] = if_needed(need_grad_x, std::get<0>(g));
  out[1] = if_needed(need_grad_weight, std::get<1>(g));
  out[2] = if_needed(has_bias, std::get<2>(g));
  out[3] = if_needed(has_theta, std::get<3>(g));
  return out;
}

using GateFwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using GateBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, bool);
using ResidualFwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using ResidualBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, bool);
using LinearFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                             const Tensor&, const Tensor&, const Tensor&, c10::string_view, bool);
using LinearBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, const OptTensor&, const Tensor&,
                                                             const Tensor&, const Tensor&, c10::string_view,
                                                             bool, bool, bool, bool);
using ConvFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                           const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                                           at::IntArrayRef, at::IntArrayRef, c10::string_view, bool);
using ConvBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const OptTensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, at::IntArrayRef,
                                                           at::IntArrayRef, at::IntArrayRef, c10::string_view,
                                                           bool, bool, bool, bool);
using BnFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, const OptTensor&,
                                                         const Tensor&, const Tensor&, double, c10::string_view,
                                                         bool);
using BnBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, const Tensor&,
                                                         const OptTensor&, const Tensor&, const Tensor&, double,
                                                         c10::string_view, bool);

// ---------------------------------------------------------------------------------------------

struct GateApply : Function<GateApply> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pre, const Tensor& theta, const Tensor& alive,
                        const Tensor& seed, bool training) {
    static const auto fwd = op<GateFwd>("cadk::gate_apply_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({pre, theta, alive, seed});
    ctx->saved_data["training"] = training;
    return fwd.call(pre, theta, alive, seed, training);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<GateBwd>("cadk::gate_apply_bwd");
    check_first_order();
    const variable_list s = ctx->get_saved_variables();
    auto [grad_pre, grad_theta] = bwd.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["training"].toBool());
    return {grad_pre, grad_theta, Tensor(), Tensor(), Tensor()};
  }
};

struct GatedResidual : Function<GatedResidual> {
  static Tensor forward(AutogradContext* ctx, const Tensor& shortcut, const Tensor& branch, const Tensor& theta,
                        const Tensor& alive, const Tensor& seed, bool training) {
    static const auto fwd = op<ResidualFwd>("cadk::gated_residual_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor y = fwd.call(shortcut, branch, theta, alive, seed, training);
    ctx->save_for_backward({y, branch, theta, alive, seed});
    ctx->saved_data["training"] = training;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<ResidualBwd>("cadk::gated_residual_bwd");
    check_first_order();
    const variable_list s = ctx->get_saved_variables();
    auto [grad_shortcut, grad_branch, grad_theta] =
        bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["training"].toBool());
    return {grad_shortcut, grad_branch, grad_theta, Tensor(), Tensor(), Tensor()};
  }
};

struct GatedLinear : Function<GatedLinear> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& theta, const Tensor& alive_in, const Tensor& alive_out,
                               const Tensor& seed, const std::string& activation, bool training) {
    static const auto fwd = op<LinearFwd>("cadk::gated_linear_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, pre] = fwd.call(x, weight, bias, theta, alive_in, alive_out, seed, activation, training);
    save_layer(ctx, x, weight, y, pre, theta, alive_in, alive_out, seed, activation, training, bias.has_value());
    return {y, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<LinearBwd>("cadk::gated_linear_bwd");
    check_first_order();
    if (!grads[0].defined()) return variable_list(9);
    const variable_list s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const OptTensor theta = optional(s[3]);
    const bool has_bias = d["has_bias"].toBool(), need_grad_x = ctx->needs_input_grad(0);
    const bool need_grad_weight = ctx->needs_input_grad(1);
    return layer_grads(9, bwd.call(grads[0], s[0], s[1], saved_pre(s[2], grads[0]), theta, s[4], s[5], s[6],
                                   d["activation"].toStringRef(), d["training"].toBool(), has_bias, need_grad_x,
                                   need_grad_weight),
                       need_grad_x, need_grad_weight, has_bias, theta.has_value());
  }
};

struct GatedConv2d : Function<GatedConv2d> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& theta, const Tensor& alive_in, const Tensor& alive_out,
                               const Tensor& seed, const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                               const std::string& activation, bool training) {
    static const auto fwd = op<ConvFwd>("cadk::gated_conv2d_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, pre] = fwd.call(x, weight, bias, theta, alive_in, alive_out, seed, stride, padding, dilation,
                             activation, training);
    save_layer(ctx, x, weight, y, pre, theta, alive_in, alive_out, seed, activation, training, bias.has_value());
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    return {y, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<ConvBwd>("cadk::gated_conv2d_bwd");
    check_first_order();
    if (!grads[0].defined()) return variable_list(12);
    const variable_list s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const OptTensor theta = optional(s[3]);
    const bool has_bias = d["has_bias"].toBool(), need_grad_x = ctx->needs_input_grad(0);
    const bool need_grad_weight = ctx->needs_input_grad(1);
    return layer_grads(12, bwd.call(grads[0], s[0], s[1], saved_pre(s[2], grads[0]), theta, s[4], s[5], s[6],
                                    d["stride"].toIntVector(), d["padding"].toIntVector(), d["dilation"].toIntVector(),
                                    d["activation"].toStringRef(), d["training"].toBool(), has_bias, need_grad_x,
                                    need_grad_weight),
                       need_grad_x, need_grad_weight, has_bias, theta.has_value());
  }
};

struct BnGateAct : Function<BnGateAct> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& running_mean, const Tensor& running_var, const OptTensor& theta,
                               const Tensor& alive, const Tensor& seed, double eps, const std::string& activation,
                               bool training) {
    static const auto fwd = op<BnFwd>("cadk::bn_gate_act_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, pre, mean, var] =
        fwd.call(x, weight, bias, running_mean, running_var, theta, alive, seed, eps, activation, training);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, pre_to_save(theta, activation, y, pre), mean, var, or_undefined(theta), alive,
                            seed});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["training"] = training;
    return {y, pre, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<BnBwd>("cadk::bn_gate_act_bwd");
    check_first_order();
    variable_list out(11);
    if (!grads[0].defined()) return out;
    const variable_list s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const OptTensor theta = optional(s[5]);
    auto [gx, gw, gb, gt] = bwd.call(grads[0], s[0], s[1], saved_pre(s[2], grads[0]), s[3], s[4], theta, s[6], s[7],
                                     d["eps"].toDouble(), d["activation"].toStringRef(), d["training"].toBool());
    out[0] = gx;
    out[1] = gw;
    out[2] = gb;
    out[5] = if_needed(theta.has_value(), gt);
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// The Autograd kernels: the schemas' signatures, forwarding to the Functions above.

// Whether autograd will call the op's backward: grad mode on and some input needing a gradient.
bool backward_coming(std::initializer_list<OptTensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  return std::any_of(inputs.begin(), inputs.end(), [](const OptTensor& t) { return t.has_value() && t->requires_grad(); });
}

Tensor gate_apply_autograd(const Tensor& pre, const Tensor& theta, const Tensor& alive, const Tensor& seed,
                           bool training) {
  const ExpectBackward expect(backward_coming({pre, theta}));
  return GateApply::apply(pre, theta, alive, seed, training);
}

Tensor gated_residual_autograd(const Tensor& shortcut, const Tensor& branch, const Tensor& theta,
                               const Tensor& alive, const Tensor& seed, bool training) {
  const ExpectBackward expect(backward_coming({shortcut, branch, theta}));
  return GatedResidual::apply(shortcut, branch, theta, alive, seed, training);
}

std::tuple<Tensor, Tensor> gated_linear_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                 const OptTensor& theta, const Tensor& alive_in,
                                                 const Tensor& alive_out, const Tensor& seed,
                                                 c10::string_view activation, bool training) {
  const ExpectBackward expect(backward_coming({x, weight, bias, theta}));
  const variable_list out = GatedLinear::apply(x, weight, bias, theta, alive_in, alive_out, seed,
                                               std::string(activation), training);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> gated_conv2d_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                 const OptTensor& theta, const Tensor& alive_in,
                                                 const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                 c10::string_view activation, bool training) {
  const ExpectBackward expect(backward_coming({x, weight, bias, theta}));
  const variable_list out = GatedConv2d::apply(x, weight, bias, theta, alive_in, alive_out, seed, stride.vec(),
                                               padding.vec(), dilation.vec(), std::string(activation), training);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_autograd(const Tensor& x, const Tensor& weight,
                                                                const Tensor& bias, const Tensor& running_mean,
                                                                const Tensor& running_var, const OptTensor& theta,
                                                                const Tensor& alive, const Tensor& seed, double eps,
                                                                c10::string_view activation, bool training) {
  const ExpectBackward expect(backward_coming({x, weight, bias, theta}));
  const variable_list out = BnGateAct::apply(x, weight, bias, running_mean, running_var, theta, alive, seed, eps,
                                             std::string(activation), training);
  return {out[0], out[1], out[2], out[3]};
}

// bn_running_stats_ updates its first two arguments in place: as ATen's in-place ops do, it bumps their
// version counters, so autograd's checks of saved tensors see the update.
void bn_running_stats_inplace(const Tensor& running_mean, const Tensor& running_var, const Tensor& alive,
                              const Tensor& mean, const Tensor& var, double momentum, c10::SymInt count) {
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    // count stays symbolic under torch.compile: as an int it would pin the batch size in the graph.
    static const auto update = op<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       double, c10::SymInt)>("cadk::bn_running_stats_");
    update.call(running_mean, running_var, alive, mean, var, momentum, count);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
}

}  // namespace
}  // namespace cadk

TORCH_LIBRARY_IMPL(cadk, ADInplaceOrView, m) {
  m.impl("bn_running_stats_", &cadk::bn_running_stats_inplace);
}

TORCH_LIBRARY_IMPL(cadk, Autograd, m) {
  m.impl("gate_apply_fwd", &cadk::gate_apply_autograd);
  m.impl("gated_residual_fwd", &cadk::gated_residual_autograd);
  m.impl("gated_linear_fwd", &cadk::gated_linear_autograd);
  m.impl("gated_conv2d_fwd", &cadk::gated_conv2d_autograd);
  m.impl("bn_gate_act_fwd", &cadk::bn_gate_act_autograd);
}
