"""The complexity cost lam * C(theta) with the three user knobs, and its gradient on theta.

    C(theta) = beta * E[FLOPs]/FLOPs_dense + (1 - beta) * E[Params]/Params_dense

The per-structure regularization weights are lam * dC/dtheta_s: each unit's price is the compute
and storage it controls (including through its neighbours), recomputed every step as neighbours get
pruned. Layer gates' gradients are scaled by alpha (layer vs unit pruning).

Target mode (cadk's budget controller) makes lam a dual variable, updated every step:

    lam <- min(LAM_CEILING, max(lam, LAM_FLOOR) * exp(lam_lr * e)),   e = min(1, measured / target_t - 1),
                                                     e <= -RELAX_ERROR once measured < target_t

- measured is the network that rounding the thetas would give: every alive structure with
  theta > 1/2 counts in full, the others not at all. Not the expectation: fractional thetas can meet
  an expected budget while the compacted network is still large. Not the compacted network itself
  (theta > 0) either: a structure leaves that only when its theta reaches 0, hundreds of steps after
  the price started to push it, and over that lag lam kept rising until everything was in flight.
- The step is multiplicative: the scale of lam that balances the data gradient is not known in
  advance, and a multiplicative step finds it in a few hundred steps from any start, then moves
  it by small relative amounts. Once the budget is met it relaxes at a quarter of its full rate or
  faster, however small the gap: pruned structures never come back, so a lower lam cannot undo the
  budget, and it lets the survivors' thetas return towards 1 instead of being priced further
  (the overshoot an additive step on a fixed target showed: 18% FLOPs for a 35% budget).
- target_t anneals linearly from 1 to the budget over `ramp_steps` steps (0: the budget at once).
  Pruning by measured size lags the thetas (a unit is counted until it reaches 0); with a moving
  target the controller only ever chases a small gap, so few structures are in flight when the
  budget is met and the final size lands close to it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import ComplexityModel


LAM_FLOOR = 1e-3    # lam restarts from here in target mode when it was 0
LAM_CEILING = 1e8   # and rises no further (see _adapt_lam)
RELAX_ERROR = 0.25  # smallest relative error lam relaxes by once the budget is met
ROUND_AT = 0.5      # the controller measures the network that rounding the thetas would give


class ComplexityCost:
    def __init__(self, model: nn.Module, example: torch.Tensor, lam: float = 0.1, alpha: float = 1.0,
                 beta: float = 0.5, target_flops: float | None = None, target_params: float | None = None,
                 lam_lr: float = 0.02, ramp_steps: int = 0):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta (FLOPs vs params weight) must lie in [0, 1], got {beta}")
        if not (0 <= alpha < math.inf and 0 <= lam < math.inf):  # NaN fails every comparison
            raise ValueError(f"lam and alpha must be finite and >= 0, got lam={lam}, alpha={alpha}")
        if not 0 <= lam_lr < math.inf:
            raise ValueError(f"lam_lr must be finite and >= 0, got {lam_lr}")
        if target_flops is not None and target_params is not None:
            raise ValueError("give one budget: target_flops or target_params, not both")
        target = target_flops if target_flops is not None else target_params
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(f"a complexity target is a fraction of the dense model in (0, 1], got {target}")
        self.complexity = ComplexityModel(model, example)
        self.lam, self.alpha, self.beta, self.lam_lr = float(lam), float(alpha), float(beta), float(lam_lr)
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        self.target, self.ramp_steps, self.steps = target, int(ramp_steps), 0
        self.target_kind = "flops" if target_flops is not None else ("params" if target_params is not None else None)

    def value(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C, FLOPs ratio, params ratio), differentiable in theta."""
        flops, params = self.complexity.ratios()
        return self.beta * flops + (1 - self.beta) * params, flops, params

    def add_grad_(self) -> dict[str, float]:
        """Accumulate lam * dC/dtheta (alpha-scaled for layer gates) into theta.grad; adapt lam in target
        mode. Returns the current C, ratios and lam for logging."""
        gates = self.complexity.gates()
        c, flops, params = self.value()
        grads = torch.autograd.grad(c, [g.theta for g in gates], allow_unused=True)
        with torch.no_grad():
            for g, d in zip(gates, grads):
                if d is None:
                    continue
                scale = self.lam * (self.alpha if g.kind == "layer" else 1.0)
                d = (d * scale).to(g.theta.dtype)
                g.theta.grad = d if g.theta.grad is None else g.theta.grad + d
        stats = {"C": c.detach().item(), "flops": flops.detach().item(), "params": params.detach().item(),
                 "lam": self.lam}
        self._adapt_lam(stats)
        return stats

    def deployed_ratios(self, above: float = 0.0, guard: bool = False) -> tuple[float, float]:
        """FLOPs and params ratios of the network that keeps every alive structure with theta > `above`
        (0: what compaction would produce now; 0.5: what rounding the thetas would give). With `guard`,
        a unit gate left with no unit keeps its best alive unit, as `Pruner.settle` does (last-unit guard)."""
        with torch.no_grad():
            kept = {}
            for g in self.complexity.gates():
                k = (g.theta > above) & g.alive_mask
                if guard and g.kind == "unit" and g.num_alive > 0 and not bool(k.any()):
                    k[g.best_alive()] = True
                kept[g] = k.to(g.theta.dtype)
            flops, params = self.complexity.expected(kept)
        return float(flops) / self.complexity.dense_flops, float(params) / self.complexity.dense_params

    def settle_threshold(self) -> float:
        """The smallest theta threshold >= ROUND_AT such that keeping only the structures with theta above
        it meets the final budget (ROUND_AT without a budget): what `Pruner.settle` is given.

        Structures at theta = 1 always stay (rounding keeps them): where removing every fractional one
        still misses the budget, the threshold keeps exactly those, over budget, rather than remove
        structures the thetas have all chosen (which would leave next to nothing of the network)."""
        if self.target is None:
            return ROUND_AT
        index = 0 if self.target_kind == "flops" else 1
        # guard=True: the network Pruner.settle leaves, which keeps the best unit of a gate it would empty
        if self.deployed_ratios(ROUND_AT, guard=True)[index] <= self.target:
            return ROUND_AT
        with torch.no_grad():
            values = torch.cat([g.theta[g.alive_mask & (g.theta > ROUND_AT) & (g.theta < 1)]
                                for g in self.complexity.gates()])
        candidates = torch.unique(values).tolist()  # sorted: rounding above candidates[i] keeps fewer
        if not candidates:  # nothing fractional above 1/2 is left to round away: the budget cannot be met
            return ROUND_AT
        lo, hi = 0, len(candidates) - 1  # the largest keeps only theta = 1: taken if nothing smaller meets it
        while lo < hi:
            mid = (lo + hi) // 2
            if self.deployed_ratios(candidates[mid], guard=True)[index] <= self.target:
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo]

    def target_now(self) -> float | None:
        """The budget in force at this step: annealed from 1 to `target` over `ramp_steps` steps."""
        if self.target is None:
            return None
        done = 1.0 if self.ramp_steps == 0 else min(1.0, self.steps / self.ramp_steps)
        return 1.0 - (1.0 - self.target) * done

    def _adapt_lam(self, stats: dict[str, float]) -> None:
        if self.target is None:
            return
        stats["deployed_flops"], stats["deployed_params"] = self.deployed_ratios()
        flops, params = self.deployed_ratios(ROUND_AT)
        stats["rounded_flops"], stats["rounded_params"] = flops, params
        measured = flops if self.target_kind == "flops" else params
        target = self.target_now()
        error = min(1.0, measured / target - 1.0)
        if error < 0:  # budget met: relax at least at a quarter of the full rate (see the module doc)
            error = min(error, -RELAX_ERROR)
        # Capped: while the budget stays unmet (thetas slower than lam: a small theta lr, a large lam_lr, a budget
        # below what rounding reaches) lam rose without bound until lam * dC/dtheta overflowed float32 (Adam's
        # moments infinite: thetas frozen, or NaN). At the cap the price outweighs any data gradient by far.
        self.lam = min(LAM_CEILING, max(self.lam, LAM_FLOOR) * math.exp(self.lam_lr * error))
        self.steps += 1
        stats["target"] = target

    def state_dict(self) -> dict:
        return {"lam": self.lam, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.steps = int(state.get("steps", 0))
