"""Gated drop-in layers: GatedLinear and GatedConv2d (optionally with BatchNorm), and GatedSequential.

Parameters keep their full shape, so optimizers, state_dict and DDP buckets never change; the layer
reads and writes activations that hold the alive channels only (of `in_gate` on the input side, of
its own gate on the output side), so pruned channels cost nothing in forward or backward.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .. import kernels as K
from ..kernels.reference import check_activation, linear_over_positions
from .gates import UnitGate


class GatedLayer(nn.Module):
    """What GatedLinear and GatedConv2d share: gate wiring, alive sets, seeds, compaction helpers.

    Gates this layer did not create (`in_gate`, a shared `gate`, the enclosing block's `block_gate`)
    are held as plain references, not submodules: each gate is registered (and saved) once, by its owner.
    """

    in_units: int
    out_units: int

    def _init_gates(self, gate, in_gate, theta_init: float) -> None:
        self._refs: dict[str, UnitGate | None] = {"in": None, "out": None, "block": None}
        self._owns_gate = gate is True
        if gate is True:  # on the weight's device; theta in float32 whatever the weight's dtype (see GatedLinear)
            self.gate = UnitGate(self.out_units, theta_init, device=self.weight.device)
            self._refs["out"] = self.gate
        elif isinstance(gate, UnitGate):
            self._check_units(gate, self.out_units, "gate", "output")
            self._refs["out"] = gate
            # a gate made on its own: without an owner no layer would draw it, and every step reused one sample
            self._owns_gate = not getattr(gate, "has_owner", True)
        elif gate not in (False, None):
            raise TypeError(f"gate must be True, False or a UnitGate, got {type(gate).__name__}")
        if self._owns_gate:
            self._refs["out"].has_owner = True
        self.set_in_gate(in_gate)
        self.register_buffer("_all_in", torch.arange(self.in_units, device=self.weight.device), persistent=False)
        self.register_buffer("_all_out", torch.arange(self.out_units, device=self.weight.device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._make_index_lists()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._make_index_lists()

    def _make_index_lists(self) -> None:
        """The full index lists hold no state: made anew on the weight's device after a move or a load,
        so that meta-device init (to_empty, or load_state_dict(assign=True)) leaves no uninitialised or
        meta indices behind (load_state_dict does not restore non-persistent buffers)."""
        with torch.inference_mode(False):  # usable by training after a .to() under inference mode
            self._all_in = torch.arange(self.in_units, device=self.weight.device)
            self._all_out = torch.arange(self.out_units, device=self.weight.device)

    @staticmethod
    def _check_units(gate, units, name, side):
        if gate.num_units != units:
            raise ValueError(f"{name} has {gate.num_units} units but the layer has {units} {side} channels")

    @property
    def out_gate(self) -> UnitGate | None:
        return self._refs["out"]

    @property
    def in_gate(self) -> UnitGate | None:
        return self._refs["in"]

    def set_in_gate(self, gate: UnitGate | None) -> None:
        """Wire the gate of the layer producing this layer's input (a plain reference, not a submodule)."""
        if gate is not None:
            if not isinstance(gate, UnitGate):
                raise TypeError(f"in_gate must be a UnitGate or None, got {type(gate).__name__}")
            self._check_units(gate, self.in_units, "in_gate", "input")
        self._refs["in"] = gate

    @property
    def block_gate(self) -> UnitGate | None:
        return self._refs["block"]

    def set_block_gate(self, gate: UnitGate | None) -> None:
        """The layer gate of the residual block whose branch this layer is in (cost and compaction)."""
        self._refs["block"] = gate

    def alive_in(self) -> torch.Tensor:
        return self._all_in if self.in_gate is None else self.in_gate.alive_idx

    def alive_out(self) -> torch.Tensor:
        return self._all_out if self.out_gate is None else self.out_gate.alive_idx

    def _theta_and_seed(self):
        gate = self.out_gate
        if gate is None:
            return None, self._all_out.new_zeros(())
        seed = gate.next_seed() if (self._owns_gate and self.training) else gate.current_seed()
        return gate.theta, seed

    def _check_input(self, x: torch.Tensor, dims: int, what: str) -> None:
        expected = self.alive_in().numel()
        if x.dim() != dims:
            if x.dim() == dims - 1:
                hint = "add the batch dim of an unbatched input: x[None]"
            elif x.dim() > dims:
                hint = f"x.flatten(0, {x.dim() - dims}) makes the leading dims one batch dim, which draws a gate per row"
            else:
                hint = f"it needs {dims} dims"
            raise ValueError(
                f"{type(self).__name__} expects {what} ({dims} dims; gates are drawn per example, dim 0), got "
                f"shape {tuple(x.shape)}; {hint}")
        if x.shape[1] != expected:
            raise ValueError(
                f"{type(self).__name__} expects {what} with {expected} channels in dim 1 (the alive inputs "
                f"of its in_gate), got shape {tuple(x.shape)}; check that in_gate is the gate of the "
                f"layer that produces this input")

    # compaction -----------------------------------------------------------------------------------
    def keep_in(self) -> torch.Tensor:
        return self._all_in if self.in_gate is None else self.in_gate.keep_idx()

    def keep_out(self) -> torch.Tensor:
        return self._all_out if self.out_gate is None else self.out_gate.keep_idx()

    def out_scale(self, extra: float = 1.0) -> torch.Tensor:
        """Per kept output unit: theta (the eval gate) times `extra` (a block's theta, passed by the block
        to its branch's last layer), folded into the weights by compaction.

        theta * act(z) == act(theta * z) holds for theta >= 0 and act in {relu, none}."""
        keep = self.keep_out()
        scale = torch.full((keep.numel(),), float(extra), dtype=torch.float64, device=self._all_out.device)
        if self.out_gate is not None:  # float64: a float64 model's theta and block theta are not rounded
            scale = scale * self.out_gate.theta.detach()[keep].double()
        return scale

    def prune_masks(self):
        """(tensor, keep mask broadcastable to it) for every parameter touched by pruned units."""
        out_keep = self._keep_mask(self.out_gate, self.out_units)
        in_keep = self._keep_mask(self.in_gate, self.in_units)
        if self.block_gate is not None and self.block_gate.is_pruned:  # the whole branch left the network
            out_keep, in_keep = torch.zeros_like(out_keep), torch.zeros_like(in_keep)
        view = (-1,) + (1,) * (self.weight.dim() - 1)
        yield self.weight, out_keep.view(view) & in_keep.view((1, -1) + (1,) * (self.weight.dim() - 2))
        if self.bias is not None:
            yield self.bias, out_keep
        bn = getattr(self, "bn", None)
        if bn is not None:
            yield bn.weight, out_keep
            yield bn.bias, out_keep

    def _keep_mask(self, gate, units):
        if gate is None:
            return torch.ones(units, dtype=torch.bool, device=self.weight.device)
        return gate.alive_mask


class GatedLinear(GatedLayer):
    """nn.Linear with a Bernoulli gate per output unit, acting after `activation` ("relu" or "none").

    Takes [N, features] or [N, *positions, features] (a sequence: [N, T, features]). An example's gate
    of a unit is shared by all its positions, as a conv shares it over H x W, and its theta gradient
    sums over them (docs/METHOD.md); the positions run as a 1x1 conv on a channels-last view, no copy.

    gate: True (own gate), False (no gate, e.g. a classifier), or a UnitGate to share.
    in_gate: the gate of the layer producing the input (None: all inputs are always present).
    device, dtype: as nn.Linear takes them, for the weight and bias; the layer's own gate is made on that
    device with a float32 theta, as autocast keeps it (a bfloat16 theta rounds small steps away)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "none",
                 gate=True, in_gate: UnitGate | None = None, theta_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        check_activation(activation)
        self.in_units, self.out_units, self.activation = in_features, out_features, activation
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()
        self._init_gates(gate, in_gate, theta_init)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            return self._forward_positions(x)
        self._check_input(x, 2, "input [N, features]")
        theta, seed = self._theta_and_seed()
        return K.gated_linear(x, self.weight, self.bias, theta, self.alive_in(), self.alive_out(), seed,
                              self.activation, self.training)

    def _forward_positions(self, x: torch.Tensor) -> torch.Tensor:
        """[N, *positions, features]: a channels-last [N, features, P, 1] view through gated_conv2d."""
        expected = self.alive_in().numel()
        if x.shape[-1] != expected:
            raise ValueError(
                f"GatedLinear expects input [N, *positions, features] with {expected} features in the last dim "
                f"(the alive inputs of its in_gate), got shape {tuple(x.shape)}; check that in_gate is the "
                f"gate of the layer that produces this input")
        theta, seed = self._theta_and_seed()
        return linear_over_positions(K.gated_conv2d, K.gated_linear, x, self.weight, self.bias, theta,
                                     self.alive_in(), self.alive_out(), seed, self.activation, self.training)

    def compact(self, extra_scale: float = 1.0) -> nn.Module:
        keep_in, keep_out, scale = self.keep_in(), self.keep_out(), self.out_scale(extra_scale)
        lin = nn.Linear(keep_in.numel(), keep_out.numel(), bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight[keep_out][:, keep_in] * scale[:, None])
            if self.bias is not None:
                lin.bias.copy_(self.bias[keep_out] * scale)
        return _with_activation(lin, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")


class GatedConv2d(GatedLayer):
    """nn.Conv2d (groups=1) with a Bernoulli gate per output filter, optional BatchNorm2d in between.

    Computes xi * act(BN(conv(x))) (or xi * act(conv(x)) without BN) over alive channels only; the
    BN entries of pruned filters go with them. device and dtype as nn.Conv2d takes them (the BN's too;
    the own gate's theta stays float32, as in GatedLinear)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, batch_norm: bool = False, activation: str = "none",
                 gate=True, in_gate: UnitGate | None = None, theta_init: float = 1.0,
                 bn_eps: float = 1e-5, bn_momentum: float | None = 0.1, device=None, dtype=None):
        super().__init__()
        if groups != 1:
            raise NotImplementedError(
                "GatedConv2d supports groups=1; grouped/depthwise convs are gated through their producer's "
                "channel group (use nn.Conv2d for them)")
        if isinstance(padding, str):
            raise ValueError("GatedConv2d takes numeric padding; pass (k-1)//2 * dilation for 'same'")
        check_activation(activation)
        self.in_units, self.out_units, self.activation = in_channels, out_channels, activation
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum, **factory) if batch_norm else None
        self._init_gates(gate, in_gate, theta_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 4, "input [N, C, H, W]")
        theta, seed = self._theta_and_seed()
        alive_in, alive_out = self.alive_in(), self.alive_out()
        if self.bn is None:
            return K.gated_conv2d(x, self.weight, self.bias, theta, alive_in, alive_out, seed, self.stride,
                                  self.padding, self.dilation, self.activation, self.training)
        z = K.gated_conv2d(x, self.weight, self.bias, None, alive_in, alive_out, seed, self.stride,
                           self.padding, self.dilation, "none", self.training)
        bn = self.bn
        if isinstance(bn, nn.SyncBatchNorm):
            raise NotImplementedError(
                "GatedConv2d computes its BN inside cadk's fused op, from each process's own batch: "
                "SyncBatchNorm (convert_sync_batchnorm) would sync nothing; keep nn.BatchNorm2d (each DDP rank "
                "then normalises by its own batch, as plain BatchNorm2d does under DDP)")
        if bn.training == self.training:
            y = K.bn_gate_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, theta, alive_out, seed,
                              self._bn_momentum(), bn.eps, self.activation, self.training)
        else:  # BN in a mode of its own (frozen by bn.eval() in a training model): BN as nn.BatchNorm2d in
            # that mode, then the gate in the layer's mode (sampled in training)
            y = K.bn_gate_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, None, alive_out, seed,
                              self._bn_momentum(), bn.eps, self.activation, bn.training)
            if theta is not None:
                y = K.gate_apply(y, theta, alive_out, seed, self.training)
        if bn.training:  # counted after the update: a checkpoint's recomputation that stops inside the
            bn.num_batches_tracked.add_(1)  # op (early stop) then skips both, or runs both
        return y

    def _bn_momentum(self) -> float:
        """The running statistics' update factor as nn.BatchNorm2d takes it: momentum, or with
        momentum=None the cumulative average's 1 / (training batches so far, this one included)."""
        bn = self.bn
        if bn.momentum is not None or not bn.training:
            return bn.momentum or 0.0
        return 1.0 / float(bn.num_batches_tracked + 1)

    def compact(self, extra_scale: float = 1.0) -> nn.Module:
        keep_in, keep_out, scale = self.keep_in(), self.keep_out(), self.out_scale(extra_scale)
        conv = nn.Conv2d(keep_in.numel(), keep_out.numel(), self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        fold_into_conv = self.bn is None
        with torch.no_grad():
            w = self.weight[keep_out][:, keep_in]
            conv.weight.copy_(w * scale.view(-1, 1, 1, 1) if fold_into_conv else w)
            if self.bias is not None:
                conv.bias.copy_(self.bias[keep_out] * (scale if fold_into_conv else 1))
        if fold_into_conv:
            return _with_activation(conv, self.activation)
        bn = nn.BatchNorm2d(keep_out.numel(), eps=self.bn.eps, momentum=self.bn.momentum,
                            device=self.bn.weight.device, dtype=self.bn.weight.dtype)
        with torch.no_grad():
            bn.weight.copy_(self.bn.weight[keep_out] * scale)
            bn.bias.copy_(self.bn.bias[keep_out] * scale)
            bn.running_mean.copy_(self.bn.running_mean[keep_out])
            bn.running_var.copy_(self.bn.running_var[keep_out])
            bn.num_batches_tracked.copy_(self.bn.num_batches_tracked)
        return _with_activation(nn.Sequential(conv, bn), self.activation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"batch_norm={self.bn is not None}, activation={self.activation}")


def check_gates_registered(model: nn.Module) -> None:
    """Every gate a gated layer of `model` owns (draws) is a submodule of `model`: a gate made on its own and
    held by its layers alone (a plain reference) has no place in model.modules(), so its theta was silently
    neither trained (split_parameters), saved (state_dict) nor pruned (Pruner). Gates the layers only read
    (an in_gate, a shared gate) may belong to a model around this one."""
    registered = {id(m) for m in model.modules() if isinstance(m, UnitGate)}
    stray = [name for name, m in model.named_modules()
             if isinstance(m, GatedLayer) and m._owns_gate and id(m.out_gate) not in registered]
    if stray:
        raise ValueError(f"gated layers {stray[:5]} use a UnitGate that is not a submodule of the model, so its "
                         "theta would not be trained, saved in state_dict or pruned: register a gate made on its "
                         "own as an attribute of a module of the model (e.g. self.gate = UnitGate(n) in the "
                         "parent of the layers that share it)")


def _with_activation(module: nn.Module, activation: str) -> nn.Module:
    if activation == "none":
        return module
    parts = list(module) if isinstance(module, nn.Sequential) else [module]
    return nn.Sequential(*parts, nn.ReLU(inplace=False))


_ELEMENTWISE = (nn.ReLU, nn.Dropout, nn.Identity)


class GatedSequential(nn.Sequential):
    """nn.Sequential that wires each gated layer's in_gate to the previous gated layer's gate.

    Only elementwise modules (ReLU, Dropout, Identity) may stand between a gated output and the next
    gated layer that it wires, since anything else may change what a channel means; a layer given its
    `in_gate` by hand may follow any module (a pooling layer, say)."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        prev, between = None, None  # the last gated layer, and the first other module after its gated output
        for m in self:
            if isinstance(m, GatedLayer):
                if prev is not None and m.in_gate is None and prev.out_gate is not None:
                    if between is not None:
                        raise ValueError(
                            f"GatedSequential cannot carry the channel gate of its {_named(self, prev)} through "
                            f"{_named(self, between)} to {_named(self, m)}; pass that layer's in_gate by hand "
                            "or place only ReLU/Dropout/Identity between gated layers")
                    m.set_in_gate(prev.out_gate)
                prev, between = m, None
            elif prev is not None and prev.out_gate is not None and between is None and not isinstance(m, _ELEMENTWISE):
                between = m
        if between is not None:  # no gated layer follows to say what the gated channels become
            raise ValueError(
                f"GatedSequential cannot carry the channel gate of its {_named(self, prev)} through "
                f"{_named(self, between)}, whose input holds the alive channels only; end the GatedSequential "
                "at that layer or follow it with only ReLU/Dropout/Identity")

    def compact(self) -> nn.Module:
        from ..compaction import compact_module
        return nn.Sequential(*[compact_module(m) for m in self])


def _named(seq: nn.Sequential, module: nn.Module) -> str:
    return next(f"{type(m).__name__} [{name}]" for name, m in seq.named_children() if m is module)
