"""Host time of the Triton backend's ops, forward+backward, with their kernels not launched.

The Triton backend's ops are Python, and on a GPU their host work (checks, allocations, PyTorch calls,
autograd) sets the time at small and medium sizes (README, GPU section). This script measures that
work on any machine without a GPU: it runs the ops on tiny CPU tensors with every Triton launch replaced
by a no-op, so everything but those launches is timed (their own host cost, Triton's argument binding and
the driver call, is left out). PyTorch's own calls run on the CPU here; on a GPU machine each one also
pays a CUDA launch. Variants: `eager` (the public functions, as layers call them)
and `registered` (the same ops through torch.ops and the custom-op machinery, as under torch.compile).

    python benchmarks/bench_triton_host.py [--repeats 300] [--json out.json]

Needs triton importable with TRITON_INTERPRET unset (interpreted kernels would run, not be skipped).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from cadk.utils import atomic_write_json


def _stub_launches(tb) -> None:
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    tb.wrap_triton = lambda kernel: NoLaunch()
    tb._check_alive = lambda *args, **kwargs: None  # reads index values on CPU tensors only, never on a GPU


def _steps(tb) -> dict:
    """name -> a forward+backward closure on tiny tensors (half of each layer's units alive)."""
    def leaf(*shape, cl=False):
        t = torch.randn(*shape)
        return (t.contiguous(memory_format=torch.channels_last) if cl else t).requires_grad_()

    seed, c = torch.tensor(7), 16
    alive = torch.arange(0, c, 2)
    theta = torch.full((c,), 0.5, requires_grad=True)
    x2, w2, b = leaf(4, 8), leaf(c, c), leaf(c)
    x4, w4 = leaf(2, 8, 4, 4, cl=True), leaf(c, c, 3, 3)
    stats, gamma, beta, branch = (torch.zeros(c), torch.ones(c)), leaf(c), leaf(c), leaf(2, 8, 4, 4, cl=True)

    def linear(matmul):
        def step():
            tb.LINEAR_MATMUL = matmul
            tb.gated_linear(x2, w2, b, theta, alive, alive, seed, "relu", True).sum().backward()
        return step

    def fresh(step):  # as after zero_grad(set_to_none=True): no step adds into the last one's gradients
        def run():
            for t in (x2, w2, b, theta, x4, w4, gamma, beta, branch):
                t.grad = None
            step()
        return run

    return {name: fresh(step) for name, step in {
        "gated_linear (fused matmul)": linear("fused"),
        "gated_linear (torch matmul)": linear("torch"),
        "gated_conv2d": lambda: tb.gated_conv2d(x4, w4, b, theta, alive, alive, seed, (1, 1), (1, 1), (1, 1),
                                                "relu", True).sum().backward(),
        "bn_gate_act": lambda: tb.bn_gate_act(x4, gamma, beta, *stats, theta, alive, seed, 0.1, 1e-5, "relu",
                                              True).sum().backward(),
        "gate_apply": lambda: tb.gate_apply(x4, theta, alive, seed, True).sum().backward(),
        "gated_residual": lambda: tb.gated_residual(x4, branch, theta, alive[:1], seed, True).sum().backward(),
    }.items()}


def _median_ms(step, repeats: int, rounds: int = 7) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times) * 1e3


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=300, help="steps per round (7 rounds, median)")
    p.add_argument("--json", default=None, help="write the results to this path")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_triton_host: unset TRITON_INTERPRET (interpreted kernels would run instead of being skipped)")
    from cadk.kernels import triton_backend as tb

    if not tb.AVAILABLE:
        sys.exit(f"bench_triton_host: the Triton backend is not available here: {tb.UNAVAILABLE_REASON}")
    torch.set_num_threads(1)
    _stub_launches(tb)
    eager = tb._eager
    results = []
    print(f"torch {torch.__version__}, 1 thread; host ms per forward+backward, kernels not launched")
    print(f"{'op':30} {'eager':>8} {'registered':>11}")
    for name, step in _steps(tb).items():
        row = {"op": name}
        for variant, use_eager in (("eager", eager), ("registered", lambda tensors: False)):
            tb._eager = use_eager
            row[variant] = _median_ms(step, args.repeats)
        tb._eager = eager
        results.append(row)
        print(f"{name:30} {row['eager']:8.3f} {row['registered']:11.3f}")
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
