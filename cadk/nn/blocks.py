"""Residual blocks with a layer gate: out = relu(S(x) + xi_B * F(x)).

S is the identity or a 1x1 projection (conv + BN). The residual stream's channels form one channel
group per stage: the projection (or, for identity blocks, whoever produced x) owns the stream gate,
and the branch's last conv shares it, so stream channel j is on or off for the whole stage.
A block whose layer gate is pruned computes only relu(S(x)); its branch gets zero gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as K
from .gates import UnitGate
from .layers import GatedConv2d


class Residual(nn.Module):
    """Plain residual block used by compacted models: relu(shortcut(x) + branch(x))."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.branch(x))


class _ZeroGrads(torch.autograd.Function):
    """Identity on x whose backward gives `params` zero gradients of their full shape."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.likes = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.likes))


def _prune_if_emptied_after_load(block: "GatedResidualBlock", _incompatible_keys) -> None:
    block._prune_if_emptied()


class GatedResidualBlock(nn.Module):
    """Shared machinery; subclasses build `branch` (a list of GatedConv2d) and `shortcut`."""

    branch: nn.ModuleList
    shortcut: GatedConv2d | None

    def _finish(self, theta_init: float) -> None:
        self.layer_gate = UnitGate(1, theta_init, kind="layer")
        self.layer_gate.has_owner = True  # forward draws it
        for conv in self.branch:
            conv.set_block_gate(self.layer_gate)
        # A block whose inner units are all pruned is a pruned block (docs/METHOD.md), however they were pruned:
        # by hand (UnitGate.prune) or in a loaded state_dict.
        for gate in self.internal_gates():
            gate.prunes_with_it.append(self.layer_gate)
        # A module-level function, not a lambda: the hook lives in the module's __dict__, which torch.save(model)
        # and pickle must be able to pickle.
        self.register_load_state_dict_post_hook(_prune_if_emptied_after_load)

    def _prune_if_emptied(self) -> None:
        if not self.layer_gate.is_pruned and any(g.is_pruned for g in self.internal_gates()):
            self.layer_gate.prune(torch.ones_like(self.layer_gate.alive_mask))

    @staticmethod
    def _shortcut(in_planes, out_planes, stride, in_gate, theta_init) -> GatedConv2d | None:
        if stride == 1 and in_planes == out_planes:
            return None
        return GatedConv2d(in_planes, out_planes, 1, stride, 0, bias=False, batch_norm=True, activation="none",
                           gate=True, in_gate=in_gate, theta_init=theta_init)

    @property
    def out_gate(self) -> UnitGate | None:
        """The stream gate of this block's output."""
        return self.branch[-1].out_gate

    @property
    def is_pruned(self) -> bool:
        return self.layer_gate.is_pruned

    def internal_gates(self) -> list[UnitGate]:
        """Gates of the units inside the branch (not the shared stream gate)."""
        return [conv.out_gate for conv in self.branch[:-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shortcut runs first: for projection blocks it owns the stream gate and advances its seed.
        s = x if self.shortcut is None else self.shortcut(x)
        if self.is_pruned:
            return F.relu(self._with_zero_grads(s))
        gate = self.layer_gate
        seed = gate.next_seed() if self.training else gate.current_seed()
        b = x
        for conv in self.branch:
            b = conv(b)
        return K.gated_residual(s, b, gate.theta, gate.alive_idx, seed, self.training)

    def _with_zero_grads(self, s: torch.Tensor) -> torch.Tensor:
        """A pruned block's branch and layer gate still get zero gradients, as pruned units do, so that
        every parameter gets a gradient each step: DDP (find_unused_parameters=False) waits for all of
        them, and optimizers treat the block's parameters as before it was pruned."""
        params = [p for m in (self.branch, self.layer_gate) for p in m.parameters() if p.requires_grad]
        if not (torch.is_grad_enabled() and params):
            return s
        return _ZeroGrads.apply(s, *params)

    def compact(self) -> nn.Module:
        shortcut = None if self.shortcut is None else self.shortcut.compact()
        if self.is_pruned or float(self.layer_gate.theta.detach()[0]) == 0.0:
            return nn.Sequential(shortcut if shortcut is not None else nn.Identity(), nn.ReLU())
        *body, last = self.branch
        branch = [conv.compact() for conv in body] + [last.compact(float(self.layer_gate.theta.detach()[0]))]
        return Residual(nn.Sequential(*branch), shortcut)


class GatedBasicBlock(GatedResidualBlock):
    """ResNet basic block: 3x3 conv-BN-ReLU (gated units), 3x3 conv-BN (stream gate), layer gate."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, in_gate: UnitGate | None = None,
                 theta_init: float = 1.0):
        super().__init__()
        self.shortcut = self._shortcut(in_planes, planes, stride, in_gate, theta_init)
        stream = in_gate if self.shortcut is None else self.shortcut.out_gate
        conv1 = GatedConv2d(in_planes, planes, 3, stride, 1, bias=False, batch_norm=True, activation="relu",
                            in_gate=in_gate, theta_init=theta_init)
        conv2 = GatedConv2d(planes, planes, 3, 1, 1, bias=False, batch_norm=True, activation="none",
                            gate=stream if stream is not None else False, in_gate=conv1.out_gate)
        self.branch = nn.ModuleList([conv1, conv2])
        self._finish(theta_init)


class GatedBottleneck(GatedResidualBlock):
    """ResNet bottleneck: 1x1 and 3x3 conv-BN-ReLU (gated units), 1x1 conv-BN (stream gate), layer gate."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, in_gate: UnitGate | None = None,
                 theta_init: float = 1.0):
        super().__init__()
        out_planes = planes * self.expansion
        self.shortcut = self._shortcut(in_planes, out_planes, stride, in_gate, theta_init)
        stream = in_gate if self.shortcut is None else self.shortcut.out_gate
        conv1 = GatedConv2d(in_planes, planes, 1, 1, 0, bias=False, batch_norm=True, activation="relu",
                            in_gate=in_gate, theta_init=theta_init)
        conv2 = GatedConv2d(planes, planes, 3, stride, 1, bias=False, batch_norm=True, activation="relu",
                            in_gate=conv1.out_gate, theta_init=theta_init)
        conv3 = GatedConv2d(planes, out_planes, 1, 1, 0, bias=False, batch_norm=True, activation="none",
                            gate=stream if stream is not None else False, in_gate=conv2.out_gate)
        self.branch = nn.ModuleList([conv1, conv2, conv3])
        self._finish(theta_init)

