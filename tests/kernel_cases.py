"""Random inputs for cadk's ops and a runner that collects the output and every gradient.

A case is a list of positional arguments in the reference signature plus the positions of the
differentiable inputs. Cases are drawn from a torch.Generator so a failing test can be rerun from its
printed data seed (CADK_TEST_SEED=<seed>).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

ALIVE_KINDS = ("empty", "one", "subset", "all")
CHANNELS = (1, 3, 7, 13)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def data_seed() -> int:
    """Fresh per test unless CADK_TEST_SEED pins it; printed so pytest shows it on failure."""
    seed = int(os.environ.get("CADK_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"data seed: {seed} (rerun with CADK_TEST_SEED={seed})")
    return seed


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def choice(gen: torch.Generator, options):
    return options[randint(gen, 0, len(options) - 1)]


def alive_set(kind: str, full: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "empty":
        return torch.zeros(0, dtype=torch.int64)
    if kind == "all":
        return torch.arange(full)
    count = 1 if kind == "one" else randint(gen, 1, max(1, full - 1))
    return torch.randperm(full, generator=gen)[:count].sort().values


def channels_for(kind: str, gen: torch.Generator) -> int:
    """A full channel count for which `kind` is a proper case (a subset needs 3 or more)."""
    return choice(gen, CHANNELS if kind in ("one", "all", "empty") else CHANNELS[1:])


def randn(shape, gen, dtype, device, channels_last=False, scale=1.0, shift=0.0) -> torch.Tensor:
    t = (torch.randn(shape, generator=gen) * scale + shift).to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(device)


def theta_values(units: int, gen: torch.Generator) -> torch.Tensor:
    """Probabilities in (0, 1) with a few exact 0s and 1s (converged gates)."""
    theta = torch.rand(units, generator=gen) * 0.9 + 0.05
    fixed = torch.rand(units, generator=gen)
    theta[fixed < 0.15] = 0.0
    theta[fixed > 0.85] = 1.0
    return theta


@dataclass
class Case:
    args: list
    grad_args: list[int]                              # positions of the differentiable inputs
    mutated: list[int] = field(default_factory=list)  # positions the op updates in place


def gate_apply_case(gen, device, dtype, kind, training, with_theta, channels_last, units=None) -> Case:
    units = units or channels_for(kind, gen)
    alive = alive_set(kind, units, gen)
    shape = (randint(gen, 1, 4), alive.numel()) + choice(gen, ((), (5, 7), (3,)))
    pre = randn(shape, gen, dtype, device, channels_last)
    theta = theta_values(units, gen).to(device)
    seed = torch.tensor(randint(gen, 0, 2**40), dtype=torch.int64)
    return Case([pre, theta, alive.to(device), seed, training], [0, 1])


RESIDUAL_LAYOUTS = ("nchw", "nhwc", "mixed", "2d", "large")


def gated_residual_case(gen, device, dtype, training, layout) -> Case:
    """A block gate (one alive unit of 1-3) over branch and shortcut of one shape: NCHW, channels-last,
    the two mixed, 2-D, or examples of more than one CPU task's 16384 values."""
    units = randint(gen, 1, 3)
    alive = torch.tensor([randint(gen, 0, units - 1)])
    spatial = {"2d": (), "large": (48, 48)}.get(layout) or choice(gen, ((5, 7), (3, 4), (1, 1)))
    examples = randint(gen, 1, 3 if layout == "large" else 9)
    shape = (examples, 8 if layout == "large" else randint(gen, 1, 6)) + spatial
    shortcut = randn(shape, gen, dtype, device, layout == "nhwc")
    branch = randn(shape, gen, dtype, device, layout in ("nhwc", "mixed"))
    seed = torch.tensor(randint(gen, 0, 2**40), dtype=torch.int64)
    return Case([shortcut, branch, theta_values(units, gen).to(device), alive.to(device), seed, training], [0, 1, 2])


def _layer_common(gen, device, kind_in, kind_out, with_theta, with_bias, channels=None):
    c_in, c_out = channels or (channels_for(kind_in, gen), channels_for(kind_out, gen))
    alive_in, alive_out = alive_set(kind_in, c_in, gen), alive_set(kind_out, c_out, gen)
    theta = theta_values(c_out, gen).to(device) if with_theta else None
    seed = torch.tensor(randint(gen, 0, 2**40), dtype=torch.int64)
    return c_in, c_out, alive_in.to(device), alive_out.to(device), theta, seed


def gated_linear_case(gen, device, dtype, kinds, training, activation, with_theta, with_bias=True,
                      channels=None) -> Case:
    c_in, c_out, alive_in, alive_out, theta, seed = _layer_common(gen, device, *kinds, with_theta, with_bias,
                                                                  channels)
    x = randn((randint(gen, 1, 5), alive_in.numel()), gen, dtype, device)
    weight = randn((c_out, c_in), gen, dtype, device, scale=0.5)
    bias = randn((c_out,), gen, dtype, device) if with_bias else None
    args = [x, weight, bias, theta, alive_in, alive_out, seed, activation, training]
    return Case(args, [i for i in (0, 1, 2, 3) if args[i] is not None])


def gated_conv2d_case(gen, device, dtype, kinds, training, activation, with_theta, channels_last,
                      with_bias=True, channels=None, kernel=None) -> Case:
    c_in, c_out, alive_in, alive_out, theta, seed = _layer_common(gen, device, *kinds, with_theta, with_bias,
                                                                  channels)
    k = kernel or (choice(gen, (1, 3)), choice(gen, (1, 3)))
    stride, padding, dilation = ((choice(gen, (1, 2)), choice(gen, (1, 2))), (choice(gen, (0, 1)),) * 2,
                                 (choice(gen, (1, 2)), 1))
    hw = tuple(max(size, dilation[d] * (k[d] - 1) + 1) for d, size in enumerate(choice(gen, ((5, 7), (4, 4), (7, 5)))))
    x = randn((randint(gen, 1, 3), alive_in.numel()) + hw, gen, dtype, device, channels_last)
    weight = randn((c_out, c_in) + k, gen, dtype, device, channels_last, scale=0.5)
    bias = randn((c_out,), gen, dtype, device) if with_bias else None
    args = [x, weight, bias, theta, alive_in, alive_out, seed, stride, padding, dilation, activation, training]
    return Case(args, [i for i in (0, 1, 2, 3) if args[i] is not None])


def bn_gate_act_case(gen, device, dtype, kind, training, activation, with_theta, channels_last, units=None) -> Case:
    units = units or channels_for(kind, gen)
    alive = alive_set(kind, units, gen)
    shape = (randint(gen, 2, 4), alive.numel(), choice(gen, (5, 3)), choice(gen, (7, 4)))
    x = randn(shape, gen, dtype, device, channels_last, scale=2.0, shift=0.5)
    weight = (torch.rand(units, generator=gen) + 0.5).to(device)
    bias = randn((units,), gen, torch.float32, device)
    running_mean = randn((units,), gen, torch.float32, device)
    running_var = (torch.rand(units, generator=gen) + 0.5).to(device)
    theta = theta_values(units, gen).to(device) if with_theta else None
    seed = torch.tensor(randint(gen, 0, 2**40), dtype=torch.int64)
    args = [x, weight, bias, running_mean, running_var, theta, alive.to(device), seed, 0.1, 1e-5, activation,
            training]
    return Case(args, [i for i in (0, 1, 2, 5) if args[i] is not None], mutated=[3, 4])


def in_place_case(gen, device, op: str, gated: bool) -> Case:
    """A case of `op` whose output no backward reads, so it may be updated in place: with a gate (the
    backward reads pre), or with neither gate nor activation (nothing is read)."""
    activation = "relu" if gated else "none"
    if op == "gate_apply":
        return gate_apply_case(gen, device, torch.float32, "subset", True, True, False)
    if op == "gated_linear":
        return gated_linear_case(gen, device, torch.float32, ("subset", "subset"), True, activation, gated)
    if op == "gated_conv2d":
        return gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, activation, gated, False)
    return bn_gate_act_case(gen, device, torch.float32, "subset", True, activation, gated, False)


def run(fn, case: Case, grad_y_seed: int, add_to_output: bool = False):
    """fn(*args) on fresh leaves; returns (y, grads by position, mutated tensors after the call).
    add_to_output: y += a random tensor before the backward (as residual blocks do to a layer's output)."""
    args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in case.args]
    for i in case.grad_args:
        args[i].requires_grad_(True)
    y = fn(*args)
    gen = torch.Generator().manual_seed(grad_y_seed)
    grad_y = torch.randn(y.shape, generator=gen).to(y.dtype).to(y.device)
    if add_to_output:
        y += torch.randn(y.shape, generator=gen).to(y.dtype).to(y.device)
    leaves = [args[i] for i in case.grad_args]
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True) if y.requires_grad else [None] * len(leaves)
    grads = {i: (torch.zeros_like(args[i]) if g is None else g) for i, g in zip(case.grad_args, grads)}
    return y.detach(), grads, {i: args[i] for i in case.mutated}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, compute_dtype: torch.dtype,
                 tol_scale: float = 1.0) -> None:
    """Elementwise |a - e| <= tol * (|e| + max(1, max|e|)), tol set by the dtype the op computed in
    (times tol_scale, for sums of many terms)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    tol = TOLERANCE[compute_dtype] * tol_scale
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, e.abs().max().item())
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
