// Gather of a weight's alive block and scatter of its gradient into the full-size gradient.
#include "weights.cuh"

#include <ATen/ops/empty.h>

#include <limits>

namespace cadk::cuda {
namespace {

// A weight in memory order as [rows, mid, last]: rows are output channels; input channels are `mid`
// (contiguous conv: mid = C_in, last = taps) or `last` (linear: mid = 1; channels-last conv:
// mid = taps). The compact block has the same layout with the alive counts.
struct BlockShape {
  int64_t rows;          // compact rows (alive outputs)
  int64_t mid, last;     // compact
  int64_t full_mid, full_last;
  bool cols_last;        // input channels are the `last` dimension
  const int64_t* alive_rows;  // nullptr: all rows, in order
  const int64_t* alive_cols;  // nullptr: all input channels, in order
  int64_t full_rows, full_cols;  // ranges the indices must fall in
};

// kScatter: full[...] = compact[...]; else compact[...] = full[...]. T is an unsigned integer type
// of the element's size: a copy needs no arithmetic type.
template <typename T, bool kScatter>
__global__ void block_copy_kernel(const T* __restrict__ src, T* __restrict__ dst, BlockShape b) {
  const uint32_t per_row = static_cast<uint32_t>(b.mid * b.last);
  const uint32_t last = static_cast<uint32_t>(b.last);
  for (int64_t r = blockIdx.y; r < b.rows; r += gridDim.y) {
    int64_t row = r;
    if (b.alive_rows != nullptr) {
      row = b.alive_rows[r];
      CUDA_KERNEL_ASSERT(row >= 0 && row < b.full_rows &&
                         "cadk: alive index outside the parameter's channel range");
    }
    for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < per_row; q += blockDim.x * gridDim.x) {
      const uint32_t m = q / last, p = q - m * last;
      int64_t fm = m, fp = p;
      if (b.alive_cols != nullptr) {
        const int64_t col = b.alive_cols[b.cols_last ? p : m];
        CUDA_KERNEL_ASSERT(col >= 0 && col < b.full_cols &&
                           "cadk: alive index outside the parameter's channel range");
        (b.cols_last ? fp : fm) = col;
      }
      const int64_t compact = r * per_row + q;
      const int64_t full = (row * b.full_mid + fm) * b.full_last + fp;
      if constexpr (kScatter) {
        dst[full] = src[compact];
      } else {
        dst[compact] = src[full];
      }
    }
  }
}

bool is_full(const Tensor& alive, int64_t full) { return alive.numel() == full; }

// The [rows, mid, last] view of a full-size weight contiguous in fmt, and its alive block.
BlockShape block_shape(const Tensor& weight, at::MemoryFormat fmt, const Tensor& alive_in, const Tensor& alive_out) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t taps = weight.dim() == 4 ? weight.size(2) * weight.size(3) : 1;
  const int64_t in = weight.size(1), ai = alive_in.numel();
  BlockShape b{};
  b.rows = alive_out.numel();
  b.cols_last = weight.dim() == 2 || cl;
  b.mid = b.cols_last ? taps : ai;
  b.last = b.cols_last ? ai : taps;
  b.full_mid = b.cols_last ? taps : in;
  b.full_last = b.cols_last ? in : taps;
  b.alive_rows = is_full(alive_out, weight.size(0)) ? nullptr : alive_out.data_ptr<int64_t>();
  b.alive_cols = is_full(alive_in, in) ? nullptr : alive_in.data_ptr<int64_t>();
  b.full_rows = weight.size(0);
  b.full_cols = in;
  TORCH_CHECK(b.mid * b.last <= std::numeric_limits<int32_t>::max(), "cadk: a weight row of ", b.mid * b.last,
              " elements is too large for the CUDA gather");
  return b;
}

template <bool kScatter>
void launch_block_copy(const Tensor& src, const Tensor& dst, const BlockShape& b) {
  const int64_t per_row = b.mid * b.last;
  if (b.rows == 0 || per_row == 0) return;
  constexpr int kBlock = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(per_row, kBlock), 1024)),
                  static_cast<unsigned>(std::min<int64_t>(b.rows, 65535)));
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    block_copy_kernel<T, kScatter><<<grid, kBlock, 0, current_stream()>>>(
        static_cast<const T*>(src.const_data_ptr()), static_cast<T*>(dst.data_ptr()), b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (src.element_size()) {
    case 1: run(uint8_t{}); break;
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    case 8: run(uint64_t{}); break;
    default: TORCH_CHECK(false, "cadk: unsupported element size ", src.element_size());
  }
}

}  // namespace

Tensor gather_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  if (is_full(alive_out, weight.size(0)) && is_full(alive_in, weight.size(1))) return weight;
  const auto fmt = format_of(weight);
  const Tensor full = weight.contiguous(fmt);
  const Tensor ai = alive_in.contiguous(), ao = alive_out.contiguous();
  std::vector<int64_t> sizes = full.sizes().vec();
  sizes[0] = ao.numel();
  sizes[1] = ai.numel();
  Tensor out = at::empty(sizes, full.options().memory_format(fmt));
  launch_block_copy<false>(full, out, block_shape(full, fmt, ai, ao));
  return out;
}

Tensor gather_vector(const Tensor& v, const Tensor& alive) {
  if (is_full(alive, v.size(0))) return v;
  const Tensor full = v.contiguous(), a = alive.contiguous();
  Tensor out = at::empty({a.numel()}, full.options());
  // A vector is a weight of one row.
  BlockShape b{};
  b.rows = b.full_rows = 1;
  b.mid = b.full_mid = 1;
  b.last = a.numel();
  b.full_last = b.full_cols = full.size(0);
  b.cols_last = true;
  b.alive_cols = a.data_ptr<int64_t>();
  launch_block_copy<false>(full, out, b);
  return out;
}

Tensor scatter_weight(const Tensor& compact, const Tensor& full_like, const Tensor& alive_in,
                      const Tensor& alive_out) {
  TORCH_INTERNAL_ASSERT(compact.scalar_type() == full_like.scalar_type(), "cadk: weight gradient dtype mismatch");
  const auto fmt = format_of(full_like);
  if (is_full(alive_out, full_like.size(0)) && is_full(alive_in, full_like.size(1))) return compact.contiguous(fmt);
  const Tensor src = compact.contiguous(fmt);
  const Tensor ai = alive_in.contiguous(), ao = alive_out.contiguous();
  Tensor out = zeros_fast(full_like.sizes(), full_like.options().memory_format(fmt));
  launch_block_copy<true>(src, out, block_shape(out, fmt, ai, ao));
  return out;
}

}  // namespace cadk::cuda
