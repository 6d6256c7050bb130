"""Compiled backend: cadk's ops as torch.ops.cadk.* from the extension cadk._C.

Importing cadk._C registers the op schemas (csrc/cadk_ops.cpp) and their CPU (csrc/cpu) and, in CUDA
builds, CUDA (csrc/cuda) kernels. The extension also registers their autograd (csrc/autograd.cpp: each
forward op's backward is itself an op, so forward and backward both compile without graph breaks).
This module adds the fake kernels (shapes, dtypes and memory formats for torch.compile and meta
tensors). The four functions below have the signatures of reference.py; cuda_backend.py re-exports them for CUDA.

Output conventions shared by every kernel of these ops (the fake kernels below state them):
- forward ops return `pre` (the pre-gate, post-activation output) only when theta is given; without
  a gate `pre` equals `y`, so the op returns an empty tensor and autograd saves `y` in its place;
- activations keep the input's memory format: channels-last in, channels-last out (for conv: when x
  or the weight is channels-last); parameter gradients have the parameter's memory format;
- gradients of absent optional inputs (bias, theta) are empty tensors of x's dtype.
"""
from __future__ import annotations

import warnings

import torch

from .reference import as_seed, check_activation, check_conv_geometry, conv_pair

try:
    from cadk import _C  # noqa: F401  (loading the library registers torch.ops.cadk.*)

    AVAILABLE = True
except (ImportError, OSError):  # not built (pure-Python install) or built against another torch
    AVAILABLE = False

if AVAILABLE and not torch._C._dispatch_has_kernel_for_dispatch_key("cadk::gated_linear_fwd", "Autograd"):
    # A library built from older sources, whose autograd lived in Python: its gradients would be wrong.
    warnings.warn("cadk._C was built from older sources (its ops have no autograd kernels); the compiled "
                  "backends stay off until it is rebuilt: pip install --no-deps --no-build-isolation -e .")
    AVAILABLE = False

_OPS = ("gate_apply", "gated_residual", "gated_linear", "gated_conv2d", "bn_gate_act")

# Activation dtypes the CPU kernels compute in (others are refused with this list).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


# Read once: registrations are fixed after the import, and torch.compile cannot trace the query.
_KERNEL_KEYS = frozenset(k for k in ("CPU", "CUDA") if AVAILABLE and
                         torch._C._dispatch_has_kernel_for_dispatch_key("cadk::gated_linear_fwd", k))


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered kernels for `dispatch_key` ("CPU", "CUDA")."""
    return dispatch_key in _KERNEL_KEYS


def supports(device) -> bool:
    return torch.device(device).type == "cpu" and has_kernel("CPU")


# ---------------------------------------------------------------------------------------------
# The ops with the reference signatures


def release_cached_memory() -> None:
    """See cadk.kernels.release_cached_memory."""
    release = getattr(_C, "release_cached_memory", None) if AVAILABLE else None
    if release is not None:
        release()


def gate_apply(pre, theta, alive, seed, training: bool):
    return torch.ops.cadk.gate_apply_fwd(pre, theta, alive, as_seed(seed), training)


def gated_residual(shortcut, branch, theta, alive, seed, training: bool):
    return torch.ops.cadk.gated_residual_fwd(shortcut, branch, theta, alive, as_seed(seed), training)


def gated_linear(x, weight, bias, theta, alive_in, alive_out, seed, activation: str = "none",
                 training: bool = True):
    check_activation(activation)
    y, _ = torch.ops.cadk.gated_linear_fwd(x, weight, bias, theta, alive_in, alive_out, as_seed(seed),
                                           activation, training)
    return y


def gated_conv2d(x, weight, bias, theta, alive_in, alive_out, seed, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), activation: str = "none", training: bool = True):
    check_activation(activation)
    y, _ = torch.ops.cadk.gated_conv2d_fwd(x, weight, bias, theta, alive_in, alive_out, as_seed(seed),
                                           conv_pair(stride), conv_pair(padding), conv_pair(dilation), activation,
                                           training)
    return y


def bn_gate_act(x, weight, bias, running_mean, running_var, theta, alive, seed, momentum: float = 0.1,
                eps: float = 1e-5, activation: str = "relu", training: bool = True):
    """BatchNorm over the alive channels, act, gate; updates the running statistics at the alive
    entries in training, as nn.BatchNorm2d does (the op itself is functional)."""
    check_activation(activation)
    units = running_mean.shape[0]
    if weight is None:
        weight = torch.ones(units, dtype=running_mean.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(units, dtype=running_mean.dtype, device=x.device)
    y, _, mean, var = torch.ops.cadk.bn_gate_act_fwd(x, weight, bias, running_mean, running_var, theta, alive,
                                                     as_seed(seed), eps, activation, training)
    if training:
        _update_running_stats(running_mean, running_var, alive, mean, var, x, momentum)
    return y


def _update_running_stats(running_mean, running_var, alive, mean, var, x, momentum):
    values = x.shape[0]  # per channel: N * H * W (the op checked that it exceeds 1)
    for size in x.shape[2:]:
        values = values * size
    with torch.no_grad():  # mean and var are outputs of a differentiable op
        torch.ops.cadk.bn_running_stats_(running_mean, running_var, alive, mean, var, momentum, values)


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata from input metadata only, and the input checks torch.compile sees.


def _is_channels_last(t: torch.Tensor) -> bool:
    """Mirror of format_of in csrc/cpu/common.cpp, which is ATen's suggest_memory_format(): the layout
    the strides suggest, as PyTorch's own ops decide it (is_channels_last_strides_2d). Strides decide
    where the shape alone is ambiguous: a [C_out, 1, 3, 3] weight moved to channels-last is."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return False
        low = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def _format(*ts: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if any(_is_channels_last(t) for t in ts) else torch.contiguous_format


def _empty(shape, like: torch.Tensor, fmt=torch.contiguous_format, dtype=None) -> torch.Tensor:
    if len(shape) != 4:
        fmt = torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _no_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _check_alive(alive: torch.Tensor, count, name: str) -> None:
    torch._check(alive.dtype == torch.int64,
                 lambda: f"cadk: {name} must be an int64 index tensor, got {alive.dtype}")
    torch._check(alive.dim() == 1, lambda: f"cadk: {name} must be 1-D, got shape {tuple(alive.shape)}")
    torch._check(alive.shape[0] == count,
                 lambda: f"cadk: {name} lists {alive.shape[0]} channels but the activation has {count} (dim 1)")


def _check_same_dtype(t: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if t is not None:
        torch._check(t.dtype == x.dtype, lambda: f"cadk: {name} dtype {t.dtype} differs from x dtype {x.dtype}")


def _check_vector(t: torch.Tensor | None, units, name: str) -> None:
    if t is not None:
        torch._check(t.dim() == 1 and t.shape[0] == units,
                     lambda: f"cadk: {name} must have shape [{units}], got {tuple(t.shape)}")


def _check_devices(x: torch.Tensor, **tensors) -> None:
    """Every given tensor on x's device. The dispatcher picks these fake kernels whenever one argument is
    on the meta device: without this check, real inputs with a meta index list got uninitialised outputs."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == x.device, lambda: f"cadk: {name} is on {t.device} but the activation on "
                                                       f"{x.device}; move all inputs of the op to one device")


def _check_seed(seed: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(seed.dim() == 0 and seed.dtype == torch.int64,
                 lambda: f"cadk: seed must be a 0-dim int64 tensor, got {tuple(seed.shape)} {seed.dtype}")
    torch._check(seed.device == x.device or seed.device.type == "cpu",  # kernels read a CPU seed on the host
                 lambda: f"cadk: seed is on {seed.device} but the activation on {x.device}; keep it on the CPU "
                         "or the activation's device")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv_out_shape(x, weight, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"cadk gated_conv2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 4,
                 lambda: f"cadk gated_conv2d: weight must be [C_out, C_in, kh, kw], got {tuple(weight.shape)}")
    check_conv_geometry(stride, padding, dilation)
    h, w = ((x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
            for d in range(2))
    return h, w


def _check_layer(x, weight, bias, theta, alive_in, alive_out, seed):
    _check_devices(x, weight=weight, bias=bias, theta=theta, alive_in=alive_in, alive_out=alive_out)
    _check_same_dtype(weight, x, "weight")
    _check_same_dtype(bias, x, "bias")
    _check_vector(bias, weight.shape[0], "bias")
    _check_vector(theta, weight.shape[0], "theta")
    _check_alive(alive_in, x.shape[1], "alive_in")
    _check_alive(alive_out, alive_out.shape[0], "alive_out")
    _check_seed(seed, x)


def _register_fakes() -> None:
    @torch.library.register_fake("cadk::gate_apply_fwd")
    def _(pre, theta, alive, seed, training):
        torch._check(pre.dim() >= 2, lambda: f"cadk gate_apply: pre must be [N, units, ...], got {tuple(pre.shape)}")
        _check_devices(pre, theta=theta, alive=alive)
        _check_alive(alive, pre.shape[1], "alive")
        _check_seed(seed, pre)
        return _empty(pre.shape, pre, _format(pre))

    @torch.library.register_fake("cadk::gate_apply_bwd")
    def _(grad_y, pre, theta, alive, seed, training):
        return _empty(pre.shape, pre, _format(pre)), _empty(theta.shape, theta)

    @torch.library.register_fake("cadk::gated_residual_fwd")
    def _(shortcut, branch, theta, alive, seed, training):
        torch._check(shortcut.shape == branch.shape and shortcut.dtype == branch.dtype,
                     lambda: f"cadk gated_residual: shortcut {tuple(shortcut.shape)} {shortcut.dtype} and branch "
                             f"{tuple(branch.shape)} {branch.dtype} must match in shape and dtype")
        _check_devices(branch, shortcut=shortcut, theta=theta, alive=alive)
        _check_alive(alive, 1, "alive")
        _check_seed(seed, branch)
        return _empty(branch.shape, branch, _format(branch))

    @torch.library.register_fake("cadk::gated_residual_bwd")
    def _(grad_y, y, branch, theta, alive, seed, training):
        fmt = _format(branch)
        return _empty(branch.shape, branch, fmt), _empty(branch.shape, branch, fmt), _empty(theta.shape, theta)

    @torch.library.register_fake("cadk::gated_linear_fwd")
    def _(x, weight, bias, theta, alive_in, alive_out, seed, activation, training):
        torch._check(x.dim() == 2, lambda: f"cadk gated_linear: x must be [N, in], got shape {tuple(x.shape)}")
        _check_layer(x, weight, bias, theta, alive_in, alive_out, seed)
        shape = (x.shape[0], alive_out.shape[0])
        return _empty(shape, x), (_empty(shape, x) if theta is not None else _no_grad(x))

    @torch.library.register_fake("cadk::gated_linear_bwd")
    def _(grad_y, x, weight, pre, theta, alive_in, alive_out, seed, activation, training, has_bias,
          need_grad_x=True, need_grad_weight=True):
        units = weight.shape[0]
        return (_empty(x.shape, x) if need_grad_x else _no_grad(x),
                _empty(weight.shape, weight) if need_grad_weight else _no_grad(x),
                _empty((units,), x) if has_bias else _no_grad(x),
                _empty((units,), theta) if theta is not None else _no_grad(x))

    @torch.library.register_fake("cadk::gated_conv2d_fwd")
    def _(x, weight, bias, theta, alive_in, alive_out, seed, stride, padding, dilation, activation, training):
        _check_layer(x, weight, bias, theta, alive_in, alive_out, seed)
        shape = (x.shape[0], alive_out.shape[0], *_conv_out_shape(x, weight, stride, padding, dilation))
        fmt = _format(x, weight)
        return _empty(shape, x, fmt), (_empty(shape, x, fmt) if theta is not None else _no_grad(x))

    @torch.library.register_fake("cadk::gated_conv2d_bwd")
    def _(grad_y, x, weight, pre, theta, alive_in, alive_out, seed, stride, padding, dilation, activation,
          training, has_bias, need_grad_x=True, need_grad_weight=True):
        units = weight.shape[0]
        grad_x = _empty(x.shape, x, _format(x, weight)) if need_grad_x else _no_grad(x)
        grad_w = _empty(weight.shape, weight, _format(weight)) if need_grad_weight else _no_grad(x)
        return (grad_x, grad_w,
                _empty((units,), x) if has_bias else _no_grad(x),
                _empty((units,), theta) if theta is not None else _no_grad(x))

    @torch.library.register_fake("cadk::bn_running_stats_")
    def _(running_mean, running_var, alive, mean, var, momentum, count):
        return None

    @torch.library.register_fake("cadk::bn_gate_act_fwd")
    def _(x, weight, bias, running_mean, running_var, theta, alive, seed, eps, activation, training):
        torch._check(x.dim() >= 2, lambda: f"cadk bn_gate_act: x must be [N, C, ...], got {tuple(x.shape)}")
        for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                        (running_var, "running_var"), (theta, "theta")):
            _check_vector(t, weight.shape[0], name)
        _check_devices(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                       theta=theta, alive=alive)
        _check_alive(alive, x.shape[1], "alive")
        _check_seed(seed, x)
        fmt = _format(x)
        stat = _empty((alive.shape[0],), x, dtype=_opmath(x.dtype))
        pre = _empty(x.shape, x, fmt) if theta is not None else _no_grad(x)
        return _empty(x.shape, x, fmt), pre, stat, torch.empty_like(stat)

    @torch.library.register_fake("cadk::bn_gate_act_bwd")
    def _(grad_y, x, weight, pre, mean, var, theta, alive, seed, eps, activation, training):
        units = weight.shape[0]
        return (_empty(x.shape, x, _format(x)), _empty((units,), weight), _empty((units,), weight),
                _empty((units,), theta) if theta is not None else _no_grad(x))


if AVAILABLE:
    _register_fakes()
