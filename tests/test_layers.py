"""Gated layers compute only alive channels while parameters keep their full shape."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cadk
from cadk.nn import GatedBasicBlock, GatedConv2d, GatedLinear, GatedSequential, UnitGate


def test_full_gates_at_one_equal_plain_layers():
    torch.manual_seed(0)
    conv = GatedConv2d(3, 6, 3, stride=2, padding=1, bias=False, batch_norm=True, activation="relu")
    plain_conv = nn.Conv2d(3, 6, 3, 2, 1, bias=False)
    plain_bn = nn.BatchNorm2d(6)
    plain_conv.weight.data.copy_(conv.weight.data)
    x = torch.randn(4, 3, 9, 9)
    torch.testing.assert_close(conv(x), F.relu(plain_bn(plain_conv(x))))  # training mode, theta = 1
    torch.testing.assert_close(conv.bn.running_mean, plain_bn.running_mean)
    torch.testing.assert_close(conv.bn.running_var, plain_bn.running_var)


def test_pruned_channels_are_skipped_and_grads_stay_full_size():
    torch.manual_seed(0)
    a = GatedConv2d(3, 8, 3, padding=1, bias=False, batch_norm=True, activation="relu")
    b = GatedConv2d(8, 5, 3, padding=1, in_gate=a.gate)
    a.gate.prune(torch.tensor([1, 4, 6]))
    x = torch.randn(2, 3, 6, 6)
    h = a(x)
    assert h.shape == (2, 5, 6, 6)  # only alive channels travel between layers
    y = b(h)
    y.sum().backward()
    assert a.weight.grad.shape == a.weight.shape and b.weight.grad.shape == b.weight.shape
    assert a.weight.grad[[1, 4, 6]].abs().sum() == 0
    assert b.weight.grad[:, [1, 4, 6]].abs().sum() == 0
    assert a.bn.weight.grad[[1, 4, 6]].abs().sum() == 0
    assert a.weight.grad[[0, 2]].abs().sum() > 0
    assert a.gate.theta.grad[[1, 4, 6]].abs().sum() == 0


def test_bn_running_stats_of_pruned_channels_stay():
    conv = GatedConv2d(2, 4, 1, batch_norm=True)
    conv.gate.prune(torch.tensor([2]))
    before = conv.bn.running_mean.clone()
    conv(torch.randn(8, 2, 3, 3) + 3)
    assert conv.bn.running_mean[2] == before[2]
    assert (conv.bn.running_mean[[0, 1, 3]] != before[[0, 1, 3]]).all()


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_bn_running_stats_follow_batchnorm2d(momentum):
    """As nn.BatchNorm2d: training batches counted in num_batches_tracked, momentum=None a cumulative
    average over them; an empty batch gives an empty output and zero gradients, statistics unchanged."""
    torch.manual_seed(0)
    gated = GatedConv2d(2, 4, 3, padding=1, batch_norm=True, activation="relu", bn_momentum=momentum)
    conv, bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum)
    conv.load_state_dict({"weight": gated.weight.detach(), "bias": gated.bias.detach()})
    for _ in range(3):
        x = torch.randn(3, 2, 5, 5)
        torch.testing.assert_close(gated(x), F.relu(bn(conv(x))))
    torch.testing.assert_close(dict(gated.bn.named_buffers()), dict(bn.named_buffers()))
    before = {k: v.clone() for k, v in gated.bn.named_buffers()}
    y = gated(torch.randn(0, 2, 5, 5))
    y.sum().backward()
    assert y.shape == (0, 4, 5, 5) and not gated.bn.weight.grad.any() and not gated.weight.grad.any()
    torch.testing.assert_close(gated.bn.running_mean, before["running_mean"])
    torch.testing.assert_close(gated.bn.running_var, before["running_var"])


def test_bn_frozen_by_its_own_eval_mode_follows_batchnorm2d():
    """bn.eval() in a training model (frozen BN) uses and keeps the running statistics, as nn.BatchNorm2d
    does, while the layer's gates are still sampled; the converse (layer eval, BN training) too."""
    torch.manual_seed(0)
    gated = GatedConv2d(2, 4, 3, padding=1, batch_norm=True, activation="relu")
    conv, bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
    conv.load_state_dict({"weight": gated.weight.detach(), "bias": gated.bias.detach()})
    with torch.no_grad():
        for b in (gated.bn, bn):
            b.running_mean.fill_(0.5)
            b.running_var.fill_(2.0)
    gated.train()
    gated.bn.eval()
    bn.eval()
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(gated(x), F.relu(bn(conv(x))))  # theta 1: every gate on
    torch.testing.assert_close(dict(gated.bn.named_buffers()), dict(bn.named_buffers()))
    with torch.no_grad():
        gated.gate.theta.fill_(0.5)
    y = gated(x)
    y.sum().backward()
    assert gated.gate.theta.grad.abs().sum() > 0  # sampled gates: theta still learns
    assert set(y[y != 0].div(F.relu(bn(conv(x)))[y != 0]).round(decimals=4).tolist()) == {1.0}
    gated.eval()
    gated.bn.train()
    bn.train()
    torch.testing.assert_close(gated(x), 0.5 * F.relu(bn(conv(x))))
    torch.testing.assert_close(dict(gated.bn.named_buffers()), dict(bn.named_buffers()))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_bn_cumulative_average_under_checkpointing(use_reentrant):
    """momentum=None under activation checkpointing: a recomputation that stops inside the BN op (early
    stop) must not count a batch whose statistics it did not add; the average stays nn.BatchNorm2d's."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    gated = GatedConv2d(2, 4, 3, padding=1, batch_norm=True, activation="relu", bn_momentum=None)
    conv, bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None)
    conv.load_state_dict({"weight": gated.weight.detach(), "bias": gated.bias.detach()})
    for _ in range(3):
        x = torch.randn(8, 2, 5, 5, requires_grad=True)
        checkpoint(gated, x, use_reentrant=use_reentrant).sum().backward()
        bn(conv(x))
    torch.testing.assert_close(gated.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(gated.bn.running_var, bn.running_var)


def test_wrong_input_width_names_the_problem():
    a = GatedLinear(6, 4)
    b = GatedLinear(4, 3, in_gate=a.gate)
    a.gate.prune(torch.tensor([0]))
    with pytest.raises(ValueError, match="expects input .* with 3 channels"):
        b(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"4 dims.*x\[None\]"):
        GatedConv2d(4, 2, 1)(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="expects input .* with 6 features in the last dim"):
        a(torch.randn(2, 6, 5))  # [N, features, T]: features go last
    with pytest.raises(ValueError, match=r"2 dims.*x\[None\]"):
        a(torch.randn(6))
    with pytest.raises(ValueError, match=r"4 dims.*x.flatten\(0, 1\)"):
        GatedConv2d(4, 2, 1)(torch.randn(2, 2, 4, 3, 3))


def _sequence_pair(activation="relu"):
    """A GatedLinear fed by a gate with pruned units, and an input [N, T, alive inputs]."""
    torch.manual_seed(0)
    src = UnitGate(9)
    src.prune(torch.tensor([2, 5]))
    lin = GatedLinear(9, 8, activation=activation, in_gate=src)
    with torch.no_grad():
        lin.gate.theta.copy_(torch.rand(8) * 0.8 + 0.1)
    lin.gate.prune(torch.tensor([3]))
    return lin, torch.randn(5, 6, 7, requires_grad=True)


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_linear_positions_share_each_examples_gate(activation):
    """[N, T, F]: position t is the 2-D op on x[:, t] with the same seed (example n's gates), and the
    gradients are the sums over the positions (docs/METHOD.md: the theta estimate sums over positions)."""
    lin, x = _sequence_pair(activation)
    y = lin(x)
    assert y.shape == (5, 6, 7)
    dy = torch.randn_like(y)
    y.backward(dy)
    seed, theta = lin.gate.current_seed(), lin.gate.theta.detach().requires_grad_()
    w, b = lin.weight.detach().requires_grad_(), lin.bias.detach().requires_grad_()
    xs = x.detach().requires_grad_()
    rows = [cadk.kernels.gated_linear(xs[:, t], w, b, theta, lin.alive_in(), lin.alive_out(), seed, activation,
                                      True) for t in range(6)]
    torch.testing.assert_close(y, torch.stack(rows, 1))
    torch.autograd.backward(rows, [dy[:, t] for t in range(6)])
    for got, want in ((x.grad, xs.grad), (lin.weight.grad, w.grad), (lin.bias.grad, b.grad),
                      (lin.gate.theta.grad, theta.grad)):
        torch.testing.assert_close(got, want)
    w_alive = lin.weight[lin.alive_out()][:, lin.alive_in()]
    z = F.linear(x, w_alive, lin.bias[lin.alive_out()]).detach()
    xi = (y.detach() != 0).any(1)  # [N, A]: the gate of example n and unit j, one for all positions
    torch.testing.assert_close(y.detach(), xi[:, None, :] * (z.relu() if activation == "relu" else z))
    assert xi.any() and not xi.all()


def test_linear_positions_eval_compact_and_cost():
    lin, x = _sequence_pair()
    lin.eval()
    with torch.no_grad():
        lin.gate.theta[lin.gate.alive_mask] = 1.0  # expectation = gate: the compacted layer is exact
    torch.testing.assert_close(lin.compact()(x), lin(x))
    assert lin(x[:, :1]).squeeze(1).shape == lin(x[:, 0]).shape
    torch.testing.assert_close(lin(x[:, :1]).squeeze(1), lin(x[:, 0]))
    net = GatedSequential(lin)
    per_position = cadk.ComplexityModel(net, torch.randn(2, 7)).expected()[0]
    six = cadk.ComplexityModel(net, torch.randn(2, 6, 7)).expected()[0]
    torch.testing.assert_close(six, 6 * per_position)


@pytest.mark.parametrize("shape", [(0, 6, 7), (5, 0, 7), (5, 3, 0, 7), (0, 0, 7)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_linear_positions_without_rows(shape, training):
    """No example or no position, as nn.Linear takes them: an empty output of the matching shape, and
    zero gradients for the input and every parameter."""
    lin, _ = _sequence_pair()
    lin.train(training)
    x = torch.randn(shape, requires_grad=True)
    y = lin(x)
    assert y.shape == (*shape[:-1], lin.alive_out().numel())
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (lin.weight, lin.bias, lin.gate.theta):
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()


def test_linear_positions_without_inputs():
    """Every input unit pruned: [N, T, 0] gives the bias (gated), as the 2-D layer does per row."""
    src = UnitGate(4)
    lin = GatedLinear(4, 3, in_gate=src).eval()
    src.prune(torch.arange(4))
    x = torch.randn(2, 5, 0)
    torch.testing.assert_close(lin(x), lin(x.reshape(10, 0)).reshape(2, 5, 3))


def test_unsupported_configurations_fail_early():
    with pytest.raises(NotImplementedError, match="groups=1"):
        GatedConv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="activation"):
        GatedLinear(2, 2, activation="gelu")
    with pytest.raises(ValueError, match="GatedSequential"):
        GatedSequential(GatedLinear(4, 4), nn.Flatten(), GatedLinear(4, 2))
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(GatedConv2d(3, 4, 3, batch_norm=True))
    with pytest.raises(NotImplementedError, match="SyncBatchNorm"):
        conv(torch.randn(2, 3, 5, 5))


def test_gated_sequential_wires_gates():
    seq = GatedSequential(GatedLinear(5, 7, activation="relu"), nn.Dropout(0.0), GatedLinear(7, 2, gate=False))
    assert seq[2].in_gate is seq[0].gate
    seq[0].gate.prune(torch.tensor([0, 3]))
    assert seq(torch.randn(3, 5)).shape == (3, 2)


def test_gated_sequential_takes_any_module_before_a_layer_wired_by_hand():
    """The error's advice works: a gated layer given its in_gate by hand may follow a pooling layer; one left
    to be wired is refused with the modules named, and so is an ungated output's follower no longer."""
    conv = GatedConv2d(3, 6, 3, padding=1, batch_norm=True, activation="relu")
    head = GatedLinear(6, 4, gate=False, in_gate=conv.gate)
    seq = GatedSequential(conv, nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), head)
    conv.gate.prune(torch.tensor([1, 4]))
    x = torch.randn(2, 3, 8, 8)
    seq(x).sum().backward()
    seq.eval()
    torch.testing.assert_close(cadk.compact(seq)(x), seq(x))
    GatedSequential(GatedLinear(4, 5, gate=False), nn.LayerNorm(5), GatedLinear(5, 2))
    with pytest.raises(ValueError, match=r"GatedLinear \[0\] through Flatten \[1\] to GatedLinear \[2\]; pass"):
        GatedSequential(GatedLinear(4, 4), nn.Flatten(), GatedLinear(4, 2))
    with pytest.raises(ValueError, match=r"GatedLinear \[0\] through LayerNorm \[2\]"):
        GatedSequential(GatedLinear(4, 4), nn.ReLU(), nn.LayerNorm(4))


def test_pruned_block_is_skipped():
    stem = GatedConv2d(3, 8, 3, padding=1, bias=False, batch_norm=True, activation="relu")
    block = GatedBasicBlock(8, 8, in_gate=stem.gate)
    x = stem(torch.randn(2, 3, 5, 5))
    block.layer_gate.prune(torch.tensor([0]))
    calls = []
    block.branch[0].register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(block(x), F.relu(x))
    assert not calls


def test_pruned_block_gives_its_branch_zero_gradients():
    """Every parameter gets a full-size gradient each step (DDP with find_unused_parameters=False waits
    for all of them), a pruned block's as zeros; the input's gradient is relu(x)'s."""
    stem = GatedConv2d(3, 8, 3, padding=1, bias=False, batch_norm=True, activation="relu")
    block = GatedBasicBlock(8, 8, in_gate=stem.gate)
    block.layer_gate.prune(torch.tensor([0]))
    x = stem(torch.randn(2, 3, 5, 5)).detach().requires_grad_()
    dy = torch.randn_like(x)
    block(x).backward(dy)
    torch.testing.assert_close(x.grad, dy * (x > 0))
    own = list(block.branch.parameters()) + list(block.layer_gate.parameters())
    assert own and all(p.grad is not None and p.grad.shape == p.shape and not p.grad.any() for p in own)
    assert stem.gate.theta.grad is None  # the stream gate is the stem's: nothing to give it here
    with torch.no_grad():
        assert block(x).grad_fn is None


def test_state_dict_keys_are_stable_and_gates_saved_once():
    m = cadk.build_model("resnet20", 1, 10)
    keys = list(m.state_dict())
    assert sum(k.endswith(".theta") for k in keys) == len(cadk.nn.gates_of(m))
    m2 = cadk.build_model("resnet20", 1, 10)
    m.blocks[3].branch[0].gate.prune(torch.tensor([0, 5]))
    m2.load_state_dict(m.state_dict())
    assert m2.blocks[3].branch[0].gate.num_alive == 30  # alive_idx rebuilt on load


def test_torch_compile_traces_gated_model_without_graph_breaks():
    torch.manual_seed(0)
    m = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    m.layers[0].gate.prune(torch.tensor([2]))
    x = torch.randn(5, 1, 4, 4)
    cadk.nn.seed_gates(m, 3)
    eager = m(x)
    cadk.nn.seed_gates(m, 3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert m.layers[0].weight.grad.shape == (6, 16)


def test_torch_compile_keeps_one_graph_across_pruning_events():
    """Pruning changes the alive counts the ops take; the compiled model treats them as dynamic sizes and
    is not recompiled at each pruning event (module buffers get static shapes, and a recompilation per
    event ended in the eager fallback once past dynamo's recompile limit). Outputs and gradients stay
    those of the eager model under the same draws."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(9, 8))
    for gate in cadk.nn.gates_of(m):
        with torch.no_grad():
            gate.theta.fill_(0.7)
    compiled = torch.compile(m, backend="aot_eager")
    x = torch.randn(5, 1, 4, 4)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    gates = [g for g in cadk.nn.gates_of(m) if g.num_units > 3]
    for step in range(6):
        gate = gates[step % len(gates)]
        gate.prune(gate.alive_idx[:1])
        outs = []
        for model in (compiled, m):
            torch.manual_seed(step)
            y = model(x)
            y.square().sum().backward()
            outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
            m.zero_grad(set_to_none=True)
        torch.testing.assert_close(outs[0], outs[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1


def test_torch_compile_keeps_one_graph_across_batch_sizes():
    """After a second batch size the compiled graph takes the batch as a dynamic size; no op may pin it
    (the BN running-statistics update took its count of values as an int, which recompiled the model
    at every new batch size). Outputs and running statistics stay those of the eager model."""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = GatedConv2d(2, 4, 3, padding=1, bias=False, batch_norm=True, activation="relu", theta_init=0.8)
    m = nn.Sequential(conv, GatedBasicBlock(4, 4, in_gate=conv.out_gate, theta_init=0.8))
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, backend="aot_eager")
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step, n in enumerate((4, 3, 5, 6)):
        x = torch.randn(n, 2, 5, 5)
        outs = []
        for model in (compiled, eager):
            torch.manual_seed(step)
            y = model(x)
            y.square().sum().backward()
            outs.append(y.detach())
        torch.testing.assert_close(outs[0], outs[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 2
    torch.testing.assert_close(dict(m.named_buffers()), dict(eager.named_buffers()))


def test_meta_device_construction_then_load():
    """A model built on the meta device (no memory), materialised with to_empty and loaded from a
    state_dict, equals the original, pruned gates included; moving a model to meta works too."""
    torch.manual_seed(0)
    m = cadk.build_model("resnet20", 1, 10).eval()
    m.blocks[2].branch[0].gate.prune(torch.tensor([1, 4]))
    with torch.device("meta"):
        lazy = cadk.build_model("resnet20", 1, 10)
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(m.state_dict())
    lazy.eval()
    assert lazy.blocks[2].branch[0].gate.num_alive == m.blocks[2].branch[0].gate.num_alive
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(lazy(x), m(x))
    with torch.device("meta"):  # loading by assignment: the non-persistent buffers are remade too
        assigned = cadk.build_model("resnet20", 1, 10)
    assigned.load_state_dict(m.state_dict(), assign=True)
    torch.testing.assert_close(assigned.eval()(x), m(x))
    on_meta = m.to("meta")
    assert cadk.nn.gates_of(on_meta)[1].alive_idx.is_meta
    assert on_meta(x.to("meta")).shape == (2, 10)  # shape inference on meta runs, autocast check included


def test_partial_assign_load_into_a_meta_built_model_takes_construction_defaults():
    """A state_dict without some gate entries (strict=False, assign=True) into a meta-built model: the
    missing ones take their construction defaults on the parameters' device (all units alive, the key of
    seed 0), instead of staying on meta, where the op ran its fake kernel on real inputs."""
    torch.manual_seed(0)
    m = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,)).eval()
    partial = {k: v for k, v in m.state_dict().items() if not k.endswith((".seed", ".alive_mask", ".zero_steps"))}
    with torch.device("meta"):
        lazy = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    missing = lazy.load_state_dict(partial, assign=True, strict=False).missing_keys
    assert set(missing) == {"layers.0.gate.seed", "layers.0.gate.alive_mask", "layers.0.gate.zero_steps"}
    gate = lazy.layers[0].gate
    assert gate.num_alive == 6 and not any(t.is_meta for t in (gate.seed, gate.alive_mask, gate.alive_factor))
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(lazy.eval()(x), m(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_layers_take_dtype_as_torch_layers(dtype):
    """dtype= as nn.Linear and nn.Conv2d take it: weight, bias and BN in that dtype, the layer's own gate with
    a float32 theta (as under autocast); the layers train, and compact into plain modules of that dtype."""
    torch.manual_seed(0)
    layers = [(GatedLinear(5, 7, activation="relu", dtype=dtype), (4, 5)),
              (GatedConv2d(3, 6, 3, padding=1, batch_norm=True, activation="relu", dtype=dtype), (2, 3, 5, 5))]
    for layer, shape in layers:
        assert {t.dtype for n, t in layer.state_dict().items() if t.is_floating_point() and "gate" not in n} == {dtype}
        assert layer.gate.theta.dtype == torch.float32
        x = torch.randn(*shape, dtype=dtype)
        layer(x).float().sum().backward()
        assert layer.weight.grad.dtype == dtype and torch.isfinite(layer.gate.theta.grad).all()
        layer.gate.prune([1])
        layer.eval()
        with torch.no_grad():
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=5e-2, atol=5e-2)
            torch.testing.assert_close(cadk.compact(layer)(x), layer(x), **tol)


def test_layers_take_the_meta_device_as_torch_layers():
    """device="meta" as nn.Linear takes it: parameters, buffers and the own gate allocate nothing."""
    for layer in (GatedLinear(5, 7, device="meta"), GatedConv2d(3, 6, 3, batch_norm=True, device="meta")):
        assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers(), layer.gate.alive_idx])


def test_gates_drawn_under_inference_mode_leave_autograd_working():
    """A training-mode forward under inference mode (e.g. BN recalibration) draws the gates' seeds; a later
    eval forward with autograd (input gradients) saves them for backward, so they must not be inference
    tensors. A prune inside a compiled function runs (refresh is left to eager)."""
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    x = torch.randn(2, 1, 4, 4)
    with torch.inference_mode():
        model.train()(x)
    xi = x.clone().requires_grad_()
    model.eval()(xi).sum().backward()
    assert xi.grad is not None

    def prune_first(gate):
        gate.prune(torch.tensor([0]))
        return gate.alive_mask.float()

    torch.compile(prune_first, backend="eager")(model.layers[0].gate)
    assert model.layers[0].gate.alive_idx.tolist() == [1, 2, 3, 4, 5]


def test_moving_a_model_under_inference_mode_leaves_it_trainable():
    """.to() inside torch.inference_mode remakes the index lists as normal tensors: inference tensors
    cannot be saved for backward by a later training step."""
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(6,))
    with torch.inference_mode():
        model.to("cpu")
        model.layers[0].gate.prune(torch.tensor([1]))
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    assert model.layers[0].weight.grad is not None


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_model_stays_channels_last():
    """A model moved to channels-last keeps that layout through every gated layer and block, as plain
    PyTorch layers do, even from a 1-channel input (whose layout only the weights' strides tell), so
    no layer pays for converting activations."""
    model = cadk.build_model("resnet20", 1, 10).to(memory_format=torch.channels_last).train()
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert outputs and all(_is_channels_last(o) for o in outputs)


def test_block_gate_keeps_layout_and_values():
    """The residual-block gate multiplies each example by one sampled gate, in NCHW and channels-last
    alike, with the same gates and theta gradient for both layouts."""
    torch.manual_seed(0)
    block = GatedBasicBlock(6, 6, stride=1, theta_init=0.5).train()
    x = torch.randn(5, 6, 7, 7)
    state = {k: v.clone() for k, v in block.state_dict().items()}  # the same keys for both runs
    rng = torch.get_rng_state()  # and the same draws
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        b = block.to(memory_format=fmt)
        b.load_state_dict(state)
        torch.set_rng_state(rng)
        xi = x.contiguous(memory_format=fmt).detach().requires_grad_(True)
        y = b(xi)
        y.sum().backward()
        assert y.is_contiguous(memory_format=fmt)
        results.append((y.detach().contiguous(), xi.grad.contiguous(), b.layer_gate.theta.grad.clone()))
        b.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_activation_checkpointing_replays_the_gates(use_reentrant):
    """torch.utils.checkpoint around residual blocks: the recomputed forward samples the gates the first
    forward drew (seeds come from torch's generator, whose state checkpoint restores), so parameter and
    theta gradients equal those of the same step without checkpointing. A seed counter advanced per
    forward had drawn new gates in the recomputation."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = cadk.build_model("resnet20", 1, 10)
    for gate in cadk.nn.gates_of(model):
        with torch.no_grad():
            gate.theta.fill_(0.6)
    x = torch.randn(4, 1, 28, 28)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(run_block):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        h = model.pool0(model.stem(x))
        for block in model.blocks:
            h = run_block(block, h)
        model.fc(torch.flatten(model.pool(h), 1)).square().sum().backward()
        return [p.grad for p in params]

    plain = step(lambda block, h: block(h))
    checkpointed = step(lambda block, h: checkpoint(block, h, use_reentrant=use_reentrant))
    assert all(g is not None for g in plain)
    for g, g_ref in zip(checkpointed, plain):
        torch.testing.assert_close(g, g_ref)


def test_backward_under_compiled_autograd():
    """cadk's C++ autograd Functions trace under compiled autograd (torch.compile of the backward)."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = GatedConv2d(3, 4, 3, padding=1, theta_init=0.5).train()
    x = torch.randn(2, 3, 6, 6)
    try:
        with torch._dynamo.config.patch(compiled_autograd=True):
            torch.compile(lambda loss: loss.backward(), backend="eager")(layer(x).sum())
    finally:
        torch._dynamo.reset()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_double_backward_fails_clearly():
    layer = GatedLinear(5, 4, theta_init=0.5).train()
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
