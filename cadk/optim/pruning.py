"""The pruning rule: a structure goes for good once theta has sat at 0 for `patience` consecutive steps or
fell below `eps`, after a warm-up, applied every `every` steps (a coarse cadence bounds torch.compile
recompiles). Guards: unit pruning never removes a gate's last unit (its block's layer gate decides that);
a pruned block takes its internal units with it. Pruned rows/columns of weights and their optimizer state
are zeroed, so they stay out of every later optimizer step while shapes never change.

`settle` rounds the structure once the budget has been reached (cadk): thetas of this estimator can
rest at fractional values for many epochs (a network trained under a structure's noise keeps it),
while the method's solutions are deterministic networks. Rounding prunes the structures below the
threshold and sets the rest to 1; the remaining epochs train that deterministic network."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import GatedLayer, GatedResidualBlock, UnitGate, gates_of


class Pruner:
    def __init__(self, model: nn.Module, eps: float = 0.02, patience: int = 100, warmup_steps: int = 0,
                 every: int = 50):
        if patience < 1 or every < 1 or warmup_steps < 0 or not 0 <= eps < 1:
            raise ValueError("Pruner needs patience >= 1, every >= 1, warmup_steps >= 0, 0 <= eps < 1")
        self.model, self.eps, self.patience, self.warmup_steps, self.every = model, eps, patience, warmup_steps, every
        self.gates = gates_of(model)
        self.blocks = [m for m in model.modules() if isinstance(m, GatedResidualBlock)]
        self.layers = [m for m in model.modules() if isinstance(m, GatedLayer)]
        self.steps = 0

    @torch.no_grad()
    def step(self, optimizers=()) -> list[str]:
        """Call once per training step, after the theta update, with the optimizers (a list, or one) whose
        state for pruned weights is zeroed. Returns descriptions of what was pruned."""
        self.steps += 1
        for g in self.gates:
            at_zero = (g.theta <= 0) & g.alive_mask
            g.zero_steps.copy_(torch.where(at_zero, g.zero_steps + 1, torch.zeros_like(g.zero_steps)))
        if self.steps <= self.warmup_steps or self.steps % self.every:
            return []
        events = self._prune({g: g.alive_mask & ((g.zero_steps >= self.patience) | (g.theta < self.eps))
                              for g in self.gates})
        if events:
            self.zero_pruned(optimizers)
        return events

    @torch.no_grad()
    def settle(self, threshold: float = 0.5, optimizers=()) -> list[str]:
        """Round the structure: prune every alive structure with theta <= `threshold`, set the survivors'
        theta to 1. Afterwards the network is deterministic (the state the method converges to) and
        training continues on it without theta updates."""
        events = self._prune({g: g.alive_mask & (g.theta <= threshold) for g in self.gates})
        for g in self.gates:
            g.theta[g.alive_mask] = 1.0
            g.zero_steps.zero_()
        self.zero_pruned(optimizers)
        return events

    def _prune(self, doomed_of: dict) -> list[str]:
        """Prune the `doomed` units of every gate, with the guards: a unit gate keeps its best unit (its
        block's layer gate decides about the layer), a pruned block takes its internal units along."""
        events = []
        for g, doomed in doomed_of.items():
            if g.kind == "unit" and doomed.sum() == g.num_alive and g.num_alive > 0:
                doomed[g.best_alive()] = False
            if doomed.any():
                g.prune(doomed)
                events.append(f"pruned {self._name(g)}: -{int(doomed.sum())} ({g.num_alive} left)")
        for b in self.blocks:  # an event too, so that their weights and optimizer state are zeroed
            for g in b.internal_gates() if b.is_pruned else ():
                if not g.is_pruned:
                    events.append(f"pruned {self._name(g)}: -{g.num_alive} with its block (0 left)")
                    g.prune(torch.ones_like(g.alive_mask))
        return events

    def _name(self, gate: UnitGate) -> str:
        for name, m in self.model.named_modules():
            if m is gate:
                return name
        return "gate"

    @torch.no_grad()
    def zero_pruned(self, optimizers=()) -> None:
        """Zero pruned weights and their optimizer state (momentum, Adam moments) in place."""
        if isinstance(optimizers, torch.optim.Optimizer):  # one optimizer, as step(opt) reads
            optimizers = [optimizers]
        for layer in self.layers:
            for tensor, keep in layer.prune_masks():
                tensor.mul_(keep)
                _mask_state(optimizers, tensor, keep)
        for g in self.gates:  # pruned thetas' moments (their theta is pinned at 0 by the projection)
            _mask_state(optimizers, g.theta, g.alive_mask)

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


def _mask_state(optimizers, tensor: torch.Tensor, keep: torch.Tensor) -> None:
    """Multiply `tensor`'s per-element optimizer state (momentum, Adam moments) by `keep`."""
    for opt in optimizers:
        for buf in opt.state.get(tensor, {}).values():
            if torch.is_tensor(buf) and buf.shape == tensor.shape:
                buf.mul_(keep)
