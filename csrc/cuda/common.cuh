// Shared pieces of cadk's CUDA kernels: input checks, the gate xi[n, c] of a compact channel, and
// a per-channel traversal of compact activations that serves elementwise and reduction kernels.
//
// Kernel shape: a thread owns a pack of V consecutive compact channels c .. c + V - 1 (lane
// threadIdx.x + blockIdx.x * blockDim.x, c = lane * V; V = 1 in planar layouts, see channel_pack) and
// strides over their N*S rows (threadIdx.y + blockIdx.y * blockDim.y, step blockDim.y * gridDim.y), one
// access of V values per row. Per-channel values (bias, BN coefficients, theta) then live in registers,
// per-channel sums reduce over threadIdx.y in shared memory and end in one atomicAdd per block and channel
// (or, under torch.use_deterministic_algorithms, one store per block and channel: see BlockSums).
//
// Only c10/cuda headers are used for streams and guards: ATen/cuda/CUDAContext.h pulls in cuBLAS
// and cuSPARSE headers that a bare CUDA toolkit may lack (c10::cuda::getCurrentCUDAStream is the
// function at::cuda::getCurrentCUDAStream forwards to).
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <utility>
#include <cstdint>
#include <cstdlib>
#include <optional>

#include "../philox.h"

namespace cadk::cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define CADK_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Calls f(std::integral_constant<bool, b>) so a runtime flag becomes a template parameter.
template <typename F>
decltype(auto) with_bool(bool b, const F& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// ---------------------------------------------------------------------------------------------
// Checks (the same contract and messages as csrc/cpu). Values of alive are not read on the host
// (that would synchronise): kernels assert the range, index_select checks its indices itself.

inline bool parse_relu(c10::string_view activation) {
  if (activation == "relu") return true;
  TORCH_CHECK(activation == "none", "cadk: activation must be \"relu\" or \"none\", got \"",
              std::string(activation), "\"");
  return false;
}

inline void check_cuda(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "cadk: ", name, " is on ", t.device(), " but the op runs on ",
              ref.device(), "; move all inputs of the op to one device");
}

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "cadk: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

inline void check_alive(const Tensor& alive, int64_t count, int64_t full, const Tensor& ref, const char* name) {
  TORCH_CHECK(alive.scalar_type() == at::kLong, "cadk: ", name, " must be an int64 index tensor, got ",
              alive.scalar_type(), "; build it with dtype=torch.int64");
  TORCH_CHECK(alive.dim() == 1, "cadk: ", name, " must be 1-D, got shape ", alive.sizes());
  check_cuda(alive, ref, name);
  TORCH_CHECK(alive.numel() == count, "cadk: ", name, " lists ", alive.numel(),
              " channels but the activation has ", count,
              " (dim 1); the activation must hold exactly the alive channels");
  TORCH_CHECK(count <= full, "cadk: ", name, " lists ", count, " channels but the parameters have only ", full);
}

// seed: 0-dim int64, on the CPU (read once on the host) or on the op's device (read by the kernels).
inline void check_seed(const Tensor& seed, const Tensor& ref) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "cadk: seed must be a 0-dim int64 tensor, got shape ", seed.sizes(), " and dtype ",
              seed.scalar_type());
  TORCH_CHECK(seed.device().is_cpu() || seed.device() == ref.device(), "cadk: seed is on ", seed.device(),
              " but the op runs on ", ref.device(), "; keep it on the CPU or on the op's device");
}

// t is absent or a 1-D floating tensor of `full` entries (bias, theta, BN vectors) on ref's device.
inline void check_vector(const OptTensor& t, int64_t full, const Tensor& ref, const char* name) {
  if (!t.has_value()) return;
  check_cuda(*t, ref, name);
  check_float(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == full, "cadk: ", name, " must have shape [", full,
              "] (one entry per full-range channel), got ", t->sizes());
}

// ---------------------------------------------------------------------------------------------
// Layout

// The layout a 4-D tensor's strides suggest, as PyTorch's own ops decide it (the rule of csrc/cpu and
// of the fake kernels). Other layouts are made contiguous by the callers.
inline at::MemoryFormat format_of(const Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

// An activation [N, A, *spatial] (S = prod(spatial)) as N*S rows r = n*S + s per channel c.
// planar: channel-major storage, channel c of example n is a run of S values; otherwise the
// channel is the fastest dimension (2-D tensors, channels-last, S == 1).
struct Layout {
  int64_t N = 0, A = 0, S = 1;
  bool planar = false;

  __host__ __device__ int64_t rows() const { return N * S; }
  __host__ __device__ int64_t numel() const { return N * A * S; }
  __device__ int64_t offset(int64_t n, int64_t s, int64_t c) const {
    return planar ? (n * A + c) * S + s : (n * S + s) * A + c;
  }
};

// t must be contiguous in format_of(t).
inline Layout layout_of(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() >= 2 && t.is_contiguous(format_of(t)), "cadk: activation layout not prepared");
  Layout L;
  L.N = t.size(0);
  L.A = t.size(1);
  for (int64_t d = 2; d < t.dim(); ++d) L.S *= t.size(d);
  // One channel stored channels-last is the same memory as NCHW: planar either way.
  L.planar = L.S > 1 && (format_of(t) == at::MemoryFormat::Contiguous || L.A == 1);
  return L;
}

// ---------------------------------------------------------------------------------------------
// Row traversal

constexpr int kThreads = 256;  // threads per block of every channel-wise kernel
constexpr int kUnroll = 4;     // rows per thread whose loads are issued together

// Up to kUnroll rows of one thread's channel: example index and element offset of each.
// aligned: the rows are examples n[0] .. n[0] + 3 with n[0] a multiple of 4, whose gates one Philox
// evaluation gives (philox.h).
struct RowGroup {
  int64_t n[kUnroll];
  int64_t off[kUnroll];
  bool valid[kUnroll];
  bool aligned;
};
static_assert(kUnroll == 4, "aligned row groups take the four words of one Philox evaluation");

// This thread's lane: the pack of channels it owns (see the kernel shape above).
__device__ __forceinline__ int64_t lane_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Calls body(group) over this thread's rows of channel c, kUnroll rows at a time. When rows are
// examples (S == 1) a thread takes aligned groups of kUnroll consecutive rows; else rows a grid
// stride apart, with (n, s) advancing incrementally so the loop has no integer division. Either
// way the threads along x (consecutive channels) of one load read the same row.
template <typename F>
__device__ __forceinline__ void for_each_row_group(const Layout& L, int64_t c, const F& body) {
  const int64_t rows = L.rows();
  const int64_t step = static_cast<int64_t>(blockDim.y) * gridDim.y;
  int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (L.S == 1) {
    for (r *= kUnroll; r < rows; r += step * kUnroll) {
      RowGroup g;
      g.aligned = true;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        g.n[u] = r + u;
        g.valid[u] = r + u < rows;
        g.off[u] = L.offset(r + u, 0, c);
      }
      body(g);
    }
    return;
  }
  if (r >= rows) return;
  int64_t n = r / L.S, s = r % L.S;
  const int64_t dn = step / L.S, ds = step % L.S;
  while (r < rows) {
    RowGroup g;
    g.aligned = false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      g.valid[u] = r < rows;
      g.n[u] = n;
      g.off[u] = L.offset(n, s, c);
      r += step;
      n += dn;
      s += ds;
      if (s >= L.S) {
        s -= L.S;
        ++n;
      }
    }
    body(g);
  }
}

// V consecutive values moved as one access of V * sizeof(T) bytes (at most 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// out[u] = the V values at p + g.off[u] (zeros for rows past the end): all loads before any use. They
// stay in the activation dtype until used, which keeps 16-bit packs at half the registers.
template <typename scalar_t, int V>
__device__ __forceinline__ void load_rows(const scalar_t* p, const RowGroup& g, Pack<scalar_t, V> (&out)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (g.valid[u]) {
      out[u] = *reinterpret_cast<const Pack<scalar_t, V>*>(p + g.off[u]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) out[u].v[k] = scalar_t(0);
    }
  }
}

template <typename scalar_t, int V>
__device__ __forceinline__ void store_row(scalar_t* p, int64_t off, const Pack<scalar_t, V>& v) {
  *reinterpret_cast<Pack<scalar_t, V>*>(p + off) = v;
}

// Reduces v over threadIdx.y (the rows of one channel) with merge; the result is valid in every
// thread. Every thread of the block must call it, at most once per kernel. T is a plain aggregate.
template <typename T, typename Merge>
__device__ T reduce_over_rows(T v, const Merge& merge) {
  __shared__ T shared[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  shared[tid] = v;
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.y) < half) shared[tid] = merge(shared[tid], shared[tid + half * blockDim.x]);
    __syncthreads();
  }
  return shared[threadIdx.x];
}

template <typename T, int K>
struct Sums {
  T v[K];
};

template <typename T, int K>
__device__ __forceinline__ Sums<T, K> add_sums(const Sums<T, K>& a, const Sums<T, K>& b) {
  Sums<T, K> out;
#pragma unroll
  for (int k = 0; k < K; ++k) out.v[k] = a.v[k] + b.v[k];
  return out;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device, queried once per device.
inline int multiprocessor_count() {
  static std::atomic<int> cached[64];  // zero-initialised: static storage
  const int device = c10::cuda::current_device();
  const int known = device < 64 ? cached[device].load(std::memory_order_relaxed) : 0;
  if (known > 0) return known;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device].store(sms, std::memory_order_relaxed);
  return sms;
}

struct LaunchShape {
  dim3 grid, block;
};

// Blocks of kThreads threads of `kernel` that one SM of the current device holds at once (its registers
// and shared memory decide), queried once per kernel and device.
inline int resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find({kernel, device});
  if (it != cache.end()) return it->second;
  int blocks = 0;  // cached only once the query has succeeded (C10_CUDA_CHECK throws otherwise)
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  return cache.emplace(std::make_pair(kernel, device), std::max(blocks, 1)).first->second;
}

// Planar: one channel per block, its 256 threads on consecutive rows (coalesced along S).
// Otherwise up to 32 consecutive lanes of `pack` channels each per block (coalesced along C) times
// 256/32 rows. As many row blocks as `kernel` keeps resident on the GPU at once (a thread then loops
// over its rows, its per-channel set-up paid once), no more than there are row groups.
inline LaunchShape channel_launch(const Layout& L, int pack, const void* kernel) {
  const int64_t lanes = L.A / pack;
  int64_t tc = 1;
  if (!L.planar) {
    while (tc < lanes && tc < 32) tc *= 2;
  }
  const int64_t tr = kThreads / tc;
  const int64_t gx = ceil_div(lanes, tc);
  const int sms = multiprocessor_count();
  const int64_t blocks_per_sm = resident_blocks(kernel);
  const int64_t row_blocks = std::min<int64_t>(ceil_div(L.rows(), tr * kUnroll), 65535);
  const int64_t gy = std::clamp<int64_t>(ceil_div(sms * blocks_per_sm, gx), 1, std::max<int64_t>(row_blocks, 1));
  TORCH_CHECK(gx <= INT32_MAX, "cadk: too many channels (", L.A, ") for one launch");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(tc), static_cast<unsigned>(tr))};
}

// Channels per thread (a pack) of a channel-wise kernel over activations of layout L: in channel-fastest
// layouts, the largest power of two V <= 16 / sizeof(scalar_t) that divides the channel count and
// whose V * sizeof(scalar_t) bytes align every pointer, so each row of a thread's channels is one
// access; 1 in planar layouts (there a thread's rows are consecutive already).
// CADK_CUDA_PACK_BYTES (1, 2, 4, 8 or 16; default 16) caps the access width, for measuring.
inline int max_pack_bytes() {
  static const int bytes = [] {
    const char* env = std::getenv("CADK_CUDA_PACK_BYTES");
    const int b = env != nullptr ? std::atoi(env) : 16;
    TORCH_CHECK(b == 1 || b == 2 || b == 4 || b == 8 || b == 16, "cadk: CADK_CUDA_PACK_BYTES must be 1, 2, 4, 8 ",
                "or 16, got \"", env, "\"");
    return b;
  }();
  return bytes;
}

template <typename scalar_t>
int channel_pack(const Layout& L, std::initializer_list<const void*> pointers) {
  if (L.planar) return 1;
  int v = std::max(max_pack_bytes() / static_cast<int>(sizeof(scalar_t)), 1);
  auto fits = [&](int w) {
    if (L.A % w != 0) return false;
    for (const void* p : pointers) {
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (w * sizeof(scalar_t)) != 0) return false;
    }
    return true;
  };
  while (v > 1 && !fits(v)) v /= 2;
  return v;
}

// Calls f(std::integral_constant<int, v>) for a pack width v (a power of two up to 16 bytes).
template <typename scalar_t, int V = 16 / sizeof(scalar_t), typename F>
void with_pack(int v, const F& f) {
  if constexpr (V == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (v == V) {
    f(std::integral_constant<int, V>{});
  } else {
    with_pack<scalar_t, V / 2>(v, f);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---------------------------------------------------------------------------------------------
// Gates

// What a kernel needs to produce xi[n, c]; points into tensors owned by a host-side Gate.
struct GateParams {
  const int64_t* alive = nullptr;     // [A]: full-range unit of each compact channel
  int64_t A = 0;
  int64_t units = 0;                  // full channel count C: the range of alive
  const float* theta = nullptr;       // [C] keep probabilities as fp32; nullptr: no gate (xi = 1)
  const double* theta64 = nullptr;    // [C] theta itself when it is float64 (eval gates), else nullptr
  bool training = false;              // sampled 0/1 gates; else xi = theta (eval)
  const float* table = nullptr;       // [N, A] training gates precomputed once per (n, c), or nullptr
  const int64_t* seed_ptr = nullptr;  // the seed when it lives on the device ...
  int64_t seed = 0;                   // ... else its value
};

// Full-range unit of compact channel c.
__device__ __forceinline__ int64_t unit_of(const GateParams& g, int64_t c) {
  const int64_t j = g.alive[c];
  CUDA_KERNEL_ASSERT(j >= 0 && j < g.units && "cadk: alive index outside the parameters' channel range");
  return j;
}

__device__ __forceinline__ uint64_t load_seed(const GateParams& g) {
  return static_cast<uint64_t>(g.seed_ptr != nullptr ? *g.seed_ptr : g.seed);
}

// xi[n, c + k] for the V fixed channels c .. c + V - 1 of a thread, in the math dtype. Eval gates are
// theta rounded from its own dtype to the activation dtype, as the reference's theta.to(pre.dtype)
// (a float64 theta is not rounded through fp32 first). Training gates come from the
// table when there is one; else theta 0 and 1 need no draw (uniform < theta for none or every uniform
// in [0, 1)) and the others one Philox evaluation per example, or per aligned group of four.
template <typename scalar_t, int V = 1>
class ChannelGates {
  using acc_t = at::opmath_type<scalar_t>;

 public:
  __device__ ChannelGates(const GateParams& g, int64_t c) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      value_[k] = acc_t(1);
      draw_[k] = false;
      unit_[k] = 0;
      theta_[k] = 0.0f;
    }
    if (g.theta == nullptr) return;
    if (g.training && g.table != nullptr) {
      table_ = g.table + c;
      stride_ = g.A;
      return;
    }
    bool any_draw = false;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      unit_[k] = unit_of(g, c + k);
      theta_[k] = g.theta[unit_[k]];
      if (!g.training) {
        value_[k] = g.theta64 != nullptr ? static_cast<acc_t>(static_cast<scalar_t>(g.theta64[unit_[k]]))
                                         : static_cast<acc_t>(static_cast<scalar_t>(theta_[k]));
      } else {
        value_[k] = theta_[k] >= 1.0f ? acc_t(1) : acc_t(0);
        draw_[k] = theta_[k] > 0.0f && theta_[k] < 1.0f;
        any_draw = any_draw || draw_[k];
      }
    }
    if (any_draw) {
      seed_ = load_seed(g);
      units_ = g.units;
    }
  }

  // Gate of example n, channel c + k (k a compile-time index: the arrays stay in registers).
  __device__ __forceinline__ acc_t operator()(int64_t n, int k = 0) const {
    if (table_ != nullptr) return static_cast<acc_t>(table_[n * stride_ + k]);
    if (draw_[k]) return static_cast<acc_t>(cadk::philox_gate(seed_, n, unit_[k], units_, theta_[k]));
    return value_[k];
  }

  // The gates of a row group's examples (rows past the end get any value).
  __device__ __forceinline__ void fill(const RowGroup& g, acc_t (&xi)[kUnroll][V]) const {
    if (table_ != nullptr) {  // V floats of one table row: aligned, as the channel count is a multiple of V
      constexpr int W = V < 4 ? V : 4;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float* row = table_ + (g.valid[u] ? g.n[u] : 0) * stride_;
#pragma unroll
        for (int q = 0; q < V; q += W) {
          const Pack<float, W> w = *reinterpret_cast<const Pack<float, W>*>(row + q);
#pragma unroll
          for (int k = 0; k < W; ++k) xi[u][q + k] = w.v[k];
        }
      }
      return;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (draw_[k] && g.aligned) {
        const PhiloxWords w = cadk::philox4(seed_, cadk::philox_counter(g.n[0], unit_[k], units_));
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) xi[u][k] = cadk::philox_uniform(w.w[u]) < theta_[k] ? acc_t(1) : acc_t(0);
      } else {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) xi[u][k] = draw_[k] && g.valid[u] ? (*this)(g.n[u], k) : value_[k];
      }
    }
  }

 private:
  acc_t value_[V];
  float theta_[V];
  int64_t unit_[V];
  bool draw_[V];
  const float* table_ = nullptr;
  int64_t stride_ = 0;
  uint64_t seed_ = 0;
  int64_t units_ = 0;
};

// Host side of a gate: owns what GateParams points into.
struct Gate {
  GateParams params;
  Tensor alive, theta, theta64, table;
  bool defined() const { return params.theta != nullptr; }
};

// Builds the gate of `units` full-range channels for an activation of layout L (theta absent: no
// gate). Training gates of planar activations (S > 1) are drawn once per (n, c) into a table
// instead of once per element.
Gate make_gate(const OptTensor& theta, const Tensor& alive, const Tensor& seed, bool training, int64_t units,
               const Layout& L);

// ---------------------------------------------------------------------------------------------
// Elementwise helpers

// act(v) rounded to the activation dtype (rounding first, as ATen: relu commutes with it; NaN stays).
template <typename scalar_t, bool kRelu, typename acc_t>
__device__ __forceinline__ scalar_t activate(acc_t v) {
  const scalar_t p = static_cast<scalar_t>(v);
  return kRelu && static_cast<acc_t>(p) < acc_t(0) ? scalar_t(0) : p;
}

// Gradient reaching the activation's input: grad_y * xi rounded to the activation dtype (as the
// reference's dy * xi), zeroed where pre <= 0 under ReLU (as torch.relu's backward: a NaN pre passes).
template <typename scalar_t, bool kRelu, typename acc_t>
__device__ __forceinline__ acc_t gated_grad(acc_t dy, acc_t pre, acc_t xi) {
  const acc_t g = static_cast<acc_t>(static_cast<scalar_t>(dy * xi));
  return kRelu && pre <= acc_t(0) ? acc_t(0) : g;
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return ::rsqrt(v); }

// A new tensor of zeros on the current device: one cudaMemsetAsync, where at::zeros costs a fill
// kernel and its dispatch (host time that small layers wait for).
inline Tensor zeros_fast(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (t.nbytes() > 0) C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), current_stream()));
  return t;
}

// Full-size zero accumulator of `units` entries in the math dtype of `like`.
inline Tensor zero_sums(int64_t units, const Tensor& like) {
  return zeros_fast({units}, like.options().dtype(at::toOpMathType(like.scalar_type())));
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Per-unit sums over the blocks of a launch
//
// Float atomicAdd adds the blocks' partial sums in the order the blocks happen to finish, so the
// last bits of a sum vary from run to run. Under torch.use_deterministic_algorithms each block
// instead stores its partial sums into its own row of a zeroed [blocks, units] buffer (one thread
// per block and unit, so plain stores), and the rows are added in a fixed order afterwards (at::sum
// is deterministic). Without the flag nothing is allocated or launched besides the atomics.

// The partial_stride argument of kernels with per-unit sums over `units` units: 0 (atomics), or the
// buffer's row length under torch.use_deterministic_algorithms.
inline int64_t partial_stride(int64_t units) {
  return at::globalContext().deterministicAlgorithms() ? units : 0;
}

// Adds the partial sum v of unit j from block `block`: atomically into sum[j], or with
// partial_stride > 0 by a store to the block's row of a BlockSums buffer.
template <typename T>
__device__ __forceinline__ void add_block_sum(T* sum, int64_t partial_stride, int64_t block, int64_t j, T v) {
  if (partial_stride > 0) {
    sum[block * partial_stride + j] = v;
  } else {
    atomicAdd(sum + j, v);
  }
}

// Where a kernel adds the per-unit sums `sums` (the zeroed [units] result; undefined: not wanted):
// into sums itself, or with partial_stride > 0 into a zeroed [blocks, units] buffer that finish()
// reduces into sums. blocks: the range of add_block_sum's block argument in the launch.
template <typename T>
class BlockSums {
 public:
  BlockSums(const Tensor& sums, int64_t blocks, int64_t partial_stride) : sums_(sums) {
    if (!sums.defined() || partial_stride == 0) return;
    TORCH_INTERNAL_ASSERT(partial_stride == sums.numel(), "cadk: partial sums of the wrong width");
    partials_ = zeros_fast({blocks, partial_stride}, sums.options());
  }
  T* data() const { return partials_.defined() ? partials_.data_ptr<T>() : ptr_or_null<T>(sums_); }
  void finish() {
    if (partials_.defined()) at::sum_out(sums_, partials_, at::IntArrayRef{0});
  }

 private:
  Tensor sums_, partials_;
};

// Empty stand-in for the gradient of an absent optional input.
inline Tensor no_grad_like(const Tensor& t) { return at::empty({0}, t.options()); }

}  // namespace cadk::cuda
