// gated_conv2d: conv over alive input channels and alive filters (ATen convolution on compact
// weights), then the fused activation/gate epilogue. Activations keep the input's memory format.
#include "ops.h"

#include "../conv_geometry.h"

namespace cadk::cpu {
namespace {

struct ConvGeometry {
  at::IntArrayRef stride, padding, dilation;
  int64_t out_h, out_w;
  at::MemoryFormat fmt;  // of the output and input gradient: channels-last if x or weight is
};

ConvGeometry check_conv(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& theta,
                        const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_compute_dtype(x, "x");
  TORCH_CHECK(x.dim() == 4, "cadk gated_conv2d: x must be [N, alive_in.numel(), H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "cadk gated_conv2d: weight must be [C_out, C_in, kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "cadk gated_conv2d: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; cast one of them");
  check_vector(bias, weight.size(0), "bias");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(), "cadk gated_conv2d: bias dtype ",
              bias.has_value() ? bias->scalar_type() : x.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_vector(theta, weight.size(0), "theta");
  check_alive(alive_in, x.size(1), weight.size(1), "alive_in");
  check_alive(alive_out, alive_out.numel(), weight.size(0), "alive_out");
  seed_value(seed);
  const auto [out_h, out_w] = conv_output_size(x, weight, stride, padding, dilation);
  const bool cl = format_of(x) == at::MemoryFormat::ChannelsLast ||
                  format_of(weight) == at::MemoryFormat::ChannelsLast;
  return {stride, padding, dilation, out_h, out_w,
          cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous};
}

// ATen convolutions reject zero channels: an empty side gives a zero (or bias-only) output.
bool degenerate(const Tensor& alive_in, const Tensor& alive_out) {
  return alive_in.numel() == 0 || alive_out.numel() == 0;
}

// A 1x1 conv of stride 1 without padding on channels-last activations is a GEMM on their [N*H*W, C]
// rows, free views: ATen's convolution (oneDNN) took up to 1.9x the time of the same products
// through at::mm at a few hundred rows of wide channels, as a GatedLinear's positions are, and about
// the same at ResNet-50's pointwise shapes (README, pointwise convs).
bool pointwise(const Tensor& weight, const ConvGeometry& geo) {
  return geo.fmt == at::MemoryFormat::ChannelsLast && weight.size(2) == 1 && weight.size(3) == 1 &&
         geo.stride[0] == 1 && geo.stride[1] == 1 && geo.padding[0] == 0 && geo.padding[1] == 0;
}

Tensor gemm_rows(const Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// [N*H*W, C] rows back to a channels-last [N, C, H, W] view.
Tensor from_rows(const Tensor& rows, const Tensor& like) {
  return rows.view({like.size(0), like.size(2), like.size(3), rows.size(1)}).permute({0, 3, 1, 2});
}

}  // namespace

std::tuple<Tensor, Tensor> gated_conv2d_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                            const OptTensor& theta, const Tensor& alive_in,
                                            const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                            c10::string_view activation, bool training) {
  const ConvGeometry geo =
      check_conv(x, weight, bias, theta, alive_in, alive_out, seed, stride, padding, dilation);
  const Act act = parse_activation(activation);
  const OptTensor b = bias.has_value() ? OptTensor(gather_vector(*bias, alive_out)) : std::nullopt;
  Tensor z;
  OptTensor epilogue_bias;  // the bias when the epilogue adds it instead of the convolution
  if (degenerate(alive_in, alive_out)) {
    // at::zeros ignores a memory format in its options: empty + zero_ keeps the layout the fake kernel gives.
    z = at::empty({x.size(0), alive_out.numel(), geo.out_h, geo.out_w}, x.options().memory_format(geo.fmt)).zero_();
    if (b.has_value()) z.add_(b->view({1, -1, 1, 1}));
  } else {
    const Tensor w = gather_weight(weight, alive_in, alive_out, training ? forward_pass() : Pass::kAlone);
    if (pointwise(weight, geo)) {
      const Tensor wt = w.view({alive_out.numel(), alive_in.numel()}).t();
      std::tie(z, epilogue_bias) = gemm_leaving_bias(gemm_rows(in_format(x, geo.fmt)), wt, b);
      z = from_rows(z, x);
    } else {
      const auto [xs, ws] = safe_conv_args(x, w, geo.out_w);
      z = in_format(at::convolution(xs, ws, b, stride, padding, conv_dilation(ws, dilation), false, {0, 0}, 1),
                    geo.fmt);
    }
  }
  const Gates gates = make_gates(theta, alive_out, seed, x.size(0), training, x.scalar_type(), forward_pass());
  return epilogue_forward(z, epilogue_bias, gates, act);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_conv2d_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const OptTensor& theta,
    const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation, bool training,
    bool has_bias, bool need_grad_x, bool need_grad_weight) {
  const ConvGeometry geo =
      check_conv(x, weight, std::nullopt, theta, alive_in, alive_out, seed, stride, padding, dilation);
  const Act act = parse_activation(activation);
  const std::vector<int64_t> out_shape{x.size(0), alive_out.numel(), geo.out_h, geo.out_w};
  TORCH_CHECK(grad_y.sizes() == out_shape && pre.sizes() == out_shape, "cadk gated_conv2d: grad_y ",
              grad_y.sizes(), " and pre ", pre.sizes(), " must both be ", at::IntArrayRef(out_shape));
  const Gates gates = make_gates(theta, alive_out, seed, x.size(0), training, x.scalar_type(), Pass::kBackward);
  // With a gate or an activation the epilogue pass also sums the bias gradient; otherwise the
  // convolution backward does.
  const bool fused = gates.defined() || act != Act::kNone;
  EpilogueGrads g;
  if (fused) {
    g = epilogue_backward(in_format(grad_y, geo.fmt), in_format(pre, geo.fmt), gates, act, has_bias, true);
  } else {
    g.grad_z = in_format(grad_y, geo.fmt);
  }
  Tensor grad_x = no_grad_like(x), grad_wc;
  const bool conv_bias = has_bias && !fused;
  if (degenerate(alive_in, alive_out) || !(need_grad_x || need_grad_weight)) {
    // no channel alive (zero gradients), or a frozen layer on data (bias and theta sums only)
    release_weight(weight, alive_in, alive_out);
    if (need_grad_x) grad_x = at::empty(x.sizes(), x.options().memory_format(geo.fmt)).zero_();
    if (need_grad_weight) {
      grad_wc = at::zeros({alive_out.numel(), alive_in.numel(), weight.size(2), weight.size(3)}, weight.options());
    }
    if (conv_bias) g.bias_sum = g.grad_z.sum({0, 2, 3}, false, at::kDouble);
  } else {
    const Tensor w = gather_weight(weight, alive_in, alive_out, Pass::kBackward);
    if (pointwise(weight, geo)) {
      const Tensor gz = gemm_rows(g.grad_z);
      if (need_grad_x) grad_x = from_rows(at::mm(gz, w.view({alive_out.numel(), alive_in.numel()})), x);
      if (need_grad_weight) grad_wc = at::mm(gz.t(), gemm_rows(in_format(x, geo.fmt))).view(w.sizes());
      if (conv_bias) g.bias_sum = gz.sum(0, false, at::kDouble);  // as gated_linear
    } else {
      const std::vector<int64_t> bias_sizes{alive_out.numel()};
      Tensor grad_bc;
      Tensor gx;
      const auto [xb, wb] = safe_conv_backward_args(x, w, stride, geo.out_w);
      std::tie(gx, grad_wc, grad_bc) = at::convolution_backward(
          g.grad_z, xb, wb, conv_bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride, padding, dilation,
          false, {0, 0}, 1, {need_grad_x, need_grad_weight, conv_bias});
      // The weight's own strides again (the layout the fake kernel gives), the same memory where the
      // 1x1 weight is dense (a free view was passed).
      if (need_grad_weight && wb.strides() != w.strides() && w.is_contiguous()) {
        grad_wc = grad_wc.contiguous().as_strided(w.sizes(), w.strides());
      }
      if (need_grad_x) grad_x = in_format(gx, geo.fmt);
      if (conv_bias) g.bias_sum = grad_bc;
    }
  }
  const int64_t units = weight.size(0);
  Tensor grad_w = need_grad_weight ? scatter_weight(grad_wc, weight, alive_in, alive_out) : no_grad_like(x);
  Tensor grad_b = has_bias ? scatter_vector(g.bias_sum, alive_out, units, x.scalar_type()) : no_grad_like(x);
  Tensor grad_theta = gates.defined() ? scatter_vector(g.theta_sum, alive_out, units, theta->scalar_type())
                                      : no_grad_like(x);
  return {grad_x, grad_w, grad_b, grad_theta};
}

}  // namespace cadk::cpu
