#include "common.h"

#include <ATen/Dispatch.h>

#include <cstring>
#include <vector>

#include "../philox.h"

namespace cadk::cpu {

// ---------------------------------------------------------------------------------------------
// Checks

Act parse_activation(c10::string_view activation) {
  if (activation == "relu") return Act::kRelu;
  if (activation == "none") return Act::kNone;
  TORCH_CHECK(false, "cadk: activation must be \"relu\" or \"none\", got \"", std::string(activation), "\"");
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cadk: ", name, " is on ", t.device(),
              " but this is the CPU kernel; move all inputs of the op to one device");
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "cadk: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

void check_alive(const Tensor& alive, int64_t count, int64_t full, const char* name) {
  TORCH_CHECK(alive.scalar_type() == at::kLong, "cadk: ", name, " must be an int64 index tensor, got ",
              alive.scalar_type(), "; build it with dtype=torch.int64");
  TORCH_CHECK(alive.dim() == 1, "cadk: ", name, " must be 1-D, got shape ", alive.sizes());
  check_cpu(alive, name);
  TORCH_CHECK(alive.numel() == count, "cadk: ", name, " lists ", alive.numel(),
              " channels but the activation has ", count,
              " (dim 1); the activation must hold exactly the alive channels");
  const Tensor a = alive.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  for (int64_t k = 0; k < count; ++k) {
    TORCH_CHECK(p[k] >= 0 && p[k] < full, "cadk: ", name, "[", k, "] = ", p[k], " is outside [0, ", full,
                "), the full channel range of the parameters");
    TORCH_CHECK(k == 0 || p[k] > p[k - 1], "cadk: ", name,
                " must be sorted and without repeats (e.g. torch.unique(idx)), got ", p[k - 1], " before ",
                p[k]);
  }
}

uint64_t seed_value(const Tensor& seed) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "cadk: seed must be a 0-dim int64 tensor, got shape ", seed.sizes(), " and dtype ",
              seed.scalar_type());
  check_cpu(seed, "seed");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

void check_vector(const OptTensor& t, int64_t full, const char* name) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  check_float(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == full, "cadk: ", name, " must have shape [", full,
              "] (one entry per full-range channel), got ", t->sizes());
}

// ---------------------------------------------------------------------------------------------
// Layout

at::MemoryFormat format_of(const Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

Rows rows_of(const Tensor& t) {
  Rows v;
  v.N = t.size(0);
  v.C = t.size(1);
  v.S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) v.S *= t.size(d);
  v.cl = format_of(t) == at::MemoryFormat::ChannelsLast || v.S == 1;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Gates

namespace {

// Units whose theta is 0 or 1 (or NaN) have a fixed gate (u in [0, 1) never reaches 1, and never
// falls below 0): only the others need Philox words. Converged gates sit at exactly 0 or 1.
struct GatePlan {
  std::vector<float> fixed;     // [A]: gate of fixed units, 0 for sampled ones
  std::vector<int64_t> pos;     // positions j' of sampled units
  std::vector<uint32_t> unit;   // their full-range index j
  std::vector<float> theta;     // their theta
};

GatePlan plan_gates(const Tensor& theta, const Tensor& alive) {
  const Tensor th = theta.detach().to(at::kFloat).contiguous();
  const Tensor al = alive.contiguous();
  const float* tp = th.data_ptr<float>();
  const int64_t* ap = al.data_ptr<int64_t>();
  GatePlan plan;
  plan.fixed.resize(al.numel());
  for (int64_t k = 0; k < al.numel(); ++k) {
    const float t = tp[ap[k]];
    if (t > 0.0f && t < 1.0f) {
      plan.pos.push_back(k);
      plan.unit.push_back(static_cast<uint32_t>(ap[k]));
      plan.theta.push_back(t);
    }
    plan.fixed[k] = t >= 1.0f ? 1.0f : 0.0f;
  }
  return plan;
}

}  // namespace

Gates make_gates(const OptTensor& theta, const Tensor& alive, const Tensor& seed, int64_t batch, bool training,
                 at::ScalarType act_dtype) {
  if (!theta.has_value()) return {};
  const int64_t A = alive.numel();
  const auto opmath = at::toOpMathType(act_dtype);
  if (!training) {
    Tensor xi = gather_vector(*theta, alive).detach().to(act_dtype).to(opmath).reshape({1, A}).contiguous();
    return {xi, 0};
  }
  const int64_t units = theta->numel();
  TORCH_CHECK(batch * units <= kPhiloxMaxOffset, "cadk gates: batch ", batch, " x ", units,
              " units exceeds the 2^31 Philox offset range; split the batch");
  const uint64_t key = seed_value(seed);
  const GatePlan plan = plan_gates(*theta, alive);
  const int64_t sampled = static_cast<int64_t>(plan.pos.size());
  Tensor table = at::empty({batch, A}, at::TensorOptions().dtype(at::kFloat));
  float* tp = table.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, A));
  at::parallel_for(0, batch, grain, [&](int64_t b, int64_t e) {
    std::vector<float> drawn(sampled);
    for (int64_t n = b; n < e; ++n) {
      float* row = tp + n * A;
      const uint32_t base = static_cast<uint32_t>(n * units);
      if (sampled == A) {  // no fixed unit: draw straight into the row
        philox_gates(key, base, plan.unit.data(), plan.theta.data(), A, row);
        continue;
      }
      std::copy(plan.fixed.begin(), plan.fixed.end(), row);
      if (sampled == 0) continue;
      philox_gates(key, base, plan.unit.data(), plan.theta.data(), sampled, drawn.data());
      for (int64_t k = 0; k < sampled; ++k) row[plan.pos[k]] = drawn[k];
    }
  });
  return {opmath == at::kFloat ? table : table.to(opmath), A};
}

// ---------------------------------------------------------------------------------------------
// Weights and vectors

namespace {

// Elements move as raw bits: copies need only the element size.
template <typename F>
void with_bits(const Tensor& t, const F& f) {
  switch (t.element_size()) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK(false, "cadk: unsupported element size ", t.element_size(), " of ", t.scalar_type());
  }
}

// Weight storage seen as [C_out, P, Q]: P = C_in, Q = kernel taps (channel-major), or P = taps,
// Q = C_in (channels-last). `in_inner` tells which.
struct WeightShape {
  int64_t out, in, taps;
  bool in_inner;
};

WeightShape weight_shape(const Tensor& w) {
  const int64_t taps = w.dim() > 2 ? w.numel() / std::max<int64_t>(1, w.size(0) * w.size(1)) : 1;
  return {w.size(0), w.size(1), taps, format_of(w) == at::MemoryFormat::ChannelsLast};
}

std::vector<int64_t> inverse_index(const Tensor& alive, int64_t full) {
  std::vector<int64_t> inv(full, -1);
  const Tensor a = alive.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  for (int64_t k = 0; k < a.numel(); ++k) inv[p[k]] = k;
  return inv;
}

// Memory for a tensor used only within the current op call, reused across calls on this thread:
// a fresh allocation of a gathered weight page-faults on first touch, which costs as much as the
// gather itself. Falls back to a fresh tensor while a previous result is still referenced.
Tensor scratch_tensor(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt) {
  constexpr int64_t kMaxCachedBytes = int64_t(64) << 20;
  thread_local at::Storage cached;
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(c10::elementSize(options.dtype().toScalarType()));
  if (bytes > kMaxCachedBytes) return at::empty(sizes, options.memory_format(fmt));
  if (!cached || cached.use_count() > 1 || int64_t(cached.nbytes()) < bytes) {
    cached = at::empty({bytes}, options.dtype(at::kByte)).storage();
  }
  std::vector<int64_t> strides;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else {
    const auto dense = c10::contiguous_strides(sizes);
    strides.assign(dense.begin(), dense.end());
  }
  return at::empty({0}, options).set_(cached, 0, sizes, strides);
}

}  // namespace

Tensor gather_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out, bool scratch) {
  const WeightShape s = weight_shape(weight);
  if (is_full(alive_in, s.in) && is_full(alive_out, s.out)) return weight;
  const auto fmt = format_of(weight);
  const Tensor src = weight.contiguous(fmt);
  const int64_t ai = alive_in.numel(), ao = alive_out.numel();
  auto sizes = weight.sizes().vec();
  sizes[0] = ao;
  sizes[1] = ai;
  Tensor out = scratch ? scratch_tensor(sizes, weight.options(), fmt) : at::empty(sizes, weight.options().memory_format(fmt));
  const Tensor in_idx = alive_in.contiguous(), out_idx = alive_out.contiguous();
  const int64_t* ip = in_idx.data_ptr<int64_t>();
  const int64_t* op = out_idx.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, ai * s.taps));
  with_bits(weight, [&](auto bits) {
    using B = decltype(bits);
    const B* sp = static_cast<const B*>(src.data_ptr());
    B* dp = static_cast<B*>(out.data_ptr());
    at::parallel_for(0, ao, grain, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const B* srow = sp + op[o] * s.in * s.taps;
        B* drow = dp + o * ai * s.taps;
        if (s.in_inner) {  // [taps, C_in] rows
          for (int64_t k = 0; k < s.taps; ++k)
            for (int64_t i = 0; i < ai; ++i) drow[k * ai + i] = srow[k * s.in + ip[i]];
        } else {  // [C_in, taps] rows
          for (int64_t i = 0; i < ai; ++i)
            for (int64_t k = 0; k < s.taps; ++k) drow[i * s.taps + k] = srow[ip[i] * s.taps + k];
        }
      }
    });
  });
  return out;
}

Tensor scatter_weight(const Tensor& compact, const Tensor& full_like, const Tensor& alive_in,
                      const Tensor& alive_out) {
  const WeightShape s = weight_shape(full_like);
  const auto fmt = format_of(full_like);
  const Tensor src = compact.to(full_like.scalar_type()).contiguous(fmt);
  if (is_full(alive_in, s.in) && is_full(alive_out, s.out)) return src;
  const int64_t ai = alive_in.numel();
  Tensor out = at::empty(full_like.sizes(), full_like.options().memory_format(fmt));
  const std::vector<int64_t> inv_out = inverse_index(alive_out, s.out);
  const Tensor in_idx = alive_in.contiguous();
  const int64_t* ip = in_idx.data_ptr<int64_t>();
  const int64_t row = s.in * s.taps;
  with_bits(out, [&](auto bits) {
    using B = decltype(bits);
    const B* sp = static_cast<const B*>(src.data_ptr());
    B* dp = static_cast<B*>(out.data_ptr());
    // Zero each row, then write its alive entries: one streaming pass plus a sparse one.
    at::parallel_for(0, s.out, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row)), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        B* drow = dp + o * row;
        std::memset(drow, 0, row * sizeof(B));
        if (inv_out[o] < 0) continue;
        const B* srow = sp + inv_out[o] * ai * s.taps;
        if (s.in_inner) {
          for (int64_t k = 0; k < s.taps; ++k)
            for (int64_t i = 0; i < ai; ++i) drow[k * s.in + ip[i]] = srow[k * ai + i];
        } else {
          for (int64_t i = 0; i < ai; ++i)
            for (int64_t k = 0; k < s.taps; ++k) drow[ip[i] * s.taps + k] = srow[i * s.taps + k];
        }
      }
    });
  });
  return out;
}

Tensor gather_vector(const Tensor& v, const Tensor& alive) {
  return is_full(alive, v.size(0)) ? v : v.index_select(0, alive);
}

Tensor scatter_vector(const Tensor& values, const Tensor& alive, int64_t full, at::ScalarType dtype) {
  if (is_full(alive, full)) return values.to(dtype);
  Tensor out = at::zeros({full}, values.options().dtype(dtype));
  return out.index_copy_(0, alive, values.to(dtype));
}

Tensor no_grad_like(const Tensor& t) { return at::empty({0}, t.options()); }

// ---------------------------------------------------------------------------------------------
// Epilogues

std::tuple<Tensor, Tensor> epilogue_forward(Tensor z, const Gates& gates, Act act) {
  const bool relu = act == Act::kRelu;
  if (!gates.defined()) {
    if (relu) z.clamp_min_(0);
    return {z, at::empty({0}, z.options())};
  }
  const Rows v = rows_of(z);
  Tensor y = at::empty_like(z, format_of(z));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "cadk_epilogue_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
        const int64_t len = v.len();
        for_rows(v, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* zr = zp + r * len;
            scalar_t* yr = yp + r * len;
            const acc_t* xi = gates.row<acc_t>(v.n_of(r)) + v.c_of(r);
            CADK_PRAGMA(omp simd)
            for (int64_t i = 0; i < len; ++i) {
              acc_t p = acc_t(zr[i]);
              if constexpr (kRelu) {
                p = p < acc_t(0) ? acc_t(0) : p;  // NaN stays NaN, as torch.relu
                zr[i] = scalar_t(p);
              }
              yr[i] = scalar_t(p * xi[kCL ? i : 0]);
            }
          }
        });
      });
    });
  });
  return {y, z};
}

EpilogueGrads epilogue_backward(const Tensor& grad_y, const Tensor& pre, const Gates& gates, Act act,
                                bool want_bias_sum) {
  const Rows v = rows_of(pre);
  const bool gated = gates.defined(), relu = act == Act::kRelu;
  Tensor grad_z = at::empty_like(pre, format_of(pre));
  Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pre.scalar_type(), "cadk_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* pp = pre.data_ptr<scalar_t>();
    scalar_t* gzp = grad_z.data_ptr<scalar_t>();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        with_bool(gated, [&](auto use_gate) {
          constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
          constexpr bool kGate = decltype(use_gate)::value;
          const int64_t len = v.len(), C = v.C;
          // Accumulators: [0] theta (sum grad_y * pre), [1] bias (sum grad_z); both always summed
          // (the bias sum is nearly free in the same pass).
          sums = reduce_rows(v, 2, [&](int64_t r0, int64_t r1, double* acc) {
            Partials<acc_t> part(acc, 2, kCL ? C : 0);
            for (int64_t r = r0; r < r1; ++r) {
              const int64_t c = v.c_of(r);
              const scalar_t* gy = gyp + r * len;
              const scalar_t* p = pp + r * len;
              scalar_t* gz = gzp + r * len;
              const acc_t* xi = kGate ? gates.row<acc_t>(v.n_of(r)) + c : nullptr;
              acc_t* part_theta = part[0];
              acc_t* part_bias = part[1];
              acc_t row_theta = 0, row_bias = 0;
              CADK_PRAGMA(omp simd reduction(+ : row_theta, row_bias))
              for (int64_t i = 0; i < len; ++i) {
                const acc_t dy = acc_t(gy[i]);
                const acc_t pv = acc_t(p[i]);
                // As the reference: grad_y * xi rounded to the activation dtype, then the ReLU mask.
                acc_t g = kGate ? acc_t(scalar_t(dy * xi[kCL ? i : 0])) : dy;
                if constexpr (kRelu) g = pv > acc_t(0) ? g : acc_t(0);
                gz[i] = scalar_t(g);
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

}  // namespace cadk::cpu
