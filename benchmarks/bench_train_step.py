"""Training-step time of a pruned gated model against the same model before pruning.

    python benchmarks/bench_train_step.py runs/resnet20-fashion-mnist-cadk-s0 [--batch 128] [--threads N]
    python benchmarks/bench_train_step.py --random-keep 0.5 [--model resnet20] [--device cuda]

Loads the run's last checkpoint (or, with --random-keep, builds the model and prunes each unit gate to
that fraction of its units at random, for machines without a run) and times one training step (forward,
backward with theta gradients, weight update; thetas stay fixed, as in the first epoch's warm-up and after
the structure settles) for: the gated model with its pruned structure (what a settled last epoch pays); the
same gated model with every structure alive (what the first epoch pays); the dense plain model; the
compacted plain model (the floor for the pruned structure). Rounds are interleaved and medians reported,
so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

import cadk
from cadk.nn import gates_of
from cadk.training import load_checkpoint
from cadk.utils import keep_freed_memory


def _step_fn(model, x, y, warmup: bool = True):
    """A training step as the trainer takes it in epoch 1 (`warmup`: theta gradients computed, then dropped
    before the theta optimizer's step, which only projects) or in a settled last epoch (no theta step).
    Thetas never move in either: one moved off 1 would turn a fixed gate into a sampled one."""
    weights, gates = cadk.split_parameters(model)
    opt = torch.optim.SGD(weights, lr=1e-4, momentum=0.9)
    topt = cadk.ThetaSGD(gates, lr=1e-4) if gates else None

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if topt:
            topt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if topt and warmup:
            for g in gates:
                g.theta.grad = None
            topt.step()
    return step


def _timed(step, repeats, sync):
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats


def _random_prune(model, keep: float, gen: torch.Generator) -> None:
    """Keep a random `keep` fraction (at least one) of every unit gate's units; layer gates stay."""
    with torch.no_grad():
        for g in gates_of(model):
            if g.kind != "unit":
                continue
            drop = torch.randperm(g.num_units, generator=gen)[max(1, round(keep * g.num_units)):]
            g.prune(drop)
            g.refresh()


def _load(args):
    """(pruned gated model, its config) from the run's checkpoint or a random pruning."""
    state = None if args.random_keep is not None else load_checkpoint(os.path.join(args.run_dir, "checkpoint.pt"))
    cfg = {"model": args.model, "data": args.data} if state is None else state["config"]
    in_ch, classes, _ = _shape_of(cfg)
    model = cadk.build_model(cfg["model"], in_ch, classes)
    if state is None:
        _random_prune(model, args.random_keep, torch.Generator().manual_seed(0))
    else:
        model.load_state_dict(state["model"])
    return model, cfg


def _shape_of(cfg) -> tuple[int, int, int]:
    """(input channels, classes, image size) of the run's data."""
    if cfg["data"] == "fashion-mnist":
        return 1, 10, 28
    return 3, 100 if cfg["data"] == "cifar100" else 10, 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a run directory (omit with --random-keep)")
    p.add_argument("--random-keep", type=float, default=None,
                   help="no checkpoint: keep this fraction of each unit gate's units, chosen at random")
    p.add_argument("--model", default="resnet20", help="with --random-keep")
    p.add_argument("--data", default="fashion-mnist", help="with --random-keep: input shape and classes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default of returning freed memory to the system (see cadk.utils.keep_freed_memory)")
    args = p.parse_args()
    if (args.run_dir is None) == (args.random_keep is None):
        p.error("give either a run directory or --random-keep")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kept_freed = device.type == "cpu" and not args.system_malloc and keep_freed_memory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pruned, cfg = _load(args)
    in_ch, classes, size = _shape_of(cfg)
    unpruned = copy.deepcopy(pruned)
    with torch.no_grad():
        for g in gates_of(unpruned):
            g.alive_mask.fill_(True)
            g.theta.fill_(1.0)
            g.refresh()
    x = torch.randn(args.batch, in_ch, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch,))
    variants = {
        "gated, all alive (epoch 1)": unpruned,
        "gated, pruned (last epoch)": pruned,
        "dense plain": cadk.compact(unpruned).train(),
        "compacted plain (floor)": cadk.compact(pruned).train(),
    }
    flops = {k: cadk.flop_count(m, x[:1]) for k, m in variants.items()}
    x, y = x.to(device), y.to(device)
    steps = {}
    for k, m in variants.items():
        m = m.to(device, memory_format=torch.channels_last).train()  # gates rebuild alive lists on the device
        steps[k] = _step_fn(m, x, y, warmup=k != "gated, pruned (last epoch)")
    for s in steps.values():
        s()  # warm-up
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            times[k].append(_timed(s, args.repeats, sync))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = "gated, all alive (epoch 1)"
    print(f"{cfg['model']} train step, batch {args.batch}, device {device}, backend {cadk.kernels.backend_for(device)}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          + (", malloc keeps freed memory" if kept_freed else ""))
    print(f"{'variant':<28} {'ms/step':>9} {'time vs epoch 1':>16} {'FLOPs vs epoch 1':>17}")
    for k in steps:
        print(f"{k:<28} {1e3 * med[k]:>9.1f} {med[k] / med[base]:>16.3f} {flops[k] / flops[base]:>17.3f}")


if __name__ == "__main__":
    main()
