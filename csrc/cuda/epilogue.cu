// Gate tables and the channel-wise epilogue/prologue kernels of the gated ops.
#include "epilogue.cuh"

#include <ATen/ops/empty_like.h>

namespace cadk::cuda {
namespace {

// out[n, c] = training gate of example n, compact channel c.
__global__ void gate_table_kernel(GateParams g, int64_t total, float* out) {
  const uint64_t seed = load_seed(g);
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / g.A, j = unit_of(g, i % g.A);
    const float theta = g.theta[j];  // 0 and 1 need no draw: uniform < theta for none or every uniform in [0, 1)
    out[i] = theta >= 1.0f ? 1.0f : theta <= 0.0f ? 0.0f : cadk::philox_gate(seed, n, j, g.units, theta);
  }
}

// Each thread owns the V consecutive channels c .. c + V - 1 (V from channel_pack).
template <typename scalar_t, bool kRelu, int V>
__global__ void gate_forward_kernel(const scalar_t* z, const scalar_t* bias, GateParams g, Layout L, scalar_t* pre,
                                    scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = lane_index() * V;
  if (c >= L.A) return;  // no block-wide synchronisation below
  acc_t b[V];
#pragma unroll
  for (int k = 0; k < V; ++k) b[k] = bias != nullptr ? static_cast<acc_t>(bias[unit_of(g, c + k)]) : acc_t(0);
  const ChannelGates<scalar_t, V> gate(g, c);
  for_each_row_group(L, c, [&](const RowGroup& rg) {
    Pack<scalar_t, V> v[kUnroll];
    load_rows(z, rg, v);
    acc_t xi[kUnroll][V];
    gate.fill(rg, xi);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!rg.valid[u]) continue;
      Pack<scalar_t, V> p, out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        p.v[k] = activate<scalar_t, kRelu>(static_cast<acc_t>(v[u].v[k]) + b[k]);
        out.v[k] = static_cast<scalar_t>(static_cast<acc_t>(p.v[k]) * static_cast<acc_t>(xi[u][k]));
      }
      if (pre != nullptr) store_row(pre, rg.off[u], p);
      store_row(y, rg.off[u], out);
    }
  });
}

// grad_z and the per-unit sums of grad_y * pre (theta) and grad_z (bias), added once per block as row
// block blockIdx.y (add_block_sum); null sums are skipped.
template <typename scalar_t, bool kRelu, int V>
__global__ void gate_backward_kernel(const scalar_t* grad_y, const scalar_t* pre, GateParams g, Layout L,
                                     scalar_t* grad_z, at::opmath_type<scalar_t>* theta_sum,
                                     at::opmath_type<scalar_t>* bias_sum, int64_t partial_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = lane_index() * V;
  const bool active = c < L.A;
  Sums<acc_t, 2 * V> s = {};  // [k]: grad_y * pre, [V + k]: grad_z, of channel c + k
  if (active) {
    const ChannelGates<scalar_t, V> gate(g, c);
    for_each_row_group(L, c, [&](const RowGroup& rg) {
      Pack<scalar_t, V> dy[kUnroll], p[kUnroll];
      load_rows(grad_y, rg, dy);
      load_rows(pre, rg, p);
      acc_t xi[kUnroll][V];
      gate.fill(rg, xi);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!rg.valid[u]) continue;
        Pack<scalar_t, V> gz;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t d = static_cast<acc_t>(dy[u].v[k]), pk = static_cast<acc_t>(p[u].v[k]);
          const acc_t v = gated_grad<scalar_t, kRelu>(d, pk, xi[u][k]);
          gz.v[k] = static_cast<scalar_t>(v);
          s.v[k] += d * pk;
          s.v[V + k] += v;
        }
        store_row(grad_z, rg.off[u], gz);
      }
    });
  }
  s = reduce_over_rows(s, [](const Sums<acc_t, 2 * V>& a, const Sums<acc_t, 2 * V>& b) { return add_sums(a, b); });
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t j = unit_of(g, c + k);
      if (theta_sum != nullptr) add_block_sum(theta_sum, partial_stride, blockIdx.y, j, s.v[k]);
      if (bias_sum != nullptr) add_block_sum(bias_sum, partial_stride, blockIdx.y, j, s.v[V + k]);
    }
  }
}

}  // namespace

Gate make_gate(const OptTensor& theta, const Tensor& alive, const Tensor& seed, bool training, int64_t units,
               const Layout& L) {
  Gate gate;
  gate.alive = alive.contiguous();
  gate.params.alive = gate.alive.data_ptr<int64_t>();
  gate.params.A = alive.numel();
  gate.params.units = units;
  if (!theta.has_value()) return gate;
  TORCH_CHECK(theta->numel() == units, "cadk: theta has ", theta->numel(), " entries for ", units, " units");
  // Below autograd here: theta's data is read as it is, no detach needed.
  gate.theta = theta->scalar_type() == at::kFloat ? theta->contiguous() : theta->to(at::kFloat).contiguous();
  gate.params.theta = gate.theta.data_ptr<float>();
  gate.params.training = training;
  if (!training) {  // eval gates round theta from its own dtype: a float64 theta is kept as it is
    if (theta->scalar_type() == at::kDouble) {
      gate.theta64 = theta->contiguous();
      gate.params.theta64 = gate.theta64.data_ptr<double>();
    }
    return gate;
  }
  TORCH_CHECK(L.N * units <= kPhiloxMaxOffset, "cadk gates: batch ", L.N, " x ", units,
              " units exceeds the 2^31 Philox counter range; split the batch");
  if (seed.device().is_cpu()) {
    gate.params.seed = *seed.const_data_ptr<int64_t>();  // a host read, without item()'s dispatch
  } else {
    gate.params.seed_ptr = seed.data_ptr<int64_t>();
  }
  const int64_t total = L.N * L.A;
  if (L.S > 1 && total > 0) {
    gate.table = at::empty({L.N, L.A}, gate.theta.options());
    const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 4096);
    gate_table_kernel<<<blocks, kThreads, 0, current_stream()>>>(gate.params, total, gate.table.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gate.params.table = gate.table.data_ptr<float>();
  }
  return gate;
}

void gate_forward(const Tensor& z, const Tensor& bias, const Gate& gate, bool relu, const Tensor& pre,
                  const Tensor& y) {
  TORCH_INTERNAL_ASSERT(!bias.defined() || (bias.scalar_type() == z.scalar_type() && bias.is_contiguous()),
                        "cadk: the epilogue bias must be contiguous in z's dtype");
  const Layout L = layout_of(z);
  if (L.numel() == 0) return;
  CADK_DISPATCH_FLOATING(z.scalar_type(), "cadk_gate_forward", [&] {
    const int v = channel_pack<scalar_t>(L, {z.data_ptr(), pre.defined() ? pre.data_ptr() : nullptr, y.data_ptr()});
    with_bool(relu, [&](auto use_relu) {
      with_pack<scalar_t>(v, [&](auto pack) {
        const auto kernel = gate_forward_kernel<scalar_t, decltype(use_relu)::value, decltype(pack)::value>;
        const LaunchShape shape = channel_launch(L, v, reinterpret_cast<const void*>(kernel));
        kernel<<<shape.grid, shape.block, 0, current_stream()>>>(z.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias),
                                                               gate.params, L, ptr_or_null<scalar_t>(pre),
                                                               y.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

std::tuple<Tensor, Tensor> epilogue_forward(Tensor z, const Tensor& bias, const Gate& gate, bool relu) {
  if (!gate.defined()) {
    if (relu || bias.defined()) gate_forward(z, bias, gate, relu, Tensor(), z);
    return {z, at::empty({0}, z.options())};
  }
  Tensor y = at::empty_like(z, format_of(z));
  gate_forward(z, bias, gate, relu, z, y);
  return {y, z};
}

EpilogueGrads epilogue_backward(const Tensor& grad_y, const Tensor& pre, const Gate& gate, bool relu,
                                bool want_bias_sum) {
  EpilogueGrads out;
  if (gate.defined()) out.theta_sum = zero_sums(gate.params.units, pre);
  if (want_bias_sum) out.bias_sum = zero_sums(gate.params.units, pre);
  if (!gate.defined() && !relu && !want_bias_sum) {
    out.grad_z = grad_y;  // identity: nothing to compute
    return out;
  }
  TORCH_INTERNAL_ASSERT(grad_y.sizes() == pre.sizes() && grad_y.is_contiguous(format_of(pre)),
                        "cadk: grad_y and pre must share a layout");
  out.grad_z = at::empty_like(pre, format_of(pre));
  const Layout L = layout_of(pre);
  if (L.numel() == 0) return out;
  CADK_DISPATCH_FLOATING(pre.scalar_type(), "cadk_gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int v = channel_pack<scalar_t>(L, {grad_y.data_ptr(), pre.data_ptr(), out.grad_z.data_ptr()});
    with_bool(relu, [&](auto use_relu) {
      with_pack<scalar_t>(v, [&](auto pack) {
        const auto kernel = gate_backward_kernel<scalar_t, decltype(use_relu)::value, decltype(pack)::value>;
        const LaunchShape shape = channel_launch(L, v, reinterpret_cast<const void*>(kernel));
        const int64_t stride = partial_stride(gate.params.units);
        BlockSums<acc_t> theta(out.theta_sum, shape.grid.y, stride), bias(out.bias_sum, shape.grid.y, stride);
        kernel<<<shape.grid, shape.block, 0, current_stream()>>>(
                grad_y.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), gate.params, L,
                out.grad_z.data_ptr<scalar_t>(), theta.data(), bias.data(), stride);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        theta.finish();
        bias.finish();
      });
    });
  });
  return out;
}

}  // namespace cadk::cuda
