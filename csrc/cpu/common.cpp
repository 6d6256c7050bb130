#include "common.h"

#include <ATen/Dispatch.h>

#include <vector>

#include "../philox.h"
#include "kept.h"

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

void check_compute_dtype(const Tensor& t, const char* name) {
  check_float(t, name);
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, "cadk: ", name, " is ", dtype,
              ", which the CPU kernels do not compute in; use float32, float64 or bfloat16 (torch.autocast on "
              "the CPU takes bfloat16 by default), or the reference backend (CADK_BACKEND=reference)");
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
  return static_cast<uint64_t>(*seed.data_ptr<int64_t>());  // not item(): no op call for one scalar
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
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

Rows rows_of(const Tensor& t) {
  Rows v;
  v.N = t.size(0);
  v.C = t.size(1);
  v.S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) v.S *= t.size(d);
  // One channel stored channels-last is the same memory as NCHW: keep the per-channel runs.
  v.cl = (format_of(t) == at::MemoryFormat::ChannelsLast && v.C > 1) || v.S == 1;
  return v;
}


// ---------------------------------------------------------------------------------------------
// Gates

namespace {

// Everything a training gate table depends on.
struct GateKey {
  uint64_t seed = 0;
  int64_t batch = 0, units = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> alive;
  std::vector<float> theta;  // theta at alive, as compared against the uniforms
  bool operator==(const GateKey& o) const {
    return seed == o.seed && batch == o.batch && units == o.units && dtype == o.dtype && alive == o.alive &&
           theta == o.theta;
  }
};

GateKey gate_key(const Tensor& theta, const Tensor& alive, const Tensor& seed, int64_t batch,
                 at::ScalarType dtype) {
  const Tensor th = theta.detach().to(at::kFloat).contiguous();
  const float* tp = th.data_ptr<float>();
  GateKey key{seed_value(seed), batch, theta.numel(), dtype, index_list(alive), {}};
  key.theta.reserve(key.alive.size());
  for (const int64_t j : key.alive) key.theta.push_back(tp[j]);
  return key;
}

KeptForBackward<GateKey>& kept_gates() {
  static KeptForBackward<GateKey> kept;
  return kept;
}

// Units whose theta is 0 or 1 (or NaN) have a fixed gate (u in [0, 1) never reaches 1, and never
// falls below 0): only the others need Philox words. Converged gates sit at exactly 0 or 1.
struct GatePlan {
  std::vector<uint8_t> fixed;   // [A]: gate of fixed units, 0 for sampled ones
  std::vector<int64_t> pos;     // positions j' of sampled units
  std::vector<uint32_t> unit;   // their full-range index j
  std::vector<float> theta;     // their theta
};

GatePlan plan_gates(const GateKey& key) {
  GatePlan plan;
  plan.fixed.resize(key.alive.size());
  for (size_t k = 0; k < key.alive.size(); ++k) {
    const float t = key.theta[k];
    if (t > 0.0f && t < 1.0f) {
      plan.pos.push_back(int64_t(k));
      plan.unit.push_back(static_cast<uint32_t>(key.alive[k]));
      plan.theta.push_back(t);
    }
    plan.fixed[k] = t >= 1.0f ? 1 : 0;
  }
  return plan;
}

// The [batch, A] byte table of sampled gates, four examples (one Philox counter) at a time.
Tensor draw_gates(const GateKey& key) {
  const int64_t A = int64_t(key.alive.size()), batch = key.batch, units = key.units;
  const GatePlan plan = plan_gates(key);
  const int64_t sampled = static_cast<int64_t>(plan.pos.size());
  Tensor table = at::empty({batch, A}, at::TensorOptions().dtype(at::kByte));
  uint8_t* tp = table.data_ptr<uint8_t>();
  const int64_t quads = (batch + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, A));
  at::parallel_for(0, quads, grain, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> drawn(4 * sampled);
    for (int64_t q = b; q < e; ++q) {
      uint8_t* rows = tp + 4 * q * A;
      const int count = static_cast<int>(std::min<int64_t>(4, batch - 4 * q));
      const uint32_t base = philox_counter(4 * q, 0, units);  // of unit 0; unit j adds j
      if (sampled == A) {  // no fixed unit: draw straight into the rows
        philox_gates(key.seed, base, plan.unit.data(), plan.theta.data(), A, count, rows, A);
        continue;
      }
      for (int r = 0; r < count; ++r) std::copy(plan.fixed.begin(), plan.fixed.end(), rows + r * A);
      if (sampled == 0) continue;
      philox_gates(key.seed, base, plan.unit.data(), plan.theta.data(), sampled, count, drawn.data(), sampled);
      for (int r = 0; r < count; ++r) {
        for (int64_t k = 0; k < sampled; ++k) rows[r * A + plan.pos[k]] = drawn[r * sampled + k];
      }
    }
  });
  return table;
}

}  // namespace

void release_kept_gates() { kept_gates().clear(); }

Gates make_gates(const OptTensor& theta, const Tensor& alive, const Tensor& seed, int64_t batch, bool training,
                 at::ScalarType act_dtype, Pass pass) {
  if (!theta.has_value()) return {};
  const int64_t A = alive.numel();
  const auto opmath = at::toOpMathType(act_dtype);
  if (!training) {
    Tensor xi = gather_vector(*theta, alive).detach().to(act_dtype).to(opmath).reshape({1, A}).contiguous();
    return {xi, 0};
  }
  TORCH_CHECK(batch * theta->numel() <= kPhiloxMaxOffset, "cadk gates: batch ", batch, " x ", theta->numel(),
              " units exceeds the 2^31 Philox counter range; split the batch");
  GateKey key = gate_key(*theta, alive, seed, batch, opmath);
  if (pass == Pass::kBackward) {
    Tensor kept = kept_gates().take(key);
    if (kept.defined()) return {kept, A};
  }
  Tensor table = draw_gates(key);
  if (pass == Pass::kForward) kept_gates().put(std::move(key), table);
  return {table, A};
}

// ---------------------------------------------------------------------------------------------
// Epilogues: the baseline build here, the AVX-512 one in avx512.cpp.

}  // namespace cadk::cpu

#define CADK_ISA baseline
#include "epilogues.h"
#undef CADK_ISA

namespace cadk::cpu {

namespace avx512 {  // avx512.cpp
decltype(cpu::epilogue_forward) epilogue_forward;
decltype(cpu::epilogue_backward) epilogue_backward;
}  // namespace avx512

std::tuple<Tensor, Tensor> epilogue_forward(Tensor z, const OptTensor& bias, const Gates& gates, Act act) {
  return cpu_has_avx512_bw() ? avx512::epilogue_forward(std::move(z), bias, gates, act)
                             : baseline::epilogue_forward(std::move(z), bias, gates, act);
}

std::pair<Tensor, OptTensor> gemm_leaving_bias(const Tensor& x, const Tensor& wt, const OptTensor& bias) {
  const bool exact = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (bias.has_value() && !exact) return {at::addmm(*bias, x, wt), std::nullopt};
  return {at::mm(x, wt), bias};
}

EpilogueGrads epilogue_backward(const Tensor& grad_y, const Tensor& pre, const Gates& gates, Act act,
                                bool want_bias_sum, bool scratch_grad_z) {
  return cpu_has_avx512_bw() ? avx512::epilogue_backward(grad_y, pre, gates, act, want_bias_sum, scratch_grad_z)
                             : baseline::epilogue_backward(grad_y, pre, gates, act, want_bias_sum, scratch_grad_z);
}

}  // namespace cadk::cpu
