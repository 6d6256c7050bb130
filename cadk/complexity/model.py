"""Expected FLOPs and parameters as closed-form, differentiable polynomials in every theta.

Shapes are recorded on one example forward. With independent gates, a conv/linear layer with
expected n_in live inputs and n_out live outputs inside a block with layer gate theta_B costs

    FLOPs  = 2 * k_h * k_w * H_out * W_out * n_in * n_out * theta_B      (2 per multiply-add, as
                                                                       torch.utils.flop_counter counts)
    Params = (k_h * k_w * n_in * n_out + [bias] n_out + [BN] 2 n_out) * theta_B

with n = sum of theta over alive units of the gate (or the fixed width for ungated sides). At theta in
{0, 1} this is exactly the count of the compacted network; for fractional theta it is the mean over
structures sampled from the gates: the polynomial is multilinear, except in a layer with one gate on
both sides (stream -> stream), whose k x k pairs have mean E[k^2] = n^2 - sum theta^2 + n.

Layers outside cadk's gated ones (a plain nn.Conv2d stem, an nn.Linear head) cost a constant that the
compacted model keeps: their FLOPs, as FlopCounterMode counts them on the example, and their parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..nn import GatedConv2d, GatedLayer, GatedLinear, UnitGate
from ..nn.layers import check_gates_registered
from ..utils import eval_mode


@dataclass
class LayerTerm:
    name: str
    layer: GatedLayer
    macs_per_pair: int        # multiply-adds per (input channel, output channel) pair for one example, all calls
    weights_per_pair: int     # k_h * k_w (1 for Linear)
    extra_per_out: int        # bias + BN affine parameters per output channel

    def _n(self, gate: UnitGate | None, full: int, theta: dict | None):
        if gate is None:
            return full
        if theta is None:
            return gate.expected_alive()
        return (theta[gate].double() * gate.alive_mask).sum()  # float64 before the sum, as expected_alive

    def expected(self, theta: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[FLOPs], E[params]); `theta` optionally maps gates to substitute theta vectors."""
        n_in = self._n(self.layer.in_gate, self.layer.in_units, theta)
        n_out = self._n(self.layer.out_gate, self.layer.out_units, theta)
        block = 1.0 if self.layer.block_gate is None else self._n(self.layer.block_gate, 1, theta)
        pairs = n_in * n_out
        gate = self.layer.out_gate
        if gate is not None and gate is self.layer.in_gate:
            # one gate on both sides (e.g. a stream -> stream layer): E[k^2] = n^2 - sum theta^2 + n, since
            # xi_j * xi_j = xi_j; keeps the polynomial the mean over sampled structures (equal at 0/1 thetas)
            t = (gate.theta if theta is None else theta[gate]) * gate.alive_mask
            pairs = pairs - (t.double() ** 2).sum() + n_out
        flops = 2 * self.macs_per_pair * pairs * block
        params = (self.weights_per_pair * pairs + self.extra_per_out * n_out) * block
        return torch.as_tensor(flops, dtype=torch.float64), torch.as_tensor(params, dtype=torch.float64)

    def dense_flops(self) -> int:
        return 2 * self.macs_per_pair * self.layer.in_units * self.layer.out_units

    def dense_params(self) -> int:
        return self.weights_per_pair * self.layer.in_units * self.layer.out_units + self.extra_per_out * self.layer.out_units


class ComplexityModel:
    """Records every gated layer's output size on one example, then evaluates E[FLOPs] and E[params]."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        check_gates_registered(model)
        self.terms, total_flops = _record_terms(model, example)
        if not self.terms:
            raise ValueError("ComplexityModel found no cadk gated layers in the model")
        _check_runs_pruned(model, example)
        # FLOPs outside gated layers, like their parameters below, are a constant the compacted model keeps.
        self.fixed_flops = total_flops - sum(t.dense_flops() for t in self.terms)
        # Parameters outside gated layers (and not thetas) are a constant the compacted model keeps.
        gate_params = sum(g.theta.numel() for g in model.modules() if isinstance(g, UnitGate))
        self.fixed_params = (sum(p.numel() for p in model.parameters()) - gate_params
                             - sum(t.dense_params() for t in self.terms))
        with torch.no_grad():
            dense = {g: torch.ones_like(g.theta) for g in self.gates()}
            saved = {g: g.alive_mask.clone() for g in dense}
            for g in dense:
                g.alive_mask.fill_(True)
            self.dense_flops, self.dense_params = (float(v) for v in self.expected(dense))
            for g, m in saved.items():
                g.alive_mask.copy_(m)

    def gates(self) -> list[UnitGate]:
        seen = {}
        for t in self.terms:
            for g in (t.layer.in_gate, t.layer.out_gate, t.layer.block_gate):
                if g is not None:
                    seen[id(g)] = g
        return list(seen.values())

    def expected(self, theta: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        flops = torch.zeros((), dtype=torch.float64)
        params = torch.zeros((), dtype=torch.float64)
        for t in self.terms:
            f, p = t.expected(theta)
            flops = flops + f
            params = params + p
        return flops + self.fixed_flops, params + self.fixed_params

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[FLOPs] / dense FLOPs and E[params] / dense params (differentiable in theta)."""
        flops, params = self.expected()
        return flops / self.dense_flops, params / self.dense_params

    def per_layer(self) -> list[dict]:
        """Alive/total width of every gated layer's output, for logs and plots."""
        rows = []
        for t in self.terms:
            g = t.layer.out_gate
            if g is None:
                continue
            blk = t.layer.block_gate
            alive = 0 if (blk is not None and blk.is_pruned) else g.num_alive
            rows.append({"layer": t.name, "alive": alive, "total": g.num_units})
        return rows


def _record_terms(model: nn.Module, example: torch.Tensor) -> tuple[list[LayerTerm], int]:
    """The gated layers' terms, and the FLOPs of the whole dense network on one example."""
    out_sizes: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, GatedLayer):
            hooks.append(m.register_forward_hook(_size_hook(name, out_sizes)))
    gates = [g for g in model.modules() if isinstance(g, UnitGate)]
    try:
        with FlopCounterMode(display=False) as counter:  # on the full network: pruned blocks still have shapes
            _run_with_masks(model, example, gates, lambda g: g.alive_mask.fill_(True))
    finally:
        for h in hooks:
            h.remove()
    terms = []
    for name, m in model.named_modules():
        if not isinstance(m, GatedLayer):
            continue
        if name not in out_sizes:
            raise RuntimeError(f"gated layer {name} did not run on the example input; cadk cannot count its cost")
        k = m.weight[0, 0].numel()
        extra = (m.bias is not None) + (2 if getattr(m, "bn", None) is not None else 0)
        terms.append(LayerTerm(name, m, k * out_sizes[name], k, extra))
    return terms, counter.get_total_flops()


def _check_runs_pruned(model: nn.Module, example: torch.Tensor) -> None:
    """Run the example with one unit of every unit gate pruned: a module that reads a gated output but takes a
    fixed channel count (a plain nn.BatchNorm2d, nn.Conv2d, nn.Linear, or a gated layer whose in_gate is not
    wired) fails there now, not at the first pruning event, hours into training."""
    gates = [g for g in model.modules() if isinstance(g, UnitGate) and g.kind == "unit" and g.num_alive > 1]
    running: list[nn.Module] = []  # the modules whose forward is under way, innermost last

    def enter(module, args):
        running.append(module)

    def leave(module, args, out):
        running.pop()

    hooks = [h for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)  # which take no hooks
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        _run_with_masks(model, example, gates, lambda g: g.alive_mask.__setitem__(g.alive_idx[-1], False))
    except Exception as e:
        name = {m: n for n, m in model.named_modules()}[running[-1]] if running else ""
        where = f"module '{name}' ({type(running[-1]).__name__})" if name else "the model's own forward"
        raise ValueError(
            f"the model fails once gated units are pruned, in {where} "
            f"({type(e).__name__}: {e}): gated layers pass on their alive channels only, so every module that "
            "reads a gated output must be a cadk gated layer with that gate as its in_gate (GatedConv2d("
            "batch_norm=True) holds a conv's BN) or only elementwise; give the producing layer gate=False to keep "
            "its width fixed") from e
    finally:
        for h in hooks:
            h.remove()


def _run_with_masks(model: nn.Module, example: torch.Tensor, gates: list[UnitGate], set_mask) -> None:
    """Run the model on one example in eval mode without autograd, each gate's alive_mask changed in place by
    set_mask(gate) for the run and restored after it, also when the run fails."""
    saved = {g: g.alive_mask.clone() for g in gates}
    try:
        with eval_mode(model), torch.no_grad():
            for g in gates:
                set_mask(g)
                g.refresh()
            model(example[:1])
    finally:
        with torch.no_grad():
            for g, m in saved.items():
                g.alive_mask.copy_(m)
                g.refresh()


def _size_hook(name, out_sizes):
    def hook(module, inputs, output):  # positions per output channel: H x W, a linear layer's T, or 1
        if isinstance(module, GatedLinear):
            positions = output[0].numel() // max(1, output.shape[-1])
        else:
            positions = output[0, 0].numel()
        # summed over calls: a layer applied twice in one forward costs its FLOPs twice
        out_sizes[name] = out_sizes.get(name, 0) + positions
    return hook
