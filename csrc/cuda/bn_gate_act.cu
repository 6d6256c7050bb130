// bn_gate_act on CUDA: batch norm over the alive channels, then activation and gate.
// Forward: Welford statistics (one pass, per-block partials merged per channel), then one fused
// normalise + act + gate pass. Backward: one pass for the per-channel sums (fused with the gate,
// ReLU mask and theta gradient), one for grad_x.
#include <ATen/ops/empty_like.h>

#include "../running_stats.h"
#include "common.cuh"
#include "ops.cuh"

namespace cadk::cuda {
namespace {

template <typename T>
struct Welford {
  T count, mean, m2;  // m2: sum of squared deviations from mean
};

// Chan et al.'s combination of two partial statistics.
template <typename T>
__device__ __forceinline__ Welford<T> merge(const Welford<T>& a, const Welford<T>& b) {
  const T count = a.count + b.count;
  if (count == T(0)) return a;
  const T delta = b.mean - a.mean;
  const T wb = b.count / count;
  return {count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

template <typename T, int V>
struct WelfordPack {
  Welford<T> w[V];
};

// partial[blockIdx.y, c + k]: statistics of this block's rows of channel c + k (each thread owns the V
// consecutive channels c .. c + V - 1, V from channel_pack).
template <typename scalar_t, int V>
__global__ void bn_stats_kernel(const scalar_t* x, Layout L, Welford<at::opmath_type<scalar_t>>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = lane_index() * V;
  const bool active = c < L.A;
  WelfordPack<acc_t, V> w = {};
  if (active) {
    for_each_row_group(L, c, [&](const RowGroup& rg) {
      Pack<scalar_t, V> v[kUnroll];
      load_rows(x, rg, v);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!rg.valid[u]) continue;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          Welford<acc_t>& s = w.w[k];
          s.count += acc_t(1);
          const acc_t value = static_cast<acc_t>(v[u].v[k]);
          const acc_t delta = value - s.mean;
          s.mean += delta / s.count;
          s.m2 += delta * (value - s.mean);
        }
      }
    });
  }
  w = reduce_over_rows(w, [](const WelfordPack<acc_t, V>& a, const WelfordPack<acc_t, V>& b) {
    WelfordPack<acc_t, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.w[k] = merge(a.w[k], b.w[k]);
    return out;
  });
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) partial[blockIdx.y * L.A + c + k] = w.w[k];
  }
}

// mean[c] and biased var[c] from the `blocks` partials of each channel.
template <typename acc_t>
__global__ void bn_stats_finish_kernel(const Welford<acc_t>* partial, int64_t blocks, int64_t A, acc_t* mean,
                                       acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= A) return;
  Welford<acc_t> w = {};
  for (int64_t b = 0; b < blocks; ++b) w = merge(w, partial[b * A + c]);
  mean[c] = w.mean;
  var[c] = w.m2 / w.count;
}

// Per-channel z = x * scale + shift with scale = weight * rsqrt(var + eps), shift = bias - mean * scale.
template <typename acc_t>
struct Affine {
  acc_t scale, shift;
};

template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> bn_affine(const acc_t* weight, const acc_t* bias, const acc_t* mean,
                                                   const acc_t* var, acc_t eps, int64_t c, int64_t j) {
  const acc_t scale = weight[j] * rsqrt_acc(var[c] + eps);
  return {scale, bias[j] - mean[c] * scale};
}

template <typename scalar_t, bool kRelu, int V>
__global__ void bn_forward_kernel(const scalar_t* x, const at::opmath_type<scalar_t>* mean,
                                  const at::opmath_type<scalar_t>* var, const at::opmath_type<scalar_t>* weight,
                                  const at::opmath_type<scalar_t>* bias, at::opmath_type<scalar_t> eps,
                                  GateParams g, Layout L, scalar_t* pre, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = lane_index() * V;
  if (c >= L.A) return;  // no block-wide synchronisation below
  Affine<acc_t> f[V];
#pragma unroll
  for (int k = 0; k < V; ++k) f[k] = bn_affine(weight, bias, mean, var, eps, c + k, unit_of(g, c + k));
  const ChannelGates<scalar_t, V> gate(g, c);
  for_each_row_group(L, c, [&](const RowGroup& rg) {
    Pack<scalar_t, V> v[kUnroll];
    load_rows(x, rg, v);
    acc_t xi[kUnroll][V];
    gate.fill(rg, xi);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!rg.valid[u]) continue;
      Pack<scalar_t, V> p, out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        p.v[k] = activate<scalar_t, kRelu>(static_cast<acc_t>(v[u].v[k]) * f[k].scale + f[k].shift);
        out.v[k] = static_cast<scalar_t>(static_cast<acc_t>(p.v[k]) * static_cast<acc_t>(xi[u][k]));
      }
      if (pre != nullptr) store_row(pre, rg.off[u], p);
      store_row(y, rg.off[u], out);
    }
  });
}

// Adds, per unit j of channel c: theta_sum[j] += sum(grad_y * pre) (when non-null),
// dz_sum[j] += sum(dz), dz_xhat_sum[j] += sum(dz * xhat); dz is the gradient reaching the BN output.
// Added once per block as row block blockIdx.y (add_block_sum).
template <typename scalar_t, bool kRelu, int V>
__global__ void bn_backward_reduce_kernel(const scalar_t* grad_y, const scalar_t* pre, const scalar_t* x,
                                          const at::opmath_type<scalar_t>* mean,
                                          const at::opmath_type<scalar_t>* var, at::opmath_type<scalar_t> eps,
                                          GateParams g, Layout L, at::opmath_type<scalar_t>* theta_sum,
                                          at::opmath_type<scalar_t>* dz_sum, at::opmath_type<scalar_t>* dz_xhat_sum,
                                          int64_t partial_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = lane_index() * V;
  const bool active = c < L.A;
  Sums<acc_t, 3 * V> s = {};  // [k]: grad_y * pre, [V + k]: dz, [2V + k]: dz * (x - mean), of channel c + k
  if (active) {
    acc_t m[V];
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = mean[c + k];
    const ChannelGates<scalar_t, V> gate(g, c);
    for_each_row_group(L, c, [&](const RowGroup& rg) {
      Pack<scalar_t, V> dy[kUnroll], p[kUnroll], xv[kUnroll];
      load_rows(grad_y, rg, dy);
      load_rows(pre, rg, p);
      load_rows(x, rg, xv);
      acc_t xi[kUnroll][V];
      gate.fill(rg, xi);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!rg.valid[u]) continue;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t d = static_cast<acc_t>(dy[u].v[k]), pk = static_cast<acc_t>(p[u].v[k]);
          const acc_t dz = gated_grad<scalar_t, kRelu>(d, pk, xi[u][k]);
          s.v[k] += d * pk;
          s.v[V + k] += dz;
          s.v[2 * V + k] += dz * (static_cast<acc_t>(xv[u].v[k]) - m[k]);
        }
      }
    });
  }
  s = reduce_over_rows(s, [](const Sums<acc_t, 3 * V>& a, const Sums<acc_t, 3 * V>& b) { return add_sums(a, b); });
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t j = unit_of(g, c + k);
      if (theta_sum != nullptr) add_block_sum(theta_sum, partial_stride, blockIdx.y, j, s.v[k]);
      add_block_sum(dz_sum, partial_stride, blockIdx.y, j, s.v[V + k]);
      add_block_sum(dz_xhat_sum, partial_stride, blockIdx.y, j, s.v[2 * V + k] * rsqrt_acc(var[c + k] + eps));
    }
  }
}

// grad_x = weight * rstd * (dz - inv_m * dz_sum - xhat * inv_m * dz_xhat_sum); inv_m = 1/(N*S) in
// training, 0 in eval (the running statistics are constants).
template <typename scalar_t, bool kRelu, int V>
__global__ void bn_backward_input_kernel(const scalar_t* grad_y, const scalar_t* pre, const scalar_t* x,
                                         const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* var,
                                         at::opmath_type<scalar_t> eps, const at::opmath_type<scalar_t>* weight,
                                         const at::opmath_type<scalar_t>* dz_sum,
                                         const at::opmath_type<scalar_t>* dz_xhat_sum, at::opmath_type<scalar_t> inv_m,
                                         GateParams g, Layout L, scalar_t* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = lane_index() * V;
  if (c >= L.A) return;  // no block-wide synchronisation below
  acc_t m[V], rstd[V], scale[V], mean_dz[V], mean_dz_xhat[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t j = unit_of(g, c + k);
    m[k] = mean[c + k];
    rstd[k] = rsqrt_acc(var[c + k] + eps);
    scale[k] = weight[j] * rstd[k];
    mean_dz[k] = dz_sum[j] * inv_m;
    mean_dz_xhat[k] = dz_xhat_sum[j] * inv_m;
  }
  const ChannelGates<scalar_t, V> gate(g, c);
  for_each_row_group(L, c, [&](const RowGroup& rg) {
    Pack<scalar_t, V> dy[kUnroll], p[kUnroll], xv[kUnroll];
    load_rows(grad_y, rg, dy);
    load_rows(pre, rg, p);
    load_rows(x, rg, xv);
    acc_t xi[kUnroll][V];
    gate.fill(rg, xi);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!rg.valid[u]) continue;
      Pack<scalar_t, V> gx;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t dz =
            gated_grad<scalar_t, kRelu>(static_cast<acc_t>(dy[u].v[k]), static_cast<acc_t>(p[u].v[k]), xi[u][k]);
        const acc_t xhat = (static_cast<acc_t>(xv[u].v[k]) - m[k]) * rstd[k];
        // Eval (inv_m 0) reads no x: a NaN x times a zero coefficient would make its gradient NaN.
        const acc_t centred = inv_m == acc_t(0) ? dz : dz - mean_dz[k] - xhat * mean_dz_xhat[k];
        gx.v[k] = static_cast<scalar_t>(scale[k] * centred);
      }
      store_row(grad_x, rg.off[u], gx);
    }
  });
}

template <typename run_t, typename acc_t>
__global__ void running_stats_kernel(run_t* running_mean, int64_t mean_stride, run_t* running_var, int64_t var_stride,
                                     const int64_t* alive, const acc_t* mean, const acc_t* var, int64_t A,
                                     int64_t units, double momentum, acc_t unbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= A) return;
  const int64_t j = alive[c];
  CUDA_KERNEL_ASSERT(j >= 0 && j < units && "cadk: alive index outside the parameters' channel range");
  update_running_stats(running_mean, mean_stride, running_var, var_stride, j, mean[c], var[c], momentum, unbias);
}

void check_bn(const Tensor& x, const Tensor& alive, const OptTensor& theta,
              const Tensor& seed, std::initializer_list<std::pair<const Tensor*, const char*>> vectors) {
  TORCH_CHECK(x.is_cuda(), "cadk bn_gate_act: x must be a CUDA tensor here, got ", x.device());
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "cadk bn_gate_act: x must be [N, alive.numel(), ...], got shape ", x.sizes());
  // The first vector gives the unit count: in the forward the running statistics (buffers of the BN
  // layer), so a weight or bias of the wrong size is named as such.
  const int64_t units = vectors.begin()->first->numel();
  for (const auto& [t, name] : vectors) check_vector(*t, units, x, name);
  check_vector(theta, units, x, "theta");
  check_alive(alive, x.size(1), units, x, "alive");
  check_seed(seed, x);
}

// Full-size per-unit vector in the math dtype, contiguous (BN weight, bias).
Tensor coef(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Batch mean and biased variance of the compact channels, [A] each in the math dtype.
std::tuple<Tensor, Tensor> batch_stats(const Tensor& x, const Layout& L) {
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor mean = at::empty({L.A}, x.options().dtype(acc));
  Tensor var = at::empty({L.A}, x.options().dtype(acc));
  if (L.A == 0) return {mean, var};
  CADK_DISPATCH_FLOATING(x.scalar_type(), "cadk_bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int v = channel_pack<scalar_t>(L, {x.data_ptr()});
    Tensor partial;
    int64_t blocks = 0;
    with_pack<scalar_t>(v, [&](auto pack) {
      const auto kernel = bn_stats_kernel<scalar_t, decltype(pack)::value>;
      const LaunchShape shape = channel_launch(L, v, reinterpret_cast<const void*>(kernel));
      blocks = shape.grid.y;
      partial = at::empty({blocks, L.A, 3}, x.options().dtype(acc));
      kernel<<<shape.grid, shape.block, 0, current_stream()>>>(
          x.data_ptr<scalar_t>(), L, reinterpret_cast<Welford<acc_t>*>(partial.data_ptr<acc_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    auto* parts = reinterpret_cast<Welford<acc_t>*>(partial.data_ptr<acc_t>());
    bn_stats_finish_kernel<acc_t><<<ceil_div(L.A, kThreads), kThreads, 0, current_stream()>>>(
        parts, blocks, L.A, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_gate_act_fwd(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& theta, const Tensor& alive, const Tensor& seed, double eps,
    c10::string_view activation, bool training) {
  check_bn(x, alive, theta, seed,
           {{&running_mean, "running_mean"}, {&running_var, "running_var"}, {&weight, "weight"}, {&bias, "bias"}});
  const bool relu = parse_relu(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  const Tensor xc = x.contiguous(fmt);
  const Layout L = layout_of(xc);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor mean, var;
  if (training) {
    // A ValueError, as nn.BatchNorm2d's and the Triton backend's.
    TORCH_CHECK_VALUE(L.rows() > 1, "cadk bn_gate_act: training needs more than one value per channel, ",
                      "got input shape ", x.sizes(), "; use a larger batch or eval mode");
    std::tie(mean, var) = batch_stats(xc, L);
  } else {  // index_select copies even for a full alive set: outputs must not alias inputs
    mean = running_mean.index_select(0, alive).to(acc);
    var = running_var.index_select(0, alive).to(acc);
  }
  const Gate gate = make_gate(theta, alive, seed, training, weight.numel(), L);
  const Tensor w = coef(weight, acc), b = coef(bias, acc);
  Tensor y = at::empty_like(xc, fmt);
  Tensor pre = gate.defined() ? at::empty_like(xc, fmt) : at::empty({0}, x.options());
  if (L.numel() == 0) return {y, pre, mean, var};
  CADK_DISPATCH_FLOATING(x.scalar_type(), "cadk_bn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* pre_ptr = gate.defined() ? pre.data_ptr<scalar_t>() : nullptr;
    const int v = channel_pack<scalar_t>(L, {xc.data_ptr(), pre_ptr, y.data_ptr()});
    with_bool(relu, [&](auto use_relu) {
      with_pack<scalar_t>(v, [&](auto pack) {
        const auto kernel = bn_forward_kernel<scalar_t, decltype(use_relu)::value, decltype(pack)::value>;
        const LaunchShape shape = channel_launch(L, v, reinterpret_cast<const void*>(kernel));
        kernel<<<shape.grid, shape.block, 0, current_stream()>>>(
                xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), w.data_ptr<acc_t>(),
                b.data_ptr<acc_t>(), static_cast<acc_t>(eps), gate.params, L, pre_ptr, y.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  check_cuda(grad_y, x, "grad_y");
  check_cuda(pre, x, "pre");
  check_cuda(mean, x, "mean");
  check_cuda(var, x, "var");
  const bool relu = parse_relu(activation);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && pre.sizes() == x.sizes(), "cadk bn_gate_act: grad_y ",
              grad_y.sizes(), " and pre ", pre.sizes(), " must both match x ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && pre.scalar_type() == x.scalar_type(),
              "cadk bn_gate_act: grad_y and pre must have x's dtype ", x.scalar_type());
  const int64_t A = alive.numel();
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == A && var.dim() == 1 && var.size(0) == A,
              "cadk bn_gate_act: mean and var must be the [", A, "] statistics returned by bn_gate_act_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(x);
  const Tensor xc = x.contiguous(fmt), gy = grad_y.contiguous(fmt), pc = pre.contiguous(fmt);
  const Layout L = layout_of(xc);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor mu = coef(mean, acc), vr = coef(var, acc), w = coef(weight, acc);
  const Gate gate = make_gate(theta, alive, seed, training, weight.numel(), L);
  const Tensor theta_sum = gate.defined() ? zero_sums(weight.numel(), x) : Tensor();
  const Tensor dz_sum = zero_sums(weight.numel(), x), dz_xhat_sum = zero_sums(weight.numel(), x);
  Tensor grad_x = at::empty_like(xc, fmt);
  if (L.numel() > 0) {
    const double inv_m = training ? 1.0 / static_cast<double>(L.rows()) : 0.0;
    CADK_DISPATCH_FLOATING(x.scalar_type(), "cadk_bn_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int v = channel_pack<scalar_t>(L, {gy.data_ptr(), pc.data_ptr(), xc.data_ptr(), grad_x.data_ptr()});
      with_bool(relu, [&](auto use_relu) {
        with_pack<scalar_t>(v, [&](auto pack) {
          constexpr bool kRelu = decltype(use_relu)::value;
          constexpr int kPack = decltype(pack)::value;
          const cudaStream_t stream = current_stream();
          const auto reduce = bn_backward_reduce_kernel<scalar_t, kRelu, kPack>;
          const auto input = bn_backward_input_kernel<scalar_t, kRelu, kPack>;
          const LaunchShape shape = channel_launch(L, v, reinterpret_cast<const void*>(reduce));
          const int64_t stride = partial_stride(weight.numel());
          BlockSums<acc_t> theta_part(theta_sum, shape.grid.y, stride), dz_part(dz_sum, shape.grid.y, stride),
              dz_xhat_part(dz_xhat_sum, shape.grid.y, stride);
          reduce<<<shape.grid, shape.block, 0, stream>>>(
              gy.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mu.data_ptr<acc_t>(),
              vr.data_ptr<acc_t>(), static_cast<acc_t>(eps), gate.params, L, theta_part.data(), dz_part.data(),
              dz_xhat_part.data(), stride);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          theta_part.finish();
          dz_part.finish();
          dz_xhat_part.finish();
          const LaunchShape input_shape = channel_launch(L, v, reinterpret_cast<const void*>(input));
          input<<<input_shape.grid, input_shape.block, 0, stream>>>(
              gy.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mu.data_ptr<acc_t>(),
              vr.data_ptr<acc_t>(), static_cast<acc_t>(eps), w.data_ptr<acc_t>(), dz_sum.data_ptr<acc_t>(),
              dz_xhat_sum.data_ptr<acc_t>(), static_cast<acc_t>(inv_m), gate.params, L,
              grad_x.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  const auto wtype = weight.scalar_type();
  return {grad_x, dz_xhat_sum.to(wtype), dz_sum.to(wtype),
          gate.defined() ? theta_sum.to(theta->scalar_type()) : no_grad_like(x)};
}

void bn_running_stats_(const Tensor& running_mean, const Tensor& running_var, const Tensor& alive,
                       const Tensor& mean, const Tensor& var, double momentum, int64_t count) {
  TORCH_CHECK(mean.is_cuda(), "cadk bn_running_stats_: mean must be a CUDA tensor here, got ", mean.device());
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, {&running_var, "running_var"},
                                {&var, "var"}}) {
    check_cuda(*t, mean, name);
  }
  check_running_stats(running_mean, running_var, mean, var, count);
  check_alive(alive, mean.numel(), running_mean.numel(), mean, "alive");
  const int64_t A = alive.numel();
  if (A == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  const Tensor a = alive.contiguous(), m = mean.contiguous(), v = var.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "cadk_bn_running_stats",
                                  [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cadk_bn_running_stats", [&] {
      const auto unbias = static_cast<scalar_t>(static_cast<double>(count) / static_cast<double>(count - 1));
      running_stats_kernel<run_t, scalar_t><<<ceil_div(A, kThreads), kThreads, 0, current_stream()>>>(
          running_mean.data_ptr<run_t>(), running_mean.stride(0), running_var.data_ptr<run_t>(),
          running_var.stride(0), a.data_ptr<int64_t>(), m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), A,
          running_mean.numel(), momentum, unbias);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cadk::cuda
