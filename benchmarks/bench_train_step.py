"""Training-step time of a pruned gated model against the same model before pruning.

    python benchmarks/bench_train_step.py runs/resnet20-fashion-mnist-cadk-s0 [--batch 128] [--threads N]

Loads the run's last checkpoint and times one training step (forward, backward, weight and theta
updates) for: the gated model with its pruned structure; the same gated model with every structure
alive (what the first epoch pays); the dense plain model; the compacted plain model (the floor for the
pruned structure). Rounds are interleaved and medians reported, so machine noise hits all alike.
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


def _step_fn(model, x, y):
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
        if topt:
            topt.step()
    return step


def _timed(step, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = load_checkpoint(os.path.join(args.run_dir, "checkpoint.pt"))
    cfg = state["config"]
    in_ch, classes, size = (1, 10, 28) if cfg["data"] == "fashion-mnist" else (3, 100 if cfg["data"] == "cifar100" else 10, 32)
    pruned = cadk.build_model(cfg["model"], in_ch, classes)
    pruned.load_state_dict(state["model"])
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
    steps = {k: _step_fn(m.to(memory_format=torch.channels_last).train(), x, y) for k, m in variants.items()}
    for s in steps.values():
        s()  # warm-up
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            times[k].append(_timed(s, args.repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {k: cadk.flop_count(m, x[:1]) for k, m in variants.items()}
    base = "gated, all alive (epoch 1)"
    print(f"{cfg['model']} train step, batch {args.batch}, backend {cadk.kernels.backend_for(x.device)}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':<28} {'ms/step':>9} {'time vs epoch 1':>16} {'FLOPs vs epoch 1':>17}")
    for k in steps:
        print(f"{k:<28} {1e3 * med[k]:>9.1f} {med[k] / med[base]:>16.3f} {flops[k] / flops[base]:>17.3f}")


if __name__ == "__main__":
    main()
