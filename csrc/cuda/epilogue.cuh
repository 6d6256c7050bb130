// Fused channel-wise passes around the GEMMs/convolutions of gate_apply, gated_linear and
// gated_conv2d: forward epilogue (bias, activation, gate) and backward prologue (gate, ReLU mask,
// theta and bias sums).
#pragma once

#include "common.cuh"

namespace cadk::cuda {

// y = xi * act(z + bias[unit]) and pre = act(z + bias[unit]) in z's layout; pre may be undefined
// (not stored), pre and y may be z itself. bias: full-size in z's dtype, or undefined.
void gate_forward(const Tensor& z, const Tensor& bias, const Gate& gate, bool relu, const Tensor& pre,
                  const Tensor& y);

// From z (overwritten with pre = act(z + bias)) returns {y, pre}. Without a gate y is z itself and
// pre is an empty tensor: the caller passes y back as pre (the convention of csrc/cpu).
std::tuple<Tensor, Tensor> epilogue_forward(Tensor z, const Tensor& bias, const Gate& gate, bool relu);

// grad_z = grad_y * xi * act'(pre), in pre's layout (grad_y must share it), plus full-size sums in
// the math dtype: theta_sum[unit] = sum(grad_y * pre) when gated, bias_sum[unit] = sum(grad_z) when
// want_bias_sum (undefined otherwise).
struct EpilogueGrads {
  Tensor grad_z, theta_sum, bias_sum;
};
EpilogueGrads epilogue_backward(const Tensor& grad_y, const Tensor& pre, const Gate& gate, bool relu,
                                bool want_bias_sum);

}  // namespace cadk::cuda
