"""Side-by-side table of finished `cadk train` runs (their report.json), for the README.

    python benchmarks/compare_runs.py RUN_DIR [RUN_DIR ...] [--markdown]

Per run: kind (dense / cadk with its budget), seed, test accuracy of the compacted model, FLOPs and
parameters of the compacted model as a share of the dense one (torch.utils.flop_counter counts), and
the first and last epoch times with their ratio. Then, per setting (the whole config but the seed and the
run's paths), the mean over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics


def load(run_dir: str) -> dict:
    path = os.path.join(run_dir, "report.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"compare_runs: cannot read {path} ({e}); is the run finished?")


def kind_of(report: dict) -> str:
    cfg = report["config"]
    if cfg.get("dense"):
        return "dense"
    if cfg.get("target_flops") is not None:
        return f"cadk FLOPs<={cfg['target_flops']:.0%}"
    if cfg.get("target_params") is not None:
        return f"cadk params<={cfg['target_params']:.0%}"
    return f"cadk lam={cfg['lam']}"


# Config entries that differ between seeds of one setting without changing what is measured.
NOT_SETTING = ("seed", "out_dir", "data_dir", "resume", "overwrite")


def setting_of(report: dict) -> str:
    return json.dumps({k: v for k, v in report["config"].items() if k not in NOT_SETTING}, sort_keys=True)


def row(report: dict) -> dict:
    return {"kind": kind_of(report), "setting": setting_of(report), "seed": report["config"]["seed"],
            "epochs": report["config"]["epochs"],
            "acc": 100 * report["test_acc_compact"], "flops": 100 * report["flops_ratio"],
            "params": 100 * report["params_ratio"], "first": report["first_epoch_time"],
            "last": report["last_epoch_time"]}


COLUMNS = ("kind", "seed", "epochs", "test acc %", "FLOPs %", "params %", "epoch 1 s", "last epoch s", "last/first")


def cells(r: dict) -> list[str]:
    return [r["kind"], str(r["seed"]), str(r["epochs"]), f"{r['acc']:.2f}", f"{r['flops']:.1f}",
            f"{r['params']:.1f}", f"{r['first']:.0f}", f"{r['last']:.0f}", f"{r['last'] / r['first']:.2f}"]


def mean_rows(rows: list[dict]) -> list[dict]:
    out = []
    # Grouped by setting, not kind: runs of another model, dataset or length share a kind.
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        if len(group) < 2:
            continue
        m = {k: statistics.mean(r[k] for r in group) for k in ("acc", "flops", "params", "first", "last")}
        out.append({"kind": group[0]["kind"], "seed": "mean", "epochs": group[0]["epochs"], **m})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    rows = [row(load(d)) for d in args.runs]
    table = [cells(r) for r in rows + mean_rows(rows)]
    if args.markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for t in table:
            print("| " + " | ".join(t) + " |")
        return
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(COLUMNS)]
    for line in [list(COLUMNS)] + table:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


if __name__ == "__main__":
    main()
