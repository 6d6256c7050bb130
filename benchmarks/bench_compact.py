"""Inference speed of a compacted model against the dense model of the same architecture.

    python benchmarks/bench_compact.py runs/resnet20-fashion-mnist-cadk-s0 [--batch 256] [--threads N]

Loads the run's compacted TorchScript model and report, builds the dense twin (every gate at 1, compacted
to plain modules, traced to TorchScript as the compacted model was), and times eval forwards of both side
by side (interleaved, medians), so machine noise hits both alike. Prints FLOPs and parameter ratios next
to the measured latency ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import cadk
from cadk.data import FOLDER_DATASETS


def _time(model, x, repeats):
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def _input_of(cfg: dict) -> tuple[int, int]:
    """(input channels, image side) of the run's data: image folders are cropped to their --image-size."""
    if cfg["data"] == "fashion-mnist":
        return 1, 28
    return 3, cfg["image_size"] if cfg["data"] in FOLDER_DATASETS else 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = json.load(open(os.path.join(args.run_dir, "report.json")))
    cfg = report["config"]
    # The file in run_dir: the report's path is where the run was written (relative to that process's
    # working directory), which after a move may hold another run's model.
    compacted = torch.jit.load(os.path.join(args.run_dir, os.path.basename(report["artifacts"]["torchscript"]))).eval()
    # A TorchScript file does not keep the weights' layout: loaded NCHW, they would be converted on every call.
    compacted = compacted.to(memory_format=torch.channels_last)
    in_ch, size = _input_of(cfg)
    example = torch.randn(2, in_ch, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        classes = compacted(example).shape[1]  # an image folder's class count is in no file of the run
    kw = {"image_size": size} if cfg["model"] == "mlp" else {}
    dense = cadk.compact(cadk.build_model(cfg["model"], in_ch, classes, **kw)).eval()
    dense = dense.to(memory_format=torch.channels_last)
    # Traced as save_compact traces the compacted model: an eager twin would add Python's per-module calls
    # to the dense side of the speed-up. Batch 2: a batch of 1 would be specialised as a constant.
    with torch.no_grad():
        dense = torch.jit.trace(dense, example, check_trace=False)
    print(f"{cfg['model']} on {cfg['data']}: compacted FLOPs {100 * report['flops_ratio']:.1f}% and params "
          f"{100 * report['params_ratio']:.1f}% of dense; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'dense ms':>10} {'compact ms':>11} {'speed-up':>9} {'FLOPs ratio':>12}")
    for b in args.batch:
        x = torch.randn(b, in_ch, size, size).contiguous(memory_format=torch.channels_last)
        repeats = max(3, 512 // b)
        for m in (dense, compacted):
            _time(m, x, 2)  # warm-up: oneDNN primitive caches, TorchScript profiling runs
        td, tc = [], []
        for _ in range(args.rounds):
            td.append(_time(dense, x, repeats))
            tc.append(_time(compacted, x, repeats))
        d, c = statistics.median(td), statistics.median(tc)
        print(f"{b:>6} {1e3 * d:>10.3f} {1e3 * c:>11.3f} {d / c:>8.2f}x {report['flops_ratio']:>12.3f}")


if __name__ == "__main__":
    main()
