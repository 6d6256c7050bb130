// The fused gate/activation epilogues (declared in common.h), compiled twice: for baseline x86-64 in
// common.cpp and with AVX-512 enabled in avx512.cpp, each inside its own namespace CADK_ISA;
// common.cpp picks one per call (cpu_has_avx512_bw). A baseline build vectorises 4 floats wide and
// packs bf16 results with emulated shuffles, where the AVX-512 build runs 16 lanes.
// Included only by those two files, after all other headers.
#ifndef CADK_ISA
#error "define CADK_ISA (the namespace of this build of the epilogues) before including epilogues.h"
#endif

namespace cadk::cpu::CADK_ISA {

std::tuple<Tensor, Tensor> epilogue_forward(Tensor z, const OptTensor& bias, const Gates& gates, Act act) {
  const bool relu = act == Act::kRelu, gated = gates.defined();
  if (!gated && !bias.has_value()) {
    if (relu) z.clamp_min_(0);
    return {z, at::empty({0}, z.options())};
  }
  const Rows v = rows_of(z);
  Tensor y = gated ? at::empty_like(z, format_of(z)) : z;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "cadk_epilogue_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateRows<acc_t> gate_rows = gates.rows<acc_t>();
    const Tensor b = bias.has_value() ? bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : Tensor();
    const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        with_bool(gated, [&](auto use_gate) {
          with_bool(bp != nullptr, [&](auto use_bias) {
            constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
            constexpr bool kGate = decltype(use_gate)::value, kBias = decltype(use_bias)::value;
            const int64_t len = v.len(), run = run_rows(v);
            for_rows(v, [&](int64_t r0, int64_t r1) {
              TiledGateRow<acc_t> tiled_gates(gate_rows, v.C, run);
              const std::vector<acc_t> tiled_bias = kBias && kCL ? tiled(bp, v.C, run) : std::vector<acc_t>{};
              for (RunCursor at(v, run, r0, r1); !at.done(); at.next()) {
                const int64_t r = at.row(), count = at.count();
                scalar_t* zr = zp + r * len;
                scalar_t* yr = yp + r * len;
                const acc_t* xi = tiled_gates.of(at.n(), at.c());
                const acc_t* bv = kBias ? (kCL ? tiled_bias.data() : bp + at.c()) : nullptr;
                CADK_PRAGMA(omp simd)
                for (int64_t i = 0; i < count; ++i) {
                  acc_t p = acc_t(zr[i]);
                  if constexpr (kBias) p += bv[kCL ? i : 0];
                  if constexpr (kRelu) p = p < acc_t(0) ? acc_t(0) : p;  // NaN stays NaN, as torch.relu
                  if constexpr (kRelu || kBias) zr[i] = round_to<scalar_t>(p);
                  if constexpr (kGate) yr[i] = round_to<scalar_t>(p * xi[kCL ? i : 0]);
                }
              }
            });
          });
        });
      });
    });
  });
  return {y, gated ? z : at::empty({0}, z.options())};
}

EpilogueGrads epilogue_backward(const Tensor& grad_y, const Tensor& pre, const Gates& gates, Act act,
                                bool want_bias_sum, bool scratch_grad_z) {
  const Rows v = rows_of(pre);
  const bool gated = gates.defined(), relu = act == Act::kRelu;
  Tensor grad_z = scratch_grad_z ? scratch_tensor(pre.sizes(), pre.options(), format_of(pre))
                                 : at::empty_like(pre, format_of(pre));
  Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pre.scalar_type(), "cadk_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateRows<acc_t> gate_rows = gates.rows<acc_t>();
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* pp = pre.data_ptr<scalar_t>();
    scalar_t* gzp = grad_z.data_ptr<scalar_t>();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        with_bool(gated, [&](auto use_gate) {
          constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
          constexpr bool kGate = decltype(use_gate)::value;
          const int64_t len = v.len(), C = v.C, run = run_rows(v);
          // Accumulators: [0] theta (sum grad_y * pre), [1] bias (sum grad_z); both always summed
          // (the bias sum is nearly free in the same pass).
          sums = reduce_rows(v, 2, [&](int64_t r0, int64_t r1, double* acc) {
            Partials<acc_t> part(acc, 2, kCL ? C : 0, run);
            TiledGateRow<acc_t> tiled_gates(gate_rows, C, run);
            for (RunCursor at(v, run, r0, r1); !at.done(); at.next()) {
              const int64_t r = at.row(), count = at.count();
              const int64_t c = at.c();
              const scalar_t* gy = gyp + r * len;
              const scalar_t* p = pp + r * len;
              scalar_t* gz = gzp + r * len;
              const acc_t* xi = tiled_gates.of(at.n(), c);
              acc_t* part_theta = part[0];
              acc_t* part_bias = part[1];
              acc_t row_theta = 0, row_bias = 0;
              CADK_PRAGMA(omp simd reduction(+ : row_theta, row_bias))
              for (int64_t i = 0; i < count; ++i) {
                const acc_t dy = acc_t(gy[i]);
                const acc_t pv = acc_t(p[i]);
                // As the reference: grad_y * xi rounded to the activation dtype, then the ReLU mask,
                // which as torch.relu's zeroes where pre <= 0 only: a NaN pre passes the gradient.
                acc_t g = kGate ? acc_t(round_to<scalar_t>(dy * xi[kCL ? i : 0])) : dy;
                if constexpr (kRelu) g = pv <= acc_t(0) ? acc_t(0) : g;
                gz[i] = round_to<scalar_t>(g);
                if constexpr (kCL) {
                  part_theta[i] += dy * pv;
                  part_bias[i] += g;
                } else {
                  row_theta += dy * pv;
                  row_bias += g;
                }
              }
              if constexpr (kCL) {
                part.next_row();
              } else {
                acc[c] += row_theta;
                acc[C + c] += row_bias;
              }
            }
          });
        });
      });
    });
  });
  EpilogueGrads out;
  out.grad_z = grad_z;
  if (gated) out.theta_sum = sums[0];
  if (want_bias_sum) out.bias_sum = sums[1];
  return out;
}

}  // namespace cadk::cpu::CADK_ISA
