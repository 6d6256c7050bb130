// bn_gate_act: batch norm over the alive channels, then activation and gate (bn_gate_act_kernels.h),
// in the build for this CPU: AVX-512 (avx512.cpp) or baseline x86-64 (here).
#include "ops.h"

#include <ATen/Dispatch.h>

#include <cmath>

#define CADK_ISA baseline
#include "bn_gate_act_kernels.h"
#undef CADK_ISA

namespace cadk::cpu {

namespace avx512 {  // avx512.cpp
decltype(cpu::bn_gate_act_fwd) bn_gate_act_fwd;
decltype(cpu::bn_gate_act_bwd) bn_gate_act_bwd;
}  // namespace avx512

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_fwd(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training) {
  const auto fwd = cpu_has_avx512_bw() ? &avx512::bn_gate_act_fwd : &baseline::bn_gate_act_fwd;
  return fwd(x, weight, bias, running_mean, running_var, theta, alive, seed, eps, activation, training);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const Tensor& mean,
    const Tensor& var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training) {
  const auto bwd = cpu_has_avx512_bw() ? &avx512::bn_gate_act_bwd : &baseline::bn_gate_act_bwd;
  return bwd(grad_y, x, weight, pre, mean, var, theta, alive, seed, eps, activation, training);
}

}  // namespace cadk::cpu
