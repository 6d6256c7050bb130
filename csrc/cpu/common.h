// Shared pieces of cadk's CPU kernels: input checks, the row view of channel-major activations,
// gate tables, weight gather/scatter and the row/reduction drivers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "../backward_expected.h"

// A pragma usable inside macro arguments (AT_DISPATCH bodies), where #pragma is not.
#define CADK_PRAGMA(x) _Pragma(#x)

namespace cadk::cpu {

using at::Tensor;

using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------
// Checks

enum class Act { kNone, kRelu };
Act parse_activation(c10::string_view activation);

// alive: 1-D int64 CPU tensor of `count` strictly increasing indices in [0, full).
void check_alive(const Tensor& alive, int64_t count, int64_t full, const char* name);
// seed: 0-dim int64 CPU tensor; returns its value as the 64-bit Philox key.
uint64_t seed_value(const Tensor& seed);
void check_float(const Tensor& t, const char* name);
// An activation the kernels compute on: float32, float64 or bfloat16.
void check_compute_dtype(const Tensor& t, const char* name);
void check_cpu(const Tensor& t, const char* name);
// t is absent or a 1-D tensor of `full` entries (bias, theta).
void check_vector(const OptTensor& t, int64_t full, const char* name);

inline bool is_full(const Tensor& alive, int64_t full) { return alive.numel() == full; }

// ---------------------------------------------------------------------------------------------
// Layout: an activation [N, C, *spatial] as contiguous rows. Channel-major storage gives rows
// (n, c) of S spatial values; channels-last storage (and S == 1) gives rows (n, s) of C channels.

// The layout a 4-D tensor's strides suggest (ATen's suggest_memory_format, as PyTorch's own ops
// decide it); this rule is mirrored by the fake kernels in cadk/kernels/cpp_backend.py.
at::MemoryFormat format_of(const Tensor& t);

struct Rows {
  int64_t N = 0, C = 0, S = 0;
  bool cl = false;
  int64_t count() const { return cl ? N * S : N * C; }
  int64_t len() const { return cl ? C : S; }
};
// Requires t to be contiguous in format_of(t) (callers pass tensors made so).
Rows rows_of(const Tensor& t);

// Walks rows r0, r0 + 1, ... keeping each row's example n and channel c without a division per row:
// channels-last rows are short, and a division each would cost as much as the row's own work.
class RowCursor {
 public:
  RowCursor(const Rows& v, int64_t r0)
      : cl_(v.cl), per_(std::max<int64_t>(1, v.cl ? v.S : v.C)), n_(r0 / per_), pos_(r0 % per_) {}
  int64_t n() const { return n_; }
  int64_t c() const { return cl_ ? 0 : pos_; }
  // Rows from this one to the last of its example (channels-last) or channel (channel-major).
  int64_t rows_left() const { return per_ - pos_; }
  void skip(int64_t rows) {  // rows <= rows_left()
    pos_ += rows;
    if (pos_ == per_) {
      pos_ = 0;
      ++n_;
    }
  }

 private:
  bool cl_;
  int64_t per_, n_, pos_;
};

// Channels-last rows hold one example's C alive channels at one position: with few channels, a loop
// per row costs more than the row's work. The passes walk runs of up to run_rows(v) consecutive rows
// of one example instead (about 64 values, at most the example's S rows), with that example's gate
// row tiled to the run's length. Runs are rounded up to whole 32-value vectors where the example has
// the rows: the vectorised loops take 16 or 32 values a step and finish each run in scalar code,
// which for bf16 costs ten times a vector step per value (C = 6: runs of 60 values spent most of
// their time in a 28-value scalar tail).
inline int64_t run_rows(const Rows& v) {
  if (!v.cl) return 1;
  const int64_t C = std::max<int64_t>(1, v.C), S = std::max<int64_t>(1, v.S);
  const int64_t rows = std::clamp<int64_t>(64 / C, 1, S);
  const int64_t step = 32 / std::gcd<int64_t>(C, 32);  // rows whose values fill whole 32-value vectors
  const int64_t whole = (rows + step - 1) / step * step;
  return whole <= S ? whole : rows;
}

// out[0..C * tiles) = v[0..C) repeated `tiles` times, for loops over runs of rows; out may be v.
template <typename T>
void tile_into(const T* v, int64_t C, int64_t tiles, T* out) {
  for (int64_t t = out == v ? 1 : 0; t < tiles; ++t) std::copy(v, v + C, out + t * C);
}

// A per-channel vector, tiled (tile_into).
template <typename T>
std::vector<T> tiled(const T* v, int64_t C, int64_t tiles) {
  std::vector<T> out(C * tiles);
  tile_into(v, C, tiles, out.data());
  return out;
}

// Walks rows [r0, r1) in runs of up to `run` rows of one example (channels-last, see run_rows) or
// single rows (channel-major): row() is the run's first row, count() its values, n() and c() those of
// its rows.
class RunCursor {
 public:
  RunCursor(const Rows& v, int64_t run, int64_t r0, int64_t r1)
      : at_(v, r0), run_(run), len_(v.len()), r_(r0), r1_(r1) {
    measure();
  }
  bool done() const { return r_ >= r1_; }
  int64_t row() const { return r_; }
  int64_t count() const { return rows_ * len_; }
  int64_t n() const { return at_.n(); }
  int64_t c() const { return at_.c(); }
  void next() {
    r_ += rows_;
    at_.skip(rows_);
    measure();
  }

 private:
  void measure() { rows_ = r_ < r1_ ? std::min({run_, r1_ - r_, at_.rows_left()}) : 0; }
  RowCursor at_;
  int64_t run_, len_, r_, r1_, rows_ = 0;
};

// Runs f(row_begin, row_end) over all rows in parallel.
template <typename F>
void for_rows(const Rows& v, const F& f) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, v.len()));
  at::parallel_for(0, v.count(), grain, f);
}

// Per-channel sums in double: f(row_begin, row_end, acc) adds its rows' contributions to
// acc[k * C + c] for k < n_acc. Chunks are fixed by the thread count, so results are deterministic
// for a given number of threads. Returns a [n_acc, C] double tensor.
template <typename F>
Tensor reduce_rows(const Rows& v, int64_t n_acc, const F& f) {
  const int64_t rows = v.count();
  const int64_t min_rows = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, v.len()));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + min_rows - 1) / min_rows));
  const int64_t width = n_acc * v.C;
  std::vector<double> acc(chunks * width, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(rows * k / chunks, rows * (k + 1) / chunks, acc.data() + k * width);
  });
  // Chunk sums added in chunk order by a plain loop: ATen's reduction would cost more than the sums.
  Tensor out = at::empty({n_acc, v.C}, at::TensorOptions().dtype(at::kDouble));
  double* op = out.data_ptr<double>();
  std::copy(acc.begin(), acc.begin() + width, op);
  for (int64_t k = 1; k < chunks; ++k) {
    for (int64_t j = 0; j < width; ++j) op[j] += acc[k * width + j];
  }
  return out;
}

// Per-channel sums of channels-last rows: inner loops add into opmath partials (vectorisable),
// flushed into the double accumulators every kFlushRows rows to bound fp32 rounding.
// With tiles > 1 each accumulator holds `tiles` copies of the C channels, for runs of rows
// (run_rows): entry j adds to channel j % C.
template <typename T>
class Partials {
 public:
  static constexpr int64_t kFlushRows = 64;
  Partials(double* acc, int64_t n_acc, int64_t C, int64_t tiles = 1)
      : acc_(acc), n_acc_(n_acc), C_(C), width_(C * tiles), buf_(n_acc * C * tiles, T(0)) {}
  Partials(const Partials&) = delete;
  Partials& operator=(const Partials&) = delete;
  ~Partials() { flush(); }
  T* operator[](int64_t k) { return buf_.data() + k * width_; }
  void next_row() {  // a row, or a run of rows
    if (++rows_ == kFlushRows) flush();
  }
  void flush() {  // tile by tile: no j % C per entry (a division each would cost more than the rows)
    for (int64_t k = 0; k < n_acc_; ++k) {
      double* acc = acc_ + k * C_;
      for (int64_t t = 0; t < width_; t += C_) {
        T* buf = buf_.data() + k * width_ + t;
        CADK_PRAGMA(omp simd)
        for (int64_t c = 0; c < C_; ++c) acc[c] += double(buf[c]);
      }
    }
    std::fill(buf_.begin(), buf_.end(), T(0));
    rows_ = 0;
  }

 private:
  double* acc_;
  int64_t n_acc_, C_, width_, rows_ = 0;
  std::vector<T> buf_;
};


// v rounded to the activation dtype T, as T(v). For bfloat16 the same round-to-nearest-even bits as
// c10::BFloat16(float), but branch-free: c10's conversion tests for NaN with a branch, which kept
// every bf16 pass scalar.
template <typename T, typename A>
inline T round_to(A v) {
  return T(v);
}
template <>
inline c10::BFloat16 round_to<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16((u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

// Calls f(std::integral_constant<bool, b>) so a runtime flag becomes a template parameter.
template <typename F>
decltype(auto) with_bool(bool b, const F& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// Which pass asks for a gate table or a gathered weight. A training forward keeps them for its
// backward, which takes them rather than computing them again; they are found by everything they
// depend on, so a backward that finds none recomputes them. kAlone: a forward without a backward.
enum class Pass { kForward, kBackward, kAlone };

// A training forward's pass: kForward (keep for the backward) unless no backward will come. Under
// torch.inference_mode the Autograd kernels that set backward_expected() do not run, and no backward can.
inline Pass forward_pass() {
  return backward_expected() && !c10::InferenceMode::is_enabled() ? Pass::kForward : Pass::kAlone;
}

// ---------------------------------------------------------------------------------------------
// Gates: xi as a table, [N, A] bytes 0 or 1 in training (Philox samples), [1, A] opmath values in
// eval (theta rounded through the activation dtype, as the reference's theta.to(pre.dtype)). Bytes
// keep the training table a quarter of the activation's size for linear layers, where it has one
// entry per output value and is kept from the forward for its backward.

// Example n's gates in a table: raw pointers, so row loops read the tensor's data_ptr once.
template <typename T>
struct GateRows {
  const T* base = nullptr;         // opmath table (eval)
  const uint8_t* bytes = nullptr;  // byte table (training)
  int64_t stride = 0;
  bool none() const { return base == nullptr && bytes == nullptr; }
  const T* row(int64_t n) const { return base + n * stride; }
};

struct Gates {
  Tensor table;  // undefined: no gate (theta absent)
  int64_t row_stride = 0;
  bool defined() const { return table.defined(); }
  template <typename T>
  GateRows<T> rows() const {
    if (!defined()) return {};
    if (table.scalar_type() == at::kByte) return {nullptr, table.data_ptr<uint8_t>(), row_stride};
    return {table.data_ptr<T>(), nullptr, row_stride};
  }
};

// The gates a run of rows (RunCursor) reads: example n's gate row tiled `tiles` times (channels-last
// runs, see run_rows), or its gate at channel c when tiles == 1; null without a gate.
template <typename T>
class TiledGateRow {
 public:
  TiledGateRow(const GateRows<T>& rows, int64_t C, int64_t tiles)
      : rows_(rows), C_(C), tiles_(tiles), buf_((tiles > 1 || rows.bytes != nullptr) && !rows.none() ? C * tiles : 0) {}
  const T* of(int64_t n, int64_t c) {
    if (rows_.none()) return nullptr;
    if (rows_.bytes != nullptr) {  // example n's bytes as T, tiled; once per example
      const uint8_t* row = rows_.bytes + n * rows_.stride;
      if (row != bytes_from_) {
        for (int64_t k = 0; k < C_; ++k) buf_[k] = T(row[k]);
        tile_into(buf_.data(), C_, tiles_, buf_.data());
        bytes_from_ = row;
      }
      return buf_.data() + (tiles_ == 1 ? c : 0);
    }
    if (tiles_ == 1) return rows_.row(n) + c;
    const T* row = rows_.row(n);
    if (row != tiled_from_) {  // eval tables repeat one row for every example: tiled once
      tile_into(row, C_, tiles_, buf_.data());
      tiled_from_ = row;
    }
    return buf_.data();
  }

 private:
  GateRows<T> rows_;
  int64_t C_, tiles_;
  const T* tiled_from_ = nullptr;
  const uint8_t* bytes_from_ = nullptr;
  std::vector<T> buf_;
};

Gates make_gates(const OptTensor& theta, const Tensor& alive, const Tensor& seed, int64_t batch,
                 bool training, at::ScalarType act_dtype, Pass pass);

// Whether this CPU runs AVX-512F code, AVX-512F/BW/VL/DQ code (the AVX-512 build of the epilogues)
// and AVX-512 VBMI2 code (16-bit compress/expand); read once, CADK_CPU_CAPABILITY caps all three.
bool cpu_has_avx512();
bool cpu_has_avx512_bw();
bool cpu_has_avx512_vbmi2();

// Gates of `rows` (1 to 4) consecutive examples 4q..4q+rows-1, whose counters share base = q * C:
// out[r * stride + k] = uniform(word r of philox4(seed, base + unit[k])) < theta[k] for k < count
// (csrc/philox.h semantics; 1 or 0), vectorised where the CPU allows.
void philox_gates(uint64_t seed, uint32_t base, const uint32_t* unit, const float* theta, int64_t count,
                  int rows, uint8_t* out, int64_t stride);

// ---------------------------------------------------------------------------------------------
// Memory

// An uninitialised tensor for use within the current op call only: its memory is reused by later
// calls on this thread once dropped. Fresh allocations of activation-sized temporaries page-fault on
// first touch every call (malloc returns large freed blocks to the system), which can cost more
// than the pass that fills them.
Tensor scratch_tensor(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt);

// Frees what the kernels keep for reuse and is not in use: the calling thread's scratch memory, the
// free full-size gradient buffers, and the gate tables and gathered weights kept for a backward (a
// backward that finds none recomputes them).
void release_cached_memory();
// The gate-table part of release_cached_memory.
void release_kept_gates();

// ---------------------------------------------------------------------------------------------
// Full-size <-> compact tensors

// weight[alive_out][:, alive_in] ([C_out, C_in, *k]), in weight's memory format; weight itself when
// both index sets are full. The caller must drop the result before the op returns: it may live in
// memory reused by the next call on this thread.
Tensor gather_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out, Pass pass);
// Drops what a training forward kept for gather_weight(kBackward), for a backward that needs no weight.
void release_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out);
// A full-size tensor shaped and formatted like `full_like`: `compact` at alive_out rows and alive_in
// columns, zero elsewhere, each element written once.
Tensor scatter_weight(const Tensor& compact, const Tensor& full_like, const Tensor& alive_in,
                      const Tensor& alive_out);
// v[alive] of a 1-D tensor (no copy when alive is full).
Tensor gather_vector(const Tensor& v, const Tensor& alive);
// Full-size zero vector of `full` entries of dtype `dtype` with `values` at alive.
Tensor scatter_vector(const Tensor& values, const Tensor& alive, int64_t full, at::ScalarType dtype);
// Empty stand-in for the gradient of an absent optional input.
Tensor no_grad_like(const Tensor& t);

// ---------------------------------------------------------------------------------------------
// Fused gate/activation epilogues shared by gate_apply, gated_linear and gated_conv2d.

// From z (modified in place into pre = act(z + bias)) returns {y, pre}: y = xi * pre. Without a gate
// y is z itself (after the bias and activation) and pre is an empty tensor: the caller uses y as pre.
// bias: absent, or one value per channel of z (the compact bias), added in opmath precision. Callers
// pass it for float32/float64, where z + bias is as exact as a GEMM's own bias (its bits may differ
// from addmm's, as between any two GEMM kernels); a bf16 z is already rounded, so bf16 keeps addmm.
std::tuple<Tensor, Tensor> epilogue_forward(Tensor z, const OptTensor& bias, const Gates& gates, Act act);

// x @ wt and the bias for epilogue_forward, by the rule above: bf16 adds `bias` in the GEMM (addmm)
// and returns none; float32/float64 return it for the epilogue's pass (addmm would first copy it into
// every row of the product).
std::pair<Tensor, OptTensor> gemm_leaving_bias(const Tensor& x, const Tensor& wt, const OptTensor& bias);

// grad_z = grad_y * xi * act'(pre) plus the per-channel sums of grad_y * pre (theta gradient,
// when gated) and of grad_z (bias gradient, when want_bias_sum). Sums are double [C] tensors, or
// undefined when not requested. grad_y must be in pre's memory format. grad_z is a scratch_tensor
// when `scratch_grad_z` (the caller drops it before returning), else a fresh tensor.
struct EpilogueGrads {
  Tensor grad_z, theta_sum, bias_sum;
};
EpilogueGrads epilogue_backward(const Tensor& grad_y, const Tensor& pre, const Gates& gates, Act act,
                                bool want_bias_sum, bool scratch_grad_z);

// t in memory format `fmt`, copying only when needed.
inline Tensor in_format(const Tensor& t, at::MemoryFormat fmt) { return t.contiguous(fmt); }

// torch's CPU convolution forward (2.13) returns wrong values when one input channel is stored with
// channels-last strides and the output is one column wide. With one channel both layouts are the
// same memory, so NCHW strides are a free view. Mirrors safe_conv_args in cadk/kernels/reference.py,
// which applies it at any width (it has no output shape at hand); here other widths keep the layout.
inline Tensor nchw_view(const Tensor& t) {
  return t.is_contiguous() ? t.as_strided(t.sizes(), c10::contiguous_strides(t.sizes())) : t.contiguous();
}
inline std::pair<Tensor, Tensor> safe_conv_args(const Tensor& x, const Tensor& weight, int64_t out_w) {
  if (x.size(1) != 1 || out_w != 1) return {x, weight};
  return {nchw_view(x), nchw_view(weight)};
}
// torch's CPU convolution forward (2.13) crashes in bfloat16 when an input one column wide, padded and
// strided across, meets a one-column kernel with a dilation > 1 across and an operand has channels-last
// strides. Dilation along a kernel dim of size 1 changes nothing, so it is passed as 1 there. Mirrors
// conv_dilation in cadk/kernels/reference.py.
inline std::vector<int64_t> conv_dilation(const Tensor& weight, at::IntArrayRef dilation) {
  return {weight.size(2) == 1 ? 1 : dilation[0], weight.size(3) == 1 ? 1 : dilation[1]};
}
// torch's CPU convolution backward (2.13) corrupts the heap when it computes the weight gradient of a
// 1x1 kernel with stride > 1 (a downsampling shortcut) and the input or the weight has channels-last
// strides (model.to(memory_format=torch.channels_last) gives a 1x1 weight those): NCHW operands avoid
// that path. A 1x1 weight is NCHW-contiguous in either layout, so its NCHW strides are a free view.
// In bfloat16 the same backward returns wrong input and weight gradients (stale memory, at times NaN)
// when the output is one column wide with a stride > 1 across and an operand has channels-last
// strides: NCHW operands again (a copy of tensors one or two columns wide).
inline std::pair<Tensor, Tensor> safe_conv_backward_args(const Tensor& x, const Tensor& weight,
                                                         at::IntArrayRef stride, int64_t out_w) {
  const bool pointwise = weight.size(2) == 1 && weight.size(3) == 1;
  const bool one_strided_column = out_w == 1 && stride[1] > 1;
  if ((!pointwise || std::max(stride[0], stride[1]) == 1) && !one_strided_column) return {x, weight};
  return {x.contiguous(), nchw_view(weight)};
}

}  // namespace cadk::cpu
