// CUDA kernels of the ops declared in csrc/cadk_ops.cpp (registered in gated_ops.cu). Same
// contract as csrc/cpu/ops.h; cadk/kernels/reference.py defines the semantics.
#pragma once

#include "common.cuh"

namespace cadk::cuda {

Tensor gate_apply_fwd(const Tensor& pre, const Tensor& theta, const Tensor& alive, const Tensor& seed,
                      bool training);
std::tuple<Tensor, Tensor> gate_apply_bwd(const Tensor& grad_y, const Tensor& pre, const Tensor& theta,
                                          const Tensor& alive, const Tensor& seed, bool training);

Tensor gated_residual_fwd(const Tensor& shortcut, const Tensor& branch, const Tensor& theta, const Tensor& alive,
                          const Tensor& seed, bool training);
std::tuple<Tensor, Tensor, Tensor> gated_residual_bwd(const Tensor& grad_y, const Tensor& y, const Tensor& branch,
                                                      const Tensor& theta, const Tensor& alive, const Tensor& seed,
                                                      bool training);

std::tuple<Tensor, Tensor> gated_linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                            const OptTensor& theta, const Tensor& alive_in,
                                            const Tensor& alive_out, const Tensor& seed,
                                            c10::string_view activation, bool training);
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_linear_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const OptTensor& theta,
    const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed, c10::string_view activation,
    bool training, bool has_bias, bool need_grad_x, bool need_grad_weight);

std::tuple<Tensor, Tensor> gated_conv2d_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                            const OptTensor& theta, const Tensor& alive_in,
                                            const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                            c10::string_view activation, bool training);
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_conv2d_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const OptTensor& theta,
    const Tensor& alive_in, const Tensor& alive_out, const Tensor& seed, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation, bool training,
    bool has_bias, bool need_grad_x, bool need_grad_weight);

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_fwd(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const Tensor& mean,
    const Tensor& var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training);

void bn_running_stats_(const Tensor& running_mean, const Tensor& running_var, const Tensor& alive,
                       const Tensor& mean, const Tensor& var, double momentum, int64_t count);

}  // namespace cadk::cuda
