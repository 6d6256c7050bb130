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


def test_emptied_unit_gate_is_refused_unless_its_block_is_pruned():
    """A unit gate emptied by hand compacted to a layer with no outputs, which failed only when the plain model
    first ran (torch's 'expected weight to be at least 1 at dimension 0'); inside a block it prunes the block,
    whose branch compaction drops."""
    model = cadk.build_model("resnet20", in_channels=1, num_classes=10)
    block = next(m for m in model.modules() if hasattr(m, "internal_gates"))
    inner = block.internal_gates()[0]
    inner.prune(torch.ones_like(inner.alive_mask))
    assert block.is_pruned and cadk.compact(model)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    model.stem.gate.prune(torch.ones_like(model.stem.gate.alive_mask))
    with pytest.raises(ValueError, match=r"unit gates \['stem.gate'\] have no alive unit"):
        cadk.compact(model)


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


def _dtype_models():
    from cadk.nn import GatedConv2d, GatedLinear, GatedSequential

    def mlp():
        return GatedSequential(GatedLinear(5, 6, activation="relu"), GatedLinear(6, 3, gate=False))
    return [("linear", mlp, (4, 5)), ("linear-positions", mlp, (4, 7, 5)),
            ("conv-bn", lambda: GatedSequential(GatedConv2d(3, 6, 3, padding=1, batch_norm=True, activation="relu"),
                                                GatedConv2d(6, 4, 3, bias=True, activation="none")), (2, 3, 7, 7)),
            ("resnet20", lambda: cadk.build_model("resnet20", 1, 10), (2, 1, 10, 10))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,build,shape", _dtype_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_compacted_model_keeps_the_gated_models_dtype(name, build, shape, dtype):
    """A float64 or bfloat16 gated model compacts into plain modules of its dtype (they were float32 and
    refused its inputs), with the gate scale folded in without rounding a float64 theta to float32."""
    gen = torch.Generator().manual_seed(0)
    model = build()
    randomize_bn(model, gen)
    random_thetas(model, gen, binary=False, p_zero=0.0)
    for g in gates_of(model):
        if g.kind == "unit" and g.num_units > 2:
            g.prune(torch.tensor([1]))
    model = model.to(dtype).eval()
    x = torch.randn(*shape, generator=gen).to(dtype)
    plain = cadk.compact(model)
    assert {p.dtype for p in plain.parameters()} == {dtype}
    with torch.no_grad():
        want, got = model(x), plain(x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got, want, **tol)


class _GatedTrunkPlainHead(nn.Module):
    def __init__(self):
        super().__init__()
        from cadk.nn import GatedConv2d

        self.c1 = GatedConv2d(3, 6, 3, activation="relu")
        self.c2 = GatedConv2d(6, 6, 1, gate=False, in_gate=self.c1.gate)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.norm(self.c2(self.c1(x)).mean((2, 3))))


def test_compacted_plain_children_own_their_parameters():
    """Modules without a compact() of their own (a custom parent, plain children) are copied with their own
    parameters and buffers: fine-tuning or converting the compacted model leaves the gated one alone."""
    torch.manual_seed(0)
    model = _GatedTrunkPlainHead().eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
    plain = cadk.compact(model)
    torch.testing.assert_close(plain(x), want)
    gated_ids = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not any(id(t) in gated_ids for t in [*plain.parameters(), *plain.buffers()])
    with torch.no_grad():
        plain.head.weight.add_(1.0)
        plain.norm.bias.add_(1.0)
    plain.double()
    assert model.head.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_compaction_keeps_tensors_and_modules_shared_across_children():
    """One deepcopy memo for the whole compaction: plain children of a GatedSequential that share a weight, or
    one module reached twice, stay shared in the copy (each child's own memo had untied them)."""
    from cadk.nn import GatedLinear, GatedSequential

    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = GatedSequential(a, b, GatedLinear(4, 3, gate=False)).eval()
    plain = cadk.compact(model)
    assert plain[0].weight is plain[1].weight and plain[0].weight is not model[0].weight
    assert cadk.param_count(plain) == cadk.param_count(model)
    lin = nn.Linear(5, 5)
    twice = GatedSequential(GatedSequential(lin, GatedLinear(5, 5, activation="relu"), GatedLinear(5, 3, gate=False)),
                            lin)
    plain = cadk.compact(twice.eval())
    assert plain[0][0].weight is plain[1].weight


def test_compacted_plain_module_has_registries_of_its_own():
    """Dicts and sets of a copied module (hooks, _non_persistent_buffers_set) are its own."""
    model = _GatedTrunkPlainHead().eval()
    plain = cadk.compact(model)
    plain.norm.register_buffer("scratch", torch.zeros(1), persistent=False)
    plain.head.register_forward_hook(lambda *args: None)
    assert "scratch" not in model.norm._non_persistent_buffers_set and not model.head._forward_hooks


class _ParentOwnsSharedGate(nn.Module):
    """A gate made on its own, registered on the parent and shared by two layers."""

    def __init__(self):
        super().__init__()
        self.g = UnitGate(6)
        self.a = cadk.nn.GatedLinear(4, 6, activation="relu", gate=self.g)
        self.b = cadk.nn.GatedLinear(4, 6, activation="relu", gate=self.g)
        self.c = cadk.nn.GatedLinear(6, 3, gate=False, in_gate=self.g)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_gate_registered_on_the_parent_folds_into_its_layers(tmp_path):
    """compact() raised 'a UnitGate cannot be compacted on its own; compact the model that uses it' for the
    model that uses it: the gate is a child of the parent, and it is folded into the layers instead."""
    model = _ParentOwnsSharedGate()
    with torch.no_grad():
        model.g.theta.copy_(torch.tensor([1.0, 0.5, 0.0, 1.0, 0.3, 1.0]))
    model.g.prune(torch.tensor([3]))
    model.eval()
    plain = cadk.compact(model)
    assert not any(isinstance(m, (GatedLayer, UnitGate)) for m in plain.modules())
    assert plain.a[0].out_features == 4  # the pruned unit and the one at theta 0 are gone
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
    cadk.save_compact(plain, x, str(tmp_path / "net"))


def test_save_compact_leaves_a_training_model_training(tmp_path):
    """save_compact switched the model it was given to eval mode for good: a compacted model fine-tuned after a
    save trained on with BN's running statistics and no dropout. The files hold it in eval mode."""
    plain = cadk.compact(cadk.build_model("resnet20", 1, 10)).train()
    paths = cadk.save_compact(plain, torch.randn(1, 1, 12, 12), str(tmp_path / "net"))
    assert plain.training and all(m.training for m in plain.modules())
    assert not torch.load(paths["checkpoint"], weights_only=False)["model"].training


class _NoCompactMethod(nn.Module):
    """A user's model without a compact() of its own: compacted child by child."""

    def __init__(self):
        super().__init__()
        self.a = cadk.nn.GatedConv2d(3, 8, 3, padding=1, batch_norm=True, activation="relu")
        self.head = cadk.nn.GatedLinear(8, 5, gate=False, in_gate=self.a.gate)

    def forward(self, x):
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.a(x), 1), 1))


def test_compacting_a_compiled_model_leaves_the_gated_model_alone():
    """torch.compile's wrapper forwards attribute writes to the model it wraps: compacting it replaced the gated
    model's children with {'_orig_mod': its compacted copy}, and the result ran that broken model."""
    model = _NoCompactMethod()
    model.a.gate.prune(torch.tensor([0, 3, 5]))
    randomize_bn(model, torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    plain = cadk.compact(torch.compile(model))
    assert list(model._modules) == ["a", "head"]
    assert not any(isinstance(m, (GatedLayer, UnitGate)) for m in plain.modules())
    assert plain.a[0].out_channels == 5
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_compaction_and_counting_keep_every_modules_own_mode(tmp_path):
    """compact, flop_count, save_compact and the cost's set-up ran the model in eval mode, then set every module
    back to the root's mode: BN frozen by bn.eval() in a training model trained on its batch statistics."""
    model = cadk.build_model("resnet20", 1, 10).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(1, 1, 12, 12)
    cadk.ComplexityCost(model, x)
    cadk.flop_count(model, x)
    plain = cadk.compact(model)
    assert [m.training for m in model.modules()] == modes
    plain.train()
    next(m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    plain_modes = [m.training for m in plain.modules()]
    cadk.save_compact(plain, x, str(tmp_path / "net"))
    assert [m.training for m in plain.modules()] == plain_modes


@pytest.mark.parametrize("name,model,x", small_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_compacted_builder_models_share_no_module_with_the_gated_one(name, model, x, tmp_path):
    """The builders' compact() put the gated model's pooling modules themselves into the compacted one: a hook
    registered there (feature extraction) also ran in the gated model, and torch.save(gated) failed on it."""
    model.eval()
    plain = cadk.compact(model)
    gated = {id(m) for m in model.modules()}
    assert not [type(m).__name__ for m in plain.modules() if id(m) in gated]
    seen = []
    for m in plain.modules():
        m.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        model(x)
    assert not seen
    torch.save(model, tmp_path / "gated.pt")
