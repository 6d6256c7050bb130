// bn_gate_act's kernels, compiled twice like epilogues.h: for baseline x86-64 in bn_gate_act.cpp
// and with AVX-512 enabled in avx512.cpp, each inside its own namespace CADK_ISA. Batch norm over
// the alive channels, then activation and gate, in two passes over x forward (statistics, then
// normalise+act+gate) and two backward (reductions, then grad_x).
// Included only by those two files, after all other headers.
#ifndef CADK_ISA
#error "define CADK_ISA (the namespace of this build of the kernels) before including bn_gate_act_kernels.h"
#endif

namespace cadk::cpu::CADK_ISA {
namespace {

void check_bn(const Tensor& x, const Tensor& alive, const OptTensor& theta,
              const Tensor& seed, std::initializer_list<std::pair<const Tensor*, const char*>> vectors) {
  check_cpu(x, "x");
  check_compute_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 2, "cadk bn_gate_act: x must be [N, alive.numel(), ...], got shape ", x.sizes());
  // The first vector gives the unit count: in the forward the running statistics (buffers of the BN
  // layer), so a weight or bias of the wrong size is named as such.
  const int64_t units = vectors.begin()->first->numel();
  for (const auto& [t, name] : vectors) check_vector(*t, units, name);
  check_vector(theta, units, "theta");
  check_alive(alive, x.size(1), units, "alive");
  seed_value(seed);
}

int64_t values_per_channel(const Rows& v) { return v.N * v.S; }

// Per-channel coefficient vector in the opmath dtype, contiguous.
Tensor coef(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Training statistics: mean and biased variance per channel, summed around a per-channel shift
// (the channel's first value) so that a large mean does not cancel the variance.
std::tuple<Tensor, Tensor> batch_stats(const Tensor& x, const Rows& v) {
  Tensor shift;
  Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cadk_bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    shift = at::empty({v.C}, at::TensorOptions().dtype(at::toOpMathType(x.scalar_type())));
    acc_t* sp = shift.data_ptr<acc_t>();
    for (int64_t c = 0; c < v.C; ++c) sp[c] = acc_t(xp[v.cl ? c : c * v.S]);
    with_bool(v.cl, [&](auto cl) {
      constexpr bool kCL = decltype(cl)::value;
      const int64_t len = v.len(), C = v.C, run = run_rows(v);
      const std::vector<acc_t> shift_runs = kCL ? tiled(sp, C, run) : std::vector<acc_t>{};
      const acc_t* shift_base = kCL ? shift_runs.data() : sp;
      sums = reduce_rows(v, 2, [&](int64_t r0, int64_t r1, double* acc) {
        Partials<acc_t> part(acc, 2, kCL ? C : 0, run);
        for (RunCursor at(v, run, r0, r1); !at.done(); at.next()) {
          const int64_t r = at.row(), count = at.count();
          const int64_t c = at.c();
          const scalar_t* xr = xp + r * len;
          const acc_t* k = shift_base + c;
          acc_t *p1 = part[0], *p2 = part[1];
          acc_t row1 = 0, row2 = 0;
          CADK_PRAGMA(omp simd reduction(+ : row1, row2))
          for (int64_t i = 0; i < count; ++i) {
            const acc_t d = acc_t(xr[i]) - k[kCL ? i : 0];
            if constexpr (kCL) {
              p1[i] += d;
              p2[i] += d * d;
            } else {
              row1 += d;
              row2 += d * d;
            }
          }
          if constexpr (kCL) {
            part.next_row();
          } else {
            acc[c] += row1;
            acc[C + c] += row2;
          }
        }
      });
    });
  });
  // mean = shift + E[x - shift], var = max(E[(x - shift)^2] - E[x - shift]^2, 0), in double, then the
  // math dtype: plain loops, as a dozen ATen calls on C-entry vectors cost more than a small batch's pass.
  const double m = double(values_per_channel(v));
  const auto acc_type = at::toOpMathType(x.scalar_type());
  Tensor mean = at::empty({v.C}, at::TensorOptions().dtype(acc_type));
  Tensor var = at::empty({v.C}, at::TensorOptions().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "cadk_bn_stats", [&] {
    const scalar_t* sp = shift.data_ptr<scalar_t>();
    const double* s1 = sums.data_ptr<double>();
    const double* s2 = s1 + v.C;
    scalar_t *mp = mean.data_ptr<scalar_t>(), *vp = var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < v.C; ++c) {
      const double d1 = s1[c] / m, d2 = s2[c] / m - d1 * d1;
      mp[c] = scalar_t(double(sp[c]) + d1);
      vp[c] = scalar_t(d2 < 0.0 ? 0.0 : d2);  // NaN stays NaN, as clamp_min
    }
  });
  return {mean, var};
}

// Per-channel values of a full-size parameter vector at the alive units, in the math dtype.
template <typename acc_t>
std::vector<acc_t> at_alive(const Tensor& full, const Tensor& alive) {
  const Tensor f = coef(full, c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* fp = f.data_ptr<acc_t>();
  const int64_t* ap = alive.data_ptr<int64_t>();
  std::vector<acc_t> out(alive.numel());
  for (size_t c = 0; c < out.size(); ++c) out[c] = fp[ap[c]];
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_fwd(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training) {
  check_bn(x, alive, theta, seed,
           {{&running_mean, "running_mean"}, {&running_var, "running_var"}, {&weight, "weight"}, {&bias, "bias"}});
  const Act act = parse_activation(activation);
  const Tensor xc = in_format(x, format_of(x));
  const Rows v = rows_of(xc);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  Tensor mean, var;
  if (training) {
    // A ValueError, as nn.BatchNorm2d's and the Triton backend's.
    TORCH_CHECK_VALUE(values_per_channel(v) > 1, "cadk bn_gate_act: training needs more than one value per ",
                      "channel, got input shape ", x.sizes(), "; use a larger batch or eval mode");
    std::tie(mean, var) = batch_stats(xc, v);
  } else {
    // Fresh tensors: with every channel alive the gather would return the running statistics themselves.
    mean = coef(gather_vector(running_mean, alive), acc_type).clone();
    var = coef(gather_vector(running_var, alive), acc_type).clone();
  }
  const Tensor ac = alive.contiguous();
  const Gates gates = make_gates(theta, alive, seed, v.N, training, x.scalar_type(), forward_pass());
  const bool gated = gates.defined(), relu = act == Act::kRelu;
  Tensor y = at::empty_like(xc, format_of(xc));
  Tensor pre = gated ? at::empty_like(xc, format_of(xc)) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cadk_bn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateRows<acc_t> gate_rows = gates.rows<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* pp = gated ? pre.data_ptr<scalar_t>() : nullptr;
    // z = x * scale + shift, the form ATen's batch norm uses, each step rounded as its tensor ops do.
    std::vector<acc_t> scale = at_alive<acc_t>(weight, ac), shift = at_alive<acc_t>(bias, ac);
    const acc_t *mp = mean.data_ptr<acc_t>(), *vp = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < v.C; ++c) {
      scale[c] = scale[c] * (acc_t(1) / std::sqrt(vp[c] + acc_t(eps)));
      shift[c] = shift[c] - mp[c] * scale[c];
    }
    const acc_t* scp = scale.data();
    const acc_t* shp = shift.data();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        with_bool(gated, [&](auto use_gate) {
          constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
          constexpr bool kGate = decltype(use_gate)::value;
          const int64_t len = v.len(), run = run_rows(v);
          const std::vector<acc_t> sc_runs = kCL ? tiled(scp, v.C, run) : std::vector<acc_t>{};
          const std::vector<acc_t> sh_runs = kCL ? tiled(shp, v.C, run) : std::vector<acc_t>{};
          const acc_t* sc_base = kCL ? sc_runs.data() : scp;
          const acc_t* sh_base = kCL ? sh_runs.data() : shp;
          for_rows(v, [&](int64_t r0, int64_t r1) {
            TiledGateRow<acc_t> tiled_gates(gate_rows, v.C, run);
            for (RunCursor at(v, run, r0, r1); !at.done(); at.next()) {
              const int64_t r = at.row(), count = at.count();
              const int64_t c = at.c();
              const scalar_t* xr = xp + r * len;
              scalar_t* yr = yp + r * len;
              scalar_t* pr = kGate ? pp + r * len : nullptr;
              const acc_t* sc = sc_base + c;
              const acc_t* sh = sh_base + c;
              const acc_t* xi = tiled_gates.of(at.n(), c);
              CADK_PRAGMA(omp simd)
              for (int64_t i = 0; i < count; ++i) {
                const int64_t k = kCL ? i : 0;
                acc_t p = acc_t(round_to<scalar_t>(acc_t(xr[i]) * sc[k] + sh[k]));  // z rounds to x's dtype
                if constexpr (kRelu) p = p < acc_t(0) ? acc_t(0) : p;
                if constexpr (kGate) {
                  pr[i] = round_to<scalar_t>(p);
                  yr[i] = round_to<scalar_t>(p * xi[k]);
                } else {
                  yr[i] = round_to<scalar_t>(p);
                }
              }
            }
          });
        });
      });
    });
  });
  return {y, pre, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_bwd(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& pre, const Tensor& mean,
    const Tensor& var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training) {
  check_bn(x, alive, theta, seed, {{&weight, "weight"}});
  const Act act = parse_activation(activation);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && pre.sizes() == x.sizes(), "cadk bn_gate_act: grad_y ",
              grad_y.sizes(), " and pre ", pre.sizes(), " must both match x ", x.sizes());
  const int64_t A = alive.numel();
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == A && var.dim() == 1 && var.size(0) == A,
              "cadk bn_gate_act: mean and var must be the [", A, "] statistics returned by bn_gate_act_fwd");
  const auto fmt = format_of(x);
  const Tensor xc = in_format(x, fmt), gy = in_format(grad_y, fmt), pc = in_format(pre, fmt);
  const Rows v = rows_of(xc);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const Tensor mu = coef(mean, acc_type), vr = coef(var, acc_type), ac = alive.contiguous();
  const Gates gates = make_gates(theta, alive, seed, v.N, training, x.scalar_type(), Pass::kBackward);
  const bool gated = gates.defined(), relu = act == Act::kRelu;
  Tensor grad_x = at::empty_like(xc, fmt);
  Tensor grad_w_alive, grad_b_alive, theta_sum;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cadk_bn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GateRows<acc_t> gate_rows = gates.rows<acc_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* pp = pc.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const acc_t* mup = mu.data_ptr<acc_t>();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        with_bool(gated, [&](auto use_gate) {
          constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
          constexpr bool kGate = decltype(use_gate)::value;
          const int64_t len = v.len(), C = v.C, run = run_rows(v);
          const std::vector<acc_t> mu_runs = kCL ? tiled(mup, C, run) : std::vector<acc_t>{};
          const acc_t* mu_base = kCL ? mu_runs.data() : mup;
          // Gradient reaching z (the normalised value): as the reference, grad_y * xi rounded to the
          // activation dtype, then the ReLU mask (zero where pre <= 0 only: a NaN pre passes, as torch.relu's).
          auto grad_z = [](const scalar_t* gyr, const scalar_t* pr, const acc_t* xi, int64_t i) {
            const acc_t dy = acc_t(gyr[i]);
            const acc_t g = kGate ? acc_t(round_to<scalar_t>(dy * xi[kCL ? i : 0])) : dy;
            return kRelu ? (acc_t(pr[i]) <= acc_t(0) ? acc_t(0) : g) : g;
          };
          // Pass 1: sum(g), sum(g * (x - mean)), sum(grad_y * pre) per channel.
          const Tensor sums = reduce_rows(v, 3, [&](int64_t r0, int64_t r1, double* acc) {
            Partials<acc_t> part(acc, 3, kCL ? C : 0, run);
            TiledGateRow<acc_t> tiled_gates(gate_rows, C, run);
            for (RunCursor at(v, run, r0, r1); !at.done(); at.next()) {
              const int64_t r = at.row(), count = at.count();
              const int64_t c = at.c();
              const scalar_t *xr = xp + r * len, *gyr = gyp + r * len, *pr = pp + r * len;
              const acc_t* xi = tiled_gates.of(at.n(), c);
              const acc_t* m = mu_base + c;
              acc_t *pg = part[0], *pgx = part[1], *pt = part[2];
              acc_t row_g = 0, row_gx = 0, row_t = 0;
              CADK_PRAGMA(omp simd reduction(+ : row_g, row_gx, row_t))
              for (int64_t i = 0; i < count; ++i) {
                const acc_t g = grad_z(gyr, pr, xi, i);
                const acc_t gx = g * (acc_t(xr[i]) - m[kCL ? i : 0]);
                const acc_t t = kGate ? acc_t(gyr[i]) * acc_t(pr[i]) : acc_t(0);
                if constexpr (kCL) {
                  pg[i] += g;
                  pgx[i] += gx;
                  if (kGate) pt[i] += t;
                } else {
                  row_g += g;
                  row_gx += gx;
                  row_t += t;
                }
              }
              if constexpr (kCL) {
                part.next_row();
              } else {
                acc[c] += row_g;
                acc[C + c] += row_gx;
                acc[2 * C + c] += row_t;
              }
            }
          });
          // grad_x = a * g + b * (x - mean) + c per channel; b = c = 0 in eval (running stats are
          // constants).
          // In double from the sums, rounded to the math dtype once (plain loops, as in the forward).
          const std::vector<double> w = at_alive<double>(weight, ac);
          const double m = double(values_per_channel(v));
          const double *sg = sums.data_ptr<double>(), *sgx = sg + C;
          grad_w_alive = at::empty({C}, at::TensorOptions().dtype(at::kDouble));
          grad_b_alive = sums[0];
          theta_sum = sums[2];
          double* gw = grad_w_alive.data_ptr<double>();
          const acc_t* vp = vr.data_ptr<acc_t>();
          std::vector<acc_t> ca(C), cb(C), cc(C);
          for (int64_t c = 0; c < C; ++c) {
            const double inv = double(acc_t(1) / std::sqrt(vp[c] + acc_t(eps)));  // invstd in the math dtype
            const double a = w[c] * inv;
            gw[c] = sgx[c] * inv;
            ca[c] = acc_t(a);
            cb[c] = training ? acc_t(-a * inv * inv * sgx[c] / m) : acc_t(0);
            cc[c] = training ? acc_t(-a * sg[c] / m) : acc_t(0);
          }
          const acc_t *ap = ca.data(), *bp = cb.data(), *cp = cc.data();
          const std::vector<acc_t> a_runs = kCL ? tiled(ap, C, run) : std::vector<acc_t>{};
          const std::vector<acc_t> b_runs = kCL ? tiled(bp, C, run) : std::vector<acc_t>{};
          const std::vector<acc_t> c_runs = kCL ? tiled(cp, C, run) : std::vector<acc_t>{};
          const acc_t* a_base = kCL ? a_runs.data() : ap;
          const acc_t* b_base = kCL ? b_runs.data() : bp;
          const acc_t* c_base = kCL ? c_runs.data() : cp;
          // Pass 2: grad_x.
          for_rows(v, [&](int64_t r0, int64_t r1) {
            TiledGateRow<acc_t> tiled_gates(gate_rows, C, run);
            for (RunCursor at(v, run, r0, r1); !at.done(); at.next()) {
              const int64_t r = at.row(), count = at.count();
              const int64_t c = at.c();
              const scalar_t *xr = xp + r * len, *gyr = gyp + r * len, *pr = pp + r * len;
              scalar_t* gxr = gxp + r * len;
              const acc_t* xi = tiled_gates.of(at.n(), c);
              const acc_t *ac = a_base + c, *bc = b_base + c, *cc_ = c_base + c, *mc = mu_base + c;
              CADK_PRAGMA(omp simd)
              for (int64_t i = 0; i < count; ++i) {
                const int64_t k = kCL ? i : 0;
                const acc_t g = grad_z(gyr, pr, xi, i);
                // Eval reads no x: a NaN x times a zero coefficient would make its gradient NaN.
                const acc_t gx = ac[k] * g;
                gxr[i] = round_to<scalar_t>(training ? gx + bc[k] * (acc_t(xr[i]) - mc[k]) + cc_[k] : gx);
              }
            }
          });
        });
      });
    });
  });
  const int64_t units = weight.numel();
  const auto wtype = weight.scalar_type();
  Tensor grad_theta = gated ? scatter_vector(theta_sum, alive, units, theta->scalar_type()) : no_grad_like(x);
  return {grad_x, scatter_vector(grad_w_alive, alive, units, wtype), scatter_vector(grad_b_alive, alive, units, wtype),
          grad_theta};
}

}  // namespace cadk::cpu::CADK_ISA
