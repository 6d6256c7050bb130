"""Projected optimizers for gate probabilities: theta <- clip(theta - lr * step, 0, 1), pruned units
pinned at 0 (docs/METHOD.md). They take the gates, not bare parameters, so they can honour pruning."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import UnitGate, gates_of
from ..nn.layers import check_gates_registered


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[UnitGate]]:
    """(weights for the usual optimizer, gates for a theta optimizer): thetas must not get weight decay."""
    check_gates_registered(model)
    gates = gates_of(model)
    thetas = {id(g.theta) for g in gates}
    return [p for p in model.parameters() if id(p) not in thetas], gates


class _Projected:
    """Masking and projection as foreach ops over all gates at once: a few multi-tensor kernels per step
    instead of three ops (three GPU launches) per gate."""
    _gates: list[UnitGate]

    @torch.no_grad()
    def _project(self) -> None:
        thetas = [g.theta for g in self._gates]
        torch._foreach_clamp_min_(thetas, 0.0)
        torch._foreach_clamp_max_(thetas, 1.0)
        torch._foreach_mul_(thetas, [g.alive_factor for g in self._gates])

    @torch.no_grad()
    def step(self, closure=None):
        with_grad = [g for g in self._gates if g.theta.grad is not None]
        if with_grad:
            torch._foreach_mul_([g.theta.grad for g in with_grad], [g.alive_factor for g in with_grad])
        loss = super().step(closure)
        self._project()
        return loss


def _as_gates(gates, optimizer: str) -> list[UnitGate]:
    gates = list(gates)
    wrong = next((g for g in gates if not isinstance(g, UnitGate)), None)
    if wrong is not None:  # e.g. the thetas themselves, which cannot say which units are pruned
        raise TypeError(f"{optimizer} takes the model's gates (cadk.split_parameters(model)[1]), not "
                        f"{type(wrong).__name__}s: it masks and projects each gate's theta")
    low = next((g for g in gates if g.theta.dtype in (torch.bfloat16, torch.float16)), None)
    if low is not None:  # model.bfloat16() casts thetas too; theta steps of ~1e-3 near 1 would round to nothing
        raise TypeError(f"{optimizer}: a gate's theta is {low.theta.dtype}, whose spacing near 1 (2^-8 or 2^-11) "
                        "rounds the theta steps away, so the gates would never move: keep the gates in float32 "
                        "(after model.to(dtype), call g.float() for each g in cadk.split_parameters(model)[1]; "
                        "autocast keeps them float32)")
    return gates


class ThetaSGD(_Projected, torch.optim.SGD):
    """Projected SGD on theta (the method's update); momentum optional."""

    def __init__(self, gates: list[UnitGate], lr: float = 0.05, momentum: float = 0.0):
        self._gates = _as_gates(gates, "ThetaSGD")
        super().__init__([g.theta for g in self._gates], lr=lr, momentum=momentum)


class ThetaAdam(_Projected, torch.optim.Adam):
    """Adam-style projected step: robust to the scale of the gradient estimate."""

    def __init__(self, gates: list[UnitGate], lr: float = 1e-3, betas=(0.9, 0.999)):
        self._gates = _as_gates(gates, "ThetaAdam")
        super().__init__([g.theta for g in self._gates], lr=lr, betas=betas)
