"""Plots for a training run: final width of every gated layer, FLOPs / accuracy over epochs, and the
epoch time (what pruning during training saves)."""
from __future__ import annotations

import io

from .utils import atomic_write


def plot_run(report: dict, path: str) -> str:
    # A bare Figure, not pyplot: pyplot would need a backend, and switching the process to Agg took the
    # caller's own (a notebook's inline plots) away; savefig renders to PNG without one.
    from matplotlib.figure import Figure

    hist = report["history"]
    epochs = [h["epoch"] for h in hist]
    fig = Figure(figsize=(17, 4.5))
    ax_w, ax_f, ax_t = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.6, 1, 0.8]})
    widths = hist[-1].get("widths") or []
    if widths:
        names = [w["layer"] for w in widths]
        ax_w.bar(range(len(names)), [w["total"] for w in widths], color="#d9d9d9", label="dense width")
        ax_w.bar(range(len(names)), [w["alive"] for w in widths], color="#3b75af", label="alive after training")
        ax_w.set_xticks(range(len(names)))
        ax_w.set_xticklabels(names, rotation=70, fontsize=7)
        ax_w.set_ylabel("units / filters")
        ax_w.legend(fontsize=8)
    else:
        ax_w.text(0.5, 0.5, "dense run: no gates", ha="center", va="center")
    ax_w.set_title("Width of every gated layer")
    ax_f.plot(epochs, [100 * h["flops"] for h in hist], "o-", label="E[FLOPs] % of dense")
    if any("deployed_flops" in h for h in hist):
        ax_f.plot(epochs, [100 * h.get("deployed_flops", h["flops"]) for h in hist], "o--",
                  label="FLOPs % of dense, compacted now")
    ax_f.plot(epochs, [100 * h["params"] for h in hist], "s-", label="E[params] % of dense")
    ax_f.plot(epochs, [100 * h["test_acc"] for h in hist], "^-", label="test accuracy %")
    ax_f.set_xlabel("epoch")
    ax_f.set_ylim(0, 102)
    ax_f.grid(alpha=0.3)
    ax_f.legend(fontsize=8)
    ax_f.set_title(f"{report['config']['model']} on {report['config']['data']}")
    ax_t.bar(epochs, [h["epoch_time"] for h in hist], color="#7a9e4a")
    ax_t.set_xlabel("epoch")
    ax_t.set_ylabel("seconds")
    ax_t.set_title("Epoch time (training only)")
    ax_t.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
