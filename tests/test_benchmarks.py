"""The benchmark scripts run end to end on tiny settings (their figures are not checked here)."""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_kernels_tiny(tmp_path):
    stdout = _run("benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "1.0,0.5", "--repeats", "2",
                  "--warmup", "1", "--json", str(tmp_path / "k.json"))
    assert "gated[reference]" in stdout and "floor" in stdout
    rows = json.loads((tmp_path / "k.json").read_text())
    # On glibc the CPU benchmarks keep freed memory (no page faults of recycled activations) unless told not to.
    want = "keeps-freed" if platform.libc_ver()[0] == "glibc" else "system"
    assert f"malloc={want}" in stdout and {r["malloc"] for r in rows} == {want}
    # how each figure was taken travels with it
    assert {(r["repeats"], r["warmup"], r["memory_format"]) for r in rows} == {(2, 1, "channels_last")}
    stdout = _run("benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "0.5", "--layers", "linear",
                  "--repeats", "1", "--warmup", "1", "--system-malloc")
    assert "malloc=system" in stdout
    stdout = _run("benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "0.5", "--repeats", "1",
                  "--warmup", "1", "--frozen-weight")
    assert "frozen-weight" in stdout and "full-size" in stdout


def test_bench_kernels_full_size_variant_keeps_the_contract():
    """full-size: the floor's gradients inside the alive block of full-size gradients, zeros elsewhere."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    gen = torch.Generator().manual_seed(0)
    for kind, spec in bench_kernels.SIZES["tiny"].items():
        if kind == "residual":
            continue
        layer = bench_kernels.Layer(kind, spec, 0.5, "cpu", torch.float64, torch.channels_last, gen)
        floor, full = layer.floor(), layer.full_size()
        floor()
        full()
        (_, w_compact, b_compact), (_, weight, bias) = floor.leaves, full.leaves
        rows, cols = layer.alive_out[:, None], layer.alive_in
        assert torch.allclose(weight.grad[rows, cols], w_compact.grad)
        assert torch.allclose(bias.grad[layer.alive_out], b_compact.grad)
        dead = torch.ones_like(weight.grad, dtype=torch.bool)
        dead[rows, cols] = False
        assert weight.grad.shape == weight.shape and not weight.grad[dead].any()
        assert bias.grad.shape == bias.shape and bias.grad.count_nonzero() <= layer.alive_out.numel()


def test_bench_kernels_residual_tiny():
    stdout = _run("benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "1.0,0.5", "--layers", "residual",
                  "--repeats", "1", "--warmup", "1", "--memory-format", "contiguous")
    assert "unfused[reference]" in stdout and "gated[reference]" in stdout and "floor" in stdout


def test_bench_kernels_conv_bn_variants_compute_one_layer():
    """conv-bn: with every gate on (theta = 1) the gated and unfused variants give the floor's gradients at
    the alive entries (BN statistics over the alive channels only), zeros elsewhere; the run prints them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_kernels
    finally:
        sys.path.pop(0)
    layer = bench_kernels.ConvBN(bench_kernels.SIZES["tiny"]["conv-bn"], 0.5, "cpu", torch.float64,
                                 torch.channels_last, torch.Generator().manual_seed(0))
    layer.conv.theta.fill_(1.0)
    floor = layer.floor()
    floor()
    _, w_compact, gamma_compact, beta_compact = floor.leaves
    rows, cols = layer.conv.alive_out, layer.conv.alive_in
    for step in (layer.gated("reference"), layer.unfused("reference")):
        step()
        _, weight, gamma, beta, _ = step.leaves
        assert torch.allclose(weight.grad[rows][:, cols], w_compact.grad)
        for full, compact in ((gamma, gamma_compact), (beta, beta_compact)):
            assert torch.allclose(full.grad[rows], compact.grad.to(full.dtype))
            assert full.grad.count_nonzero() <= rows.numel()
    stdout = _run("benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "0.5", "--layers", "conv-bn",
                  "--repeats", "1", "--warmup", "1")
    assert "unfused[reference]" in stdout and "gated[reference]" in stdout and "floor" in stdout


def test_bench_train_step_random_pruning():
    stdout = _run("benchmarks/bench_train_step.py", "--random-keep", "0.5", "--batch", "2", "--rounds", "1",
                  "--repeats", "1")
    assert "gated, pruned (last epoch)" in stdout and "compacted plain (floor)" in stdout


def test_bench_triton_host(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "benchmarks/bench_triton_host.py", "--repeats", "2", "--json",
                          str(tmp_path / "h.json")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "h.json").read_text())
    assert {r["op"] for r in rows} >= {"bn_gate_act", "gated_residual"} and all(r["eager"] > 0 for r in rows)


def test_bench_kernels_triton_matmul_variants():
    """triton:fused / triton:torch time the linear layer only (the conv has one way to multiply)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "0.5",
                          "--backends", "triton,triton:fused,triton:torch", "--repeats", "1", "--warmup", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any("linear" in ln and "gated[triton:fused]" in ln for ln in lines)
    assert not any("conv3x3" in ln and "gated[triton:" in ln for ln in lines)


def test_bench_train_step_keeps_thetas_fixed():
    """Epoch 1 (the warm-up drops theta gradients) and a settled last epoch never move theta, so the timed
    steps must not: a theta moved off 1 turns a fixed gate into a sampled one (Philox draws, random zeros)."""
    import cadk
    from cadk.nn import gates_of

    bench = _bench("bench_train_step")
    model = cadk.build_model("resnet20", 1, 10)
    bench._random_prune(model, 0.5, torch.Generator().manual_seed(0))
    before = [g.theta.detach().clone() for g in gates_of(model)]
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    for kw in ({}, {"warmup": False}):  # epoch 1 (the default), a settled last epoch
        step = bench._step_fn(model.train(), x, y, **kw)
        step()
        step()
        assert all(torch.equal(b, g.theta) for b, g in zip(before, gates_of(model)))


def test_bench_triton_host_steps_start_without_gradients():
    """Each timed step gets fresh gradients, as after the trainer's zero_grad(set_to_none=True): a step that
    accumulated into the last one's would time an extra add per leaf."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = """
import gc, sys, torch
sys.path.insert(0, "benchmarks")
import bench_triton_host as bench
from cadk.kernels import triton_backend as tb
bench._stub_launches(tb)
steps = bench._steps(tb)
leaves = [t for t in gc.get_objects() if torch.is_tensor(t) and t.is_leaf and t.requires_grad]
for name, step in steps.items():
    step()
    grads = [t.grad for t in leaves]
    step()
    assert all(g is None or t.grad is not g for t, g in zip(leaves, grads)), name
"""
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def _compact_run(run_dir: Path, keep: float, model: str = "mlp", shape=(1, 10, 28), **cfg) -> dict:
    """A finished run's files as bench_compact reads them (by default an MLP on Fashion-MNIST), `keep` of its
    units kept; shape: (input channels, classes, image side)."""
    import cadk

    in_ch, classes, size = shape
    gated = cadk.build_model(model, in_ch, classes, **({"image_size": size} if model == "mlp" else {}))
    _bench("bench_train_step")._random_prune(gated, keep, torch.Generator().manual_seed(0))
    run_dir.mkdir()
    example = torch.randn(1, in_ch, size, size)
    paths = cadk.save_compact(cadk.compact(gated), example, str(run_dir / "model_compact"))
    report = {"config": {"model": model, "data": "fashion-mnist", **cfg}, "flops_ratio": keep,
              "params_ratio": keep, "artifacts": paths}
    (run_dir / "report.json").write_text(json.dumps(report))
    return report


def _timed_models(monkeypatch, run_dir: Path, inputs: list | None = None) -> list:
    """The models bench_compact times on `run_dir`, dense first, at batch 1 and one round (their inputs
    appended to `inputs`)."""
    bench = _bench("bench_compact")
    timed, inputs = [], [] if inputs is None else inputs
    monkeypatch.setattr(bench, "_time", lambda model, x, repeats: timed.append(model) or inputs.append(x) or 1.0)
    monkeypatch.setattr(sys, "argv", ["bench_compact.py", str(run_dir), "--batch", "1", "--rounds", "1"])
    bench.main()
    return timed[-2:]


def test_bench_compact_runs_both_models_alike(tmp_path, monkeypatch):
    """The dense twin runs through TorchScript as the compacted model does: an eager twin would add
    Python's per-module calls to the dense side of the speed-up."""
    _compact_run(tmp_path / "run", 0.5)
    dense, compacted = _timed_models(monkeypatch, tmp_path / "run")
    assert isinstance(compacted, torch.jit.ScriptModule) and isinstance(dense, torch.jit.ScriptModule)


def test_bench_compact_reads_the_run_directorys_model(tmp_path, monkeypatch):
    """The compacted model comes from the run directory given, not from the path its report was written
    with: a run moved aside, with a new run in its old place, timed the new run's model."""
    report = _compact_run(tmp_path / "run", 0.25)
    (tmp_path / "run").rename(tmp_path / "old")
    _compact_run(tmp_path / "run", 1.0)  # the new run where the old one was written
    _, compacted = _timed_models(monkeypatch, tmp_path / "old")
    want = torch.jit.load(str(tmp_path / "old" / "model_compact.ts"))
    assert report["artifacts"]["torchscript"] == str(tmp_path / "run" / "model_compact.ts")
    assert sum(p.numel() for p in compacted.parameters()) == sum(p.numel() for p in want.parameters())


def test_compare_runs_means_only_runs_that_differ_by_seed(tmp_path, capsys):
    """The per-kind mean is over seeds of one setting: runs of other models, data or epoch counts are not
    averaged into it (the mean row showed the first run's epochs next to times of 15- and 30-epoch runs)."""
    bench = _bench("compare_runs")

    def run(name, seed, seconds, **cfg):
        config = {"model": "resnet20", "data": "fashion-mnist", "epochs": 15, "dense": True, "seed": seed,
                  "out_dir": f"runs/{name}", **cfg}
        report = {"config": config, "test_acc_compact": 0.9, "flops_ratio": 1.0, "params_ratio": 1.0,
                  "first_epoch_time": seconds, "last_epoch_time": seconds}
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        return str(tmp_path / name)

    runs = [run("a", 0, 100.0), run("b", 1, 120.0), run("c", 2, 900.0, epochs=30), run("d", 3, 500.0, data="cifar10")]
    bench.main(runs)
    means = [ln.split() for ln in capsys.readouterr().out.splitlines() if " mean " in ln]
    assert means == [["dense", "mean", "15", "90.00", "100.0", "100.0", "110", "110", "1.00"]]


def test_bench_kernels_frozen_weight_marks_only_the_layers_it_freezes(tmp_path):
    """--frozen-weight freezes the linear and conv layers' weight and bias; the conv-BN and residual
    variants keep every gradient, and their rows must not say otherwise."""
    _run("benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "0.5", "--layers", "linear,conv-bn,residual",
         "--repeats", "1", "--warmup", "1", "--frozen-weight", "--json", str(tmp_path / "k.json"))
    rows = json.loads((tmp_path / "k.json").read_text())
    assert {(r["layer"], r["frozen_weight"]) for r in rows} == {("linear", True), ("conv-bn", False),
                                                               ("residual", False)}


def test_bench_kernels_matmul_variants_only_where_there_is_a_matmul():
    """triton:fused / triton:torch name a LINEAR_MATMUL: residual and conv-BN layers have none, and rows under
    those names there timed the plain Triton op again."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--size", "tiny", "--keeps", "0.5",
                          "--layers", "residual", "--backends", "triton,triton:fused", "--repeats", "1",
                          "--warmup", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("residual")]
    assert any("gated[triton]" in ln for ln in rows) and not any("triton:fused" in ln for ln in rows)


def test_bench_compact_image_folder_runs_at_their_image_size(tmp_path, monkeypatch):
    """An image-folder run is timed on its own crops and classes: its models had been timed on 32x32 inputs,
    against a 10-class dense twin (a ResNet takes any size, so nothing failed)."""
    _compact_run(tmp_path / "run", 0.5, "resnet20", (3, 5, 40), data="imagefolder", image_size=40)
    inputs = []
    dense, compacted = _timed_models(monkeypatch, tmp_path / "run", inputs)
    assert {tuple(x.shape) for x in inputs} == {(1, 3, 40, 40)}
    assert dense(inputs[-1]).shape == compacted(inputs[-1]).shape == (1, 5)


def test_bench_compact_runs_both_models_in_the_inputs_layout(tmp_path, monkeypatch):
    """Both models' conv weights are channels-last, as the inputs: a TorchScript file does not keep the layout,
    and a loaded NCHW weight is converted on every call, which the channels-last dense twin does not pay."""
    _compact_run(tmp_path / "run", 1.0, "resnet20", (1, 10, 28))
    for model in _timed_models(monkeypatch, tmp_path / "run"):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
