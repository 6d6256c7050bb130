"""cadk's ops and their one dispatch point.

Layers call the functions below; `backend_for(device)` picks the implementation per device:
"reference" (pure PyTorch, always available), "cpp" (C++ CPU extension), "cuda", "triton".
`CADK_BACKEND=<name>` forces one on the devices it runs on (tests use this; other devices keep the
automatic choice, so e.g. a forced Triton backend leaves a CPU-side FLOP count to the CPU backend);
`auto` (default) takes the fastest backend that is available for the device.
"""
from __future__ import annotations

import os

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import flops, reference

_BACKENDS = {"reference": reference}
OP_NAMES = ("gate_apply", "gated_residual", "gated_linear", "gated_conv2d", "bn_gate_act")
BACKEND_NAMES = ("reference", "cpp", "cuda", "triton")  # what CADK_BACKEND may name, built here or not


_AUTO: dict[str, str] = {}  # device type -> the auto choice; every layer call asks, so it is kept


def register_backend(name: str, module) -> None:
    """Make `module` (which defines the functions in OP_NAMES) selectable as backend `name`."""
    missing = [op for op in OP_NAMES if not hasattr(module, op)]
    if missing:
        raise TypeError(f"cadk backend {name!r} lacks ops {missing}")
    _BACKENDS[name] = module
    _AUTO.clear()


def available_backends() -> list[str]:
    return list(_BACKENDS)


def _auto(device: torch.device) -> str:
    name = _AUTO.get(device.type)
    if name is None:
        name = _AUTO[device.type] = _first_supporting(device)
    return name


def _first_supporting(device: torch.device) -> str:
    # Backends decide support by device type (and what was built), so the answer holds per type.
    # The CUDA order is measured (benchmarks/results/bench_kernels_cuda_*_h200_all_backends.json): the
    # CUDA backend (gathered weights through cuBLAS/cuDNN, fused gate epilogues, C++ host code) beat
    # Triton at every layer, keep ratio, dtype and size there, Triton taking 1.01x to 2.7x its time.
    order = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}.get(device.type, ())
    for name in order:
        mod = _BACKENDS.get(name)
        if mod is not None and getattr(mod, "supports", lambda d: True)(device):
            return name
    return "reference"


def backend_for(device: torch.device) -> str:
    forced = os.environ.get("CADK_BACKEND", "auto")
    if forced == "auto":
        return _auto(device)
    module = _BACKENDS.get(forced)
    if module is None:
        if forced not in BACKEND_NAMES:  # a typo: building would not help
            raise RuntimeError(f"CADK_BACKEND={forced!r} names no cadk backend; set it to auto or one of "
                               f"{list(BACKEND_NAMES)}, or unset it")
        raise RuntimeError(
            f"CADK_BACKEND={forced!r} is not available here (available: {available_backends()}); "
            "build the extension with `pip install -e .` or unset CADK_BACKEND")
    return forced if getattr(module, "supports", lambda d: True)(device) else _auto(device)


def _impl(op: str, device: torch.device):
    return getattr(_BACKENDS[backend_for(device)], op)


def release_cached_memory() -> None:
    """Free the memory cadk's C++ CPU kernels keep for reuse and are not using, as
    torch.cuda.empty_cache() does for CUDA's allocator: the calling thread's scratch buffers, full-size
    weight-gradient buffers nobody references, and the gate tables and gathered weights a training
    forward kept for its backward (a backward that finds none recomputes them). Results do not change."""
    from . import cpp_backend

    cpp_backend.release_cached_memory()


# Whether autocast knows a device type (asking whether it is enabled on others, e.g. meta, raises).
# Common types are filled in now, not while torch.compile traces a first call (see _AUTO).
_AUTOCAST_KNOWN = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def _autocast_dtype(device: torch.device):
    """The dtype autocast runs matmuls and convolutions in on this device, or None outside autocast."""
    kind = device.type
    known = _AUTOCAST_KNOWN.get(kind)
    if known is None:
        known = _AUTOCAST_KNOWN[kind] = torch.amp.is_autocast_available(kind)
    return torch.get_autocast_dtype(kind) if known and torch.is_autocast_enabled(kind) else None


def _to(dtype, *tensors) -> list:
    """tensors cast to dtype where floating, float64 kept as autocast keeps it (a promoted type that is
    float64 leaves float64 inputs alone anyway)."""
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
            else t for t in tensors]


# Under torch.autocast the ops take the types autocast gives the PyTorch ops they replace (the
# backends' custom ops are not autocast-aware themselves, and reject mixed dtypes): gated_linear and
# gated_conv2d run in the autocast dtype, as F.linear and F.conv2d do, with the parameters cast by a
# differentiable .to(), so their gradients reach the float32 parameters (float64 stays float64, as
# autocast leaves it); gated_residual adds in the promoted type, as `shortcut + branch` would;
# gate_apply and bn_gate_act keep their input's dtype
# (BatchNorm takes float32 parameters and statistics with any activation dtype). Theta stays as it is:
# the gates compare it with float32 uniforms.


def gate_apply(pre, theta, alive, seed, training: bool):
    return _impl("gate_apply", pre.device)(pre, theta, alive, seed, training)


def gated_residual(shortcut, branch, theta, alive, seed, training: bool):
    if shortcut.dtype != branch.dtype and _autocast_dtype(branch.device) is not None:
        shortcut, branch = _to(torch.promote_types(shortcut.dtype, branch.dtype), shortcut, branch)
    return _impl("gated_residual", branch.device)(shortcut, branch, theta, alive, seed, training)


def gated_linear(x, weight, bias, theta, alive_in, alive_out, seed, activation="none", training=True):
    dtype = _autocast_dtype(x.device)
    if dtype is not None:
        x, weight, bias = _to(dtype, x, weight, bias)
    return _impl("gated_linear", x.device)(x, weight, bias, theta, alive_in, alive_out, seed,
                                           activation, training)


def gated_conv2d(x, weight, bias, theta, alive_in, alive_out, seed, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), activation="none", training=True):
    dtype = _autocast_dtype(x.device)
    if dtype is not None:
        x, weight, bias = _to(dtype, x, weight, bias)
    return _impl("gated_conv2d", x.device)(x, weight, bias, theta, alive_in, alive_out, seed, stride,
                                           padding, dilation, activation, training)


def bn_gate_act(x, weight, bias, running_mean, running_var, theta, alive, seed, momentum=0.1, eps=1e-5,
                activation="relu", training=True):
    if momentum is None:  # each backend failed its own way (or not at all in eval)
        raise TypeError("cadk bn_gate_act: momentum must be a float; for nn.BatchNorm2d's momentum=None "
                        "(a cumulative average) pass 1 / (training batches so far, this one included)")
    if training and guard_or_false(x.numel() == 0):  # a batch size unknown while tracing stays training
        # An empty batch, taken as nn.BatchNorm2d takes it: an empty output, the running statistics left
        # as they are and zero parameter gradients, which are the eval formulas over no values.
        training = False
    return _impl("bn_gate_act", x.device)(x, weight, bias, running_mean, running_var, theta, alive, seed,
                                          momentum, eps, activation, training)


def _load_optional_backends() -> None:
    """Register the compiled and Triton backends that import here; the reference always stays."""
    import importlib

    for name, module in (("cpp", "cpp_backend"), ("cuda", "cuda_backend"), ("triton", "triton_backend")):
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ImportError:
            continue
        if getattr(mod, "AVAILABLE", False):
            register_backend(name, mod)


_load_optional_backends()
for _device_type in ("cpu", "cuda"):  # decided now, not while torch.compile traces the first call:
    _auto(torch.device(_device_type))  # filling the cache there would fail its guard on the next call
flops.register_flop_formulas()
