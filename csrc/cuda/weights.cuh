// Alive blocks of full-size weights on CUDA: one kernel launch each way, where index_select and
// index_copy_ chains cost two to four launches and as many temporaries (the host time a small
// layer's step waits for).
#pragma once

#include "common.cuh"

namespace cadk::cuda {

// weight[alive_out][:, alive_in] (dim 0 and 1; conv taps follow) as a new tensor in weight's memory
// format; weight itself when both sets are full.
Tensor gather_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out);

// v[alive] of a 1-D tensor; v itself when alive is full.
Tensor gather_vector(const Tensor& v, const Tensor& alive);

// A tensor shaped, typed and formatted like `full_like`, holding `compact` (same dtype, shape
// [alive_out, alive_in, taps...]) at the alive rows and columns and zeros elsewhere: the full-size
// gradient of a weight, so optimizers and DDP see stable shapes.
Tensor scatter_weight(const Tensor& compact, const Tensor& full_like, const Tensor& alive_in,
                      const Tensor& alive_out);

}  // namespace cadk::cuda
