"""The complexity cost lam * C(theta) with the three user knobs, and its gradient on theta.

    C(theta) = beta * E[FLOPs]/FLOPs_dense + (1 - beta) * E[Params]/Params_dense

The per-structure regularization weights are lam * dC/dtheta_s: each unit's price is the compute
and storage it controls (including through its neighbours), recomputed every step as neighbours get
pruned. Layer gates' gradients are scaled by alpha (layer vs unit pruning). In target mode lam is a
dual variable: lam <- max(0, lam + lam_lr * (measured/target - 1)) every step until the budget holds.

The budget is measured on the network that would be deployed: every alive structure with theta > 0
counts in full (what compaction keeps), not its expectation. Fractional thetas can meet an expected
budget while the compacted network is still large; this measure keeps raising lam until enough
structures are actually pruned, after which the survivors' thetas are free to return to 1.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import ComplexityModel


class ComplexityCost:
    def __init__(self, model: nn.Module, example: torch.Tensor, lam: float = 1.0, alpha: float = 1.0,
                 beta: float = 0.5, target_flops: float | None = None, target_params: float | None = None,
                 lam_lr: float = 0.01):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta (FLOPs vs params weight) must lie in [0, 1], got {beta}")
        if alpha < 0 or lam < 0:
            raise ValueError(f"lam and alpha must be >= 0, got lam={lam}, alpha={alpha}")
        if target_flops is not None and target_params is not None:
            raise ValueError("give one budget: target_flops or target_params, not both")
        target = target_flops if target_flops is not None else target_params
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(f"a complexity target is a fraction of the dense model in (0, 1], got {target}")
        self.complexity = ComplexityModel(model, example)
        self.lam, self.alpha, self.beta, self.lam_lr = float(lam), float(alpha), float(beta), float(lam_lr)
        self.target = target
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

    def deployed_ratios(self) -> tuple[float, float]:
        """FLOPs and params ratios of the network compaction would produce now (theta > 0 counts as 1)."""
        with torch.no_grad():
            kept = {g: (g.theta > 0).to(g.theta.dtype) for g in self.complexity.gates()}
            flops, params = self.complexity.expected(kept)
        return float(flops) / self.complexity.dense_flops, float(params) / self.complexity.dense_params

    def _adapt_lam(self, stats: dict[str, float]) -> None:
        if self.target is None:
            return
        flops, params = self.deployed_ratios()
        stats["deployed_flops"], stats["deployed_params"] = flops, params
        measured = flops if self.target_kind == "flops" else params
        self.lam = max(0.0, self.lam + self.lam_lr * (measured / self.target - 1.0))

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
