// bn_gate_act: batch norm over the alive channels, then activation and gate (bn_gate_act_kernels.h),
// in the build for this CPU: AVX-512 (avx512.cpp) or baseline x86-64 (here).
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <utility>

#include "../running_stats.h"

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

namespace cadk {

void check_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var, int64_t count) {
  TORCH_CHECK(running_mean.dim() == 1 && running_var.sizes() == running_mean.sizes() &&
                  running_var.scalar_type() == running_mean.scalar_type(),
              "cadk bn_running_stats_: running_mean ", running_mean.sizes(), " ", running_mean.scalar_type(),
              " and running_var ", running_var.sizes(), " ", running_var.scalar_type(),
              " must be 1-D of one shape and dtype");
  cpu::check_float(running_mean, "running_mean");
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes() && var.scalar_type() == mean.scalar_type(),
              "cadk bn_running_stats_: mean ", mean.sizes(), " ", mean.scalar_type(), " and var ", var.sizes(),
              " ", var.scalar_type(), " must be 1-D of one shape and dtype (bn_gate_act_fwd's batch statistics)");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "cadk bn_running_stats_: mean and var must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(count > 1, "cadk bn_running_stats_: count (values per channel) must exceed 1, got ", count);
  // Entries that share memory (an expanded vector) would each take the last write: refused, as the
  // in-place ops of the reference refuse them.
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, {&running_var, "running_var"}}) {
    TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "cadk bn_running_stats_: entries of ", name,
                " share memory (an expanded tensor?), so updating them in place would lose updates; pass a ",
                "tensor with its own entries (", name, ".clone())");
  }
}

namespace cpu {

void bn_running_stats_(const Tensor& running_mean, const Tensor& running_var, const Tensor& alive,
                       const Tensor& mean, const Tensor& var, double momentum, int64_t count) {
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, {&running_var, "running_var"},
                                {&mean, "mean"}, {&var, "var"}}) {
    check_cpu(*t, name);
  }
  check_running_stats(running_mean, running_var, mean, var, count);
  check_alive(alive, mean.numel(), running_mean.numel(), "alive");
  const Tensor a = alive.contiguous(), m = mean.contiguous(), v = var.contiguous();
  const int64_t* idx = a.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "cadk_bn_running_stats",
                                  [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cadk_bn_running_stats", [&] {
      const scalar_t unbias = static_cast<scalar_t>(static_cast<double>(count) / static_cast<double>(count - 1));
      const scalar_t* mp = m.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      run_t* rmp = running_mean.data_ptr<run_t>();
      run_t* rvp = running_var.data_ptr<run_t>();
      const int64_t rms = running_mean.stride(0), rvs = running_var.stride(0);
      for (int64_t c = 0; c < a.numel(); ++c) {
        update_running_stats(rmp, rms, rvp, rvs, idx[c], mp[c], vp[c], momentum, unbias);
      }
    });
  });
}

}  // namespace cpu
}  // namespace cadk
