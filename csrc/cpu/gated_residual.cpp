// gated_residual: y = relu(shortcut + xi[n] * branch), the output of a residual block whose branch
// carries a layer gate (one unit). One pass over the activations where gate, add and ReLU took three
// forward (and two backward); each example is one dense run of M values in either memory format. The
// loops (gated_residual_kernels.h) run in the build for this CPU: AVX-512 (avx512.cpp) or baseline.
#include "ops.h"

#include <ATen/Dispatch.h>

#define CADK_ISA baseline
#include "gated_residual_kernels.h"
#undef CADK_ISA

namespace cadk::cpu {

namespace avx512 {  // avx512.cpp
decltype(baseline::residual_forward) residual_forward;
decltype(baseline::residual_backward) residual_backward;
}  // namespace avx512

namespace {

struct Residual {
  Tensor shortcut, branch;  // contiguous in format_of(branch)
  at::MemoryFormat fmt;
  int64_t N, M;             // examples, values per example
};

Residual check_residual(const Tensor& shortcut, const Tensor& branch, const Tensor& theta, const Tensor& alive,
                        const Tensor& seed) {
  check_cpu(branch, "branch");
  check_cpu(shortcut, "shortcut");
  check_compute_dtype(branch, "branch");
  TORCH_CHECK(shortcut.sizes() == branch.sizes() && shortcut.scalar_type() == branch.scalar_type(),
              "cadk gated_residual: shortcut ", shortcut.sizes(), " ", shortcut.scalar_type(), " and branch ",
              branch.sizes(), " ", branch.scalar_type(), " must match in shape and dtype");
  TORCH_CHECK(branch.dim() >= 1, "cadk gated_residual: branch must be [N, ...], got a 0-dim tensor");
  check_vector(theta, theta.numel(), "theta");
  TORCH_CHECK(alive.dim() == 1 && alive.numel() == 1, "cadk gated_residual: alive must list the one unit of the ",
              "block gate, got shape ", alive.sizes(), "; a pruned block skips its branch (relu(shortcut))");
  check_alive(alive, 1, theta.numel(), "alive");
  seed_value(seed);
  const auto fmt = format_of(branch);
  const int64_t N = branch.size(0);
  return {in_format(shortcut, fmt), in_format(branch, fmt), fmt, N, N == 0 ? 0 : branch.numel() / N};
}

// xi[n] of the block gate, from the gate table every op draws (make_gates): [N, 1] Philox bytes in
// training (the forward's table kept for the backward), [1, 1] theta rounded through the activation
// dtype in eval.
std::vector<double> block_gates(const Tensor& theta, const Tensor& alive, const Tensor& seed, int64_t N,
                                bool training, at::ScalarType dtype, Pass pass) {
  const Gates gates = make_gates(theta, alive, seed, N, training, dtype, pass);
  if (!training) return std::vector<double>(N, gates.table.item<double>());
  const uint8_t* bytes = gates.table.data_ptr<uint8_t>();
  std::vector<double> xi(N);
  for (int64_t n = 0; n < N; ++n) xi[n] = bytes[n * gates.row_stride];
  return xi;
}

}  // namespace

Tensor gated_residual_fwd(const Tensor& shortcut, const Tensor& branch, const Tensor& theta, const Tensor& alive,
                          const Tensor& seed, bool training) {
  const Residual r = check_residual(shortcut, branch, theta, alive, seed);
  const std::vector<double> xi = block_gates(theta, alive, seed, r.N, training, branch.scalar_type(), forward_pass());
  Tensor y = at::empty_like(r.branch, r.fmt);
  const auto fwd = cpu_has_avx512_bw() ? &avx512::residual_forward : &baseline::residual_forward;
  fwd(r.shortcut, r.branch, xi, r.M, y);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> gated_residual_bwd(const Tensor& grad_y, const Tensor& y, const Tensor& branch,
                                                      const Tensor& theta, const Tensor& alive, const Tensor& seed,
                                                      bool training) {
  const Residual r = check_residual(y, branch, theta, alive, seed);  // y: the output, shaped as the shortcut
  TORCH_CHECK(grad_y.sizes() == branch.sizes() && grad_y.scalar_type() == branch.scalar_type(),
              "cadk gated_residual: grad_y must match branch in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  const std::vector<double> xi = block_gates(theta, alive, seed, r.N, training, branch.scalar_type(), Pass::kBackward);
  Tensor grad_shortcut = at::empty_like(r.branch, r.fmt), grad_branch = at::empty_like(r.branch, r.fmt);
  const auto bwd = cpu_has_avx512_bw() ? &avx512::residual_backward : &baseline::residual_backward;
  const double sum = bwd(in_format(grad_y, r.fmt), r.shortcut, r.branch, xi, r.M, grad_shortcut, grad_branch);
  const Tensor sums = at::full({1}, sum, theta.options().dtype(at::kDouble));
  return {grad_shortcut, grad_branch, scatter_vector(sums, alive, theta.numel(), theta.scalar_type())};
}

}  // namespace cadk::cpu
