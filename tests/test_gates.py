"""Gates, their sampling and the theta-gradient estimator (reference path)."""
import math

import pytest
import torch

import cadk
from cadk.kernels import philox, reference
from cadk.nn import GatedConv2d, GatedLinear, UnitGate


def test_philox_uniform_range_and_determinism():
    off = torch.arange(100_000)
    u1, u2 = philox.uniform(1234, off // 4, off % 4), philox.uniform(1234, off // 4, off % 4)
    assert torch.equal(u1, u2)
    assert u1.min() >= 0 and u1.max() < 1
    assert abs(u1.mean().item() - 0.5) < 0.01
    assert not torch.equal(u1, philox.uniform(1235, off // 4, off % 4))
    # The four words of a counter (gates of four consecutive examples) are uncorrelated.
    lanes = u1.view(-1, 4).T
    corr = torch.corrcoef(lanes.double())
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 0.03


def test_philox_known_answer():
    # Philox4x32-10 test vector (Random123 kat_vectors: counter 0, key 0).
    words = philox.philox4(0, torch.zeros(1, dtype=torch.int64))[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_gate_counters_share_one_philox_call_per_four_examples():
    counter, lane = philox.gate_counters(6, torch.tensor([1, 4]), 5)
    assert counter.tolist() == [[1, 4]] * 4 + [[6, 9]] * 2
    assert lane.flatten().tolist() == [0, 1, 2, 3, 0, 1]
    words = philox.philox4(7, torch.tensor([1, 4]))  # examples 0..3: the four words of counters 1 and 4
    expected = ((words.T >> 8).float() * 2.0**-24 < 0.5).float()
    assert torch.equal(philox.sample_gates(7, 4, torch.full((5,), 0.5), torch.tensor([1, 4])), expected)


@pytest.mark.parametrize("theta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_sampled_gate_mean_matches_theta(theta):
    n, c = 4000, 8
    th = torch.full((c,), theta)
    xi = philox.sample_gates(torch.tensor(77), n, th, torch.arange(c))
    sd = math.sqrt(theta * (1 - theta) / (n * c))
    assert abs(xi.mean().item() - theta) <= 5 * sd + 1e-12


def test_gate_apply_estimator_equals_autograd_through_explicit_gates():
    torch.manual_seed(0)
    pre = torch.randn(6, 5, 3, 4)
    theta = torch.rand(9).requires_grad_()
    alive = torch.tensor([0, 2, 3, 7, 8])
    seed = torch.tensor(5)
    y = reference.gate_apply(pre, theta, alive, seed, True)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    xi = philox.sample_gates(seed, 6, theta, alive).requires_grad_()
    (pre * xi[:, :, None, None] * w).sum().backward()
    expected = torch.zeros(9).index_add(0, alive, xi.grad.sum(0))
    torch.testing.assert_close(theta.grad, expected)


def test_eval_uses_theta_as_expectation():
    lin = GatedLinear(4, 3, activation="relu").eval()
    with torch.no_grad():
        lin.gate.theta.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = torch.randn(2, 4)
    ref = torch.relu(x @ lin.weight.T + lin.bias) * lin.gate.theta
    torch.testing.assert_close(lin(x), ref)


def test_training_samples_fresh_gates_each_step_and_is_reproducible():
    def outputs(seed):
        torch.manual_seed(0)
        lin = GatedLinear(4, 64, theta_init=0.5)
        cadk.nn.seed_gates(lin, seed)
        x = torch.ones(3, 4)
        return [lin(x) != 0 for _ in range(2)]

    a1, a2 = outputs(1)
    b1, _ = outputs(1)
    c1, _ = outputs(2)
    assert not torch.equal(a1, a2)  # new sample every training step
    assert torch.equal(a1, b1)  # same key and torch seed, same gates
    assert not torch.equal(a1, c1)  # the gate's key enters the sample, not only torch's draw


def test_shared_gate_samples_once_per_step():
    conv_a = GatedConv2d(2, 8, 3, padding=1, theta_init=0.5)
    conv_b = GatedConv2d(2, 8, 1, gate=conv_a.gate)
    x = torch.rand(4, 2, 5, 5) + 0.1
    with torch.no_grad():
        conv_b.weight.fill_(1.0)
        conv_a.weight.fill_(1.0)
    ya, yb = conv_a(x), conv_b(x)  # owner first, as in every cadk model
    assert torch.equal(ya[:, :, 0, 0] != 0, yb[:, :, 0, 0] != 0)


def test_gate_validation():
    with pytest.raises(ValueError, match="theta_init"):
        UnitGate(3, theta_init=1.5)
    with pytest.raises(ValueError, match="at least one unit"):
        UnitGate(0)
    with pytest.raises(ValueError, match="units"):
        GatedLinear(4, 3, gate=UnitGate(5))


def test_alive_factor_follows_pruning_and_loading():
    """The theta optimizers mask with alive_factor: it must equal alive_mask after prune and load."""
    gate = UnitGate(6)
    gate.prune(torch.tensor([1, 4]))
    assert gate.alive_factor.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    fresh = UnitGate(6)
    fresh.load_state_dict(gate.state_dict())
    assert fresh.alive_factor.tolist() == gate.alive_factor.tolist()
    assert "alive_factor" not in gate.state_dict()  # derived, like alive_idx: checkpoints do not change
    opt = cadk.ThetaSGD([fresh], lr=1.0)
    fresh.theta.grad = torch.full((6,), -0.5)
    opt.step()
    assert fresh.theta.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_alive_idx_follows_in_place_writes_to_alive_mask():
    """A write into alive_mask from outside cadk (DDP's broadcast of rank 0's buffers, a copy_) reaches
    alive_idx and alive_factor before the next op reads them; writing the same mask again (every DDP
    forward with broadcast_buffers) keeps the index list as it is."""
    layer = GatedLinear(3, 6)
    gate = layer.out_gate
    with torch.no_grad():
        gate.alive_mask.copy_(torch.tensor([True, False, True, True, False, True]))
    assert gate.alive_idx.tolist() == [0, 2, 3, 5]
    assert gate.alive_factor.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert layer(torch.randn(2, 3)).shape == (2, 4)  # the alive outputs only
    idx = gate.alive_idx
    with torch.no_grad():
        gate.alive_mask.copy_(gate.alive_mask.clone())
    assert gate.alive_idx is idx
    gate.alive_mask = torch.ones(6, dtype=torch.bool)  # replaced: a new tensor
    assert gate.alive_idx.tolist() == list(range(6))


def test_gate_made_on_its_own_and_shared_is_drawn_anew_every_step():
    """A UnitGate made on its own and given to two layers: the first one draws it every training forward and
    the second applies the same sample (no layer drew it: every step reused one sample)."""
    torch.manual_seed(0)
    gate = UnitGate(6, theta_init=0.5)
    a, b = GatedLinear(4, 6, gate=gate), GatedLinear(4, 6, gate=gate)
    x = torch.ones(64, 4)
    masks = []
    for _ in range(3):
        ya, yb = a(x), b(x)
        masks.append(ya != 0)
        assert torch.equal(ya != 0, yb != 0)  # one sample per step for both layers
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_prune_takes_lists_of_indices_or_bools():
    """gate.prune([0, 2]) failed with "'list' object has no attribute 'dtype'"."""
    gate = UnitGate(5)
    gate.prune([0, 2])
    gate.prune([])
    gate.prune([False, True, False, False, False])
    assert gate.alive_idx.tolist() == [3, 4] and gate.theta.tolist() == [0, 0, 0, 1, 1]
