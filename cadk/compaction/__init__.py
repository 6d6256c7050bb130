"""Compaction: a trained gated network becomes a plain PyTorch network (Conv2d, Linear, BatchNorm2d, ...)
with pruned units, filters and blocks physically removed and the surviving theta folded into weights."""
from __future__ import annotations

import contextvars
import copy

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils.flop_counter import FlopCounterMode

from ..nn import GatedLayer, UnitGate
from ..utils import atomic_write, eval_mode


# The deepcopy memo of the compaction in progress: compact() methods (GatedSequential, GatedVGG, ...) call
# compact_module once per child, and every call must share one memo for tensors shared across children
# (tied weights, a module used twice) to stay shared in the copy.
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cadk_compact_memo", default=None)


def compact_module(module: nn.Module) -> nn.Module:
    """The plain equivalent of `module`: its own compact() if it has one, else a copy with children compacted.

    The copy owns its parameters, buffers and registries (hooks, ...): training or converting the compacted
    model leaves the gated one alone. Tensors shared within the model stay shared in the copy: the outermost
    call starts the deepcopy memo that every nested call shares."""
    if module is None:
        return None
    memo = _MEMO.get()
    token = _MEMO.set({} if memo is None else memo)
    try:
        return _compact_module(module, _MEMO.get())
    finally:
        _MEMO.reset(token)


def _compact_module(module: nn.Module, memo: dict) -> nn.Module:
    if isinstance(module, OptimizedModule):  # torch.compile's wrapper: its attribute writes (the copy's _modules,
        return _compact_module(module._orig_mod, memo)  # _parameters) reach the gated model; compact that, uncompiled
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):  # their reducer, process group
        return _compact_module(module.module, memo)  # and replicas belong to the training run: the plain model alone
    if hasattr(module, "compact"):
        return module.compact()
    if isinstance(module, UnitGate):
        raise TypeError("a UnitGate cannot be compacted on its own; compact the model that uses it")
    out = copy.copy(module)
    for key, value in module.__dict__.items():  # registries (hooks, ...) of its own, not the gated module's
        if isinstance(value, (dict, set)):  # sets too: _non_persistent_buffers_set
            out.__dict__[key] = copy.copy(value)
    out._parameters = copy.deepcopy(module._parameters, memo)
    out._buffers = copy.deepcopy(module._buffers, memo)
    # A gate registered on the parent (made on its own, shared by its layers) is folded into those layers.
    out._modules = {name: None if isinstance(child, UnitGate) else compact_module(child)
                    for name, child in module._modules.items()}
    return out


@torch.no_grad()
def compact(model: nn.Module) -> nn.Module:
    """Return a plain, smaller model whose eval outputs equal `model.eval()`'s (a torch.compile'd model or
    submodule becomes plain, uncompiled modules: compile the result again where wanted; a DDP or DataParallel
    wrapper is left out: the plain model is what it wrapped).

    Raises a clear error if the model holds gated layers that no enclosing module knows how to compact."""
    _check_widths(model)
    with eval_mode(model):
        plain = compact_module(model).eval()
    leftovers = [n for n, m in plain.named_modules() if isinstance(m, (GatedLayer, UnitGate))]
    if leftovers:
        raise TypeError(f"compaction left gated modules at {leftovers[:5]}: their parent has no compact(); "
                        "build the model from cadk.nn blocks or give the parent a compact() method")
    return plain


def _check_widths(model: nn.Module) -> None:
    """A unit gate with no alive unit outside a pruned block would compact to a layer of zero width, which
    torch's layers refuse only when the plain model first runs. The Pruner never empties one (it keeps the
    last unit); a hand-made prune or an edited state_dict can."""
    # an emptied gate inside a block prunes the block (prunes_with_it), whose branch compaction drops
    empty = [n for n, g in model.named_modules() if isinstance(g, UnitGate) and g.kind == "unit" and g.is_pruned
             and not any(block.is_pruned for block in g.prunes_with_it)]
    if empty:
        raise ValueError(f"unit gates {empty[:5]} have no alive unit, so their layers would have no outputs: "
                         "keep at least one unit of each (the Pruner does; UnitGate.prune by hand and edited "
                         "state_dicts can empty one)")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flop_count(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward on `example` as torch.utils.flop_counter counts them (2 per multiply-add)."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops()


def compact_paths(path_prefix: str) -> dict[str, str]:
    """The files save_compact writes for `path_prefix`, by kind."""
    return {"checkpoint": f"{path_prefix}.pt", "torchscript": f"{path_prefix}.ts", "exported": f"{path_prefix}.pt2"}


def save_compact(model: nn.Module, example: torch.Tensor, path_prefix: str) -> dict[str, str]:
    """Write the compacted model three ways:
    - `.pt2`: torch.export program (`torch.export.load(p).module()`), loads without cadk;
    - `.ts`: TorchScript (`torch.jit.load(p)`), loads without cadk;
    - `.pt`: standard checkpoint {"model": module, "state_dict": ...}; unpickling the module of a residual
      net needs cadk importable (for cadk.nn.Residual), its state_dict does not."""
    paths = compact_paths(path_prefix)
    example = torch.cat([example[:1]] * 2)  # batch 2: a batch of 1 would be specialised as a constant
    batch = torch.export.Dim("batch", min=1)
    with eval_mode(model):  # written in eval mode; a model being fine-tuned trains on afterwards
        with torch.no_grad():
            exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            scripted = torch.jit.trace(model, example, check_trace=False)
        atomic_write(paths["exported"], lambda f: torch.export.save(exported, f))
        atomic_write(paths["torchscript"], lambda f: torch.jit.save(scripted, f))
        atomic_write(paths["checkpoint"], lambda f: torch.save({"model": model, "state_dict": model.state_dict()}, f))
    return paths


__all__ = ["compact", "compact_module", "param_count", "flop_count", "save_compact", "compact_paths"]
