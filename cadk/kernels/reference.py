"""Pure-PyTorch reference of cadk's ops: the definition every kernel backend is tested against.

Conventions shared by all backends:
- Parameters keep their full size ([C_out, C_in, ...]); activations hold alive channels only.
  `alive_in` / `alive_out` are sorted int64 index tensors into the full channel range.
- Gradients of full-size tensors (weight, bias, theta, BN affine) are full-size, zero outside the
  alive rows/columns, so optimizer state and DDP buckets never change shape.
- `theta` is the full-size gate probability vector of the output units, or None for no gate.
  Training: xi[n, j'] = Philox gate of example n and unit alive_out[j'] (see philox.py); eval: xi = theta.
- theta's gradient is the estimator of docs/METHOD.md: sum over examples and positions of
  dy * (pre-gate output), evaluated at the sampled gates.
- `activation` is "relu" or "none"; the gate acts after it: y = xi * act(z).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .philox import sample_gates

ACTIVATIONS = ("relu", "none")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"cadk: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    return F.relu(z) if activation == "relu" else z


def gate_values(theta: torch.Tensor, alive: torch.Tensor, seed: torch.Tensor, n: int,
                training: bool) -> torch.Tensor:
    """xi as an [n, A] (training) or [1, A] (eval) tensor in theta's dtype."""
    if training:
        return sample_gates(seed, n, theta, alive)
    return theta.detach()[alive][None, :]


class _Gate(torch.autograd.Function):
    """y = xi * pre with theta's gradient estimated as sum(dy * pre) (docs/METHOD.md)."""

    @staticmethod
    def forward(ctx, pre, theta, alive, seed, training):
        xi = gate_values(theta, alive, seed, pre.shape[0], training).to(pre.dtype)
        xi = xi.reshape(xi.shape + (1,) * (pre.dim() - 2))
        ctx.save_for_backward(pre, xi, alive)
        ctx.theta_shape = theta.shape
        ctx.theta_dtype = theta.dtype
        return pre * xi

    @staticmethod
    def backward(ctx, dy):
        pre, xi, alive = ctx.saved_tensors
        grad_pre = dy * xi if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            dims = [0] + list(range(2, pre.dim()))
            acc = torch.float64 if pre.dtype == torch.float64 else torch.float32  # the math dtype of the kernels
            per_unit = (dy.to(acc) * pre.to(acc)).sum(dim=dims)
            grad_theta = torch.zeros(ctx.theta_shape, dtype=acc, device=dy.device)
            grad_theta = grad_theta.index_add(0, alive, per_unit).to(ctx.theta_dtype)
        return grad_pre, grad_theta, None, None, None


def gate_apply(pre: torch.Tensor, theta: torch.Tensor, alive: torch.Tensor, seed: torch.Tensor,
               training: bool) -> torch.Tensor:
    """y[n, j', ...] = xi[n, j'] * pre[n, j', ...]; pre holds the alive units only (dim 1)."""
    # Checked as the kernels check it: xi [N, A] would broadcast against a pre of other channels silently.
    check_seed(seed)
    torch._check(pre.dim() >= 2, lambda: f"cadk gate_apply: pre must be [N, units, ...], got shape {tuple(pre.shape)}")
    torch._check(alive.dim() == 1 and alive.shape[0] == pre.shape[1],
                 lambda: f"cadk gate_apply: alive must be 1-D and list the {pre.shape[1]} channels of pre (dim 1), "
                         f"got shape {tuple(alive.shape)}")
    return _Gate.apply(pre, theta, alive, seed, training)


def check_residual(shortcut: torch.Tensor, branch: torch.Tensor, alive: torch.Tensor) -> None:
    """The contract of gated_residual that every backend checks first, with the same messages."""
    if shortcut.shape != branch.shape or shortcut.dtype != branch.dtype:
        raise RuntimeError(f"cadk gated_residual: shortcut {tuple(shortcut.shape)} {shortcut.dtype} and branch "
                           f"{tuple(branch.shape)} {branch.dtype} must match in shape and dtype")
    if branch.dim() < 1:
        raise RuntimeError("cadk gated_residual: branch must be [N, ...], got a 0-dim tensor")
    if alive.dim() != 1 or alive.numel() != 1:
        raise RuntimeError(f"cadk gated_residual: alive must list the one unit of the block gate, got shape "
                           f"{tuple(alive.shape)}; a pruned block skips its branch (relu(shortcut))")


def runs_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format in which t's examples are each one dense run: channels-last for a 4-D tensor
    stored that way (and not also contiguous), else contiguous."""
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def as_runs(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t as [N, 1, M], each example one run of M values: a view when t is dense in fmt."""
    v = t.permute(0, 2, 3, 1) if fmt == torch.channels_last else t
    return v.reshape(t.shape[0], 1, math.prod(t.shape[1:]))


def gate_examples(gate_apply_fn, branch: torch.Tensor, theta: torch.Tensor, alive: torch.Tensor, seed: torch.Tensor,
                  training: bool) -> torch.Tensor:
    """xi[n] * branch through a backend's gate_apply (one unit: a block gate), on branch seen as [N, 1, M]
    with each example one dense run: a view for NCHW and channels-last alike, so neither direction copies."""
    fmt = runs_format(branch)
    gated = gate_apply_fn(as_runs(branch, fmt), theta, alive, seed, training)
    if fmt == torch.channels_last:
        n, c, h, w = branch.shape
        return gated.view(n, h, w, c).permute(0, 3, 1, 2)
    return gated.view(branch.shape)


def linear_over_positions(gated_conv2d_fn, gated_linear_fn, x: torch.Tensor, weight: torch.Tensor, bias, theta,
                          alive_in: torch.Tensor, alive_out: torch.Tensor, seed: torch.Tensor, activation: str,
                          training: bool) -> torch.Tensor:
    """gated_linear over x [N, *positions, features] with a backend's ops: one gate per example and unit,
    shared by the example's positions (as a conv shares it over H x W), so it runs as a 1x1 gated conv on
    a channels-last [N, features, P, 1] view (no copy either way)."""
    features, positions = x.shape[-1], math.prod(x.shape[1:-1])
    if guard_or_false(x.shape[0] * positions == 0):
        # No example or no position (nn.Linear takes both): no rows for the 2-D op, whose empty output and
        # zero parameter gradients these are. A conv over no positions would be refused.
        y = gated_linear_fn(x.reshape(0, features), weight, bias, theta, alive_in, alive_out, seed, activation,
                            training)
        return y.reshape(*x.shape[:-1], y.shape[1])
    x4 = x.reshape(x.shape[0], positions, 1, features).permute(0, 3, 1, 2)
    y4 = gated_conv2d_fn(x4, weight[:, :, None, None], bias, theta, alive_in, alive_out, seed, (1, 1), (0, 0),
                         (1, 1), activation, training)
    return y4.permute(0, 2, 3, 1).reshape(*x.shape[:-1], y4.shape[1])


def gated_residual(shortcut: torch.Tensor, branch: torch.Tensor, theta: torch.Tensor, alive: torch.Tensor,
                   seed: torch.Tensor, training: bool) -> torch.Tensor:
    """y = relu(shortcut + xi[n] * branch): the output of a residual block whose branch carries a layer
    gate, xi[n] the gate of example n and unit alive[0] of theta (one unit: alive has one entry)."""
    check_residual(shortcut, branch, alive)
    return F.relu(shortcut + gate_apply(branch.unsqueeze(1), theta, alive, seed, training).squeeze(1))


def gather_weight(weight: torch.Tensor, alive_in: torch.Tensor, alive_out: torch.Tensor) -> torch.Tensor:
    """W[alive_out][:, alive_in]; its gradient lands in a zero full-size tensor."""
    w = weight if alive_out.numel() == weight.shape[0] else weight.index_select(0, alive_out)
    return w if alive_in.numel() == weight.shape[1] else w.index_select(1, alive_in)


def check_seed(seed) -> None:
    """A 0-dim int64 tensor (or a Python int), as the kernels take it: philox.py would truncate a float
    seed and broadcast a vector of seeds over the units."""
    if isinstance(seed, torch.Tensor):
        torch._check(seed.dim() == 0 and seed.dtype == torch.int64,
                     lambda: f"cadk: seed must be a 0-dim int64 tensor, got shape {list(seed.shape)} and dtype "
                             f"{seed.dtype}")


def as_seed(seed) -> torch.Tensor:
    """A Python int seed as the 0-dim int64 tensor the kernels take; a tensor as it is."""
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(int(seed), dtype=torch.int64)


def conv_pair(v) -> list[int]:
    """Two entries: an int or a one-entry sequence is used for both dims, as F.conv2d takes it."""
    v = [int(v)] if isinstance(v, int) else [int(e) for e in v]
    return v * 2 if len(v) == 1 else v


def check_conv_geometry(stride, padding, dilation) -> None:
    """What the kernels' output-size arithmetic needs (F.conv2d refuses the rest too)."""
    torch._check(all(s > 0 and d > 0 and p >= 0 for s, p, d in zip(stride, padding, dilation)),
                 lambda: f"cadk gated_conv2d: need stride > 0, dilation > 0 and padding >= 0, got {list(stride)}, "
                         f"{list(dilation)}, {list(padding)}")


def check_units(units, **vectors) -> None:
    """Per-unit vectors (bias, theta, BN's) hold one entry per unit of the full range, as the kernels check:
    a compact one, of one entry per alive unit, would be taken for the gathered vector."""
    for name, v in vectors.items():
        if v is not None:
            torch._check(v.dim() == 1 and v.shape[0] == units,
                         lambda: f"cadk: {name} must have shape [{units}] (one entry per full-range channel), "
                                 f"got {list(v.shape)}")


def _gather_bias(bias, alive_out):
    if bias is None or alive_out.numel() == bias.shape[0]:
        return bias
    return bias.index_select(0, alive_out)


def _epilogue(z, theta, alive_out, seed, activation, training):
    pre = _act(z, activation)
    return pre if theta is None else gate_apply(pre, theta, alive_out, seed, training)


def gated_linear(x, weight, bias, theta, alive_in, alive_out, seed, activation: str = "none",
                 training: bool = True):
    """y[n, j'] = xi[n, j] * act(sum_i' W[j, alive_in[i']] x[n, i'] + b[j]), j = alive_out[j']."""
    check_activation(activation)  # _act would take any other name as "none"
    check_units(weight.shape[0], bias=bias, theta=theta)
    check_seed(seed)
    z = F.linear(x, gather_weight(weight, alive_in, alive_out), _gather_bias(bias, alive_out))
    return _epilogue(z, theta, alive_out, seed, activation, training)


def safe_conv_args(x: torch.Tensor, weight: torch.Tensor, stride, padding=(0, 0),
                   dilation=(1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """x and weight laid out to dodge three bugs of torch's CPU convolution (seen with torch 2.13):
    - the forward returns wrong values when one input channel is stored with channels-last strides and
      the output is one column wide; with one channel both layouts are the same memory, so NCHW strides
      are a free view (csrc/cpu/gated_conv2d.cpp does the same);
    - the backward corrupts the heap for a 1x1 kernel with stride > 1 when the input or the weight has
      channels-last strides; NCHW operands avoid that path (a 1x1 weight's NCHW strides are a free view);
    - in bfloat16 the backward returns wrong gradients (stale memory, at times NaN) when the output is one
      column wide with a stride > 1 across and an operand has channels-last strides: NCHW operands too."""
    if x.device.type != "cpu":
        return x, weight
    stride = conv_pair(stride)  # an int stride as F.conv2d takes it
    if x.shape[1] == 1:
        x, weight = _nchw_view(x), _nchw_view(weight)
    span = x.shape[3] + 2 * conv_pair(padding)[1] - conv_pair(dilation)[1] * (weight.shape[3] - 1) - 1
    out_w = span // stride[1] + 1
    one_strided_column = out_w == 1 and stride[1] > 1  # as safe_conv_backward_args in csrc/cpu/common.h
    if (tuple(weight.shape[-2:]) == (1, 1) and max(stride) > 1) or one_strided_column:
        x, weight = x.contiguous(), _nchw_view(weight)
    return x, weight


def conv_dilation(weight: torch.Tensor, dilation) -> list[int]:
    """dilation with 1 along kernel dims of size 1, where it changes nothing: torch's CPU convolution
    forward (2.13) crashes in bfloat16 when an input one column wide, padded and strided across, meets a
    one-column kernel with a dilation > 1 across and an operand has channels-last strides
    (csrc/cpu/gated_conv2d.cpp does the same)."""
    return [1 if k == 1 else d for k, d in zip(weight.shape[-2:], conv_pair(dilation))]


def _nchw_view(t: torch.Tensor) -> torch.Tensor:
    """t with NCHW strides; t must already be NCHW-contiguous up to the strides of size-1 dims."""
    return t.as_strided(t.shape, torch.empty(t.shape, device="meta").stride()) if t.is_contiguous() else t.contiguous()


def gated_conv2d(x, weight, bias, theta, alive_in, alive_out, seed, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), activation: str = "none", training: bool = True):
    """Conv2d over alive input channels and alive output filters, then act and gate."""
    check_activation(activation)
    check_units(weight.shape[0], bias=bias, theta=theta)
    check_seed(seed)
    if alive_out.numel() == 0:  # F.conv2d takes no empty channel dim: one filter, none returned
        return gated_conv2d(x, weight, bias, theta, alive_in, alive_out.new_zeros(1), seed, stride, padding,
                            dilation, activation, training)[:, :0]
    if alive_in.numel() == 0:  # nor an input without channels: one of zeros, still a function of x
        x, alive_in = x.new_zeros((x.shape[0], 1, *x.shape[2:])) + x.sum(), alive_in.new_zeros(1)
    x, w = safe_conv_args(x, gather_weight(weight, alive_in, alive_out), stride, padding, dilation)
    z = F.conv2d(x, w, _gather_bias(bias, alive_out),
                 stride, padding, conv_dilation(w, dilation))
    return _epilogue(z, theta, alive_out, seed, activation, training)


def bn_gate_act(x, weight, bias, running_mean, running_var, theta, alive, seed, momentum: float = 0.1,
                eps: float = 1e-5, activation: str = "relu", training: bool = True):
    """BatchNorm over the alive channels of x ([N, A, H, W]), then act and gate.

    Training uses batch statistics and updates running_mean/var in place at the alive entries only,
    so a pruned channel's statistics stay as they were."""
    check_activation(activation)
    check_units(running_mean.shape[0], weight=weight, bias=bias, running_var=running_var, theta=theta)
    check_seed(seed)
    if alive.numel() == 0:  # no channels: an empty output whose gradients are zeros of every input
        return x * 0 + sum(t.sum() for t in (weight, bias, theta) if t is not None) * 0
    rm = running_mean.index_select(0, alive)
    rv = running_var.index_select(0, alive)
    z = F.batch_norm(x, rm, rv, _gather_bias(weight, alive), _gather_bias(bias, alive), training,
                     momentum, eps)
    if training:
        with torch.no_grad():
            running_mean.index_copy_(0, alive, rm)
            running_var.index_copy_(0, alive, rv)
    return _epilogue(z, theta, alive, seed, activation, training)
