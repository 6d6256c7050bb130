"""Bernoulli gates: one learned probability theta per unit/filter (UnitGate) or per residual block.

A gate owns theta (a Parameter, trained by cadk.optim's projected optimizers, not the weight optimizer),
the pruning state (`alive_mask`, `zero_steps`) and its Philox key `seed`, all in state_dict.

Samples: each training forward of the gate's owner takes a fresh seed, its key XOR a draw from torch's
random number generator on the gate's device, as dropout draws its masks. So torch.manual_seed and the
key reproduce a run's gates, a resumed run continues them once it restores torch's generator state
(cadk train's checkpoints hold it), and torch.utils.checkpoint, which restores that state before it
recomputes a forward, replays the very gates the first forward drew. (A counter advanced per forward
had drawn new gates in the recomputation: gradients for a sample the loss never saw.)

Sharing: a gate may be applied by several layers (a channel group, e.g. the residual stream of a
ResNet stage). The layer that created it *owns* it and draws the seed once per training forward; the
others read that seed, so every application in one step samples the same xi[n, j]. A gate made on its
own is owned by the first layer given it as its output gate (which must then run first); a module of the
model must hold it as an attribute (layers hold shared gates as plain references), or it is in no state_dict.
"""
from __future__ import annotations

import torch
from torch import nn

_GOLDEN = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 62) - 1


def _mix(value: int) -> int:
    """splitmix64 finaliser: spreads (base seed, gate number) into well-separated Philox keys."""
    z = (value + _GOLDEN) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _SEED_MASK


def _mask_token(mask: torch.Tensor) -> tuple:
    """What changes when alive_mask is written in place or replaced (inference tensors have no version
    counter; cadk writes them only through prune and load, which refresh)."""
    return (mask.data_ptr(), None if mask.is_inference() else mask._version)


class UnitGate(nn.Module):
    """Gates for `num_units` units. kind="unit" for units/filters, "layer" for a block's layer gate."""

    def __init__(self, num_units: int, theta_init: float = 1.0, kind: str = "unit", seed: int = 0, device=None):
        super().__init__()
        if num_units < 1:
            raise ValueError(f"UnitGate needs at least one unit, got {num_units}")
        if not 0.0 <= theta_init <= 1.0:
            raise ValueError(f"theta_init must lie in [0, 1], got {theta_init}")
        if kind not in ("unit", "layer"):
            raise ValueError(f"gate kind must be 'unit' or 'layer', got {kind!r}")
        self.kind = kind
        self.theta = nn.Parameter(torch.full((num_units,), float(theta_init), device=device))
        self.register_buffer("alive_mask", torch.ones(num_units, dtype=torch.bool, device=device))
        self.register_buffer("zero_steps", torch.zeros(num_units, dtype=torch.int32, device=device))
        self.register_buffer("seed", torch.tensor(_mix(seed), dtype=torch.int64, device=device))
        # The seed of the current sample (next_seed), for the layers that share the gate.
        self.register_buffer("sample_seed", self.seed.clone(), persistent=False)
        # alive_mask as 1/0 in theta's dtype, for the theta optimizers' masking (foreach ops need it)
        self.register_buffer("alive_factor", torch.ones(num_units, device=device), persistent=False)
        # Gates pruned along once every unit of this one is (a block's layer gate, for its inner gates): a
        # plain list, so they are not registered as submodules of this gate.
        self.prunes_with_it: list[UnitGate] = []
        # Whether a layer (or block) draws this gate's samples; one made on its own gets the first layer given it.
        self.has_owner = False
        self.refresh()  # alive_idx

    @property
    def alive_idx(self) -> torch.Tensor:
        """The sorted alive units, what the ops take. Follows alive_mask when something outside cadk wrote
        it in place since the last refresh: DDP's broadcast of rank 0's buffers (at construction, and
        before every forward with broadcast_buffers=True), a copy_ into it. Skipped under torch.compile,
        which cannot read version counters: refresh() by hand there after such a write."""
        if not torch.compiler.is_compiling() and _mask_token(self.alive_mask) != self._mask_token:
            self._follow_mask()
        return self._alive_idx

    def _follow_mask(self) -> None:
        """Refresh only if the units changed: a broadcast of the same mask (every DDP forward) must not
        cost a refresh."""
        if self.alive_mask.is_meta or not torch.equal(self.alive_mask, self._refreshed_mask):
            self.refresh()
        else:
            self._mask_token = _mask_token(self.alive_mask)

    @property
    def num_units(self) -> int:
        return self.theta.numel()

    @property
    def num_alive(self) -> int:
        return self.alive_idx.numel()

    @property
    def is_pruned(self) -> bool:
        return self.num_alive == 0

    def reseed(self, seed: int, salt: int) -> None:
        """Set the Philox key from a model-wide seed and this gate's number in the model."""
        self.seed.fill_(_mix(_mix(seed) ^ salt))
        with torch.inference_mode(False):  # see refresh()
            self.sample_seed = self.seed.clone()

    def next_seed(self) -> torch.Tensor:
        """A fresh sample's seed (owner, once per training forward): the key XOR a draw from torch's
        generator (see the module docstring)."""
        with torch.inference_mode(False):  # see refresh(): a later forward with autograd saves it
            draw = torch.randint(0, 1 << 62, (), device=self.seed.device)
            self.sample_seed = torch.bitwise_xor(draw, self.seed)  # a new tensor: seeds saved for backward stay
        return self.sample_seed

    def current_seed(self) -> torch.Tensor:
        """The seed of the current sample (drawn by the owner this step), for layers sharing the gate."""
        return self.sample_seed

    @torch.no_grad()
    def prune(self, units: torch.Tensor) -> None:
        """Remove `units` (indices or a bool mask, a tensor or a list) for good: theta pinned to 0, out of alive_idx."""
        if not torch.is_tensor(units):
            units = torch.as_tensor(units)
            units = units if units.dtype == torch.bool else units.long()  # [] reads as float
        mask = units if units.dtype == torch.bool else torch.zeros_like(self.alive_mask).index_fill_(0, units, True)
        self.alive_mask &= ~mask.to(self.alive_mask.device)
        self.theta[~self.alive_mask] = 0.0
        self.refresh()
        if self.is_pruned:
            for other in self.prunes_with_it:
                if not other.is_pruned:
                    other.prune(torch.ones_like(other.alive_mask))

    @torch.compiler.disable  # maybe_mark_dynamic cannot be traced: a prune inside a compiled function runs eagerly
    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute alive_idx and alive_factor from alive_mask (after pruning or loading a state_dict).

        alive_idx (the sorted alive units, what the ops take) is a plain attribute, not a buffer, and
        its length a dynamic size from the start: torch.compile keeps module buffers at static shapes, so
        a buffer would recompile the model at every pruning event, and fall back to eager once past the
        recompile limit. _apply rebuilds it on the gate's new device. Tensors are made outside inference
        mode: a later forward with autograd saves them for backward, which inference tensors refuse."""
        device = self.theta.device
        with torch.inference_mode(False):
            self._materialise(device)
            if self.alive_mask.is_meta:  # no values to read (meta-device init): every unit, as at construction
                self._alive_idx = torch.arange(self.num_units, device=device)
            else:
                self._alive_idx = torch.nonzero(self.alive_mask).flatten().to(device)
            self._refreshed_mask = self.alive_mask.clone()
        self._mask_token = _mask_token(self.alive_mask)
        torch._dynamo.maybe_mark_dynamic(self._alive_idx, 0)
        self.alive_factor.copy_(self.alive_mask)  # in place: the buffer keeps its identity, device, dtype

    def _materialise(self, device: torch.device) -> None:
        """State a load_state_dict(assign=True) into a meta-built gate leaves on meta: the construction
        defaults for entries the state_dict lacked (all units alive, key of seed 0), and the
        non-persistent buffers remade on theta's device and dtype."""
        if device.type != "meta":
            if self.alive_mask.is_meta:
                self.alive_mask = torch.ones(self.num_units, dtype=torch.bool, device=device)
            if self.zero_steps.is_meta:
                self.zero_steps = torch.zeros(self.num_units, dtype=torch.int32, device=device)
            if self.seed.is_meta:
                self.seed = torch.tensor(_mix(0), dtype=torch.int64, device=device)
        if self.alive_factor.device != device or self.alive_factor.dtype != self.theta.dtype:
            self.alive_factor = torch.empty_like(self.theta, requires_grad=False)
        if self.sample_seed.device != self.seed.device:
            self.sample_seed = self.seed.clone()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()
        return self

    def best_alive(self) -> torch.Tensor:
        """The alive unit with the largest theta: the one the last-unit guard keeps."""
        return torch.where(self.alive_mask, self.theta.detach(), torch.full_like(self.theta.detach(), -1.0)).argmax()

    def keep_idx(self) -> torch.Tensor:
        """Units that survive compaction: alive and theta > 0 (theta == 0 contributes nothing).

        A unit gate whose alive units all sit at theta == 0 keeps its first alive unit: a layer cannot
        have zero width, and that unit's output is exactly 0 once theta is folded into the weights."""
        keep = torch.nonzero(self.alive_mask & (self.theta.detach() > 0)).flatten()
        if keep.numel() == 0 and self.kind == "unit" and self.num_alive > 0:
            return self.alive_idx[:1]
        return keep

    def expected_alive(self) -> torch.Tensor:
        """E[number of live units] = sum of theta over alive units (differentiable), in float64: a bfloat16
        sum rounds a width above 256 (301 units counted as 300)."""
        return (self.theta.double() * self.alive_mask).sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()

    def extra_repr(self) -> str:
        return f"{self.num_units}, kind={self.kind}, alive={self.num_alive}"


def gates_of(model: nn.Module) -> list[UnitGate]:
    """Every gate of `model` once, in registration order."""
    return [m for m in model.modules() if isinstance(m, UnitGate)]


def seed_gates(model: nn.Module, seed: int) -> None:
    """Give every gate of `model` its own Philox key derived from `seed`."""
    for i, gate in enumerate(gates_of(model)):
        gate.reseed(seed, i + 1)
