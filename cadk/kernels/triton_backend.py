"""Triton backend of cadk's ops (see reference.py for their semantics).

Each op is a `torch.library.triton_op` ("cadk::triton_<op>_fwd" / "..._bwd") whose kernels are
launched through `wrap_triton`, so torch.compile traces into them; the forward ops carry an autograd
formula that calls the backward ops. The op bodies double as fake kernels: output shapes come from
input shapes only, never from tensor values.

- gated_linear: one fused gather-GEMM (output rows gathered through alive_out inside the kernel,
  W's alive input columns gathered once by index_select) with bias, activation and gate in its
  epilogue; for large fp32 products (see LINEAR_MATMUL) W's alive block gathered, torch.addmm
  (cuBLAS) and the channel-wise gate/act epilogue kernel instead. Backward: a channel-wise Triton
  prologue (gate, ReLU mask, theta and bias sums), then cuBLAS GEMMs on the compact shapes and a
  scatter into the full-size weight gradient.
- gated_conv2d: compact weights, F.conv2d / aten.convolution_backward on compact shapes (cuDNN on
  GPU), with the same channel-wise epilogue / prologue kernels.
- bn_gate_act: Triton batch statistics and BN coefficients, BN-apply + act + gate in one pass, BN
  backward fused with the gate/act prologue. Running statistics are updated by a separate op
  (bn_running_stats_, one launch), so the forward op stays functional.
- gate_apply: the channel-wise kernels alone.
- gated_residual: one kernel forward (gate, add, ReLU) and one backward (both input gradients and the
  block gate's theta sum), each example one dense run in the branch's memory format.

In eager mode the public functions below run each op's body and autograd formula as a plain
autograd.Function (_EagerOp), without the custom-op machinery, whose host time exceeded the bodies';
torch.compile, fake tensors and dispatch modes go through the registered ops.

Any layout whose trailing (spatial) dims merge into one strided dim runs without copies (NCHW and
channels_last included); others are made contiguous first. Forward ops return (y, pre) with pre the
pre-gate output; without a gate y is pre and pre comes back empty (no second copy is written).

Runs on CUDA devices, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
triton is imported), which is how the tests exercise it without a GPU; the dispatcher only picks it by
itself for CUDA. Interpreted kernels cannot be traced, so there the ops are opaque custom ops (same
names, schemas and autograd) instead of triton_ops.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .philox import MAX_OFFSET
from .reference import (as_runs, as_seed, check_activation, check_conv_geometry, check_residual, conv_dilation,
                        conv_pair, gather_weight, runs_format, safe_conv_args)

try:
    import triton

    from .triton_kernels import (
        bn_coefficients_kernel,
        bn_grad_input_kernel,
        bn_running_stats_kernel,
        channel_bwd_kernel,
        channel_fwd_kernel,
        channel_stats_kernel,
        gated_linear_fwd_kernel,
        philox_uniform_kernel,
        residual_bwd_kernel,
        residual_fwd_kernel,
        scatter_sums_kernel,
    )
except ImportError as err:  # the backend is simply not offered
    triton = None
    UNAVAILABLE_REASON: Optional[str] = f"triton does not import ({err})"
else:
    UNAVAILABLE_REASON = None
    try:
        from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
    except ImportError:  # what torch.library.triton_op's own op bodies use; absent: no eager path
        UNAVAILABLE_REASON = f"torch {torch.__version__} lacks torch._library.triton.set_wrap_triton_enabled"
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        UNAVAILABLE_REASON = f"torch {torch.__version__} lacks torch.library.triton_op; cadk needs torch>=2.6"

AVAILABLE = UNAVAILABLE_REASON is None
# TRITON_INTERPRET=1 at import makes @triton.jit build interpreter functions that run on CPU tensors.
INTERPRETED = AVAILABLE and not isinstance(channel_fwd_kernel, triton.runtime.JITFunction)

# Storage dtypes of activations and weights; kernels compute in fp32 (float64 is left to the other
# backends: fp64 on GPUs is slow and the interpreter too slow for gradcheck).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 2048             # elements per channel-wise step (16 fp32 per thread at 4 warps)
_TARGET_PROGRAMS = 1024  # enough programs to fill a large GPU several times over


def supports(device: torch.device | str) -> bool:
    device = torch.device(device)
    return AVAILABLE and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


_BODIES: dict = {}  # op name -> the Python function the op runs (the eager path calls it directly)


def _op(name: str, mutates: tuple = ()):
    """Register the decorated function as the op cadk::triton_<name> (when available), mutating the
    arguments named in `mutates`.

    Compiled kernels: a triton_op, so torch.compile traces into the kernels. Interpreted kernels
    cannot be traced, so the op is an opaque custom op whose fake kernel is the same function with
    the launches skipped (see wrap_triton below)."""
    def register(fn):
        _BODIES[name] = fn
        if not AVAILABLE:
            return fn
        if not INTERPRETED:
            return torch.library.triton_op(f"cadk::triton_{name}", mutates_args=mutates)(fn)
        op = torch.library.custom_op(f"cadk::triton_{name}", mutates_args=mutates)(fn)
        op.register_fake(fn)
        return op
    return register


def wrap_triton(kernel):
    """torch.library.wrap_triton for compiled kernels; for interpreted ones a launcher that runs
    them on real tensors and does nothing on fake ones (shapes come from the op body)."""
    if not INTERPRETED:
        return torch.library.wrap_triton(kernel)
    return _InterpretedLaunch(kernel)


class _InterpretedLaunch:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not any(isinstance(a, Tensor) and is_fake(a) for a in (*args, *kwargs.values())):
                self.kernel[grid](*args, **kwargs)
        return launch


# ----------------------------------------------------------------------------------------------
# Checks and small helpers
# ----------------------------------------------------------------------------------------------

def _check(cond: bool, msg) -> None:
    """torch._check (works on symbolic shapes too) with the message built only on failure; a plain
    True, the eager case, returns at once."""
    if cond is not True:
        torch._check(cond, lambda: f"cadk triton backend: {msg()}")


def _seed_on(seed: Tensor, device: torch.device) -> Tensor:
    _check(seed.dim() == 0 and seed.dtype == torch.int64,
           lambda: f"seed must be a 0-dim int64 tensor, got shape {tuple(seed.shape)} and {seed.dtype}")
    # Kernels load it, so it must live on their device (no-op when it does). A blocking copy from the
    # host would wait for the whole stream, every op; a non-blocking one from pageable memory is staged
    # at once, while one from pinned memory would read the seed later (the caller may change it).
    if seed.device == device:
        return seed
    pageable = seed.device.type == "cpu" and not is_fake(seed) and not seed.is_pinned()
    return seed.to(device, non_blocking=pageable)


def _dense(*vectors: Optional[Tensor]) -> list:
    """Per-unit vectors (theta, bias, alive, BN statistics) as the kernels read them, through a raw
    pointer with entry j at offset j: a strided view (theta[::2]) is copied, a dense one passes as is."""
    return [v if v is None else v.contiguous() for v in vectors]


def _check_input(x: Tensor, layout: str, ok_dims: bool, name: str = "x") -> None:
    _check(ok_dims, lambda: f"{name} must be {layout}, got shape {tuple(x.shape)}")
    _check(x.dtype in SUPPORTED_DTYPES,
           lambda: f"{name} dtype {x.dtype} is not supported here (use one of {SUPPORTED_DTYPES}, or another backend)")


def _check_alive(alive: Tensor, count: int, full: int, name: str, device: torch.device) -> None:
    """alive: sorted int64 indices of the `count` channels the activation holds, out of `full`."""
    _check(alive.dtype == torch.int64,
           lambda: f"{name} must be an int64 index tensor, got {alive.dtype}; build it with dtype=torch.int64")
    _check(alive.dim() == 1, lambda: f"{name} must be 1-D, got shape {tuple(alive.shape)}")
    _check(alive.device == device, lambda: f"{name} is on {alive.device} but x on {device}; move it")
    _check(alive.shape[0] == count,
           lambda: f"{name} lists {alive.shape[0]} channels but the activation has {count} (dim 1)")
    _check(count <= full, lambda: f"{name} lists {count} channels but the parameters have only {full}")
    if alive.device.type == "cpu" and count > 0 and not is_fake(alive):  # free here; on a GPU it would sync
        _check(bool(alive[0] >= 0) and bool(alive[-1] < full) and bool((alive[1:] > alive[:-1]).all()),
               lambda: f"{name} must be sorted, without repeats and within [0, {full}) "
                       f"(e.g. torch.unique(idx)), got {alive.tolist()}")


def _check_gate(theta: Optional[Tensor], n: int, units: int, device: torch.device, training: bool) -> None:
    if theta is None:
        return
    _check(theta.dim() == 1 and theta.numel() == units and theta.is_floating_point(),
           lambda: f"theta must be a float vector of the {units} output units, got shape "
                   f"{tuple(theta.shape)} and {theta.dtype}")
    _check(theta.device == device, lambda: f"theta is on {theta.device} but x on {device}; move it")
    # Only training draws gates (eval multiplies by theta), as in the other backends.
    _check(not training or n * units <= MAX_OFFSET,
           lambda: f"batch {n} x {units} units exceeds the 2^31 Philox counter range; split the batch")


def _check_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], alive_in: Tensor, alive_out: Tensor,
                 theta: Optional[Tensor], layout: str, weight_layout: str, training: bool) -> None:
    """Checks shared by gated_linear and gated_conv2d."""
    dims = layout.count(",") + 1
    _check_input(x, layout, x.dim() == dims)
    _check(weight.dim() == dims, lambda: f"weight must be {weight_layout}, got shape {tuple(weight.shape)}")
    _check(x.dtype == weight.dtype,
           lambda: f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype; cast one of them")
    _check(x.device == weight.device, lambda: f"x is on {x.device} but weight on {weight.device}; move one")
    _check_alive(alive_in, x.shape[1], weight.shape[1], "alive_in", x.device)
    _check_alive(alive_out, alive_out.shape[0], weight.shape[0], "alive_out", x.device)
    _check_gate(theta, x.shape[0], weight.shape[0], x.device, training)
    if bias is not None:  # the kernels read bias[alive_out[a]] through a raw pointer
        _check(bias.dim() == 1 and bias.numel() == weight.shape[0] and bias.dtype == x.dtype,
               lambda: f"bias must be a {x.dtype} vector of the {weight.shape[0]} output units, got shape "
                       f"{tuple(bias.shape)} and {bias.dtype}")
        _check(bias.device == x.device, lambda: f"bias is on {bias.device} but x on {x.device}; move it")


def _is_relu(activation: str) -> bool:
    check_activation(activation)
    return activation == "relu"


def _np2(v) -> int:
    """Next power of two (>= 1), a plain int. Plain Python: triton.next_power_of_2 and triton.cdiv are
    jit functions whose host calls cost microseconds each. A symbolic size (torch.compile) is compared,
    not converted: the graph then guards on the power-of-two range it lies in rather than its value, so
    pruning a unit recompiles only when an alive count crosses a power of two."""
    if isinstance(v, int):
        return 1 << (max(v, 1) - 1).bit_length()
    p = 1
    while p < v:
        p <<= 1
    return p


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _nas(t: Tensor) -> Tensor:
    """[N, A, S] view of an [N, A, ...] tensor (S: trailing dims merged); copies only if they don't merge."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _plan(v: Tensor) -> tuple[dict, int, tuple[int, int, int]]:
    """(block sizes, rows per program, grid) of a channel-wise kernel over the [N, A, S] view v.

    The [BLOCK_A, BLOCK_S] tile runs long along the contiguous dim (positions for NCHW, channels for
    channels_last and linear activations); BLOCK_R rows per step fill it up to _TILE elements when
    A * S is small; row chunks are sized to give about _TARGET_PROGRAMS programs."""
    n, a, s = v.shape
    if s == 1 or v.stride(2) != 1:
        block_a = min(_np2(a), 256, _TILE)
        block_s = min(_np2(s), max(1, _TILE // block_a))
    else:
        block_s = min(_np2(s), 1024, _TILE)
        block_a = min(_np2(a), max(1, _TILE // block_s))
    block_r = min(_np2(n), max(1, _TILE // (block_a * block_s)))
    tiles_s, tiles_a = _cdiv(s, block_s), _cdiv(a, block_a)
    chunks = max(1, min(_cdiv(n, block_r), _cdiv(_TARGET_PROGRAMS, tiles_s * tiles_a)))
    rows = _cdiv(_cdiv(n, chunks), block_r) * block_r
    blocks = dict(BLOCK_R=block_r, BLOCK_A=block_a, BLOCK_S=block_s)
    return blocks, rows, (tiles_s, _cdiv(n, rows), tiles_a)


def _scatter_sums(sums: Tensor, alive: Tensor, size: int, rows: list) -> list:
    """Full-size vectors, zero outside alive, from rows of the compact fp32 sums [K, A]: one per
    (row, dtype) in `rows` (1 to 3), written whole by one launch."""
    outs = [sums.new_empty(size, dtype=dtype) for _, dtype in rows]
    if size > 0:
        ks = [k for k, _ in rows] + [0] * (3 - len(rows))
        block = min(_np2(size), 1024)
        wrap_triton(scatter_sums_kernel)[(_cdiv(size, block),)](
            sums, alive, *(outs + [outs[0]] * (3 - len(outs))), *ks, alive.numel(), size,
            _np2(size + 1).bit_length() - 1,  # size's bit length (symbolic too): halvings for any count <= size
            OUTS=len(rows), BLOCK=block)
    return outs


def _scatter_weight(grad_c: Tensor, weight: Tensor, alive_in: Tensor, alive_out: Tensor) -> Tensor:
    """Full-size weight gradient, zero outside the alive rows/columns, from the compact grad_c."""
    full_out, full_in = alive_out.numel() == weight.shape[0], alive_in.numel() == weight.shape[1]
    if full_out and full_in:
        return grad_c.to(weight.dtype)
    out = weight.new_zeros(weight.shape)
    if full_out:
        return out.index_copy_(1, alive_in, grad_c.to(weight.dtype))
    if full_in:
        return out.index_copy_(0, alive_out, grad_c.to(weight.dtype))
    return out.index_put_((alive_out[:, None], alive_in[None, :]), grad_c.to(weight.dtype))


def _scatter_bias_theta(sums: Tensor, alive: Tensor, size: int, has_bias: bool, bias_dtype: torch.dtype,
                        theta: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Full-size bias and theta gradients from sums rows 0 and 1 (empty tensors where there is none)."""
    rows = ([(0, bias_dtype)] if has_bias else []) + ([(1, theta.dtype)] if theta is not None else [])
    outs = _scatter_sums(sums, alive, size, rows) if rows else []
    grad_b = outs.pop(0) if has_bias else sums.new_empty(0, dtype=bias_dtype)
    return grad_b, (outs.pop(0) if theta is not None else sums.new_empty(0, dtype=bias_dtype))


def _gather_vec(v: Optional[Tensor], alive: Tensor) -> Optional[Tensor]:
    return v if v is None or alive.numel() == v.shape[0] else v.index_select(0, alive)


def _per_channel_count(x: Tensor) -> int:
    return x.shape[0] * math.prod(x.shape[2:])


# ----------------------------------------------------------------------------------------------
# Channel-wise kernels: gate/act epilogue, its backward prologue, BN statistics and BN input grad
# ----------------------------------------------------------------------------------------------

def _channel_fwd(z: Tensor, theta: Optional[Tensor], alive: Tensor, seed: Tensor, training: bool,
                 relu: bool, *, shift: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None, store_pre: bool = True,
                 reuse_z: bool = False) -> tuple[Tensor, Tensor]:
    """(y, pre) with pre = act((z - mean) * scale + shift), y = xi * pre over z's channels (dim 1).

    pre is empty when there is no gate (y is pre) or store_pre is False. reuse_z: z is a temporary
    of the caller's; if dense (then y's strides are z's), pre (or y without a gate) overwrites it."""
    z3 = _nas(z)
    has_gate = theta is not None
    store_pre = has_gate and store_pre
    dense = z.is_contiguous() or (z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last))
    reuse_z = reuse_z and dense
    # y is allocated whole and written through its [N, A, S] view: returning a view of a temporary
    # would make autograd refuse in-place updates of the output (out += shortcut).
    if reuse_z and not has_gate:
        y = z
    else:
        y = torch.empty_like(z) if dense else torch.empty_like(z, memory_format=torch.contiguous_format)
    y3 = _nas(y)
    # The kernel stores pre at y's offsets: a buffer of its own takes y3's strides (z3's differ when z is
    # dense in another order, e.g. a transposed [N, C, L]); a reused z has y's strides (y = empty_like(z)).
    pre3 = (z3 if reuse_z else torch.empty_like(y3)) if store_pre else y3.new_empty(0)
    if z3.numel() > 0:
        n, a, s = z3.shape
        blocks, rows, grid = _plan(z3)
        wrap_triton(channel_fwd_kernel)[grid](
            z3, y3, pre3 if store_pre else z3,
            z3 if mean is None else mean, z3 if scale is None else scale, z3 if shift is None else shift,
            z3 if theta is None else theta, alive, seed,
            n, a, s, 0 if theta is None else theta.numel(), rows,
            *_strides(z3), *_strides(y3),
            HAS_NORM=mean is not None, HAS_SHIFT=shift is not None, RELU=relu,
            HAS_GATE=has_gate, TRAINING=training, STORE_PRE=store_pre, **blocks)
    return y, (pre3.view(z.shape) if store_pre else pre3)


def _channel_bwd(grad_y: Tensor, pre: Tensor, theta: Optional[Tensor], alive: Tensor, seed: Tensor,
                 training: bool, relu: bool, *, store_g: bool = True, sum_g: bool = False,
                 x: Optional[Tensor] = None, mean: Optional[Tensor] = None, var: Optional[Tensor] = None,
                 eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """(g, sums): g = dy * xi * act'(pre) in pre's layout, sums [3, A] fp32 per channel:
    sum(g) (if sum_g), sum(dy * pre) (with a gate), sum(g * (x - mean) * rsqrt(var + eps)) (if x is
    given).

    pre is the pre-gate output, or y when there is no gate."""
    gy3, p3 = _nas(grad_y), _nas(pre)
    x3 = _nas(x) if x is not None else p3
    g3 = torch.empty_like(p3) if store_g else p3.new_empty(0)
    n, a, s = p3.shape
    if p3.numel() == 0 or not (store_g or sum_g or theta is not None or x is not None):
        return g3.view(pre.shape) if store_g else g3, p3.new_zeros((3, a), dtype=torch.float32)
    blocks, rows, grid = _plan(p3)
    num_parts = grid[0] * grid[1]
    part = p3.new_empty((3, num_parts, a), dtype=torch.float32)
    wrap_triton(channel_bwd_kernel)[grid](
        gy3, p3, x3, g3 if store_g else gy3, part,
        gy3 if mean is None else mean, gy3 if var is None else var, eps,
        gy3 if theta is None else theta, alive, seed,
        n, a, s, 0 if theta is None else theta.numel(), rows, num_parts,
        *_strides(gy3), *_strides(p3), *_strides(x3), *_strides(g3 if store_g else gy3),
        RELU=relu, HAS_GATE=theta is not None, TRAINING=training, HAS_NORM=x is not None,
        STORE_G=store_g, SUM_G=sum_g, **blocks)
    return (g3.view(pre.shape) if store_g else g3), part.sum(1)


def _prologue(grad_y: Tensor, pre: Tensor, theta: Optional[Tensor], alive: Tensor, seed: Tensor,
              training: bool, relu: bool, has_bias: bool) -> tuple[Tensor, Tensor]:
    """(grad wrt the pre-activation output, per-channel sums) of a linear / conv epilogue.

    Without gate and ReLU that gradient is grad_y itself: only the bias sum needs a kernel."""
    passthrough = theta is None and not relu
    g, sums = _channel_bwd(grad_y, pre, theta, alive, _seed_on(seed, pre.device), training, relu,
                           store_g=not passthrough, sum_g=has_bias)
    return (grad_y if passthrough else g), sums


def _bn_coefficients(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                     alive: Tensor, eps: float, training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, var, scale, shift) per alive channel, fp32 [A]: batch statistics of x over (N, spatial)
    (biased variance) in training, running ones in eval; scale = weight * rsqrt(var + eps), shift = bias."""
    x3 = _nas(x)
    n, a, s = x3.shape
    mean, var, scale, shift = (x3.new_empty(a, dtype=torch.float32) for _ in range(4))
    if a == 0:
        return mean, var, scale, shift
    part, num_parts = x3, 0
    if training:
        blocks, rows, grid = _plan(x3)
        num_parts = grid[0] * grid[1]
        part = x3.new_empty((2, num_parts, a), dtype=torch.float32)
        wrap_triton(channel_stats_kernel)[grid](x3, part, n, a, s, rows, num_parts, *_strides(x3), **blocks)
    block = min(_np2(a), 256)
    wrap_triton(bn_coefficients_kernel)[(_cdiv(a, block),)](
        part, x3, x3.stride(1), num_parts, n * s, running_mean, running_var, running_mean.stride(0),
        running_var.stride(0), weight, bias, alive, eps, mean, var, scale, shift, a,
        TRAINING=training, BLOCK=block)
    return mean, var, scale, shift


def _bn_grad_input(g: Tensor, x: Tensor, weight: Tensor, alive: Tensor, mean: Tensor, var: Tensor, sums: Tensor,
                   eps: float, training: bool) -> Tensor:
    """BatchNorm's input gradient from g = dL/d(BN output), in x's layout (see bn_grad_input_kernel)."""
    g3, x3 = _nas(g), _nas(x)
    dx3 = torch.empty_like(x3)
    n, a, s = x3.shape
    blocks, rows, grid = _plan(x3)
    wrap_triton(bn_grad_input_kernel)[grid](
        g3, x3, dx3, weight, alive, mean, var, sums, eps, torch.sym_max(n * s, 1), n, a, s, rows,
        *_strides(g3), *_strides(x3), *_strides(dx3), TRAINING=training, **blocks)
    return dx3.view(x.shape)


# ----------------------------------------------------------------------------------------------
# gate_apply
# ----------------------------------------------------------------------------------------------

@_op("gate_apply_fwd")
def gate_apply_fwd(pre: Tensor, theta: Tensor, alive: Tensor, seed: Tensor, training: bool) -> Tensor:
    _check_input(pre, "[N, units, ...]", pre.dim() >= 2, "pre")
    _check_alive(alive, pre.shape[1], theta.numel(), "alive", pre.device)
    _check_gate(theta, pre.shape[0], theta.numel(), pre.device, training)
    theta, alive = _dense(theta, alive)
    y, _ = _channel_fwd(pre, theta, alive, _seed_on(seed, pre.device), training, False, store_pre=False)
    return y


@_op("gate_apply_bwd")
def gate_apply_bwd(grad_y: Tensor, pre: Tensor, theta: Tensor, alive: Tensor, seed: Tensor,
                   training: bool) -> tuple[Tensor, Tensor]:
    theta, alive = _dense(theta, alive)
    g, sums = _channel_bwd(grad_y, pre, theta, alive, _seed_on(seed, pre.device), training, False)
    return g, _scatter_sums(sums, alive, theta.numel(), [(1, theta.dtype)])[0]


# ----------------------------------------------------------------------------------------------
# gated_residual: one pass forward, one backward
# ----------------------------------------------------------------------------------------------

def _runs(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """t made dense in fmt (the branch's format, so that example n is the same run of positions in
    every operand) as an [N, 1, M] view."""
    return as_runs(t.contiguous(memory_format=fmt), fmt)


@_op("gated_residual_fwd")
def gated_residual_fwd(shortcut: Tensor, branch: Tensor, theta: Tensor, alive: Tensor, seed: Tensor,
                       training: bool) -> Tensor:
    check_residual(shortcut, branch, alive)
    _check_input(branch, "[N, ...]", branch.dim() >= 1, "branch")
    _check(shortcut.device == branch.device,
           lambda: f"shortcut is on {shortcut.device} but branch on {branch.device}; move one")
    _check_alive(alive, 1, theta.numel(), "alive", branch.device)
    _check_gate(theta, branch.shape[0], theta.numel(), branch.device, training)
    theta, alive = _dense(theta, alive)
    fmt = runs_format(branch)
    y = torch.empty_like(branch, memory_format=fmt)
    b3, s3, y3 = _runs(branch, fmt), _runs(shortcut, fmt), _runs(y, fmt)
    if y.numel() > 0:
        blocks, rows, grid = _plan(b3)
        wrap_triton(residual_fwd_kernel)[grid[:2]](
            s3, b3, y3, theta, alive, _seed_on(seed, branch.device), b3.shape[0], b3.shape[2], theta.numel(), rows,
            TRAINING=training, BLOCK_R=blocks["BLOCK_R"], BLOCK_S=blocks["BLOCK_S"])
    return y


@_op("gated_residual_bwd")
def gated_residual_bwd(grad_y: Tensor, y: Tensor, branch: Tensor, theta: Tensor, alive: Tensor, seed: Tensor,
                       training: bool) -> tuple[Tensor, Tensor, Tensor]:
    theta, alive = _dense(theta, alive)
    fmt = runs_format(branch)
    grad_shortcut = torch.empty_like(branch, memory_format=fmt)
    grad_branch = torch.empty_like(branch, memory_format=fmt)
    if branch.numel() == 0:
        return grad_shortcut, grad_branch, torch.zeros_like(theta)
    gy3, y3, b3 = _runs(grad_y, fmt), _runs(y, fmt), _runs(branch, fmt)
    blocks, rows, grid = _plan(b3)
    part = b3.new_empty(grid[0] * grid[1], dtype=torch.float32)
    wrap_triton(residual_bwd_kernel)[grid[:2]](
        gy3, y3, b3, _runs(grad_shortcut, fmt), _runs(grad_branch, fmt), part, theta, alive,
        _seed_on(seed, branch.device), b3.shape[0], b3.shape[2], theta.numel(), rows,
        TRAINING=training, BLOCK_R=blocks["BLOCK_R"], BLOCK_S=blocks["BLOCK_S"])
    return grad_shortcut, grad_branch, _scatter_sums(part.sum().view(1, 1), alive, theta.numel(),
                                                     [(0, theta.dtype)])[0]


# ----------------------------------------------------------------------------------------------
# gated_linear
# ----------------------------------------------------------------------------------------------

def _allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 tl.dot follows torch's matmul setting: exact ("ieee") unless TF32 is allowed."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


# How gated_linear's forward multiplies. "torch": W's alive block gathered, torch.addmm (cuBLAS on a
# GPU), then the gate/act epilogue kernel. "fused": one Triton gather-GEMM with the epilogue inside:
# fewer host calls, but its fp32 dot (exact, no TF32) runs far below cuBLAS. "auto" (default) takes
# torch for fp32 products of at least _TORCH_MATMUL_MACS multiply-adds, else fused: on an H200 (keep
# 0.5, forward+backward) fused took 0.87x (fp32) and 0.80x (bf16) torch's time at 512x512x512, 0.80x at
# 4096x2048x2048 in bf16 and 1.63x in fp32; 1.05x at 4096x1024x1024 fp32 (README, GPU section).
LINEAR_MATMULS = ("auto", "torch", "fused")
LINEAR_MATMUL = os.environ.get("CADK_TRITON_LINEAR", "auto")
if LINEAR_MATMUL not in LINEAR_MATMULS:
    raise ValueError(f"CADK_TRITON_LINEAR={LINEAR_MATMUL!r}: use one of {LINEAR_MATMULS}")
_TORCH_MATMUL_MACS = 2**31


def _linear_matmul(n: int, k: int, a: int, dtype: torch.dtype) -> str:
    if LINEAR_MATMUL != "auto":
        return LINEAR_MATMUL
    return "torch" if dtype == torch.float32 and n * k * a >= _TORCH_MATMUL_MACS else "fused"


def _linear_blocks(n: int, a: int, dtype: torch.dtype) -> tuple[int, int, int]:
    block_m = min(max(_np2(n), 16), 64)
    block_n = min(max(_np2(a), 16), 64)
    return block_m, block_n, 32 if dtype == torch.float32 else 64


@_op("gated_linear_fwd")
def gated_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], theta: Optional[Tensor],
                     alive_in: Tensor, alive_out: Tensor, seed: Tensor, activation: str,
                     training: bool) -> tuple[Tensor, Tensor]:
    _check_dense(x, weight, bias, alive_in, alive_out, theta, "[N, alive_in.numel()]", "[out, in]", training)
    bias, theta, alive_out = _dense(bias, theta, alive_out)
    relu = _is_relu(activation)
    n, k, a = x.shape[0], x.shape[1], alive_out.numel()
    y = x.new_empty((n, a))
    pre = x.new_empty((n, a) if theta is not None else (0,))
    if n == 0 or a == 0:
        return y, pre
    if k == 0 or _linear_matmul(n, k, a, x.dtype) == "torch":  # k == 0: the fused kernel needs inputs
        b = _gather_vec(bias, alive_out)
        w = gather_weight(weight, alive_in, alive_out).t()
        z = torch.mm(x, w) if b is None else torch.addmm(b, x, w)  # F.linear's rounding
        if theta is None and not relu:
            return z, pre
        return _channel_fwd(z, theta, alive_out, _seed_on(seed, x.device), training, relu, reuse_z=True)
    w = weight if k == weight.shape[1] else weight.index_select(1, alive_in)
    block_m, block_n, block_k = _linear_blocks(n, a, x.dtype)
    grid = (_cdiv(n, block_m), _cdiv(a, block_n))
    wrap_triton(gated_linear_fwd_kernel)[grid](
        x, w, x if bias is None else bias, y, pre if theta is not None else x,
        x if theta is None else theta, alive_out, _seed_on(seed, x.device),
        n, a, k, weight.shape[0],
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        GATHER_OUT=a != weight.shape[0], HAS_BIAS=bias is not None, RELU=relu,
        HAS_GATE=theta is not None, TRAINING=training,
        ALLOW_TF32=_allow_tf32(x.dtype),
        UPCAST_DOT=INTERPRETED and x.dtype == torch.bfloat16,  # the interpreter's dot lacks bf16
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y, pre


@_op("gated_linear_bwd")
def gated_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, pre: Tensor, theta: Optional[Tensor],
                     alive_in: Tensor, alive_out: Tensor, seed: Tensor, activation: str, training: bool,
                     has_bias: bool, need_grad_x: bool = True,
                     need_grad_weight: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    theta, alive_out = _dense(theta, alive_out)
    g, sums = _prologue(grad_y, pre, theta, alive_out, seed, training, _is_relu(activation), has_bias)
    grad_x = torch.mm(g, gather_weight(weight, alive_in, alive_out)) if need_grad_x else x.new_empty(0)
    grad_w = (_scatter_weight(torch.mm(g.t(), x), weight, alive_in, alive_out) if need_grad_weight
              else x.new_empty(0))
    c_out = weight.shape[0]
    grad_b, grad_theta = _scatter_bias_theta(sums, alive_out, c_out, has_bias, weight.dtype, theta)
    return grad_x, grad_w, grad_b, grad_theta


# ----------------------------------------------------------------------------------------------
# gated_conv2d
# ----------------------------------------------------------------------------------------------

def _conv_out_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> list[int]:
    return [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


@_op("gated_conv2d_fwd")
def gated_conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], theta: Optional[Tensor],
                     alive_in: Tensor, alive_out: Tensor, seed: Tensor, stride: list[int],
                     padding: list[int], dilation: list[int], activation: str,
                     training: bool) -> tuple[Tensor, Tensor]:
    _check_dense(x, weight, bias, alive_in, alive_out, theta, "[N, alive_in.numel(), H, W]",
                 "[out, in, kh, kw]", training)
    check_conv_geometry(stride, padding, dilation)  # not left to F.conv2d: the path without a conv divides by it
    bias, theta, alive_out = _dense(bias, theta, alive_out)
    relu = _is_relu(activation)
    b = _gather_vec(bias, alive_out)
    if x.shape[0] == 0 or x.shape[1] == 0 or alive_out.numel() == 0:
        # No conv to run; torch's conv rejects zero output channels and mis-shapes zero inputs.
        hw = _conv_out_hw(x, weight, stride, padding, dilation)
        _check(hw[0] > 0 and hw[1] > 0,
               lambda: f"gated_conv2d: padded input {tuple(x.shape[2:])} + 2 * {tuple(padding)} is smaller than the "
                       f"(dilated) kernel {tuple(weight.shape[2:])}: Kernel size can't be greater than actual input size")
        z = x.new_zeros((x.shape[0], alive_out.numel(), *hw))
        shift = b
    else:
        # The bias goes to the conv, which adds it before rounding to x's dtype as F.conv2d does.
        xs, w = safe_conv_args(x, gather_weight(weight, alive_in, alive_out), stride, padding, dilation)
        z = F.conv2d(xs, w, b, stride, padding, conv_dilation(w, dilation))
        shift = None
    if theta is None and not relu and shift is None:
        return z, z.new_empty(0)
    return _channel_fwd(z, theta, alive_out, _seed_on(seed, x.device), training, relu, shift=shift,
                        reuse_z=True)


@_op("gated_conv2d_bwd")
def gated_conv2d_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, pre: Tensor, theta: Optional[Tensor],
                     alive_in: Tensor, alive_out: Tensor, seed: Tensor, stride: list[int],
                     padding: list[int], dilation: list[int], activation: str, training: bool,
                     has_bias: bool, need_grad_x: bool = True,
                     need_grad_weight: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    theta, alive_out = _dense(theta, alive_out)
    g, sums = _prologue(grad_y, pre, theta, alive_out, seed, training, _is_relu(activation), has_bias)
    grad_x = grad_wc = None
    if need_grad_x or need_grad_weight:  # a frozen layer on data needs only the sums above
        x, w = safe_conv_args(x, gather_weight(weight, alive_in, alive_out), stride, padding, dilation)
        if g.numel() == 0 or x.numel() == 0:
            grad_x, grad_wc = torch.zeros_like(x), torch.zeros_like(w)
        else:
            grad_x, grad_wc, _ = torch.ops.aten.convolution_backward(
                g, x, w, None, stride, padding, dilation, False, [0, 0], 1, [need_grad_x, need_grad_weight, False])
    c_out = weight.shape[0]
    grad_x = grad_x if need_grad_x else x.new_empty(0)
    grad_w = _scatter_weight(grad_wc, weight, alive_in, alive_out) if need_grad_weight else x.new_empty(0)
    grad_b, grad_theta = _scatter_bias_theta(sums, alive_out, c_out, has_bias, weight.dtype, theta)
    return grad_x, grad_w, grad_b, grad_theta


# ----------------------------------------------------------------------------------------------
# bn_gate_act
# ----------------------------------------------------------------------------------------------

def _check_bn_vectors(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                      device: torch.device) -> None:
    """The kernels index these by unit: one entry per unit each, 1-D, on x's device. The running
    statistics (buffers of the BN layer) give the unit count, so a wrong-sized weight is named as such."""
    units = running_mean.numel()
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check(v.dim() == 1 and v.numel() == units and v.is_floating_point(),
               lambda: f"bn_gate_act: {name} must be a float vector of the {units} units, got shape "
                       f"{tuple(v.shape)} and {v.dtype}")
        _check(v.device == device, lambda: f"bn_gate_act: {name} is on {v.device} but x on {device}; move it")


@_op("bn_gate_act_fwd")
def bn_gate_act_fwd(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                    theta: Optional[Tensor], alive: Tensor, seed: Tensor, eps: float, activation: str,
                    training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_input(x, "[N, alive.numel(), ...]", x.dim() >= 2)
    _check_bn_vectors(weight, bias, running_mean, running_var, x.device)  # first: the others take its count
    _check_alive(alive, x.shape[1], weight.numel(), "alive", x.device)
    _check_gate(theta, x.shape[0], weight.numel(), x.device, training)
    _check(not training or _per_channel_count(x) > 0,
           lambda: f"batch statistics need values, got input shape {tuple(x.shape)}")
    weight, bias, theta, alive = _dense(weight, bias, theta, alive)
    mean, var, scale, shift = _bn_coefficients(x, weight, bias, running_mean, running_var, alive, eps, training)
    y, pre = _channel_fwd(x, theta, alive, _seed_on(seed, x.device), training, _is_relu(activation),
                          mean=mean, scale=scale, shift=shift)
    return y, pre, mean, var


@_op("bn_gate_act_bwd")
def bn_gate_act_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, pre: Tensor, mean: Tensor, var: Tensor,
                    theta: Optional[Tensor], alive: Tensor, seed: Tensor, eps: float, activation: str,
                    training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    weight, mean, var, theta, alive = _dense(weight, mean, var, theta, alive)
    g, sums = _channel_bwd(grad_y, pre, theta, alive, _seed_on(seed, x.device), training,
                           _is_relu(activation), sum_g=True, x=x, mean=mean, var=var, eps=eps)
    grad_x = (_bn_grad_input(g, x, weight, alive, mean, var, sums, eps, training) if x.numel()
              else torch.zeros_like(x))
    c = weight.numel()
    rows = [(2, weight.dtype), (0, weight.dtype)] + ([(1, theta.dtype)] if theta is not None else [])
    grads = _scatter_sums(sums, alive, c, rows)
    return grad_x, grads[0], grads[1], grads[2] if theta is not None else x.new_empty(0)


@_op("bn_running_stats_", mutates=("running_mean", "running_var"))
def bn_running_stats_(running_mean: Tensor, running_var: Tensor, alive: Tensor, mean: Tensor, var: Tensor,
                      momentum: float, count: int) -> None:
    """nn.BatchNorm2d's running-statistics update (unbiased variance) at the alive entries, in one launch."""
    # The kernel indexes the running statistics through alive and reads A fp32 entries of mean and var.
    _check(running_mean.dim() == 1 and running_var.shape == running_mean.shape,
           lambda: f"bn_running_stats_: running_mean {tuple(running_mean.shape)} and running_var "
                   f"{tuple(running_var.shape)} must be vectors of one shape")
    _check(mean.dim() == 1 and var.shape == mean.shape and mean.dtype == var.dtype == torch.float32,
           lambda: f"bn_running_stats_: mean {tuple(mean.shape)} {mean.dtype} and var {tuple(var.shape)} {var.dtype} "
                   "must be float32 vectors of one shape (bn_gate_act_fwd's batch statistics)")
    _check(count > 1, lambda: f"bn_running_stats_: count (values per channel) must exceed 1, got {count}")
    _check_alive(alive, mean.shape[0], running_mean.shape[0], "alive", running_mean.device)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        # an expanded vector: every entry would take the last write, where the reference's in-place ops refuse
        _check(t.numel() < 2 or t.stride(0) != 0, lambda: f"bn_running_stats_: entries of {name} share memory "
               f"(an expanded tensor?), so updating them in place would lose updates; pass {name}.clone()")
    a = alive.numel()
    if a > 0:
        alive, mean, var = _dense(alive, mean, var)
        block = min(_np2(a), 256)
        wrap_triton(bn_running_stats_kernel)[(_cdiv(a, block),)](
            running_mean, running_var, running_mean.stride(0), running_var.stride(0), alive, mean, var, a,
            momentum, count / (count - 1), BLOCK=block)


# ----------------------------------------------------------------------------------------------
# Autograd: forward ops save what their backward op needs; gates are regenerated from the seed
# ----------------------------------------------------------------------------------------------

def _backward_op(ctx, name: str):
    """The backward op a formula calls: its body on the eager path, else the registered op. Neither
    has derivatives of its own, so a backward that would record a graph stops here."""
    _check(not torch.is_grad_enabled(), lambda: "ops have no second derivatives: backward with "
           "create_graph=True (double backward) is not supported")
    return _BODIES[name] if getattr(ctx, "eager", False) else getattr(torch.ops.cadk, f"triton_{name}")


def _saved_pre(theta: Optional[Tensor], activation: str, y: Tensor, pre: Tensor) -> Optional[Tensor]:
    """What a backward reads as pre: pre; y without a gate (there y is pre); nothing without a gate and
    an activation, where no backward reads it (then y may be updated in place: out += shortcut)."""
    if theta is None:
        return y if _is_relu(activation) else None
    return pre


def _saved(ctx, grad_y: Tensor) -> tuple:
    """ctx.saved_tensors with grad_y standing in for an unsaved pre (same shape; its values go unread)."""
    saved = ctx.saved_tensors
    return saved if saved[2] is not None else (*saved[:2], grad_y, *saved[3:])


def _gate_apply_setup(ctx, inputs, output):
    pre, theta, alive, seed, training = inputs
    ctx.save_for_backward(pre, theta, alive, seed)
    ctx.training = training


def _gate_apply_backward(ctx, grad_y):
    pre, theta, alive, seed = ctx.saved_tensors
    grad_pre, grad_theta = _backward_op(ctx, "gate_apply_bwd")(grad_y, pre, theta, alive, seed, ctx.training)
    return grad_pre, grad_theta, None, None, None


def _residual_setup(ctx, inputs, output):
    _shortcut, branch, theta, alive, seed, training = inputs
    ctx.save_for_backward(output, branch, theta, alive, seed)
    ctx.training = training


def _residual_backward(ctx, grad_y):
    y, branch, theta, alive, seed = ctx.saved_tensors
    grads = _backward_op(ctx, "gated_residual_bwd")(grad_y, y, branch, theta, alive, seed, ctx.training)
    return (*grads, None, None, None)


def _dense_setup(ctx, inputs, output):
    x, weight, bias, theta, alive_in, alive_out, seed = inputs[:7]
    y, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, weight, _saved_pre(theta, inputs[-2], y, pre), theta, alive_in, alive_out, seed)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_theta = theta is not None  # saved_tensors may be read once only (non-reentrant checkpoint)
    ctx.args = inputs[7:]  # (activation, training) or (stride, padding, dilation, activation, training)


def _needs_grad(ctx) -> tuple[bool, bool]:
    """Whether x and weight need gradients (the eager path's inputs start with the op's name)."""
    return tuple(ctx.needs_input_grad[1:3] if getattr(ctx, "eager", False) else ctx.needs_input_grad[:2])


def _dense_grads(ctx, grads):
    grad_x, grad_w, grad_b, grad_theta = grads
    need_x, need_w = _needs_grad(ctx)
    return (grad_x if need_x else None, grad_w if need_w else None,
            None if ctx.bias_dtype is None else grad_b.to(ctx.bias_dtype),
            grad_theta if ctx.has_theta else None) + (None,) * (3 + len(ctx.args))


def _linear_backward(ctx, grad_y, _grad_pre):
    grads = _backward_op(ctx, "gated_linear_bwd")(grad_y, *_saved(ctx, grad_y), *ctx.args,
                                                     ctx.bias_dtype is not None, *_needs_grad(ctx))
    return _dense_grads(ctx, grads)


def _conv_backward(ctx, grad_y, _grad_pre):
    grads = _backward_op(ctx, "gated_conv2d_bwd")(grad_y, *_saved(ctx, grad_y), *ctx.args,
                                                     ctx.bias_dtype is not None, *_needs_grad(ctx))
    return _dense_grads(ctx, grads)


def _bn_setup(ctx, inputs, output):
    x, weight, bias, _rm, _rv, theta, alive, seed, eps, activation, training = inputs
    y, pre, mean, var = output
    ctx.mark_non_differentiable(pre, mean, var)
    ctx.save_for_backward(x, weight, _saved_pre(theta, activation, y, pre), mean, var, theta, alive, seed)
    ctx.args = (eps, activation, training)
    ctx.bias_dtype = bias.dtype
    ctx.has_theta = theta is not None


def _bn_backward(ctx, grad_y, _grad_pre, _grad_mean, _grad_var):
    grad_x, grad_w, grad_b, grad_theta = _backward_op(ctx, "bn_gate_act_bwd")(
        grad_y, *_saved(ctx, grad_y), *ctx.args)
    return (grad_x, grad_w, grad_b.to(ctx.bias_dtype), None, None, grad_theta if ctx.has_theta else None,
            None, None, None, None, None)


# op -> (setup_context, backward): registered with the forward ops, and used by the eager path.
_AUTOGRAD = {"gate_apply": (_gate_apply_setup, _gate_apply_backward),
             "gated_residual": (_residual_setup, _residual_backward),
             "gated_linear": (_dense_setup, _linear_backward),
             "gated_conv2d": (_dense_setup, _conv_backward),
             "bn_gate_act": (_bn_setup, _bn_backward)}
if AVAILABLE:
    for _fwd_op, (_setup, _backward) in zip((gate_apply_fwd, gated_residual_fwd, gated_linear_fwd, gated_conv2d_fwd,
                                             bn_gate_act_fwd), _AUTOGRAD.values()):
        _fwd_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# Eager path: the same bodies and formulas without the dispatcher's custom-op machinery
# ----------------------------------------------------------------------------------------------

class _EagerOp(torch.autograd.Function):
    """Runs an op's forward body and its autograd formula (setup_context, backward) as a plain
    autograd.Function, launching kernels directly. In eager mode the custom-op path (argument
    defaults, redispatch, alias checks, the traceable kernel wrapper) cost more host time than the
    bodies themselves; torch.compile, fake tensors and dispatch modes keep the registered ops."""

    @staticmethod
    def forward(ctx, name, *inputs):
        with _direct_launches():
            output = _BODIES[f"{name}_fwd"](*inputs)
        setup, _ = _AUTOGRAD[name]
        setup(ctx, inputs, output)
        ctx.eager, ctx.name = True, name
        ctx.set_materialize_grads(False)  # the non-differentiable outputs' grads stay None, unallocated
        return output

    @staticmethod
    def backward(ctx, grad_y, *_unused):  # grad_y is set: y is the only differentiable output
        _, backward = _AUTOGRAD[ctx.name]
        with _direct_launches():
            return (None, *backward(ctx, grad_y, *_unused))


def _direct_launches():
    """Kernel launches go straight to Triton (what triton_op does inside its op bodies)."""
    return _set_wrap_triton_enabled(False)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _eager(tensors: tuple) -> bool:
    """Whether the eager path may run: not compiling, no dispatch mode (fake tensors, functionalization,
    make_fx) active, plain tensors only."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) in _PLAIN_TENSORS for t in tensors))


def _run_op(name: str, args: tuple, eager: bool):
    """cadk::triton_<name>_fwd on args: the eager path if `eager` (see _eager), else the op. Triton
    launches on the current CUDA device: with inputs on another GPU it is made current for the call
    (autograd's backward runs on a thread whose current device is the inputs')."""
    with _inputs_device(args[0]):
        if eager:
            return _EagerOp.apply(name, *args)
        return getattr(torch.ops.cadk, f"triton_{name}_fwd")(*args)


def _inputs_device(x: Tensor):
    """torch.cuda.device(x's GPU) when that is not the current one, else a no-op context. Compiled code
    sets its own device guards."""
    if torch.compiler.is_compiling() or x.device.type != "cuda" or x.device.index is None:
        return contextlib.nullcontext()
    if x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device.index)


# ----------------------------------------------------------------------------------------------
# The backend's ops (signatures of reference.py)
# ----------------------------------------------------------------------------------------------

def gate_apply(pre, theta, alive, seed, training: bool):
    return _run_op("gate_apply", (pre, theta, alive, as_seed(seed), training), _eager((pre, theta)))


def gated_residual(shortcut, branch, theta, alive, seed, training: bool):
    return _run_op("gated_residual", (shortcut, branch, theta, alive, as_seed(seed), training),
                   _eager((shortcut, branch, theta)))


def gated_linear(x, weight, bias, theta, alive_in, alive_out, seed, activation: str = "none",
                 training: bool = True):
    y, _ = _run_op("gated_linear", (x, weight, bias, theta, alive_in, alive_out, as_seed(seed), activation, training),
                   _eager((x, weight, bias, theta)))
    return y


def gated_conv2d(x, weight, bias, theta, alive_in, alive_out, seed, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), activation: str = "none", training: bool = True):
    y, _ = _run_op("gated_conv2d", (x, weight, bias, theta, alive_in, alive_out, as_seed(seed), conv_pair(stride),
                                    conv_pair(padding), conv_pair(dilation), activation, training),
                   _eager((x, weight, bias, theta)))
    return y


def bn_gate_act(x, weight, bias, running_mean, running_var, theta, alive, seed, momentum: float = 0.1,
                eps: float = 1e-5, activation: str = "relu", training: bool = True):
    count = _per_channel_count(x)
    if training and count <= 1:
        raise ValueError(f"cadk bn_gate_act: training needs more than 1 value per channel, got input "
                         f"shape {tuple(x.shape)}; use a larger batch or eval mode")
    weight = weight if weight is not None else x.new_ones(running_mean.shape, dtype=torch.float32)
    bias = bias if bias is not None else x.new_zeros(running_mean.shape, dtype=torch.float32)
    eager = _eager((x, weight, bias, theta, running_mean, running_var))  # one path for the op and the update
    y, _, mean, var = _run_op("bn_gate_act", (x, weight, bias, running_mean, running_var, theta, alive, as_seed(seed),
                                              eps, activation, training), eager)
    if training:
        args = (running_mean, running_var, alive, mean, var, momentum, count)
        if eager:
            with _direct_launches():
                _BODIES["bn_running_stats_"](*args)
            for t in (running_mean, running_var):  # as in-place ops and the registered op do
                torch.autograd.graph.increment_version(t)
        else:
            torch.ops.cadk.triton_bn_running_stats_(*args)
    return y


def sample_gates(seed: Tensor, n: int, theta: Tensor, alive: Tensor) -> Tensor:
    """Gates of this backend as an [n, len(alive)] tensor in theta's dtype (cf. philox.sample_gates)."""
    ones = torch.ones((n, alive.numel()), dtype=torch.float32, device=theta.device)
    return gate_apply(ones, theta.detach(), alive, seed, True).to(theta.dtype)


def uniform(seed: Tensor, counter: Tensor, lane: Tensor) -> Tensor:
    """This backend's float32 uniforms for int counters and word lanes 0..3 (cf. philox.uniform)."""
    out = torch.empty(counter.shape, dtype=torch.float32, device=counter.device)
    if counter.numel():
        block = 1024
        lane = lane.to(counter.device).broadcast_to(counter.shape).contiguous()
        philox_uniform_kernel[(_cdiv(counter.numel(), block),)](
            _seed_on(seed, counter.device), counter.contiguous(), lane, out, counter.numel(), BLOCK=block)
    return out
