// gate_apply, gated_linear and gated_conv2d on CUDA: alive weight blocks gathered by one kernel
// (weights.cu), cuBLAS / cuDNN on the compact shapes (at::mm, at::convolution[_backward]), and the
// fused channel-wise kernels of epilogue.cu around them. Also registers all CUDA kernels.
#include <ATen/ops/addmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

#include "../conv_geometry.h"
#include "epilogue.cuh"
#include "ops.cuh"
#include "weights.cuh"

namespace cadk::cuda {
namespace {

// Full-size math-dtype sums as `dtype` (the gradient of a full-size parameter).
Tensor as_grad(const Tensor& sums, at::ScalarType dtype) { return sums.to(dtype); }

// ---------------------------------------------------------------------------------------------
// gate_apply

void check_gate_inputs(const Tensor& pre, const Tensor& theta, const Tensor& alive, const Tensor& seed) {
  TORCH_CHECK(pre.is_cuda(), "cadk gate_apply: pre must be a CUDA tensor here, got ", pre.device());
  check_float(pre, "pre");
  TORCH_CHECK(pre.dim() >= 2, "cadk gate_apply: pre must be [N, units, ...], got shape ", pre.sizes());
  check_vector(theta, theta.numel(), pre, "theta");
  check_alive(alive, pre.size(1), theta.numel(), pre, "alive");
  check_seed(seed, pre);
}

// ---------------------------------------------------------------------------------------------
// gated_linear

void check_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& theta,
                  const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed) {
  TORCH_CHECK(x.is_cuda(), "cadk gated_linear: x must be a CUDA tensor here, got ", x.device());
  check_cuda(weight, x, "weight");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "cadk gated_linear: x must be [N, alive_in.numel()], got shape ", x.sizes(),
              "; flatten leading dimensions first");
  TORCH_CHECK(weight.dim() == 2, "cadk gated_linear: weight must be [out_features, in_features], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "cadk gated_linear: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; cast one of them");
  check_vector(bias, weight.size(0), x, "bias");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(), "cadk gated_linear: bias dtype ",
              bias.has_value() ? bias->scalar_type() : x.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_vector(theta, weight.size(0), x, "theta");
  check_alive(alive_in, x.size(1), weight.size(1), x, "alive_in");
  check_alive(alive_out, alive_out.numel(), weight.size(0), x, "alive_out");
  check_seed(seed, x);
}

// ---------------------------------------------------------------------------------------------
// gated_conv2d

struct ConvGeometry {
  int64_t out_h, out_w;
  at::MemoryFormat fmt;  // of the output and input gradient: channels-last if x or weight is
};

ConvGeometry check_conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& theta,
                        const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.is_cuda(), "cadk gated_conv2d: x must be a CUDA tensor here, got ", x.device());
  check_cuda(weight, x, "weight");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "cadk gated_conv2d: x must be [N, alive_in.numel(), H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "cadk gated_conv2d: weight must be [C_out, C_in, kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "cadk gated_conv2d: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; cast one of them");
  check_vector(bias, weight.size(0), x, "bias");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(), "cadk gated_conv2d: bias dtype ",
              bias.has_value() ? bias->scalar_type() : x.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_vector(theta, weight.size(0), x, "theta");
  check_alive(alive_in, x.size(1), weight.size(1), x, "alive_in");
  check_alive(alive_out, alive_out.numel(), weight.size(0), x, "alive_out");
  check_seed(seed, x);
  const auto [out_h, out_w] = conv_output_size(x, weight, stride, padding, dilation);
  const bool cl = format_of(x) == at::MemoryFormat::ChannelsLast ||
                  format_of(weight) == at::MemoryFormat::ChannelsLast;
  return {out_h, out_w, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous};
}

// cuDNN rejects zero channels: an empty side gives a zero (bias-only) output.
bool degenerate(const Tensor& alive_in, const Tensor& alive_out) {
  return alive_in.numel() == 0 || alive_out.numel() == 0;
}

}  // namespace

Tensor gate_apply_fwd(const Tensor& pre, const Tensor& theta, const Tensor& alive, const Tensor& seed,
                      bool training) {
  check_gate_inputs(pre, theta, alive, seed);
  const c10::cuda::CUDAGuard guard(pre.device());
  const Tensor p = pre.contiguous(format_of(pre));
  const Gate gate = make_gate(theta, alive, seed, training, theta.numel(), layout_of(p));
  Tensor y = at::empty_like(p, format_of(p));
  gate_forward(p, Tensor(), gate, /*relu=*/false, Tensor(), y);  // p is only read
  return y;
}

std::tuple<Tensor, Tensor> gate_apply_bwd(const Tensor& grad_y, const Tensor& pre, const Tensor& theta,
                                          const Tensor& alive, const Tensor& seed, bool training) {
  check_gate_inputs(pre, theta, alive, seed);
  check_cuda(grad_y, pre, "grad_y");
  TORCH_CHECK(grad_y.sizes() == pre.sizes() && grad_y.scalar_type() == pre.scalar_type(),
              "cadk gate_apply: grad_y must match pre in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " vs ", pre.sizes(), " ", pre.scalar_type());
  const c10::cuda::CUDAGuard guard(pre.device());
  const auto fmt = format_of(pre);
  const Tensor p = pre.contiguous(fmt);
  const Gate gate = make_gate(theta, alive, seed, training, theta.numel(), layout_of(p));
  const EpilogueGrads g = epilogue_backward(grad_y.contiguous(fmt), p, gate, /*relu=*/false, false);
  return {g.grad_z, as_grad(g.theta_sum, theta.scalar_type())};
}

std::tuple<Tensor, Tensor> gated_linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                            const OptTensor& theta, const Tensor& alive_in,
                                            const Tensor& alive_out, const Tensor& seed,
                                            c10::string_view activation, bool training) {
  check_linear(x, weight, bias, theta, alive_in, alive_out, seed);
  const bool relu = parse_relu(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor w = gather_weight(weight, alive_in, alive_out);
  // In fp32/fp64 the epilogue adds the full-size bias by unit (no gather, no extra launch); in 16-bit
  // dtypes it rides in the cuBLASLt epilogue, so z is rounded once, as the reference's addmm.
  const bool bias_in_gemm = bias.has_value() && at::isReducedFloatingType(x.scalar_type());
  Tensor z = bias_in_gemm ? at::addmm(gather_vector(*bias, alive_out), x, w.t()) : at::mm(x, w.t());
  const Gate gate = make_gate(theta, alive_out, seed, training, weight.size(0), layout_of(z));
  return epilogue_forward(z, bias.has_value() && !bias_in_gemm ? bias->contiguous() : Tensor(), gate, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_linear_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const OptTensor& theta,
    const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed, c10::string_view activation,
    bool training, bool has_bias, bool need_grad_x, bool need_grad_weight) {
  check_linear(x, weight, std::nullopt, theta, alive_in, alive_out, seed);
  check_cuda(grad_y, x, "grad_y");
  check_cuda(pre, x, "pre");
  const bool relu = parse_relu(activation);
  const std::vector<int64_t> out_shape{x.size(0), alive_out.numel()};
  TORCH_CHECK(grad_y.sizes() == out_shape && pre.sizes() == out_shape, "cadk gated_linear: grad_y ",
              grad_y.sizes(), " and pre ", pre.sizes(), " must both be ", at::IntArrayRef(out_shape));
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && pre.scalar_type() == x.scalar_type(),
              "cadk gated_linear: grad_y and pre must have x's dtype ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor p = pre.contiguous();
  const Gate gate = make_gate(theta, alive_out, seed, training, weight.size(0), layout_of(p));
  const EpilogueGrads g = epilogue_backward(grad_y.contiguous(), p, gate, relu, has_bias);
  const Tensor grad_x =
      need_grad_x ? at::mm(g.grad_z, gather_weight(weight, alive_in, alive_out)) : no_grad_like(x);
  // A frozen weight (requires_grad=False) gets no gradient: neither its GEMM nor the full-size scatter.
  const Tensor grad_w =
      need_grad_weight ? scatter_weight(at::mm(g.grad_z.t(), x), weight, alive_in, alive_out) : no_grad_like(x);
  return {grad_x, grad_w, has_bias ? as_grad(g.bias_sum, x.scalar_type()) : no_grad_like(x),
          gate.defined() ? as_grad(g.theta_sum, theta->scalar_type()) : no_grad_like(x)};
}

std::tuple<Tensor, Tensor> gated_conv2d_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                            const OptTensor& theta, const Tensor& alive_in,
                                            const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                            c10::string_view activation, bool training) {
  const ConvGeometry geo = check_conv(x, weight, bias, theta, alive_in, alive_out, seed, stride, padding, dilation);
  const bool relu = parse_relu(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor z;
  if (degenerate(alive_in, alive_out)) {
    z = zeros_fast({x.size(0), alive_out.numel(), geo.out_h, geo.out_w}, x.options().memory_format(geo.fmt));
  } else {
    const Tensor w = gather_weight(weight, alive_in, alive_out);
    z = at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, 1).contiguous(geo.fmt);
  }
  // cuDNN would add the bias in a separate pass; the epilogue reads it by unit instead.
  const Gate gate = make_gate(theta, alive_out, seed, training, weight.size(0), layout_of(z));
  return epilogue_forward(z, bias.has_value() ? bias->contiguous() : Tensor(), gate, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_conv2d_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const OptTensor& theta,
    const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation, bool training,
    bool has_bias, bool need_grad_x, bool need_grad_weight) {
  const ConvGeometry geo =
      check_conv(x, weight, std::nullopt, theta, alive_in, alive_out, seed, stride, padding, dilation);
  check_cuda(grad_y, x, "grad_y");
  check_cuda(pre, x, "pre");
  const bool relu = parse_relu(activation);
  const std::vector<int64_t> out_shape{x.size(0), alive_out.numel(), geo.out_h, geo.out_w};
  TORCH_CHECK(grad_y.sizes() == out_shape && pre.sizes() == out_shape, "cadk gated_conv2d: grad_y ",
              grad_y.sizes(), " and pre ", pre.sizes(), " must both be ", at::IntArrayRef(out_shape));
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && pre.scalar_type() == x.scalar_type(),
              "cadk gated_conv2d: grad_y and pre must have x's dtype ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor p = pre.contiguous(geo.fmt);
  const Gate gate = make_gate(theta, alive_out, seed, training, weight.size(0), layout_of(p));
  const EpilogueGrads g = epilogue_backward(grad_y.contiguous(geo.fmt), p, gate, relu, has_bias);
  Tensor grad_x = no_grad_like(x), grad_wc;
  if (degenerate(alive_in, alive_out)) {
    if (need_grad_x) grad_x = zeros_fast(x.sizes(), x.options().memory_format(geo.fmt));
    grad_wc = zeros_fast({alive_out.numel(), alive_in.numel(), weight.size(2), weight.size(3)}, weight.options());
  } else if (need_grad_x || need_grad_weight) {
    const Tensor w = gather_weight(weight, alive_in, alive_out);
    Tensor gx;
    std::tie(gx, grad_wc, std::ignore) = at::convolution_backward(
        g.grad_z, x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
        {need_grad_x, need_grad_weight, false});
    if (need_grad_x) grad_x = gx.contiguous(geo.fmt);
  }
  return {grad_x, need_grad_weight ? scatter_weight(grad_wc, weight, alive_in, alive_out) : no_grad_like(x),
          has_bias ? as_grad(g.bias_sum, x.scalar_type()) : no_grad_like(x),
          gate.defined() ? as_grad(g.theta_sum, theta->scalar_type()) : no_grad_like(x)};
}

}  // namespace cadk::cuda

TORCH_LIBRARY_IMPL(cadk, CUDA, m) {
  m.impl("gate_apply_fwd", &cadk::cuda::gate_apply_fwd);
  m.impl("gate_apply_bwd", &cadk::cuda::gate_apply_bwd);
  m.impl("gated_residual_fwd", &cadk::cuda::gated_residual_fwd);
  m.impl("gated_residual_bwd", &cadk::cuda::gated_residual_bwd);
  m.impl("gated_linear_fwd", &cadk::cuda::gated_linear_fwd);
  m.impl("gated_linear_bwd", &cadk::cuda::gated_linear_bwd);
  m.impl("gated_conv2d_fwd", &cadk::cuda::gated_conv2d_fwd);
  m.impl("gated_conv2d_bwd", &cadk::cuda::gated_conv2d_bwd);
  m.impl("bn_gate_act_fwd", &cadk::cuda::bn_gate_act_fwd);
  m.impl("bn_gate_act_bwd", &cadk::cuda::bn_gate_act_bwd);
  m.impl("bn_running_stats_", &cadk::cuda::bn_running_stats_);
}
