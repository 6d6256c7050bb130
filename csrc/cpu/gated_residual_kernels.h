// The loops of gated_residual (gated_residual.cpp), compiled twice like epilogues.h: for baseline
// x86-64 in gated_residual.cpp and with AVX-512 in avx512.cpp, each inside its own namespace CADK_ISA.
// Included only by those two files, after all other headers.
#ifndef CADK_ISA
#error "define CADK_ISA (the namespace of this build of the loops) before including gated_residual_kernels.h"
#endif

namespace cadk::cpu::CADK_ISA {

namespace residual {

constexpr int64_t kChunk = 16384;  // values per task: a batch of few examples still uses every thread

inline int64_t tasks_per_example(int64_t M) { return std::max<int64_t>(1, (M + kChunk - 1) / kChunk); }

// Calls f(task, n, begin, end) for every chunk of every example of M values, over the threads.
template <typename F>
void for_chunks(int64_t N, int64_t M, const F& f) {
  const int64_t per_example = tasks_per_example(M);
  at::parallel_for(0, N * per_example, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / per_example, k = t % per_example;
      f(t, n, n * M + k * kChunk, n * M + std::min(M, (k + 1) * kChunk));
    }
  });
}

}  // namespace residual

// y = relu(shortcut + xi[n] * branch) over N examples of M values each (all contiguous alike).
void residual_forward(const Tensor& shortcut, const Tensor& branch, const std::vector<double>& xi, int64_t M,
                      const Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, branch.scalar_type(), "cadk_gated_residual_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = shortcut.data_ptr<scalar_t>();
    const scalar_t* bp = branch.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    residual::for_chunks(static_cast<int64_t>(xi.size()), M, [&](int64_t, int64_t n, int64_t i0, int64_t i1) {
      const scalar_t* __restrict__ s = sp;  // locals, as in residual_backward
      const scalar_t* __restrict__ b = bp;
      scalar_t* __restrict__ out = yp;
      const acc_t x = static_cast<acc_t>(xi[n]);
      CADK_PRAGMA(omp simd)
      for (int64_t i = i0; i < i1; ++i) {
        // Rounded where the reference rounds: the gated branch, then the sum.
        const acc_t g = acc_t(round_to<scalar_t>(acc_t(b[i]) * x));
        const acc_t v = acc_t(round_to<scalar_t>(acc_t(s[i]) + g));
        out[i] = round_to<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // NaN stays NaN, as torch.relu
      }
    });
  });
}

// grad_shortcut = grad_y * (y > 0), grad_branch = grad_shortcut * xi[n]; returns sum(grad_shortcut *
// branch), the theta gradient, summed per task and then in task order (deterministic).
double residual_backward(const Tensor& grad_y, const Tensor& y, const Tensor& branch, const std::vector<double>& xi,
                         int64_t M, const Tensor& grad_shortcut, const Tensor& grad_branch) {
  const int64_t N = static_cast<int64_t>(xi.size());
  std::vector<double> partial(N * residual::tasks_per_example(M), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, branch.scalar_type(), "cadk_gated_residual_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* bp = branch.data_ptr<scalar_t>();
    scalar_t* gsp = grad_shortcut.data_ptr<scalar_t>();
    scalar_t* gbp = grad_branch.data_ptr<scalar_t>();
    residual::for_chunks(N, M, [&](int64_t t, int64_t n, int64_t i0, int64_t i1) {
      // Locals, not the closure's references: stores could alias those, and GCC kept the loop scalar.
      const scalar_t* __restrict__ gy = gyp;
      const scalar_t* __restrict__ out = yp;
      const scalar_t* __restrict__ b = bp;
      scalar_t* __restrict__ gs = gsp;
      scalar_t* __restrict__ gb = gbp;
      const acc_t x = static_cast<acc_t>(xi[n]);
      double sum = 0;  // in double: a float sum over a 16384-value chunk lost digits the reference keeps
      CADK_PRAGMA(omp simd reduction(+ : sum))
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t dy = acc_t(gy[i]);
        const acc_t g = acc_t(out[i]) <= acc_t(0) ? acc_t(0) : dy;  // ReLU's derivative from its output
        gs[i] = round_to<scalar_t>(g);
        gb[i] = round_to<scalar_t>(g * x);
        sum += static_cast<double>(g * acc_t(b[i]));
      }
      partial[t] = sum;
    });
  });
  double total = 0.0;
  for (const double p : partial) total += p;
  return total;
}

}  // namespace cadk::cpu::CADK_ISA
