"""FLOP formulas for cadk's ops, so torch.utils.flop_counter.FlopCounterMode counts gated layers.

They count what the kernels compute: the GEMM / convolution over alive input and output channels
only (2 FLOPs per multiply-add, as FlopCounterMode counts aten ops); a backward op computes the
input and the weight gradient, twice the forward (once when the input or the weight needs none, not
at all when neither does). Elementwise ops (gate, BN, activation) count 0,
as FlopCounterMode counts their aten counterparts.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula


def _linear_fwd(x, weight, bias, theta, alive_in, alive_out, *rest, out_shape=None, **kw) -> int:
    return 2 * x[0] * alive_in[0] * alive_out[0]


def _gradients(rest, need_grad_x_at: int, kw) -> int:
    """How many GEMM-sized products a backward op computes: one per gradient of x and weight it is asked for."""
    def wanted(name, at):
        return bool(kw.get(name, rest[at] if len(rest) > at else True))
    return int(wanted("need_grad_x", need_grad_x_at)) + int(wanted("need_grad_weight", need_grad_x_at + 1))


def _linear_bwd(grad_y, x, weight, pre, theta, alive_in, alive_out, *rest, out_shape=None, **kw) -> int:
    # rest: seed, activation, training, has_bias, need_grad_x, need_grad_weight
    return _gradients(rest, 4, kw) * _linear_fwd(x, weight, None, theta, alive_in, alive_out)


def _conv_fwd(x, weight, bias, theta, alive_in, alive_out, *rest, out_shape=None, **kw) -> int:
    y_shape = out_shape[0]
    return conv_flop_count(list(x), [alive_out[0], alive_in[0], *weight[2:]], list(y_shape))


def _conv_bwd(grad_y, x, weight, pre, theta, alive_in, alive_out, *rest, out_shape=None, **kw) -> int:
    # rest: seed, stride, padding, dilation, activation, training, has_bias, need_grad_x, need_grad_weight
    return _gradients(rest, 7, kw) * conv_flop_count(list(x), [alive_out[0], alive_in[0], *weight[2:]], list(grad_y))


_FORMULAS = {"gated_linear_fwd": _linear_fwd, "gated_linear_bwd": _linear_bwd,
             "gated_conv2d_fwd": _conv_fwd, "gated_conv2d_bwd": _conv_bwd}


def register_flop_formulas() -> None:
    """Register the formulas for every cadk op that exists now (compiled and Triton backends)."""
    from torch.utils.flop_counter import flop_registry

    for prefix in ("", "triton_"):
        for name, formula in _FORMULAS.items():
            packet = getattr(torch.ops.cadk, prefix + name, None) if hasattr(torch.ops, "cadk") else None
            if packet is not None and packet not in flop_registry:
                register_flop_formula(packet)(formula)
