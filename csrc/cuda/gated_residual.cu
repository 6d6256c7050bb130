// gated_residual on CUDA: y = relu(shortcut + xi[n] * branch) in one pass forward and one backward
// (composed of the gate kernel, add and ReLU it was three passes forward and two backward).
//
// Both operands are made contiguous in the branch's memory format, so example n is one dense run of
// M values in either format and the block gate xi[n] is the same over it: a block walks part of one
// example's run, 16 bytes per load where the run allows.
#include <ATen/ops/empty_like.h>

#include "ops.cuh"

namespace cadk::cuda {
namespace {

at::MemoryFormat check_residual(const Tensor& shortcut, const Tensor& branch, const Tensor& theta,
                                const Tensor& alive, const Tensor& seed) {
  TORCH_CHECK(branch.is_cuda(), "cadk gated_residual: branch must be a CUDA tensor here, got ", branch.device());
  check_cuda(shortcut, branch, "shortcut");
  check_float(branch, "branch");
  TORCH_CHECK(shortcut.sizes() == branch.sizes() && shortcut.scalar_type() == branch.scalar_type(),
              "cadk gated_residual: shortcut ", shortcut.sizes(), " ", shortcut.scalar_type(), " and branch ",
              branch.sizes(), " ", branch.scalar_type(), " must match in shape and dtype");
  TORCH_CHECK(branch.dim() >= 1, "cadk gated_residual: branch must be [N, ...], got a 0-dim tensor");
  check_vector(theta, theta.numel(), branch, "theta");
  TORCH_CHECK(alive.dim() == 1 && alive.numel() == 1, "cadk gated_residual: alive must list the one unit of the ",
              "block gate, got shape ", alive.sizes(), "; a pruned block skips its branch (relu(shortcut))");
  check_alive(alive, 1, theta.numel(), branch, "alive");
  check_seed(seed, branch);
  return format_of(branch);
}

// Examples are [N, M]: one run of M values each (M % V == 0, pointers aligned to a Pack).
struct Runs {
  int64_t N, M;
};

// The gate of the one unit as ChannelGates sees it: one compact channel, rows are examples.
Gate block_gate(const Tensor& theta, const Tensor& alive, const Tensor& seed, bool training, int64_t n) {
  Layout L;
  L.N = n;
  L.A = 1;
  return make_gate(theta, alive, seed, training, theta.numel(), L);
}

template <typename scalar_t, int V>
__global__ void residual_forward_kernel(const scalar_t* shortcut, const scalar_t* branch, GateParams g, Runs r,
                                        scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  const ChannelGates<scalar_t> gate(g, 0);
  const int64_t packs = r.M / V, step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t n = blockIdx.y; n < r.N; n += gridDim.y) {
    const acc_t xi = static_cast<acc_t>(gate(n));
    const P* s = reinterpret_cast<const P*>(shortcut + n * r.M);
    const P* b = reinterpret_cast<const P*>(branch + n * r.M);
    P* out = reinterpret_cast<P*>(y + n * r.M);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += step) {
      const P sv = s[i], bv = b[i];
      P o;
#pragma unroll
      for (int k = 0; k < V; ++k) {  // rounded as the reference: xi * branch, then the sum, then relu
        const scalar_t gated = static_cast<scalar_t>(static_cast<acc_t>(bv.v[k]) * xi);
        o.v[k] = activate<scalar_t, true>(static_cast<acc_t>(sv.v[k]) + static_cast<acc_t>(gated));
      }
      out[i] = o;
    }
  }
}

// grad_shortcut = grad_y where y > 0 (relu's backward: NaN passes, as threshold_backward),
// grad_branch = grad_shortcut * xi[n], theta_sum[unit] += sum(grad_shortcut * branch), added once per
// block as block blockIdx.y * gridDim.x + blockIdx.x (add_block_sum).
template <typename scalar_t, int V>
__global__ void residual_backward_kernel(const scalar_t* grad_y, const scalar_t* y, const scalar_t* branch,
                                         GateParams g, Runs r, scalar_t* grad_shortcut, scalar_t* grad_branch,
                                         at::opmath_type<scalar_t>* theta_sum, int64_t partial_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  const ChannelGates<scalar_t> gate(g, 0);
  const int64_t packs = r.M / V, step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  acc_t t = 0;
  for (int64_t n = blockIdx.y; n < r.N; n += gridDim.y) {
    const acc_t xi = static_cast<acc_t>(gate(n));
    const int64_t base = n * r.M;
    const P* dy = reinterpret_cast<const P*>(grad_y + base);
    const P* yv = reinterpret_cast<const P*>(y + base);
    const P* b = reinterpret_cast<const P*>(branch + base);
    P* gs = reinterpret_cast<P*>(grad_shortcut + base);
    P* gb = reinterpret_cast<P*>(grad_branch + base);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += step) {
      const P dv = dy[i], ov = yv[i], bv = b[i];
      P s, o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const scalar_t d = static_cast<acc_t>(ov.v[k]) <= acc_t(0) ? scalar_t(0) : dv.v[k];
        s.v[k] = d;
        o.v[k] = static_cast<scalar_t>(static_cast<acc_t>(d) * xi);
        t += static_cast<acc_t>(d) * static_cast<acc_t>(bv.v[k]);
      }
      gs[i] = s;
      gb[i] = o;
    }
  }
  // Block sum: warps by shuffle, then the first warp over the warps' sums; one add per block.
  __shared__ acc_t warp_sums[32];
  for (int off = 16; off > 0; off /= 2) t += __shfl_down_sync(0xffffffffu, t, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = t;
  __syncthreads();
  if (warp == 0) {
    t = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : acc_t(0);
    for (int off = 16; off > 0; off /= 2) t += __shfl_down_sync(0xffffffffu, t, off);
    if (lane == 0) {
      const int64_t block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
      add_block_sum(theta_sum, partial_stride, block, unit_of(g, 0), t);
    }
  }
}

// Values per access: the examples as rows of M channels, packed as in the channel-wise kernels.
template <typename scalar_t>
int pack_width(const Runs& r, std::initializer_list<const void*> pointers) {
  Layout L;
  L.N = r.N;
  L.A = r.M;
  return channel_pack<scalar_t>(L, pointers);
}

// Blocks of kThreads along each run (x) and over examples (y): enough to fill the GPU about twice.
dim3 residual_grid(const Runs& r, int v) {
  const int64_t gy = std::min<int64_t>(r.N, 65535);
  const int64_t per_run = std::max<int64_t>(ceil_div(r.M / v, kThreads * 2), 1);
  const int64_t fill = std::max<int64_t>(ceil_div(multiprocessor_count() * 2048 / kThreads * 2, gy), 1);
  return dim3(static_cast<unsigned>(std::min(per_run, fill)), static_cast<unsigned>(gy));
}

Runs runs_of(const Tensor& t) {
  const int64_t n = t.size(0);
  return {n, n == 0 ? 0 : t.numel() / n};
}

}  // namespace

Tensor gated_residual_fwd(const Tensor& shortcut, const Tensor& branch, const Tensor& theta, const Tensor& alive,
                          const Tensor& seed, bool training) {
  const auto fmt = check_residual(shortcut, branch, theta, alive, seed);
  const c10::cuda::CUDAGuard guard(branch.device());
  const Tensor b = branch.contiguous(fmt), s = shortcut.contiguous(fmt);
  Tensor y = at::empty_like(b, fmt);
  const Runs r = runs_of(b);
  if (y.numel() == 0) return y;
  const Gate gate = block_gate(theta, alive, seed, training, r.N);
  CADK_DISPATCH_FLOATING(b.scalar_type(), "cadk_gated_residual_fwd", [&] {
    const int v = pack_width<scalar_t>(r, {s.data_ptr(), b.data_ptr(), y.data_ptr()});
    with_pack<scalar_t>(v, [&](auto width) {
      residual_forward_kernel<scalar_t, decltype(width)::value>
          <<<residual_grid(r, v), kThreads, 0, current_stream()>>>(s.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                                                   gate.params, r, y.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> gated_residual_bwd(const Tensor& grad_y, const Tensor& y, const Tensor& branch,
                                                      const Tensor& theta, const Tensor& alive, const Tensor& seed,
                                                      bool training) {
  const auto fmt = check_residual(y, branch, theta, alive, seed);
  TORCH_CHECK(grad_y.sizes() == branch.sizes() && grad_y.scalar_type() == branch.scalar_type(),
              "cadk gated_residual: grad_y must match branch in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  check_cuda(grad_y, branch, "grad_y");
  const c10::cuda::CUDAGuard guard(branch.device());
  const Tensor b = branch.contiguous(fmt), dy = grad_y.contiguous(fmt), out = y.contiguous(fmt);
  Tensor grad_shortcut = at::empty_like(b, fmt), grad_branch = at::empty_like(b, fmt);
  Tensor theta_sum = zero_sums(theta.numel(), b);
  const Runs r = runs_of(b);
  if (b.numel() > 0) {
    const Gate gate = block_gate(theta, alive, seed, training, r.N);
    CADK_DISPATCH_FLOATING(b.scalar_type(), "cadk_gated_residual_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int v = pack_width<scalar_t>(
          r, {dy.data_ptr(), out.data_ptr(), b.data_ptr(), grad_shortcut.data_ptr(), grad_branch.data_ptr()});
      const dim3 grid = residual_grid(r, v);
      const int64_t stride = partial_stride(theta.numel());
      BlockSums<acc_t> sums(theta_sum, static_cast<int64_t>(grid.x) * grid.y, stride);
      with_pack<scalar_t>(v, [&](auto width) {
        residual_backward_kernel<scalar_t, decltype(width)::value><<<grid, kThreads, 0, current_stream()>>>(
            dy.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), gate.params, r,
            grad_shortcut.data_ptr<scalar_t>(), grad_branch.data_ptr<scalar_t>(), sums.data(), stride);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      sums.finish();
    });
  }
  return {grad_shortcut, grad_branch, theta_sum.to(theta.scalar_type())};
}

}  // namespace cadk::cuda
