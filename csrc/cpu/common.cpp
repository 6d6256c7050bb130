#include "common.h"

#include <ATen/Dispatch.h>

#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include "../philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

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
// Results of a training forward kept for its backward

namespace {

// Tensors a forward computed, each taken by the backward whose key equals the forward's. A key
// holds everything its tensor depends on, so a hit is exact; a miss recomputes. Bounded, oldest
// dropped first, so results of forwards that get no backward cannot pile up.
template <typename Key>
class KeptForBackward {
 public:
  void put(Key key, const Tensor& value) {
    const int64_t bytes = value.nbytes();
    if (bytes > kMaxBytes) return;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {  // a repeated forward replaces
      if (it->first == key) {
        drop(it);
        break;
      }
    }
    while (!entries_.empty() && (bytes_ + bytes > kMaxBytes || int64_t(entries_.size()) >= kMaxEntries)) {
      drop(entries_.begin());
    }
    entries_.emplace_back(std::move(key), value);
    bytes_ += bytes;
  }

  Tensor take(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {  // backward runs newest-first
      if (!(it->first == key)) continue;
      Tensor value = std::move(it->second);
      drop(std::next(it).base());
      return value;
    }
    return {};
  }

 private:
  using Entries = std::deque<std::pair<Key, Tensor>>;
  static constexpr int64_t kMaxBytes = int64_t(32) << 20;
  static constexpr int64_t kMaxEntries = 256;

  void drop(typename Entries::iterator it) {
    bytes_ -= it->second.defined() ? int64_t(it->second.nbytes()) : 0;
    entries_.erase(it);
  }

  std::mutex mu_;
  Entries entries_;
  int64_t bytes_ = 0;
};

std::vector<int64_t> index_list(const Tensor& alive) {
  const Tensor a = alive.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + a.numel());
}

}  // namespace

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
  std::vector<float> fixed;     // [A]: gate of fixed units, 0 for sampled ones
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
    plan.fixed[k] = t >= 1.0f ? 1.0f : 0.0f;
  }
  return plan;
}

// The [batch, A] float table of sampled gates, four examples (one Philox counter) at a time.
Tensor draw_gates(const GateKey& key) {
  const int64_t A = int64_t(key.alive.size()), batch = key.batch, units = key.units;
  const GatePlan plan = plan_gates(key);
  const int64_t sampled = static_cast<int64_t>(plan.pos.size());
  Tensor table = at::empty({batch, A}, at::TensorOptions().dtype(at::kFloat));
  float* tp = table.data_ptr<float>();
  const int64_t quads = (batch + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, A));
  at::parallel_for(0, quads, grain, [&](int64_t b, int64_t e) {
    std::vector<float> drawn(4 * sampled);
    for (int64_t q = b; q < e; ++q) {
      float* rows = tp + 4 * q * A;
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
  if (opmath != at::kFloat) table = table.to(opmath);
  if (pass == Pass::kForward) kept_gates().put(std::move(key), table);
  return {table, A};
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

namespace {

Tensor gather_into(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out, bool scratch) {
  const WeightShape s = weight_shape(weight);
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
        if (s.in_inner || s.taps == 1) {  // [taps, C_in] rows (a linear weight's too)
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

// The weight's identity and version counter stand for its contents, as for autograd's saved
// tensors; holding the weight keeps its identity from passing to a new tensor.
struct WeightKey {
  Tensor weight;
  int64_t version = 0;
  const void* data = nullptr;
  std::vector<int64_t> alive_in, alive_out;
  bool operator==(const WeightKey& o) const {
    return weight.is_same(o.weight) && version == o.version && data == o.data && alive_in == o.alive_in &&
           alive_out == o.alive_out;
  }
};

WeightKey weight_key(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  return {weight, weight._version(), weight.data_ptr(), index_list(alive_in), index_list(alive_out)};
}

KeptForBackward<WeightKey>& kept_weights() {
  static KeptForBackward<WeightKey> kept;
  return kept;
}

bool all_alive(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  const WeightShape s = weight_shape(weight);
  return is_full(alive_in, s.in) && is_full(alive_out, s.out);
}

}  // namespace

Tensor gather_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out, Pass pass) {
  if (all_alive(weight, alive_in, alive_out)) return weight;
  if (pass == Pass::kAlone || weight.is_inference()) return gather_into(weight, alive_in, alive_out, true);
  WeightKey key = weight_key(weight, alive_in, alive_out);
  if (pass == Pass::kBackward) {
    Tensor kept = kept_weights().take(key);
    return kept.defined() ? kept : gather_into(weight, alive_in, alive_out, true);
  }
  Tensor out = gather_into(weight, alive_in, alive_out, false);
  kept_weights().put(std::move(key), out);
  return out;
}

void release_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  if (!all_alive(weight, alive_in, alive_out)) kept_weights().take(weight_key(weight, alive_in, alive_out));
}

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// out[j] = inv[j] >= 0 ? src[inv[j]] : 0 for 4-byte elements: a full-size row in one sequential
// write, cheaper than zeroing it and scattering into it when the row is not in cache.
__attribute__((target("avx512f"))) void expand_row32_avx512(const uint32_t* src, const int32_t* inv, int64_t n,
                                                           uint32_t* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i idx = _mm512_loadu_si512(inv + j);
    const __mmask16 alive = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
    _mm512_storeu_si512(out + j, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), alive, idx, src, 4));
  }
  for (; j < n; ++j) out[j] = inv[j] >= 0 ? src[inv[j]] : 0;
}

bool expand_rows_fast(const WeightShape& s, int64_t element_size) {
  return cpu_has_avx512() && element_size == 4 && (s.in_inner || s.taps == 1);
}
#else
void expand_row32_avx512(const uint32_t*, const int32_t*, int64_t, uint32_t*) {}
bool expand_rows_fast(const WeightShape&, int64_t) { return false; }
#endif

// Full-size rows o of `dp` from compact rows inv_out[o] of `sp` (zero rows where inv_out[o] < 0).
template <typename B>
void scatter_rows(const WeightShape& s, const std::vector<int64_t>& inv_out, const Tensor& alive_in,
                  const B* sp, B* dp) {
  const int64_t ai = alive_in.numel(), row = s.in * s.taps;
  const Tensor in_idx = alive_in.contiguous();
  const int64_t* ip = in_idx.data_ptr<int64_t>();
  const bool fast = expand_rows_fast(s, sizeof(B));
  std::vector<int32_t> inv_in(fast ? s.in : 0, -1);
  for (int64_t i = 0; fast && i < ai; ++i) inv_in[ip[i]] = static_cast<int32_t>(i);
  at::parallel_for(0, s.out, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row)), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      B* drow = dp + o * row;
      const B* srow = sp + std::max<int64_t>(inv_out[o], 0) * ai * s.taps;
      if (inv_out[o] >= 0 && fast) {
        for (int64_t k = 0; k < s.taps; ++k) {
          expand_row32_avx512(reinterpret_cast<const uint32_t*>(srow + k * ai), inv_in.data(), s.in,
                              reinterpret_cast<uint32_t*>(drow + k * s.in));
        }
        continue;
      }
      // Zero the row, then write its alive entries: one streaming pass plus a sparse one.
      std::memset(drow, 0, row * sizeof(B));
      if (inv_out[o] < 0) continue;
      if (s.in_inner || s.taps == 1) {
        for (int64_t k = 0; k < s.taps; ++k)
          for (int64_t i = 0; i < ai; ++i) drow[k * s.in + ip[i]] = srow[k * ai + i];
      } else {
        for (int64_t i = 0; i < ai; ++i)
          for (int64_t k = 0; k < s.taps; ++k) drow[ip[i] * s.taps + k] = srow[i * s.taps + k];
      }
    }
  });
}

}  // namespace

Tensor scatter_weight(const Tensor& compact, const Tensor& full_like, const Tensor& alive_in,
                      const Tensor& alive_out) {
  const WeightShape s = weight_shape(full_like);
  const auto fmt = format_of(full_like);
  const Tensor src = compact.to(full_like.scalar_type()).contiguous(fmt);
  if (is_full(alive_in, s.in) && is_full(alive_out, s.out)) return src;
  Tensor out = at::empty(full_like.sizes(), full_like.options().memory_format(fmt));
  const std::vector<int64_t> inv_out = inverse_index(alive_out, s.out);
  with_bits(out, [&](auto bits) {
    using B = decltype(bits);
    scatter_rows<B>(s, inv_out, alive_in, static_cast<const B*>(src.data_ptr()), static_cast<B*>(out.data_ptr()));
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
    const GateRows<acc_t> gate_rows = gates.rows<acc_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_bool(v.cl, [&](auto cl) {
      with_bool(relu, [&](auto use_relu) {
        constexpr bool kCL = decltype(cl)::value, kRelu = decltype(use_relu)::value;
        const int64_t len = v.len();
        for_rows(v, [&](int64_t r0, int64_t r1) {
          RowCursor at(v, r0);
          for (int64_t r = r0; r < r1; ++r, at.next()) {
            scalar_t* zr = zp + r * len;
            scalar_t* yr = yp + r * len;
            const acc_t* xi = gate_rows.row(at.n()) + at.c();
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
    const GateRows<acc_t> gate_rows = gates.rows<acc_t>();
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
            RowCursor at(v, r0);
            for (int64_t r = r0; r < r1; ++r, at.next()) {
              const int64_t c = at.c();
              const scalar_t* gy = gyp + r * len;
              const scalar_t* p = pp + r * len;
              scalar_t* gz = gzp + r * len;
              const acc_t* xi = kGate ? gate_rows.row(at.n()) + c : nullptr;
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
