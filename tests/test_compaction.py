"""Compaction: plain modules, same eval outputs, artifacts that load without cadk."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import cadk
from cadk.nn import GatedLayer, UnitGate, gates_of
from helpers import random_thetas, randomize_bn, small_models


def _prune_some(model, gen):
    for g in gates_of(model):
        if g.kind == "layer" and torch.rand(1, generator=gen) < 0.3:
            g.prune(torch.tensor([0]))
        elif g.kind == "unit" and g.num_units > 2:
            g.prune(torch.randperm(g.num_units, generator=gen)[: g.num_units // 3])


@pytest.mark.parametrize("name,model,x", small_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_compacted_model_matches_gated_eval_outputs(name, model, x):
    gen = torch.Generator().manual_seed(1)
    randomize_bn(model, gen)
    _prune_some(model, gen)
    random_thetas(model, gen, binary=False)
    for g in gates_of(model):
        g.prune(torch.zeros_like(g.alive_mask))  # re-pin pruned thetas at 0
    model.eval()
    plain = cadk.compact(model)
    assert not any(isinstance(m, (GatedLayer, UnitGate)) for m in plain.modules())
    with torch.no_grad():
        ref, out = model(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert cadk.param_count(plain) < cadk.ComplexityModel(model, x).dense_params


def test_gate_with_every_theta_at_zero_compacts_to_one_zero_unit():
    """Unit pruning never removes a gate's last unit, but every alive theta can still sit at 0: the
    compacted layer keeps one unit whose output is exactly zero instead of failing on zero width."""
    gen = torch.Generator().manual_seed(2)
    model = cadk.build_model("resnet20", 1, 10)
    randomize_bn(model, gen)
    with torch.no_grad():
        model.blocks[1].branch[0].gate.theta.zero_()  # an inner unit group
        model.stem.gate.theta.zero_()                  # the stage-1 stream
    model.eval()
    plain = cadk.compact(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref, out = model(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert plain[0][0].out_channels == 1


def test_custom_parents_compact_child_by_child():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = cadk.nn.GatedLinear(3, 4)

        def forward(self, x):
            return self.a(x).sum()

    assert isinstance(cadk.compact(nn.Sequential(cadk.nn.GatedLinear(3, 4)))[0], nn.Linear)
    model = Custom().eval()
    plain = cadk.compact(model)  # the parent keeps its forward; its gated children become plain
    assert isinstance(plain.a, nn.Linear)
    x = torch.randn(2, 3)
    torch.testing.assert_close(plain(x), model(x))


def test_artifacts_load_and_run_without_cadk(tmp_path):
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    gen = torch.Generator().manual_seed(0)
    _prune_some(model, gen)
    model.eval()
    plain = cadk.compact(model)
    x = torch.randn(2, 1, 28, 28)
    paths = cadk.save_compact(plain, x[:1], str(tmp_path / "net"))
    torch.save({"x": x, "y": plain(x).detach()}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules['cadk'] = None  # any import of cadk now fails
import torch
data = torch.load({str(tmp_path / 'expected.pt')!r})
for path, load in (({paths['torchscript']!r}, torch.jit.load), ({paths['exported']!r}, lambda p: torch.export.load(p).module())):
    m = load(path)
    torch.testing.assert_close(m(data["x"]), data["y"], rtol=1e-5, atol=1e-5)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
