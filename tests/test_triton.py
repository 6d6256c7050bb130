"""Tests specific to cadk's Triton backend: gates bit-identical to philox.py in every kernel, and
each op's forward and gradients against reference.py, on small odd shapes.

Without CUDA they run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be set
before triton is imported; this file sets it when it is first to import triton)."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cadk.kernels import available_backends, philox  # noqa: E402
from cadk.kernels import reference as ref  # noqa: E402
from cadk.kernels import triton_backend as tb  # noqa: E402
from kernel_cases import in_place_case, run  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not tb.supports(DEVICE):
    pytest.skip(f"the Triton backend does not run on {DEVICE}: "
                f"{tb.UNAVAILABLE_REASON or 'TRITON_INTERPRET=1 was not set before triton was imported'}",
                allow_module_level=True)

SEED = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)  # high word non-zero: both key halves matter
OPS = torch.ops.cadk


def _alive(pattern: str, c: int) -> torch.Tensor:
    if pattern == "some":
        g = torch.Generator().manual_seed(c)
        idx = torch.randperm(c, generator=g)[: c // 2 + 1].sort().values
    else:
        idx = torch.tensor({"empty": [], "one": [c // 2], "all": list(range(c))}[pattern], dtype=torch.int64)
    return idx.to(DEVICE)


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _theta(c: int) -> torch.Tensor:
    return torch.rand(c, device=DEVICE) * 0.8 + 0.1


def _differentiable(args, diff=None):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()
            and (diff is None or i in diff)]


def _run(fn, args, dtype, diff=None):
    """y and the grads of the floating tensor arguments (those at `diff` if given; None for the
    others) for loss = sum(y * gy); the other arguments are passed as they are."""
    idx = _differentiable(args, diff)
    args = [a.detach().clone().requires_grad_() if i in idx else a for i, a in enumerate(args)]
    y = fn(*args)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    (y.float() * gy.float()).sum().backward()
    return y.detach(), [a.grad if i in idx else None for i, a in enumerate(args)]


def _close(actual, expected, dtype, atol=1e-5):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).norm()
    assert err <= 2e-2 * expected.float().norm() + 1e-3, f"relative error {err / expected.float().norm()}"


def _compare(fn_name, args, dtype, expected=None):
    """Triton op vs reference (or vs `expected` = (y, grads) where the reference cannot run)."""
    y, grads = _run(getattr(tb, fn_name), args, dtype)
    y_ref, grads_ref = expected if expected is not None else _run(getattr(ref, fn_name), args, dtype)
    _close(y, y_ref, dtype)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert (g is None) == (g_ref is None), f"argument {i}: grad presence differs"
        if g is not None:
            _close(g, g_ref, dtype)


def _zero_expected(y_shape, args, dtype, diff=None):
    """(y, grads) of an op with no alive output units: an empty y, zero grads."""
    idx = _differentiable(args, diff)
    grads = [torch.zeros_like(a) if i in idx else None for i, a in enumerate(args)]
    return torch.empty(y_shape, dtype=dtype, device=DEVICE), grads


# ------------------------------------------------------------------------------------------------
# Gates and uniforms: bit-identical to philox.py in every kernel that draws them
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, -5, 2**40 + 123, 2**63 - 1])
def test_uniform_bit_identical(seed):
    seed = torch.tensor(seed, dtype=torch.int64)
    counters = torch.cat([torch.arange(3000), torch.randint(0, philox.MAX_OFFSET, (2000,)),
                          torch.tensor([philox.MAX_OFFSET])]).to(DEVICE)
    lanes = torch.randint(0, 4, counters.shape).to(DEVICE)
    assert torch.equal(tb.uniform(seed, counters, lanes), philox.uniform(seed, counters, lanes))


@pytest.mark.parametrize("pattern", ["empty", "one", "some", "all"])
def test_sample_gates_bit_identical(pattern):
    theta = _theta(37)
    alive = _alive(pattern, 37)
    assert torch.equal(tb.sample_gates(SEED, 9, theta, alive), philox.sample_gates(SEED, 9, theta, alive))


def test_gates_bit_identical_in_fused_epilogues():
    """y == pre * xi exactly, xi from philox.py, for the GEMM, conv and BN epilogues."""
    n, c_in, c_out = 6, 11, 13
    theta, alive_in, alive_out = _theta(c_out), _alive("some", c_in), _alive("some", c_out)
    xi = philox.sample_gates(SEED, n, theta, alive_out)
    y, pre = OPS.triton_gated_linear_fwd(_randn(n, len(alive_in)), _randn(c_out, c_in), _randn(c_out),
                                         theta, alive_in, alive_out, SEED, "none", True)
    assert torch.equal(y, pre * xi)
    y, pre = OPS.triton_gated_conv2d_fwd(_randn(n, len(alive_in), 5, 4), _randn(c_out, c_in, 3, 3), None,
                                         theta, alive_in, alive_out, SEED, [1, 1], [1, 1], [1, 1],
                                         "relu", True)
    assert torch.equal(y, pre * xi[:, :, None, None])
    y, pre, _, _ = OPS.triton_bn_gate_act_fwd(_randn(n, len(alive_out), 3, 2), _randn(c_out), _randn(c_out),
                                              torch.zeros(c_out, device=DEVICE), torch.ones(c_out, device=DEVICE),
                                              theta, alive_out, SEED, 1e-5, "none", True)
    assert torch.equal(y, pre * xi[:, :, None, None])


# ------------------------------------------------------------------------------------------------
# Ops vs reference
# ------------------------------------------------------------------------------------------------

SETTINGS = [(act, training, gated) for act in ("relu", "none") for training in (True, False)
            for gated in (True, False)]
ALIVE_CASES = [("some", "some", s) for s in SETTINGS] + [
    (p_in, p_out, s) for p_in, p_out in [("all", "all"), ("one", "one"), ("empty", "some"), ("some", "empty"),
                                         ("all", "some"), ("some", "all")]
    for s in [("relu", True, True), ("none", False, False)]]
BF16_CASES = [("some", "some", ("relu", True, True)), ("all", "all", ("none", False, True))]


def _case_id(case):
    p_in, p_out, (act, training, gated) = case
    return f"{p_in}-{p_out}-{act}-{'train' if training else 'eval'}-{'gate' if gated else 'nogate'}"


def _linear_args(case, dtype, bias=True):
    p_in, p_out, (act, training, gated) = case
    n, c_in, c_out = 5, 11, 13
    alive_in, alive_out = _alive(p_in, c_in), _alive(p_out, c_out)
    return [_randn(n, len(alive_in), dtype=dtype), _randn(c_out, c_in, dtype=dtype, scale=0.3),
            _randn(c_out, dtype=dtype) if bias else None, _theta(c_out) if gated else None,
            alive_in, alive_out, SEED, act, training]


@pytest.fixture(params=["torch", "fused"])
def linear_matmul(request, monkeypatch):
    """Both ways gated_linear's forward can multiply: torch's matmul + epilogue kernel, fused kernel."""
    monkeypatch.setattr(tb, "LINEAR_MATMUL", request.param)


def test_linear_matmul_auto_rule(monkeypatch):
    monkeypatch.setattr(tb, "LINEAR_MATMUL", "auto")
    assert tb._linear_matmul(512, 512, 512, torch.float32) == "fused"
    assert tb._linear_matmul(4096, 2048, 2048, torch.float32) == "torch"
    assert tb._linear_matmul(4096, 2048, 2048, torch.bfloat16) == "fused"
    monkeypatch.setattr(tb, "LINEAR_MATMUL", "torch")
    assert tb._linear_matmul(2, 2, 2, torch.bfloat16) == "torch"


@pytest.mark.parametrize("case", ALIVE_CASES, ids=_case_id)
def test_gated_linear(case, linear_matmul):
    _compare("gated_linear", _linear_args(case, torch.float32), torch.float32)


@pytest.mark.parametrize("case", BF16_CASES, ids=_case_id)
def test_gated_linear_bf16(case, linear_matmul):
    _compare("gated_linear", _linear_args(case, torch.bfloat16), torch.bfloat16)


def test_gated_linear_no_bias_tall_batch(linear_matmul):
    """More rows, outputs and inputs than one GEMM tile, no bias."""
    n, c_in, c_out = 70, 45, 67
    args = [_randn(n, c_in), _randn(c_out, c_in, scale=0.2), None, _theta(c_out), _alive("all", c_in),
            _alive("some", c_out), SEED, "relu", True]
    _compare("gated_linear", args, torch.float32)


def _conv_args(case, dtype, channels_last=False, bias=True, hw=(7, 6)):
    p_in, p_out, (act, training, gated) = case
    n, c_in, c_out = 3, 7, 9
    alive_in, alive_out = _alive(p_in, c_in), _alive(p_out, c_out)
    x = _randn(n, len(alive_in), *hw, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return [x, _randn(c_out, c_in, 3, 3, dtype=dtype, scale=0.3), _randn(c_out, dtype=dtype) if bias else None,
            _theta(c_out) if gated else None, alive_in, alive_out, SEED, (1, 2), (1, 0), (2, 1), act, training]


def _conv_expected(args, dtype):
    """Reference result; torch's conv rejects zero output channels and mis-shapes zero input
    channels, so those cases are built another way (empty output / one all-zero input channel)."""
    x, weight, _b, _t, alive_in, alive_out = args[:6]
    if alive_out.numel() == 0:
        return _zero_expected((x.shape[0], 0, 5, 2), args, dtype)  # H, W: (7, 6) -> (5, 2)
    if alive_in.numel() == 0:
        padded = [torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=dtype, device=DEVICE)] + args[1:4] \
            + [torch.zeros(1, dtype=torch.int64, device=DEVICE)] + args[5:]
        y, grads = _run(ref.gated_conv2d, padded, dtype)
        return y, [torch.zeros_like(x)] + grads[1:]
    return None


@pytest.mark.parametrize("case", ALIVE_CASES, ids=_case_id)
def test_gated_conv2d(case):
    args = _conv_args(case, torch.float32)
    _compare("gated_conv2d", args, torch.float32, _conv_expected(args, torch.float32))


@pytest.mark.parametrize("case", BF16_CASES, ids=_case_id)
def test_gated_conv2d_bf16(case):
    _compare("gated_conv2d", _conv_args(case, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("setting", [("none", True, False), ("relu", True, True)], ids=["plain", "relu-gate"])
def test_no_bias(setting):
    """Without bias, gate and activation the epilogue and prologue kernels are skipped entirely."""
    _compare("gated_linear", _linear_args(("some", "some", setting), torch.float32, bias=False), torch.float32)
    _compare("gated_conv2d", _conv_args(("some", "some", setting), torch.float32, bias=False), torch.float32)


def test_gated_conv2d_channels_last():
    _compare("gated_conv2d", _conv_args(("some", "some", ("relu", True, True)), torch.float32, True),
             torch.float32)


BN_DIFF = (0, 1, 2, 5)  # x, weight, bias, theta (not the running statistics)


def _bn_args(pattern, setting, dtype, channels_last=False, offset=0.0, c=9):
    act, training, gated = setting
    n = 4
    alive = _alive(pattern, c)
    x = _randn(n, len(alive), 3, 5, dtype=torch.float32) * 2 + offset
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    running = (_randn(c) * 0.1, torch.rand(c, device=DEVICE) + 0.5)
    return [x, _randn(c) * 0.5 + 1, _randn(c) * 0.1, *running, _theta(c) if gated else None, alive, SEED,
            0.1, 1e-5, act, training]


def _check_bn(args, dtype, expected=None, atol=1e-5):
    """Forward, grads and the running statistics left behind, vs the reference."""
    ours, theirs = list(args), list(args)
    ours[3:5] = [t.clone() for t in args[3:5]]
    theirs[3:5] = [t.clone() for t in args[3:5]]
    y, grads = _run(tb.bn_gate_act, ours, dtype, BN_DIFF)
    y_ref, grads_ref = expected if expected is not None else _run(ref.bn_gate_act, theirs, dtype, BN_DIFF)
    _close(y, y_ref, dtype, atol)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert (g is None) == (g_ref is None), f"argument {i}: grad presence differs"
        if g is not None:
            _close(g, g_ref, dtype, atol)
    for mine, other in zip(ours[3:5], theirs[3:5]):
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)


BN_CASES = [("some", s) for s in SETTINGS] + [(p, ("relu", True, True)) for p in ("one", "all", "empty")]


@pytest.mark.parametrize("pattern,setting", BN_CASES,
                         ids=[_case_id((p, p, s)).split("-", 1)[1] for p, s in BN_CASES])
def test_bn_gate_act(pattern, setting):
    args = _bn_args(pattern, setting, torch.float32)
    expected = None
    if pattern == "empty":  # torch's batch_norm rejects zero channels
        expected = _zero_expected(args[0].shape, args, torch.float32, BN_DIFF)
    _check_bn(args, torch.float32, expected)


def test_bn_gate_act_bf16():
    _check_bn(_bn_args("some", ("relu", True, True), torch.bfloat16), torch.bfloat16)


def test_bn_gate_act_channels_last_and_offset_data():
    """channels_last strides, and data far from zero (mean 300, std 2): fp32 resolves 3e-5 there, and
    statistics from plain E[x^2] - E[x]^2 would be off by ~1e-3 relative."""
    _check_bn(_bn_args("some", ("relu", True, True), torch.float32, channels_last=True, offset=300.0),
              torch.float32, atol=2e-4)


@pytest.mark.parametrize("pattern", ["empty", "one", "some", "all"])
@pytest.mark.parametrize("training", [True, False])
def test_gate_apply(pattern, training):
    alive = _alive(pattern, 10)
    for shape in [(5, len(alive)), (3, len(alive), 4, 3)]:
        _compare("gate_apply", [_randn(*shape), _theta(10), alive, SEED, training], torch.float32)


def test_gate_apply_bf16_and_expanded_grad():
    """bf16 (eval: pre * bf16(theta) rounds to nearest even exactly like torch), and grad_y with
    zero strides (from y.sum())."""
    alive = _alive("some", 10)
    pre, theta = _randn(4, len(alive), 3, dtype=torch.bfloat16, scale=5.0), _theta(10)
    _compare("gate_apply", [pre, theta, alive, SEED, True], torch.bfloat16)
    eval_args = (pre, theta, alive, SEED, False)
    assert torch.equal(tb.gate_apply(*eval_args), ref.gate_apply(*eval_args))
    pre, theta = _randn(4, len(alive), 3).requires_grad_(), _theta(10).requires_grad_()
    tb.gate_apply(pre, theta, alive, SEED, True).sum().backward()
    pre2, theta2 = pre.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
    ref.gate_apply(pre2, theta2, alive, SEED, True).sum().backward()
    torch.testing.assert_close(pre.grad, pre2.grad)
    torch.testing.assert_close(theta.grad, theta2.grad)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (3, 1)], ids=["no-examples", "no-values", "one-value"])
def test_gated_residual_edge_shapes(shape):
    """Empty batches and runs launch nothing and give zero grads; a run of one value still works."""
    alive = _alive("one", 3)
    _compare("gated_residual", [_randn(*shape), _randn(*shape), _theta(3), alive, SEED, True], torch.float32)


@pytest.mark.parametrize("pattern", ["empty", "one", "some", "all"])
@pytest.mark.parametrize("size", [1, 13, 1500])
def test_scatter_sums(pattern, size):
    """Full-size vectors from compact sums by binary search in alive: the values at alive units, zeros
    elsewhere, each output in its own dtype; several programs for the larger size."""
    alive = _alive(pattern, size)
    sums = torch.randn(3, alive.numel(), device=DEVICE)
    rows = [(2, torch.bfloat16), (0, torch.float32), (1, torch.float32)]
    for count in (1, 3):
        outs = tb._scatter_sums(sums, alive, size, rows[:count])
        for (k, dtype), out in zip(rows, outs):
            expected = torch.zeros(size, device=DEVICE).index_copy_(0, alive, sums[k]).to(dtype)
            assert out.dtype == dtype and torch.equal(out, expected)


def test_nan_passes_like_the_reference():
    """ReLU keeps NaN (torch.relu, clamp_min) and its backward lets the gradient through there
    (threshold_backward): residual output, linear epilogue, BN statistics and running variance."""
    x = _randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = float("nan")
    branch = _randn(4, 3, 2, 2)
    residual = [x, branch, _theta(2), _alive("one", 2), SEED, True]
    y, grads = _run(tb.gated_residual, residual, torch.float32)
    y_ref, grads_ref = _run(ref.gated_residual, residual, torch.float32)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    torch.testing.assert_close(grads[0], grads_ref[0], equal_nan=True)
    lin = _linear_args(("all", "all", ("relu", True, False)), torch.float32)
    lin[0][2, 1] = float("nan")
    torch.testing.assert_close(tb.gated_linear(*lin), ref.gated_linear(*lin), equal_nan=True)
    bn = _bn_args("all", ("relu", True, False), torch.float32)
    bn[0][0, 4, 1, 1] = float("nan")
    ours, theirs = list(bn), list(bn)
    ours[3:5] = [t.clone() for t in bn[3:5]]
    theirs[3:5] = [t.clone() for t in bn[3:5]]
    torch.testing.assert_close(tb.bn_gate_act(*ours), ref.bn_gate_act(*theirs), equal_nan=True)
    torch.testing.assert_close(ours[4], theirs[4], equal_nan=True)  # running_var: NaN at unit 4
    assert ours[4][4].isnan()


def test_bn_strided_and_mismatched_vectors():
    """weight, bias and running statistics may be strided views; sizes other than weight's are refused."""
    for training in (True, False):
        args = _bn_args("some", ("relu", training, True), torch.float32)
        strided = [torch.stack([v, torch.full_like(v, 7.0)], 1)[:, 0] for v in args[1:5]]
        ours, theirs = list(args), list(args)
        ours[1:5] = strided
        theirs[3:5] = [t.clone() for t in args[3:5]]
        torch.testing.assert_close(tb.bn_gate_act(*ours), ref.bn_gate_act(*theirs))
        torch.testing.assert_close(ours[3], theirs[3])
        torch.testing.assert_close(ours[4], theirs[4])
    args = _bn_args("some", ("relu", True, True), torch.float32)
    with pytest.raises(RuntimeError, match="running_var must be a float vector of the 9 units"):
        tb.bn_gate_act(*args[:4], args[4][:-1], *args[5:])


def test_small_tiles(monkeypatch):
    """Tiny tiles: several channel / position tiles, row steps and row chunks per launch, so the
    masks, the loops and the partial sums across programs all run."""
    monkeypatch.setattr(tb, "_TILE", 8)
    monkeypatch.setattr(tb, "_TARGET_PROGRAMS", 3)
    case = ("some", "all", ("relu", True, True))
    _compare("gated_linear", _linear_args(case, torch.float32), torch.float32)  # 2 channel tiles, 2 chunks
    _compare("gated_conv2d", _conv_args(case, torch.float32, channels_last=True, hw=(4, 4)),
             torch.float32)  # channels_last: 2 channel tiles x 2 position tiles
    _check_bn(_bn_args("some", ("relu", True, True), torch.float32, c=3), torch.float32)  # NCHW, 4 rows
    alive = _alive("some", 10)
    _compare("gate_apply", [_randn(5, len(alive), 2, 5), _theta(10), alive, SEED, False], torch.float32)
    branch = _randn(5, 2, 3, 3).to(memory_format=torch.channels_last)  # 3 run tiles: 3 partial theta sums
    _compare("gated_residual", [_randn(5, 2, 3, 3), branch, _theta(2), _alive("one", 2), SEED, True], torch.float32)


# ------------------------------------------------------------------------------------------------
# Registration: dispatcher, opcheck, torch.compile, error messages
# ------------------------------------------------------------------------------------------------

def _op_cases():
    lin = _linear_args(("some", "some", ("relu", True, True)), torch.float32)
    conv = _conv_args(("some", "some", ("relu", True, True)), torch.float32)
    conv[7:10] = [list(v) for v in conv[7:10]]
    bn = _bn_args("some", ("relu", True, True), torch.float32)
    bn = bn[:8] + bn[9:]  # the op takes no momentum
    alive = _alive("some", 9)
    gate = [_randn(3, len(alive)), _theta(9), alive, SEED, True]
    branch = _randn(5, 3, 4, 2).to(memory_format=torch.channels_last)
    residual = [_randn(5, 3, 4, 2), branch, _theta(2), _alive("one", 2), SEED, True]
    return {"gated_linear": lin, "gated_conv2d": conv, "bn_gate_act": bn, "gate_apply": gate,
            "gated_residual": residual}


@pytest.mark.parametrize("name", ["gated_linear", "gated_conv2d", "bn_gate_act", "gate_apply", "gated_residual"])
def test_eager_path_matches_registered_op(name):
    """Eager calls skip the custom-op machinery (tb._EagerOp) but run the same bodies and formulas:
    outputs and grads equal the registered op's, bit for bit; the public function takes the eager path."""
    args = _op_cases()[name]
    results = []
    for run in (lambda *a: tb._EagerOp.apply(name, *a), getattr(OPS, f"triton_{name}_fwd")):
        single = name in ("gate_apply", "gated_residual")
        y, grads = _run(lambda *a: run(*a) if single else run(*a)[0], args, torch.float32)
        results.append((y, grads))
    (y, grads), (y_op, grads_op) = results
    assert torch.equal(y, y_op)
    for g, g_op in zip(grads, grads_op):
        assert (g is None and g_op is None) or torch.equal(g, g_op)
    if name == "gated_linear":
        leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        assert type(tb.gated_linear(*leaves).grad_fn).__name__ == "_EagerOpBackward"
        with torch.no_grad():  # no graph, same values
            assert torch.equal(tb.gated_linear(*args), y)


def test_double_backward_fails_clearly():
    """Both paths refuse create_graph=True rather than return gradients whose own gradients are wrong."""
    args = _linear_args(("some", "some", ("relu", True, True)), torch.float32)
    x = args[0].detach().requires_grad_()
    for forward in (lambda: tb.gated_linear(x, *args[1:]), lambda: OPS.triton_gated_linear_fwd(x, *args[1:])[0]):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(forward().sum(), x, create_graph=True)


def test_registered_with_dispatcher():
    assert "triton" in available_backends()


def test_opcheck():
    """Schema, fake kernels and autograd registration; the slow dynamic-shape AOT check runs on the
    cheaper ops only."""
    for name, args in _op_cases().items():
        op = getattr(OPS, f"triton_{name}_fwd")
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
        if name in ("gated_linear", "gate_apply", "gated_residual"):
            utils.append("test_aot_dispatch_dynamic")
        torch.library.opcheck(op, args, test_utils=utils)


def test_bn_running_stats_op():
    """The mutating op: nn.BatchNorm2d's update at the alive entries only, version counters bumped
    (public function and op alike), and its registration (schema with the mutations, fake kernel)."""
    c, alive = 7, _alive("some", 7)
    mean, var = _randn(alive.numel()), torch.rand(alive.numel(), device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):  # a model cast to bf16 has bf16 running statistics
        running = (_randn(c).to(dtype), (torch.rand(c, device=DEVICE) + 0.5).to(dtype))
        rm, rv = running[0].clone(), running[1].clone()
        OPS.triton_bn_running_stats_(rm, rv, alive, mean, var, 0.3, 10)
        want_m, want_v = running[0].clone(), running[1].clone()
        want_m[alive] = (running[0][alive].float() * 0.7 + mean * 0.3).to(dtype)
        want_v[alive] = (running[1][alive].float() * 0.7 + var * (10 / 9) * 0.3).to(dtype)
        torch.testing.assert_close(rm, want_m)
        torch.testing.assert_close(rv, want_v)
    args = _bn_args("some", ("relu", True, True), torch.float32)
    versions = [t._version for t in args[3:5]]
    tb.bn_gate_act(*args)
    assert all(t._version > v for t, v in zip(args[3:5], versions))
    torch.library.opcheck(OPS.triton_bn_running_stats_, (rm, rv, alive, mean, var, 0.3, 10),
                          test_utils=["test_schema", "test_faketensor"])


def test_eval_takes_batches_past_the_philox_counter_range():
    """Eval multiplies by theta and draws no gate, so batch x units past 2^31 is refused in training only,
    as in the other backends; eval had refused it too."""
    n, units = 2**20, 2**12
    pre, theta, alive = _randn(n, 1), torch.full((units,), 0.5, device=DEVICE), torch.tensor([7], device=DEVICE)
    torch.testing.assert_close(tb.gate_apply(pre, theta, alive, SEED, False), pre * 0.5)
    torch.testing.assert_close(tb.gated_residual(pre[:, 0], pre[:, 0], theta, alive, SEED, False),
                               ref.gated_residual(pre[:, 0], pre[:, 0], theta, alive, SEED, False))
    with pytest.raises(RuntimeError, match="exceeds the 2\\^31 Philox counter range; split the batch"):
        tb.gate_apply(pre, theta, alive, SEED, True)


def test_bn_running_stats_op_checks_its_inputs():
    """The op is public: inputs the kernel would misread are refused, as the C++ op refuses them. It had
    written past the running statistics for an index out of range, divided by zero for count 1, and
    read past mean or read bfloat16 mean as float32."""
    c, alive = 7, _alive("some", 7)
    mean, var = _randn(alive.numel()), torch.rand(alive.numel(), device=DEVICE)
    rm, rv = _randn(c), torch.rand(c, device=DEVICE) + 0.5
    bad = {"must exceed 1": (rm, rv, alive, mean, var, 0.3, 1),
           "alive lists 3 channels": (rm, rv, alive[:3], mean, var, 0.3, 10),
           "float32 vectors of one shape": (rm, rv, alive, mean.bfloat16(), var.bfloat16(), 0.3, 10),
           "vectors of one shape": (rm, rv[:-1], alive, mean, var, 0.3, 10)}
    if DEVICE.type == "cpu":  # alive's values are read on the host only there
        bad["within"] = (rm, rv, torch.cat([alive[:-1], alive.new_tensor([c])]), mean, var, 0.3, 10)
    for match, args in bad.items():
        before = (rm.clone(), rv.clone())
        with pytest.raises(RuntimeError, match=match):
            OPS.triton_bn_running_stats_(*args)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_torch_compile_fullgraph():
    """The ops trace without graph breaks; forward and grads match eager."""
    args = _linear_args(("some", "some", ("relu", True, True)), torch.float32)

    def loss(x, w, b, theta):
        return tb.gated_linear(x, w, b, theta, *args[4:]).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [a.detach().clone().requires_grad_() for a in args[:4]]
    leaves_ref = [a.detach().clone().requires_grad_() for a in args[:4]]
    out, out_ref = compiled(*leaves), loss(*leaves_ref)
    out.backward()
    out_ref.backward()
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(leaves, leaves_ref):
        torch.testing.assert_close(a.grad, b.grad)


_SM90_COMPILE = r"""
import importlib.util, os, shutil, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:
    import triton.backends.nvidia as nvidia
except ImportError:
    sys.exit(3)
bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
if not (os.access(bundled, os.X_OK) or os.environ.get("TRITON_PTXAS_PATH") or shutil.which("ptxas")):
    sys.exit(3)

spec = importlib.util.spec_from_file_location("cadk_triton_kernels", sys.argv[1])
K = importlib.util.module_from_spec(spec)
spec.loader.exec_module(K)
bf16 = dict(z_ptr="*bf16", y_ptr="*bf16", pre_ptr="*bf16", gy_ptr="*bf16", x_ptr="*bf16", g_ptr="*bf16",
            dx_ptr="*bf16", w_ptr="*bf16", shift_ptr="*bf16", b_ptr="*fp32", part_ptr="*fp32",
            mean_ptr="*fp32", scale_ptr="*fp32", rstd_ptr="*fp32", theta_ptr="*fp32", mean_g_ptr="*fp32",
            coef_x_ptr="*fp32", alive_ptr="*i64", alive_out_ptr="*i64", seed_ptr="*i64", s_ptr="*bf16",
            gs_ptr="*bf16", gb_ptr="*bf16", sums_ptr="*fp32", out0_ptr="*bf16", out1_ptr="*bf16",
            out2_ptr="*fp32", var_ptr="*fp32", rm_ptr="*fp32", rv_ptr="*fp32", eps="fp32", count="fp32",
            momentum="fp32", unbias="fp32")
tile = dict(BLOCK_R=2, BLOCK_A=8, BLOCK_S=128)
on = dict(HAS_GATE=True, TRAINING=True, RELU=True)
for kernel, constexprs in [
        (K.channel_fwd_kernel, dict(HAS_NORM=True, HAS_SHIFT=True, STORE_PRE=True, **on, **tile)),
        (K.channel_bwd_kernel, dict(HAS_NORM=True, STORE_G=True, SUM_G=True, **on, **tile)),
        (K.channel_stats_kernel, tile),
        (K.bn_grad_input_kernel, dict(TRAINING=True, **tile)),
        (K.gated_linear_fwd_kernel, dict(GATHER_OUT=True, HAS_BIAS=True, ALLOW_TF32=False,
                                         UPCAST_DOT=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, **on)),
        (K.residual_fwd_kernel, dict(TRAINING=True, BLOCK_R=2, BLOCK_S=128)),
        (K.residual_bwd_kernel, dict(TRAINING=True, BLOCK_R=2, BLOCK_S=128)),
        (K.scatter_sums_kernel, dict(OUTS=3, BLOCK=128)),
        (K.bn_coefficients_kernel, dict(TRAINING=True, BLOCK=128)),
        (K.bn_coefficients_kernel, dict(TRAINING=False, BLOCK=128)),
        (K.bn_grad_input_kernel, dict(TRAINING=False, **tile)),
        (K.bn_running_stats_kernel, dict(BLOCK=128))]:
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else bf16.get(n, "i32") for n in names}
    triton.compile(ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()}),
                   target=GPUTarget("cuda", 90, 32))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the op tests compile every kernel")
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects (non-constexpr globals, branch typing):
    compile the fullest variant of each kernel for an H100 with the installed Triton, no GPU needed."""
    import subprocess
    import sys

    kernels = os.path.join(os.path.dirname(tb.__file__), "triton_kernels.py")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE, kernels], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("this Triton install has no NVIDIA backend or ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_clear_errors():
    args = _linear_args(("some", "some", ("relu", True, True)), torch.float32)
    with pytest.raises(RuntimeError, match="the activation has 5"):
        tb.gated_linear(args[0][:, :-1], *args[1:])
    if DEVICE.type == "cpu":  # on a GPU alive's values are not read on the host: that would synchronise
        with pytest.raises(RuntimeError, match="sorted"):
            tb.gated_linear(args[0], args[1], args[2], args[3], args[4].flip(0), *args[5:])
    with pytest.raises(RuntimeError, match=r"x must be \[N"):
        tb.gated_linear(args[0][None], *args[1:])
    with pytest.raises(RuntimeError, match="same dtype"):
        tb.gated_linear(args[0].half(), *args[1:])
    with pytest.raises(RuntimeError, match="not supported"):
        tb.gated_linear(args[0].double(), args[1].double(), *args[2:])
    with pytest.raises(RuntimeError, match="0-dim int64"):
        tb.gated_linear(*args[:6], torch.tensor([1, 2]), *args[7:])
    with pytest.raises(ValueError, match="activation"):
        tb.gated_linear(*args[:7], "gelu", True)
    # errors name the op's own argument (gate_apply has no x)
    with pytest.raises(RuntimeError, match=r"pre must be \[N, units"):
        tb.gate_apply(_randn(3), _theta(3), torch.arange(3, device=DEVICE), SEED, True)
    with pytest.raises(RuntimeError, match="pre dtype torch.float64 is not supported"):
        tb.gate_apply(_randn(2, 3).double(), _theta(3), torch.arange(3, device=DEVICE), SEED, True)
    with pytest.raises(RuntimeError, match="branch dtype torch.float64 is not supported"):
        tb.gated_residual(_randn(2, 3).double(), _randn(2, 3).double(), _theta(1), torch.zeros(1, dtype=torch.int64,
                          device=DEVICE), SEED, True)
    bn = _bn_args("some", ("relu", True, True), torch.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tb.bn_gate_act(bn[0][:1, :, :1, :1], *bn[1:])


def test_python_int_seed_taken_as_by_the_other_backends():
    """A Python int seed gives the gates of the same seed as a tensor, as the reference and C++ backends
    take it; it had raised AttributeError: 'int' object has no attribute 'dim'."""
    args = _linear_args(("some", "some", ("relu", True, True)), torch.float32)
    want = tb.gated_linear(*args[:6], torch.tensor(12345), *args[7:])
    torch.testing.assert_close(tb.gated_linear(*args[:6], 12345, *args[7:]), want, rtol=0, atol=0)
    theta, alive = _theta(want.shape[1]), torch.arange(want.shape[1], device=DEVICE)
    torch.testing.assert_close(tb.gate_apply(want, theta, alive, 5, True), ref.gate_apply(want, theta, alive, 5, True),
                               rtol=0, atol=0)


@pytest.mark.parametrize("shape", ["batch0", "no_out", "no_in"])
@pytest.mark.parametrize("geometry", [((0, 1), (0, 0), (1, 1)), ((1, 1), (-1, 0), (1, 1)), ((1, 1), (0, 0), (0, 1))])
def test_conv_geometry_refused_without_a_conv(shape, geometry):
    """Where no convolution runs (no example, no alive input or output channel), a bad stride, padding or
    dilation is refused as where one does: it had divided by zero or returned a wrong-sized output."""
    n, c_in, c_out = {"batch0": (0, 2, 2), "no_out": (2, 2, 0), "no_in": (2, 0, 2)}[shape]
    x, weight = _randn(n, c_in, 5, 5), _randn(4, 3, 3, 3)
    alive_in, alive_out = torch.arange(c_in, device=DEVICE), torch.arange(c_out, device=DEVICE)
    with pytest.raises(RuntimeError, match="need stride > 0, dilation > 0 and padding >= 0"):
        tb.gated_conv2d(x, weight, None, _theta(4), alive_in, alive_out, SEED, *geometry, "relu", True)


def test_compiled_model_recompiles_only_when_an_alive_count_leaves_its_power_of_two(monkeypatch):
    """Under torch.compile the op bodies see alive counts as symbolic sizes: launch sizes are taken by
    comparing them with powers of two, so a prune recompiles only on a gate's first prune (its all-alive
    path ends) or when a count crosses a power of two, not at every pruning event as exact-value guards
    did."""
    import torch._dynamo

    import cadk
    monkeypatch.setenv("CADK_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = cadk.build_model("mlp", 1, 3, image_size=4, hidden=(12, 12)).to(DEVICE)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(5, 1, 4, 4, device=DEVICE)
    gates = [g for g in cadk.nn.gates_of(model) if g.num_units > 3]
    counts = []
    for step in range(6):  # 12 -> 9 alive units in both gates: every count stays within (8, 16]
        gate = gates[step % 2]
        gate.prune(gate.alive_idx[:1])
        compiled(x).sum().backward()
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[-1] == counts[1], f"graphs after each prune: {counts}"


def test_compiled_bn_model_takes_new_batch_sizes_in_its_power_of_two(monkeypatch):
    """The BN ops pass the count of values per channel to their kernels as a (symbolic) int: a float
    of it pinned the batch size, recompiling the model at every new batch size. Batch sizes within
    one power-of-two range now share the graph compiled at the second size."""
    import torch._dynamo

    from cadk.nn import GatedBasicBlock, GatedConv2d
    monkeypatch.setenv("CADK_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = GatedConv2d(2, 4, 3, padding=1, bias=False, batch_norm=True, activation="relu", theta_init=0.8)
    model = torch.nn.Sequential(conv, GatedBasicBlock(4, 4, in_gate=conv.out_gate, theta_init=0.8)).to(DEVICE)
    compiled = torch.compile(model, backend="aot_eager")
    counts = []
    for n in (8, 6, 5, 7):  # 6, 5 and 7 lie in (4, 8]
        compiled(torch.randn(n, 2, 3, 3, device=DEVICE)).sum().backward()
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[-1] == counts[1], f"graphs after each batch size: {counts}"



@pytest.mark.parametrize("op,gated", [("gate_apply", True), ("gated_linear", False), ("gated_conv2d", True),
                                      ("bn_gate_act", False), ("bn_gate_act", True)])
def test_registered_op_output_updated_in_place(op, gated, monkeypatch):
    """test_kernels' test_output_updated_in_place runs the eager path; this runs the registered ops."""
    monkeypatch.setattr(tb, "_eager", lambda tensors: False)
    fn, case = getattr(tb, op), in_place_case(torch.Generator().manual_seed(3), DEVICE, op, gated)
    _, grads, _ = run(fn, case, 1)
    _, grads_added, _ = run(fn, case, 1, add_to_output=True)
    for i in case.grad_args:
        assert torch.equal(grads_added[i], grads[i]), f"{op}: gradient {i} changed by the in-place update"


@pytest.mark.parametrize("op", ["gated_linear", "gated_conv2d", "bn_gate_act"])
def test_unsaved_output_backward_takes_an_expanded_grad(op):
    """Without gate and activation the backward gets grad_y in place of the unsaved output: an expanded
    grad_y (from y.sum()) with zero strides gives the reference's gradients."""
    case = in_place_case(torch.Generator().manual_seed(5), DEVICE, op, gated=False)
    grads = []
    for module in (tb, ref):
        args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in case.args]
        leaves = [args[i].requires_grad_(True) for i in case.grad_args]
        getattr(module, op)(*args).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ops_make_the_inputs_gpu_current(monkeypatch):
    """Triton launches on the current CUDA device: inputs on another GPU make theirs current for the call
    (before, kernels ran on GPU 0's stream with GPU 1's pointers). Checked with the CUDA calls stubbed: this
    machine may have no GPU, and the lent ones have one."""
    import types
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or contextlib.nullcontext())
    for device, guard in (("cuda:1", [1]), ("cuda:0", []), ("cpu", [])):
        entered.clear()
        with tb._inputs_device(types.SimpleNamespace(device=torch.device(device))):
            pass
        assert entered == guard, device
