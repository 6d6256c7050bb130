// gated_conv2d's output size and the stride/padding/dilation checks it needs, shared by the C++ and CUDA
// kernels (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

namespace cadk {

// (out_h, out_w) of x [N, C, H, W] under weight [C_out, C_in, kh, kw], as F.conv2d sizes its output.
inline std::pair<int64_t, int64_t> conv_output_size(const at::Tensor& x, const at::Tensor& weight,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "cadk gated_conv2d: stride, padding and dilation need 2 entries each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0, "cadk gated_conv2d: need stride > 0, ",
                "dilation > 0 and padding >= 0, got ", stride, ", ", dilation, ", ", padding);
  }
  // Floor division, as F.conv2d sizes its output: C++ rounds a negative span toward zero, which made an
  // input short of the kernel by less than a stride one output row long.
  auto out_size = [&](int d) {
    const int64_t span = x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1;
    return span < 0 ? int64_t(0) : span / stride[d] + 1;
  };
  const int64_t out_h = out_size(0), out_w = out_size(1);
  TORCH_CHECK(out_h > 0 && out_w > 0, "cadk gated_conv2d: input ", x.sizes(), " is smaller than the kernel ",
              weight.sizes(), " under padding ", padding, " and dilation ", dilation);
  return {out_h, out_w};
}

}  // namespace cadk
