// nn.BatchNorm's running-statistics update of one channel, shared by the C++ and CUDA kernels of
// bn_running_stats_:
//   running_mean = lerp(running_mean, mean.to(R), momentum)
//   running_var  = lerp(running_var, (var * (count / (count - 1))).to(R), momentum)
// with the batch statistics in their dtype S and the lerp in R's math dtype as ATen's vectorised lerp
// computes it: one fused multiply-add, fma(w < 0.5 ? w : w - 1, end - start, w < 0.5 ? start : end).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace cadk {

CADK_HD float fused_multiply_add(float a, float b, float c) { return ::fmaf(a, b, c); }
CADK_HD double fused_multiply_add(double a, double b, double c) { return ::fma(a, b, c); }

template <typename R, typename S>
CADK_HD R running_lerp(R running, S batch, double momentum) {
  using acc_t = at::opmath_type<R>;
  const acc_t a = static_cast<acc_t>(running), b = static_cast<acc_t>(static_cast<R>(batch));
  const acc_t w = static_cast<acc_t>(momentum);
  const bool small = w < acc_t(0.5) && w > acc_t(-0.5);
  return static_cast<R>(fused_multiply_add(small ? w : w - acc_t(1), b - a, small ? a : b));
}

// Updates entry j of the running statistics (strided views) from the batch mean and biased var.
template <typename R, typename S>
CADK_HD void update_running_stats(R* running_mean, int64_t mean_stride, R* running_var, int64_t var_stride,
                                   int64_t j, S mean, S var, double momentum, S unbias) {
  running_mean[j * mean_stride] = running_lerp(running_mean[j * mean_stride], mean, momentum);
  running_var[j * var_stride] = running_lerp(running_var[j * var_stride], var * unbias, momentum);
}

// The checks of bn_running_stats_ common to every device (defined in csrc/cpu/bn_gate_act.cpp): running
// statistics of one floating dtype whose entries do not share memory, batch statistics of one shape in
// float32 or float64, count > 1.
void check_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var, int64_t count);

}  // namespace cadk
