"""The complexity model counts what the compacted network costs, exactly at 0/1 thetas and in
expectation at fractional ones."""
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cadk
from cadk.compaction import flop_count, param_count
from cadk.nn import gates_of
from helpers import random_thetas, randomize_bn, small_models


@pytest.mark.parametrize("name,model,x", small_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_binary_thetas_count_exactly_what_flop_counter_measures(name, model, x):
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    model.eval()
    cm = cadk.ComplexityModel(model, x)
    dense = cadk.compact(model)
    assert cm.dense_flops == flop_count(dense, x[:1]) and cm.dense_params == param_count(dense)
    for _ in range(3):
        random_thetas(model, gen, binary=True)
        flops, params = cm.expected()
        plain = cadk.compact(model)
        assert flops.item() == flop_count(plain, x[:1])
        assert params.item() == param_count(plain)


@pytest.mark.parametrize("name,model,x", small_models()[:3], ids=lambda v: v if isinstance(v, str) else "")
def test_gated_forward_computes_only_what_the_compacted_model_does(name, model, x):
    """Once the theta = 0 structures are pruned, FlopCounterMode counts the same FLOPs in the gated
    model's forward (cadk ops over alive channels) as in the compacted model's."""
    gen = torch.Generator().manual_seed(1)
    random_thetas(model, gen, binary=True)
    with torch.no_grad():
        for g in gates_of(model):
            g.prune(g.theta == 0)
    model.eval()
    plain = cadk.compact(model)
    with FlopCounterMode(display=False) as fc:
        model(x[:1])
    assert fc.get_total_flops() == flop_count(plain, x[:1]) < cadk.ComplexityModel(model, x).dense_flops


def test_fractional_thetas_equal_mean_over_sampled_structures():
    gen = torch.Generator().manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10).eval()
    x = torch.randn(1, 1, 12, 12)
    cm = cadk.ComplexityModel(model, x)
    random_thetas(model, gen, binary=False)
    probs = {g: g.theta.detach().clone() for g in gates_of(model)}
    exp_flops, exp_params = (float(v.detach()) for v in cm.expected())
    samples = []
    for _ in range(48):  # structures drawn from the gates, each compacted and measured
        with torch.no_grad():
            for g, p in probs.items():
                g.theta.copy_((torch.rand(p.shape, generator=gen) < p).float())
        plain = cadk.compact(model)
        samples.append((flop_count(plain, x), param_count(plain)))
    for i, expected in ((0, exp_flops), (1, exp_params)):
        vals = torch.tensor([s[i] for s in samples], dtype=torch.float64)
        stderr = vals.std() / math.sqrt(len(vals))
        assert abs(vals.mean() - expected) <= 4 * stderr, (vals.mean(), expected, stderr)


def test_pruned_structures_leave_the_cost():
    model = cadk.build_model("resnet20", 1, 10)
    cm = cadk.ComplexityModel(model, torch.randn(1, 1, 28, 28))
    f0, p0 = (v.detach() for v in cm.ratios())
    assert float(f0) == pytest.approx(1.0) and float(p0) == pytest.approx(1.0)
    model.blocks[4].layer_gate.prune(torch.tensor([0]))
    model.blocks[0].branch[0].gate.prune(torch.arange(8))
    f1, p1 = (v.detach() for v in cm.ratios())
    assert float(f1) < float(f0) and float(p1) < float(p0)


def test_cost_gradient_prices_units_by_what_they_control():
    model = cadk.build_model("resnet20", 1, 10)
    cost = cadk.ComplexityCost(model, torch.randn(1, 1, 28, 28), lam=2.0, alpha=0.5, beta=1.0)
    cost.add_grad_()
    stem_unit = model.stem.gate.theta.grad[0].item()  # stage-1 stream channel: every stage-1 conv
    mid_unit = model.blocks[0].branch[0].gate.theta.grad[0].item()  # one block's inner channel
    assert stem_unit > mid_unit > 0
    layer = model.blocks[0].layer_gate.theta.grad.item()
    # alpha scales layer gates: compare against alpha = 1
    model2 = cadk.build_model("resnet20", 1, 10)
    cadk.ComplexityCost(model2, torch.randn(1, 1, 28, 28), lam=2.0, alpha=1.0, beta=1.0).add_grad_()
    assert layer == pytest.approx(0.5 * model2.blocks[0].layer_gate.theta.grad.item())


def test_target_mode_adapts_lam_both_ways():
    model = cadk.build_model("mlp", 1, 10, image_size=8, hidden=(16,))
    cost = cadk.ComplexityCost(model, torch.randn(1, 1, 8, 8), lam=0.0, target_flops=0.6, lam_lr=0.1)
    cost.add_grad_()
    assert cost.lam > 0  # dense model is over budget
    with torch.no_grad():
        model.layers[0].gate.theta.fill_(0.55)
    lam = cost.lam
    stats = cost.add_grad_()
    # fractional thetas meet the expected budget but rounding them keeps every unit: lam keeps rising
    assert stats["flops"] < 0.6 < stats["rounded_flops"] and cost.lam > lam
    with torch.no_grad():
        model.layers[0].gate.theta[:12] = 0.45
    lam = cost.lam
    stats = cost.add_grad_()
    # units below 1/2 no longer count, though compaction would still keep them: lam relaxes
    assert stats["rounded_flops"] < 0.6 < stats["deployed_flops"] and cost.lam < lam
    with torch.no_grad():
        model.layers[0].gate.theta[:12] = 0.55
    model.layers[0].gate.prune(torch.arange(12))
    lam = cost.lam
    stats = cost.add_grad_()
    assert stats["deployed_flops"] < 0.6 and cost.lam < lam  # under budget once units are gone: lam relaxes


def test_target_anneals_over_ramp_and_lam_steps_are_relative():
    model = cadk.build_model("mlp", 1, 10, image_size=8, hidden=(16,))
    cost = cadk.ComplexityCost(model, torch.randn(1, 1, 8, 8), lam=2.0, target_flops=0.4, lam_lr=0.1,
                               ramp_steps=10)
    assert cost.target_now() == pytest.approx(1.0)
    stats = cost.add_grad_()
    # the dense model meets the annealed target of the first step exactly: lam holds
    assert stats["target"] == pytest.approx(1.0) and cost.lam == pytest.approx(2.0)
    for _ in range(4):
        stats = cost.add_grad_()
    assert stats["target"] == pytest.approx(1 - 0.6 * 0.4)
    # over budget by 1/0.76 - 1: one relative step of lam_lr times that error
    lam = cost.lam
    cost.add_grad_()
    assert cost.lam == pytest.approx(lam * math.exp(0.1 * (1 / (1 - 0.6 * 0.5) - 1)))
    for _ in range(20):
        cost.add_grad_()
    assert cost.target_now() == pytest.approx(0.4)  # the ramp ends at the budget and stays there
    restored = cadk.ComplexityCost(model, torch.randn(1, 1, 8, 8), target_flops=0.4, ramp_steps=10)
    restored.load_state_dict(cost.state_dict())
    assert restored.lam == cost.lam and restored.target_now() == cost.target_now()


def test_cost_rejects_bad_knobs():
    model = cadk.build_model("mlp", 1, 10, image_size=8, hidden=(16,))
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="beta"):
        cadk.ComplexityCost(model, x, beta=2.0)
    with pytest.raises(ValueError, match="target"):
        cadk.ComplexityCost(model, x, target_flops=0.0)
    with pytest.raises(ValueError, match="no cadk gated layers"):
        cadk.ComplexityModel(torch.nn.Linear(2, 2), torch.randn(1, 2))
    for knobs in ({"lam": float("nan")}, {"alpha": float("nan")}, {"lam": float("inf")}):  # NaN passed lam < 0
        with pytest.raises(ValueError, match="finite"):
            cadk.ComplexityCost(model, x, **knobs)
    for lam_lr in (-0.02, float("nan")):  # the budget controller would run the wrong way
        with pytest.raises(ValueError, match="lam_lr"):
            cadk.ComplexityCost(model, x, target_flops=0.5, lam_lr=lam_lr)


@pytest.mark.parametrize("input_grad", [False, True], ids=["data", "hidden"])
def test_training_step_flops_match_plain_layer(input_grad):
    """Forward + backward of a gated conv with every unit alive counts what the plain conv counts: no
    input gradient for data (as autograd skips it), input and weight gradients otherwise."""
    from cadk.nn import GatedConv2d

    gated = GatedConv2d(3, 8, 3, padding=1, bias=True, theta_init=1.0).train()
    plain = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    counts = []
    for layer in (gated, plain):
        x = torch.randn(2, 3, 9, 9, requires_grad=input_grad)
        with FlopCounterMode(display=False) as fc:
            layer(x).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1]


class _StreamNet(nn.Module):
    """A residual stream with a stream -> stream layer: one gate on its input and its output side."""

    def __init__(self):
        super().__init__()
        from cadk.nn import GatedLinear

        self.a = GatedLinear(4, 5, activation="relu")
        self.b = GatedLinear(5, 5, activation="relu", gate=self.a.gate, in_gate=self.a.gate)
        self.fc = GatedLinear(5, 3, gate=False, in_gate=self.a.gate)

    def forward(self, x):
        h = self.a(x)
        return self.fc(h + self.b(h))


def test_expected_cost_of_a_layer_with_one_gate_on_both_sides_is_the_mean_over_structures():
    """Its k x k pairs have mean E[k^2] = n^2 - sum theta^2 + n, not n^2 (xi_j * xi_j = xi_j): checked against
    the exact mean over all 2^5 structures, each counted by the same model at 0/1 thetas."""
    import itertools

    net = _StreamNet()
    cm = cadk.ComplexityModel(net, torch.randn(2, 4))
    gate, p = net.a.gate, torch.tensor([0.9, 0.2, 0.5, 0.7, 0.4])
    with torch.no_grad():
        gate.theta.copy_(p)
    want_flops = want_params = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=5):
        xi = torch.tensor(bits)
        weight = float(torch.prod(torch.where(xi > 0, p, 1 - p)))
        flops, params = cm.expected({gate: xi})
        want_flops, want_params = want_flops + weight * float(flops), want_params + weight * float(params)
    flops, params = (float(v.detach()) for v in cm.expected())
    assert flops == pytest.approx(want_flops) and params == pytest.approx(want_params)


def test_plain_layers_outside_the_gated_ones_count_their_flops_too():
    """A plain nn.Conv2d before the gated layers costs FLOPs the compacted model keeps: counted with its
    parameters (E[FLOPs] was 155648 against 183296 measured: the parameters were counted, the FLOPs not)."""
    from cadk.nn import GatedConv2d, GatedSequential

    torch.manual_seed(0)
    model = GatedSequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                            GatedConv2d(8, 16, 3, padding=1, batch_norm=True, activation="relu"),
                            GatedConv2d(16, 4, 1, gate=False)).eval()
    x = torch.randn(1, 3, 8, 8)
    cm = cadk.ComplexityModel(model, x)
    gate = model[2].gate
    for on in ([1.0] * 16, [1.0, 0.0] * 8):
        with torch.no_grad():
            gate.theta.copy_(torch.tensor(on))
        plain = cadk.compact(model)
        flops, params = cm.expected()
        assert (flops.item(), params.item()) == (flop_count(plain, x), param_count(plain))
    assert cm.dense_flops == flop_count(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                                      nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1)), x)


def test_bfloat16_model_counts_wide_layers_exactly():
    """A bfloat16 model's widths are summed in float64: 301 alive units were summed in bfloat16 to 300
    (E[FLOPs] 8400 against 8428 measured on the compacted model)."""
    model = cadk.build_model("mlp", 1, 10, image_size=2, hidden=(400,)).to(torch.bfloat16).eval()
    model.layers[0].gate.prune(torch.arange(99))
    x = torch.randn(1, 1, 2, 2, dtype=torch.bfloat16)
    cm = cadk.ComplexityModel(model, x)
    plain = cadk.compact(model)
    flops, params = cm.expected()
    assert (flops.item(), params.item()) == (flop_count(plain, x), param_count(plain))


class _Twice(nn.Module):
    """Gated layers applied twice in one forward (shared weights)."""

    def __init__(self):
        super().__init__()
        from cadk.nn import GatedLinear

        self.a = GatedLinear(6, 6, activation="relu")
        self.b = GatedLinear(6, 3, gate=False, in_gate=self.a.gate)

    def forward(self, x):
        return self.b(self.a(x)) + self.b(self.a(2 * x))


def test_a_layer_applied_twice_costs_its_flops_twice():
    """E[FLOPs] was 72 against 144 measured: the example forward recorded one call per layer (180 once plain
    layers' FLOPs were counted: the second call became a constant that pruning did not shrink)."""
    model = _Twice().eval()
    model.a.gate.prune(torch.tensor([0, 1]))
    x = torch.randn(1, 6)
    cm = cadk.ComplexityModel(model, x)
    plain = cadk.compact(model)
    flops, params = cm.expected()
    assert (flops.item(), params.item()) == (flop_count(plain, x), param_count(plain))
    assert cm.fixed_flops == 0


class _FlattenedConv(nn.Module):
    """A gated conv whose flattened output feeds a linear layer: its width changes with every pruned filter."""

    def __init__(self):
        super().__init__()
        from cadk.nn import GatedConv2d, GatedLinear

        self.conv = GatedConv2d(3, 4, 3, padding=1, batch_norm=True, activation="relu")
        self.fc = GatedLinear(4 * 5 * 5, 2, gate=False)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_a_model_that_pruning_would_break_is_refused_with_the_module_named():
    """A plain layer (or an unwired gated one) reading a gated output ran until the first pruning event, after
    the warm-up, and failed there with torch's shape error; the cost's set-up now names it."""
    from cadk.nn import GatedConv2d

    plain_bn = nn.Sequential(GatedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match=r"pruned, in module '1' \(BatchNorm2d\) .*running_mean.*GatedConv2d\("):
        cadk.ComplexityCost(plain_bn, torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"pruned, in module 'fc' \(GatedLinear\)"):
        cadk.ComplexityCost(_FlattenedConv(), torch.randn(1, 3, 5, 5))
    model = plain_bn[0]
    cadk.ComplexityCost(model, torch.randn(1, 3, 5, 5))
    assert model.gate.num_alive == 8 and model.training  # the probe leaves the model as it was
