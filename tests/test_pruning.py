"""The pruning rule, its guards, and that pruning is permanent, cheaper, and survives save/load."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cadk
from cadk.nn import gates_of


def _setup(model, **kw):
    weights, gates = cadk.split_parameters(model)
    opt = torch.optim.SGD(weights, lr=0.01, momentum=0.9)
    topt = cadk.ThetaSGD(gates, lr=0.1)
    return opt, topt, cadk.Pruner(model, **kw)


def test_theta_optimizer_projects_onto_unit_interval_and_pins_pruned():
    gate = cadk.nn.UnitGate(4, theta_init=0.5)
    gate.prune(torch.tensor([3]))
    opt = cadk.ThetaSGD([gate], lr=1.0)
    gate.theta.grad = torch.tensor([1.0, -1.0, 0.2, -5.0])
    opt.step()
    assert gate.theta.tolist() == [0.0, 1.0, 0.30000001192092896, 0.0]
    adam = cadk.ThetaAdam([gate], lr=0.1)
    gate.theta.grad = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    adam.step()
    assert gate.theta[3] == 0 and gate.theta.max() <= 1


def test_theta_optimizers_given_thetas_say_they_take_gates():
    """cadk.ThetaAdam([g.theta for g in gates]) failed with "'Parameter' object has no attribute 'theta'"."""
    gates = cadk.nn.gates_of(cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,)))
    for cls in (cadk.ThetaSGD, cadk.ThetaAdam):
        with pytest.raises(TypeError, match=rf"{cls.__name__} takes the model's gates .*split_parameters.*not Parameters"):
            cls([g.theta for g in gates])
        cls(iter(gates))


def test_theta_optimizers_refuse_low_precision_thetas():
    """model.bfloat16() casts the thetas too, where steps of ~1e-3 near theta 1 rounded to nothing and the
    gates silently never moved; the optimizers now refuse such gates, and take them back in float32."""
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,)).bfloat16()
    gates = cadk.split_parameters(model)[1]
    for cls in (cadk.ThetaSGD, cadk.ThetaAdam):
        with pytest.raises(TypeError, match=rf"{cls.__name__}: a gate's theta is torch.bfloat16.*g.float\(\)"):
            cls(gates)
    for g in gates:
        g.float()
    opt = cadk.ThetaAdam(gates, lr=1e-3)
    F.cross_entropy(model(torch.randn(4, 1, 4, 4, dtype=torch.bfloat16)).float(), torch.tensor([0, 1, 2, 0])).backward()
    before = gates[0].theta.detach().clone()
    opt.step()
    assert (gates[0].theta - before).abs().max() > 5e-4


def test_patience_eps_warmup_and_last_unit_guard():
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    gate = model.layers[0].gate
    opt, topt, pruner = _setup(model, eps=0.01, patience=3, warmup_steps=4, every=1)
    with torch.no_grad():
        gate.theta.copy_(torch.tensor([0.0, 0.005, 0.5, 1.0, 0.0, 0.0]))
    for _ in range(4):
        assert pruner.step([opt, topt]) == []  # warm-up: nothing goes
    pruner.step([opt, topt])
    assert gate.alive_mask.tolist() == [False, False, True, True, False, False]
    with torch.no_grad():
        gate.theta.zero_()
    for _ in range(3):
        pruner.step([opt, topt])
    assert gate.num_alive == 1  # a layer never loses its last unit through unit pruning


def test_block_pruning_takes_internal_units_and_zeroes_weights_and_optimizer_state():
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    opt, topt, pruner = _setup(model, patience=1, every=1)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    block = model.blocks[2]
    with torch.no_grad():
        block.layer_gate.theta.zero_()
        model.blocks[0].branch[0].gate.theta[:5] = 0
    pruner.step([opt, topt])
    assert block.is_pruned and all(g.is_pruned for g in block.internal_gates())
    conv1 = block.branch[0]
    assert conv1.weight.abs().sum() == 0
    assert opt.state[conv1.weight]["momentum_buffer"].abs().sum() == 0
    c = model.blocks[0].branch[0]
    assert c.weight[:5].abs().sum() == 0 and c.weight[5:].abs().sum() > 0
    # pruned weights stay zero through further training steps: they have left the optimizer step
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert conv1.weight.abs().sum() == 0 and c.weight[:5].abs().sum() == 0


def _forward_flops(model, x):
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def test_forward_flops_fall_as_structures_are_pruned():
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    x = torch.randn(2, 1, 28, 28)
    opt, topt, pruner = _setup(model, patience=1, every=1)
    measured = [_forward_flops(model, x)]
    # an inner unit group, a whole block, then half of the stage-3 residual stream
    for target in (model.blocks[0].branch[0].gate, model.blocks[4].layer_gate, model.blocks[6].shortcut.gate):
        with torch.no_grad():
            target.theta[: max(1, target.num_units // 2)] = 0
        pruner.step([opt, topt])
        measured.append(_forward_flops(model, x))
    assert all(b < a for a, b in zip(measured, measured[1:])), measured


def test_save_load_resume_reproduces_structure_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    opt, topt, pruner = _setup(model, patience=1, every=1)
    with torch.no_grad():
        model.blocks[1].branch[0].gate.theta[:7] = 0
        model.blocks[5].layer_gate.theta.zero_()
    pruner.step([opt, topt])
    with torch.no_grad():  # sampled gates, so that the comparison below depends on the keys
        model.blocks[2].branch[0].gate.theta[model.blocks[2].branch[0].gate.alive_mask] = 0.5
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "topt": topt.state_dict(),
                "pruner": pruner.state_dict(), "rng": torch.get_rng_state()}, path)
    x = torch.randn(3, 1, 28, 28)
    state = torch.load(path)
    torch.set_rng_state(state["rng"])
    out = model(x)  # training forward: gates from the saved keys and torch's generator state
    fresh = cadk.build_model("resnet20", 1, 10, seed=99)
    fresh.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"])
    assert [g.num_alive for g in gates_of(fresh)] == [g.num_alive for g in gates_of(model)]
    assert fresh.blocks[5].is_pruned
    torch.testing.assert_close(fresh(x), out)


def test_settle_rounds_to_a_deterministic_network_within_the_budget():
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    x = torch.randn(2, 1, 28, 28)
    cost = cadk.ComplexityCost(model, x, target_flops=0.25)
    opt, topt, pruner = _setup(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in gates_of(model):
            g.theta.copy_(0.3 + 0.7 * torch.rand(g.num_units, generator=gen))
    threshold = cost.settle_threshold()
    assert threshold >= 0.5
    assert cost.deployed_ratios(threshold)[0] <= 0.25 < cost.deployed_ratios(0.5)[0]
    events = pruner.settle(threshold, [opt, topt])
    assert events
    for g in gates_of(model):  # every survivor at 1, every other structure pruned for good
        assert bool((g.theta[g.alive_mask] == 1).all()) and bool((g.theta[~g.alive_mask] == 0).all())
    flops, _ = cost.deployed_ratios()
    assert flops <= 0.25 and float(cost.value()[1].detach()) == pytest.approx(flops)  # E[FLOPs] is now exact
    model.eval()
    plain = cadk.compact(model)
    assert cadk.flop_count(plain, x[:1]) == pytest.approx(flops * cost.complexity.dense_flops)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_settle_keeps_the_best_unit_of_a_gate_below_the_threshold():
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    gate = model.layers[0].gate
    opt, topt, pruner = _setup(model)
    with torch.no_grad():
        gate.theta.copy_(torch.tensor([0.1, 0.3, 0.2, 0.05, 0.4, 0.0]))
    pruner.settle(0.5, [opt, topt])
    assert gate.alive_mask.tolist() == [False, False, False, False, True, False]
    assert gate.theta.tolist() == [0, 0, 0, 0, 1, 0]


def _block_with_shifted_bn():
    from cadk.nn import GatedBasicBlock

    torch.manual_seed(0)
    block = GatedBasicBlock(8, 8, 1, in_gate=None)
    with torch.no_grad():  # a BN shift makes a branch over no channels visible: relu(x + theta_B * shift)
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_()
    return block


def test_block_whose_inner_units_are_all_pruned_by_hand_is_a_pruned_block():
    """docs/METHOD.md: a block whose internal units are all pruned is a pruned block, also when they were pruned
    by hand (UnitGate.prune): it computes relu(shortcut), compacts to it, and costs what that costs."""
    block = _block_with_shifted_bn()
    block.internal_gates()[0].prune(torch.ones(8, dtype=torch.bool))
    assert block.is_pruned and block.layer_gate.theta.item() == 0.0
    block.eval()
    x = torch.randn(2, 8, 5, 5)
    plain = cadk.compact(block)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x))
        torch.testing.assert_close(plain(x), F.relu(x))
    flops, params = cadk.ComplexityModel(block, x).expected()
    assert (float(flops), float(params)) == (cadk.flop_count(plain, x), cadk.param_count(plain))


def test_loaded_state_with_an_emptied_inner_gate_prunes_the_block():
    """A state_dict whose inner gate has no unit left but whose layer gate is alive (edited by hand, or
    saved before the rule) loads as a pruned block."""
    block, state = _block_with_shifted_bn(), _block_with_shifted_bn().state_dict()
    gate_key = next(k for k in state if k.endswith("alive_mask") and "layer_gate" not in k and state[k].numel() == 8)
    state[gate_key] = torch.zeros(8, dtype=torch.bool)
    block.load_state_dict(state)
    assert block.is_pruned
    with torch.no_grad():
        x = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(block.eval()(x), F.relu(x))


def test_whole_gated_model_pickles_and_its_blocks_keep_the_rule():
    """torch.save(model) pickles the blocks' load hook (a lambda could not be pickled); the loaded copy's
    inner gates prune the copy's own layer gates."""
    import io

    model = cadk.build_model("resnet20", 3, 10).eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))
    blocks = [m for m in loaded.modules() if hasattr(m, "internal_gates")]
    gate = blocks[1].internal_gates()[0]
    gate.prune(torch.ones_like(gate.alive_mask))
    assert blocks[1].is_pruned and not [m for m in model.modules() if hasattr(m, "internal_gates")][1].is_pruned


def test_settle_meets_the_budget_its_threshold_claims_when_the_guard_keeps_a_unit():
    """The threshold is chosen on the network settle leaves: the last-unit guard keeps the best unit of a
    gate the threshold would empty, which the choice had counted as width 0 (twice the budget here)."""
    from cadk.models.small import GatedVGG

    torch.manual_seed(0)
    model, x = GatedVGG([8, 8], 1, 10), torch.randn(2, 1, 16, 16)
    cost = cadk.ComplexityCost(model, x, target_flops=0.15)
    first, second = (m.out_gate for m in model.features)
    with torch.no_grad():
        first.theta.fill_(0.9)
        second.theta.fill_(0.6)
    threshold = cost.settle_threshold()
    cadk.Pruner(model).settle(threshold)
    flops, _ = cost.deployed_ratios()
    assert cadk.flop_count(cadk.compact(model.eval()), x[:1]) == pytest.approx(flops * cost.complexity.dense_flops)
    assert flops <= 0.15, f"settled at theta > {threshold:.3f} to {flops:.3f} of dense FLOPs, budget 0.15"


def test_settle_threshold_with_no_theta_above_one_half():
    """Nothing left to round away above 1/2: the threshold is 1/2 (an IndexError before)."""
    model = cadk.build_model("mlp", 1, 10, image_size=8, hidden=(32,))
    cost = cadk.ComplexityCost(model, torch.randn(2, 1, 8, 8), target_params=0.001)
    with torch.no_grad():
        for g in gates_of(model):
            g.theta.fill_(0.4)
    assert cost.settle_threshold() == 0.5


def test_pruned_block_leaves_the_optimizer_step():
    """A pruned block's parameters, its last conv's BN included (keyed by the stream gate, which stays alive),
    and its thetas' optimizer moments are zeroed: SGD with momentum and weight decay no longer moves them."""
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    weights, gates = cadk.split_parameters(model)
    opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=5e-4)
    theta_opt = cadk.ThetaAdam(gates, lr=0.01)
    pruner = cadk.Pruner(model, patience=1, every=1)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))

    def step():
        opt.zero_grad()
        theta_opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        theta_opt.step()
        pruner.step([opt, theta_opt])

    step()
    step()
    block = model.blocks[1]
    with torch.no_grad():
        block.layer_gate.theta.zero_()
    pruner.step([opt, theta_opt])
    assert block.is_pruned
    bn = block.branch[-1].bn
    before = [p.detach().clone() for p in (bn.weight, bn.bias)]
    for _ in range(3):
        step()
    for b, p in zip(before, (bn.weight, bn.bias)):
        assert torch.equal(b, p.detach()), "a pruned block's parameters still move in the optimizer step"
    for g in [block.layer_gate, *block.internal_gates()]:
        assert all(theta_opt.state[g.theta][k].abs().sum() == 0 for k in ("exp_avg", "exp_avg_sq"))


def test_settle_keeps_structures_at_theta_one_when_rounding_cannot_meet_the_budget():
    """All thetas at 1 but four units at 0.7, budget 90% of FLOPs: removing the four misses it. The threshold
    keeps every structure at theta 1 (over budget) instead of jumping to 1 and pruning the whole network."""
    model, x = cadk.build_model("resnet20", 1, 10), torch.randn(2, 1, 16, 16)
    cost = cadk.ComplexityCost(model, x, target_flops=0.9)
    with torch.no_grad():
        model.blocks[0].branch[0].gate.theta[:4] = 0.7
    threshold = cost.settle_threshold()
    assert threshold == pytest.approx(0.7)
    cadk.Pruner(model).settle(threshold)
    assert all(not b.is_pruned for b in model.blocks) and cost.deployed_ratios()[0] > 0.9


def test_units_the_pruner_takes_with_a_block_pruned_by_hand_leave_the_optimizer_step():
    """A block pruned by hand (UnitGate.prune on its layer gate): the next check prunes its inner units and
    reports it, so their weights, momentum and theta moments are zeroed (the check reported nothing and
    left them: momentum 155.4, Adam exp_avg 0.12)."""
    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    weights, gates = cadk.split_parameters(model)
    opt, theta_opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9), cadk.ThetaAdam(gates, lr=0.01)
    pruner = cadk.Pruner(model, patience=1, every=1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        theta_opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        theta_opt.step()
    block = model.blocks[2]
    block.layer_gate.prune(torch.tensor([0]))
    events = pruner.step([opt, theta_opt])
    inner = block.internal_gates()[0]
    assert inner.is_pruned and any("blocks.2.branch.0.gate" in e for e in events)
    conv = block.branch[0]
    assert conv.weight.abs().sum() == 0 and opt.state[conv.weight]["momentum_buffer"].abs().sum() == 0
    assert theta_opt.state[inner.theta]["exp_avg"].abs().sum() == 0


class _SharedGateNotRegistered(torch.nn.Module):
    """Two layers share a gate made on its own, which no module of the model holds as an attribute."""

    def __init__(self):
        super().__init__()
        gate = cadk.nn.UnitGate(6)
        self.a = cadk.nn.GatedLinear(4, 6, activation="relu", gate=gate)
        self.b = cadk.nn.GatedLinear(4, 6, activation="relu", gate=gate)
        self.c = cadk.nn.GatedLinear(6, 3, gate=False, in_gate=gate)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_a_gate_no_module_of_the_model_holds_is_refused():
    """Its theta was in no optimizer, state_dict or Pruner (split_parameters found no gate at all, and
    training went on with the gates fixed at 1): the set-up now names the layers and the fix."""
    model = _SharedGateNotRegistered()
    with pytest.raises(ValueError, match=r"gated layers \['a'\] use a UnitGate that is not a submodule.*"
                                         r"self.gate = UnitGate"):
        cadk.split_parameters(model)
    with pytest.raises(ValueError, match="not a submodule"):
        cadk.ComplexityCost(model, torch.randn(1, 4))
    model.gate = model.a.out_gate  # registered on the parent: trained, saved and pruned
    assert cadk.split_parameters(model)[1] == [model.gate] and "gate.theta" in model.state_dict()


def test_pruner_takes_one_optimizer_as_well_as_a_list():
    """pruner.step(opt) returned nothing until the first pruning event, which then failed with "'SGD' object is
    not iterable" after pruning the gate, leaving its weights and momentum unzeroed."""
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    weights, gates = cadk.split_parameters(model)
    opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 1, 4, 4)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    pruner = cadk.Pruner(model, every=1, patience=1)
    with torch.no_grad():
        gates[0].theta[:2] = 0
    assert pruner.step(opt) == ["pruned layers.0.gate: -2 (4 left)"]
    layer = model.layers[0]
    assert not layer.weight[:2].any() and not opt.state[layer.weight]["momentum_buffer"][:2].any()
    pruner.settle(0.5, opt)
