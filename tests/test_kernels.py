"""Every compiled/Triton backend of cadk's ops against the reference: forward, all gradients, gates,
registration (opcheck), torch.compile, input checks.

Backends are called directly through their modules; one test checks that CADK_BACKEND routes the
dispatch. Data are fresh each run: a failing test prints its data seed (rerun with CADK_TEST_SEED).
"""
from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
import types

import pytest
import torch

import cadk.kernels as kernels
from cadk.kernels import philox, reference
from kernel_cases import (ALIVE_KINDS, RESIDUAL_LAYOUTS, Case, assert_close, bn_gate_act_case, choice, data_seed,
                          gate_apply_case, gated_conv2d_case, gated_linear_case, gated_residual_case, in_place_case,
                          randn, run)


def _backend_params():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for name in kernels.available_backends():
        if name == "reference":
            continue
        module = importlib.import_module(f"cadk.kernels.{name}_backend")
        params += [pytest.param((module, dev), id=f"{name}-{dev}") for dev in devices if module.supports(dev)]
    if params:
        return params
    from cadk.kernels import cpp_backend
    reason = ("no compiled or Triton backend supports the devices here" if cpp_backend.AVAILABLE else
              "the cadk._C extension is not built (pip install --no-build-isolation -e .)")
    return [pytest.param((None, None), id="no-backend", marks=pytest.mark.skip(reason=reason))]


@pytest.fixture(params=_backend_params())
def backend(request):
    return request.param


@pytest.fixture(params=[p for p in _backend_params() if p.id != "triton-cpu"])
def compiled_or_gpu_backend(request):
    """The backends but Triton's interpreter, for cases that cover compiled-code paths only."""
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(data_seed())


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _dtype_the_backend_runs(request):
    """Skips a dtype-parametrized case on a backend that refuses that dtype (float16 on the CPU)."""
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    backend = params.get("backend", params.get("compiled_or_gpu_backend"))
    if "dtype" in params and backend is not None and backend[0] is not None:
        module, _ = backend
        if params["dtype"] not in module.SUPPORTED_DTYPES:
            pytest.skip(f"{module.__name__} refuses {params['dtype']} (its dtypes: {module.SUPPORTED_DTYPES})")
LAYER_ALIVE = [("empty", "subset"), ("subset", "empty"), ("one", "one"), ("subset", "subset"), ("all", "all"),
               ("all", "subset"), ("subset", "all")]


# ---------------------------------------------------------------------------------------------
# Reference calls, with the empty-channel cases F.conv2d and F.batch_norm reject written out:
# no input channels is a zero input channel; no output channels is an empty slice of one.


def _compare(op: str, fn, ref_fn, case, dtype, gen, grad_tol_scale: dict[int, float] | None = None) -> None:
    """fn against ref_fn: output, every gradient (tolerance times grad_tol_scale[i] for argument i), and
    every in-place update."""
    grad_seed = int(torch.randint(2**31, (1,), generator=gen))
    y, grads, mutated = run(fn, case, grad_seed)
    y_ref, grads_ref, mutated_ref = run(ref_fn, case, grad_seed)
    assert_close(y, y_ref, f"{op} output", dtype)
    for i in case.grad_args:
        assert_close(grads[i], grads_ref[i], f"{op} grad of argument {i}", dtype, (grad_tol_scale or {}).get(i, 1.0))
    for i in case.mutated:
        assert_close(mutated[i], mutated_ref[i], f"{op} in-place update of argument {i}", dtype)


# ---------------------------------------------------------------------------------------------
# Forward and gradients against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ALIVE_KINDS)
def test_gate_apply(backend, gen, kind, training, channels_last, dtype):
    module, device = backend
    case = gate_apply_case(gen, device, dtype, kind, training, True, channels_last)
    _compare("gate_apply", module.gate_apply, reference.gate_apply, case, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_theta", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kinds", LAYER_ALIVE, ids="-".join)
def test_gated_linear(backend, gen, kinds, training, activation, with_theta, dtype):
    module, device = backend
    case = gated_linear_case(gen, device, dtype, kinds, training, activation, with_theta,
                             with_bias=bool(int(torch.randint(2, (1,), generator=gen))))
    _compare("gated_linear", module.gated_linear, reference.gated_linear, case, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_theta", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kinds", LAYER_ALIVE, ids="-".join)
def test_gated_conv2d(backend, gen, kinds, training, activation, with_theta, channels_last, dtype):
    module, device = backend
    case = gated_conv2d_case(gen, device, dtype, kinds, training, activation, with_theta, channels_last,
                             with_bias=bool(int(torch.randint(2, (1,), generator=gen))))
    _compare("gated_conv2d", module.gated_conv2d, reference.gated_conv2d, case, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["x-nhwc", "weight-nhwc", "nhwc"])
@pytest.mark.parametrize("kinds", LAYER_ALIVE, ids="-".join)
def test_pointwise_conv2d(backend, gen, kinds, layout, dtype):
    """1x1 kernel, stride 1, no padding, a channels-last output: the C++ CPU kernels run it as GEMMs on
    the activations' rows (GatedLinear's positions take this path). Gate, activation, bias, training
    and which inputs need gradients are drawn."""
    module, device = backend
    pick = lambda: bool(int(torch.randint(2, (1,), generator=gen)))  # noqa: E731
    case = gated_conv2d_case(gen, device, dtype, kinds, pick(), choice(gen, ("relu", "none")), pick(), False,
                             with_bias=pick(), kernel=(1, 1))
    x, weight = case.args[:2]
    if layout != "weight-nhwc":
        case.args[0] = x.contiguous(memory_format=torch.channels_last)
    if layout != "x-nhwc":
        case.args[1] = weight.contiguous(memory_format=torch.channels_last)
    case.args[7:9] = [(1, 1), (0, 0)]
    frozen = choice(gen, ((), (0,), (1,), (0, 1)))
    case.grad_args = [i for i in case.grad_args if i not in frozen] or case.grad_args
    _compare("gated_conv2d", module.gated_conv2d, reference.gated_conv2d, case, dtype, gen)


@pytest.mark.parametrize("pre_shape, alive", [((3,), [0, 1, 2]), ((2, 4), [1]), ((2, 3), [[0, 1, 2]])],
                         ids=["1-D pre", "one alive for 4 channels", "2-D alive"])
def test_gate_apply_refuses_alive_that_does_not_list_the_channels(backend, pre_shape, alive):
    """Every backend and the reference refuse it; the reference had broadcast the gates over pre (an
    [N, 1] gate table gated all 4 channels with one unit's gates) and returned a result."""
    module, device = backend
    pre, theta = torch.ones(pre_shape, device=device), torch.full((4,), 0.5, device=device)
    for fn in (reference.gate_apply, module.gate_apply):
        with pytest.raises(RuntimeError, match="must be 1-D|must be \\[N, units|channels"):
            fn(pre, theta, torch.tensor(alive, device=device), torch.tensor(3, device=device), False)


def _subset_relu_case(gen, device, op: str):
    """A float32 training case of `op` with some units alive, ReLU and a gate."""
    if op == "gated_linear":
        return gated_linear_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True)
    if op == "gated_conv2d":
        return gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True, False)
    return bn_gate_act_case(gen, device, torch.float32, "subset", True, "relu", True, False)


@pytest.mark.parametrize("op, position", [("gated_linear", 2), ("gated_linear", 3), ("gated_conv2d", 2),
                                          ("gated_conv2d", 3), ("bn_gate_act", 1), ("bn_gate_act", 5)])
def test_compact_per_unit_vector_is_refused(backend, gen, op, position):
    """A bias, theta or BN weight of one entry per alive unit, not per unit, is refused by every backend
    and the reference; the reference had taken it for the gathered vector (bias[j'] for unit alive_out[j'])."""
    module, device = backend
    args = list(_subset_relu_case(gen, device, op).args)
    alive = args[6] if op == "bn_gate_act" else args[5]
    args[position] = args[position].index_select(0, alive)
    for fn in (getattr(reference, op), getattr(module, op)):
        with pytest.raises(RuntimeError, match="must have shape|must be a .*vector of the"):
            fn(*args)


@pytest.mark.parametrize("seed", [torch.tensor(5.7), torch.tensor(5, dtype=torch.int32), torch.tensor([5, 6, 7])],
                         ids=["float", "int32", "vector"])
def test_seed_that_is_not_a_0_dim_int64_tensor_is_refused(backend, seed):
    """Every backend and the reference refuse it; the reference had truncated a float seed and given each
    unit its own seed from a vector, without an error."""
    module, device = backend
    pre, theta, alive = torch.ones(8, 3, device=device), torch.full((3,), 0.5, device=device), torch.arange(3)
    for fn in (reference.gate_apply, module.gate_apply):
        with pytest.raises(RuntimeError, match="seed must be a 0-dim int64 tensor"):
            fn(pre, theta, alive.to(device), seed.to(device), True)


@pytest.mark.parametrize("op", ["gated_linear", "gated_conv2d", "bn_gate_act"])
def test_unknown_activation_is_refused(backend, gen, op):
    """A misspelt activation ("ReLU") is a ValueError on every backend and the reference; the reference had
    computed no activation at all."""
    module, device = backend
    args = list(_subset_relu_case(gen, device, op).args)
    args[-2] = "ReLU"
    for fn in (getattr(reference, op), getattr(module, op)):
        with pytest.raises(ValueError, match="activation must be one of"):
            fn(*args)


@pytest.mark.parametrize("batch", [2, 0])
def test_one_entry_stride_padding_dilation(backend, gen, batch):
    """(2,) for stride, padding or dilation is used for both dims, as F.conv2d (the reference) takes it: the
    C++ backend had refused it, the Triton one raised IndexError where no convolution runs (batch 0)."""
    module, device = backend
    case = gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True, False,
                             kernel=(3, 3))
    case.args[0] = case.args[0][:batch]
    case.args[7:10] = [(2,), (1,), (1,)]
    _compare("gated_conv2d", module.gated_conv2d, reference.gated_conv2d, case, torch.float32, gen)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_int_stride_padding_dilation(backend, gen, kernel):
    """Ints for stride, padding and dilation, as F.conv2d takes them, on every backend and the reference:
    the reference had raised TypeError: 'int' object is not iterable for a 1x1 kernel."""
    module, device = backend
    case = gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True, False,
                             kernel=kernel)
    case.args[7:10] = [2, 1, 1]
    _compare("gated_conv2d", module.gated_conv2d, reference.gated_conv2d, case, torch.float32, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", RESIDUAL_LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gated_residual(backend, gen, training, layout, dtype):
    module, device = backend
    case = gated_residual_case(gen, device, dtype, training, layout)
    # theta's gradient (argument 2) sums every value of the branch: an fp32 sum's rounding error grows as
    # the square root of its length (up to 55296 terms here), whatever order a backend sums in.
    theta_scale = max(1.0, (case.args[1].numel() / 4096) ** 0.5)
    _compare("gated_residual", module.gated_residual, _reference_residual, case, dtype, gen, {2: theta_scale})


def _reference_residual(shortcut, branch, theta, alive, seed, training):
    """fp32 cases against a float64 reference, so that only the backend's rounding is measured."""
    if branch.dtype != torch.float32:
        return reference.gated_residual(shortcut, branch, theta, alive, seed, training)
    return reference.gated_residual(shortcut.double(), branch.double(), theta, alive, seed, training).float()


def test_gated_residual_needs_one_alive_unit(backend, gen):
    module, device = backend
    shortcut, branch, theta, alive, seed, _ = gated_residual_case(gen, device, torch.float32, True, "nchw").args
    for bad in (alive[:0], torch.tensor([0, 1], device=device)):
        with pytest.raises(RuntimeError, match="one unit of the block gate"):
            module.gated_residual(shortcut, branch, torch.rand(2, device=device), bad, seed, True)
    with pytest.raises(RuntimeError, match="must match in shape"):
        module.gated_residual(torch.cat([shortcut, shortcut]), branch, theta, alive, seed, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", ["linear", "conv-nchw", "conv-nhwc"])
@pytest.mark.parametrize("channels", [(16, 20), (37, 70), (70, 33)], ids=lambda c: f"{c[0]}to{c[1]}")
def test_wide_layers(backend, gen, channels, layer, dtype):
    """16 channels and more: the CPU weight gather and gradient scatter move alive channels in blocks of
    16 (full blocks and a partial one), which the narrow layers above never fill."""
    module, device = backend
    kinds = (choice(gen, ("subset", "all")), "subset")
    if layer == "linear":
        case = gated_linear_case(gen, device, dtype, kinds, True, "relu", True, channels=channels)
        _compare("gated_linear", module.gated_linear, reference.gated_linear, case, dtype, gen)
    else:
        # 3x3: several taps per channels-last weight row, each its own run of C_in channels.
        case = gated_conv2d_case(gen, device, dtype, kinds, True, "relu", True, layer == "conv-nhwc",
                                 channels=channels, kernel=(3, 3))
        _compare("gated_conv2d", module.gated_conv2d, reference.gated_conv2d, case, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_theta", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ALIVE_KINDS)
def test_bn_gate_act(backend, gen, kind, training, activation, with_theta, channels_last, dtype):
    module, device = backend
    case = bn_gate_act_case(gen, device, dtype, kind, training, activation, with_theta, channels_last)
    _compare("bn_gate_act", module.bn_gate_act, reference.bn_gate_act, case, dtype, gen)


def _strided(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): t's values in a view with stride 2 in its last dim of a zero buffer twice as wide."""
    buffer = t.new_zeros((*t.shape[:-1], 2 * t.shape[-1]))
    buffer[..., ::2] = t
    return buffer[..., ::2], buffer


_STRIDED_CASES = {
    "gate_apply": lambda gen, dev, training: (
        gate_apply_case(gen, dev, torch.float32, "subset", training, True, False, units=9), reference.gate_apply),
    "gated_residual": lambda gen, dev, training: (
        gated_residual_case(gen, dev, torch.float32, training, "nchw"), reference.gated_residual),
    "gated_linear": lambda gen, dev, training: (
        gated_linear_case(gen, dev, torch.float32, ("subset", "subset"), training, "relu", True,
                          channels=(11, 13)), reference.gated_linear),
    "gated_conv2d": lambda gen, dev, training: (
        gated_conv2d_case(gen, dev, torch.float32, ("subset", "subset"), training, "relu", True, False,
                          channels=(7, 9)), reference.gated_conv2d),
    "bn_gate_act": lambda gen, dev, training: (
        bn_gate_act_case(gen, dev, torch.float32, "subset", training, "relu", True, False, units=9),
        reference.bn_gate_act),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", list(_STRIDED_CASES))
def test_strided_inputs_read_as_their_values(backend, gen, op, training):
    """Every tensor argument passed as a strided view (theta[::2], an alive list sliced from a longer one,
    a weight or activation with a stride-2 last dim): outputs, gradients and running statistics equal
    those of the dense inputs. Kernels read per-unit vectors through raw pointers, so a view they did not
    make dense would be read at the wrong offsets (seen in eval, where the gate is theta itself)."""
    module, device = backend
    case, ref_fn = _STRIDED_CASES[op](gen, device, training)
    grad_seed = int(torch.randint(2**31, (1,), generator=gen))
    y_ref, grads_ref, mutated_ref = run(ref_fn, case, grad_seed)

    args, buffers = list(case.args), {}
    for i, a in enumerate(case.args):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            args[i], buffers[i] = _strided(a.detach())
            if i in case.grad_args:
                buffers[i].requires_grad_(True)
                args[i] = buffers[i][..., ::2]
    y = getattr(module, op)(*args)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype).to(y.device)
    grads = torch.autograd.grad(y, [buffers[i] for i in case.grad_args], grad_y)
    assert_close(y, y_ref, f"{op} output", torch.float32)
    for i, g in zip(case.grad_args, grads):
        assert_close(g[..., ::2], grads_ref[i], f"{op} grad of argument {i}", torch.float32)
        assert not g[..., 1::2].any(), f"{op}: gradient of argument {i} reached entries outside its view"
    for i in case.mutated:
        assert_close(args[i], mutated_ref[i], f"{op} in-place update of argument {i}", torch.float32)
        assert not buffers[i][..., 1::2].any(), f"{op}: in-place update of argument {i} wrote outside its view"


_NAN_CASES = {
    "gated_linear": lambda gen, dev, training: (
        gated_linear_case(gen, dev, torch.float32, ("all", "subset"), training, "relu", True), reference.gated_linear),
    "gated_conv2d": lambda gen, dev, training: (
        gated_conv2d_case(gen, dev, torch.float32, ("all", "subset"), training, "relu", True, False),
        reference.gated_conv2d),
    "bn_gate_act": lambda gen, dev, training: (
        bn_gate_act_case(gen, dev, torch.float32, "subset", training, "relu", True, False), reference.bn_gate_act),
}


def test_running_statistics_that_share_memory_are_refused(backend):
    """Running statistics expanded from one value have one memory location for every channel: a training
    step's update of the alive channels would leave that location with the last channel's value. The
    reference's in-place update refuses such a tensor; so must every backend, leaving it as it was."""
    module, device = backend
    alive = torch.tensor([0, 3, 4, 8], device=device)
    x = torch.randn(5, 4, 3, 3, device=device)
    for shared in ("running_mean", "running_var"):
        stats = {"running_mean": torch.zeros(9, device=device), "running_var": torch.ones(9, device=device)}
        stats[shared] = stats[shared][:1].expand(9)
        before = stats[shared].clone()
        for op in (reference.bn_gate_act, module.bn_gate_act):
            with pytest.raises(RuntimeError, match="memory location|share memory"):
                op(x, None, None, stats["running_mean"], stats["running_var"], None, alive,
                   torch.tensor(3, device=device), 0.1, 1e-5, "relu", True)
        assert torch.equal(stats[shared], before)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 3)])
def test_one_value_per_channel_in_training_is_a_value_error(backend, shape):
    """As nn.BatchNorm2d (the reference) and the Triton backend refuse it: a ValueError naming the fixes."""
    module, device = backend
    alive = torch.arange(3, device=device)
    for op in (reference.bn_gate_act, module.bn_gate_act):
        with pytest.raises(ValueError, match="more than 1 value per channel|more than one value per channel"):
            op(torch.randn(shape, device=device), None, None, torch.zeros(5, device=device),
               torch.ones(5, device=device), None, alive, torch.tensor(3, device=device), 0.1, 1e-5, "relu", True)
    with pytest.raises(ValueError, match="use a larger batch or eval mode"):
        module.bn_gate_act(torch.randn(shape, device=device), None, None, torch.zeros(5, device=device),
                           torch.ones(5, device=device), None, alive, torch.tensor(3, device=device), 0.1, 1e-5,
                           "relu", True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", list(_NAN_CASES))
def test_nan_activation_gradients_match_the_reference(backend, gen, op, training):
    """NaN in x: the outputs it reaches are NaN (ReLU keeps NaN), and torch.relu's backward passes the
    gradient at a NaN output (it zeroes where the output is <= 0, which NaN is not); the reference's
    gradients are finite wherever their formulas do not read the NaN. Every gradient must match it, NaN
    for NaN (the CPU epilogues zeroed the gradient at NaN outputs, and eval BN multiplied x - mean by 0)."""
    module, device = backend
    case, ref_fn = _NAN_CASES[op](gen, device, training)
    case.args[0][0, 0] = float("nan")  # the whole plane: a strided conv skips some positions
    grad_seed = int(torch.randint(2**31, (1,), generator=gen))
    y, grads, _ = run(getattr(module, op), case, grad_seed)
    y_ref, grads_ref, _ = run(ref_fn, case, grad_seed)
    assert y_ref.isnan().any()
    for what, got, want in [("output", y, y_ref)] + [(f"grad of argument {i}", grads[i], grads_ref[i])
                                                      for i in case.grad_args]:
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4, equal_nan=True,
                                   msg=lambda m: f"{op} {what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels", [2, 4, 8, 24])
@pytest.mark.parametrize("op", ["gate_apply", "gated_linear", "gated_conv2d", "bn_gate_act"])
def test_channel_counts_of_packed_kernels(compiled_or_gpu_backend, gen, op, channels, training, dtype):
    """Channel counts that CUDA's channel-wise kernels move several channels per access for (channels-last
    and 2-D activations, where every count divisible by 2, 4 or 8 packs): forward and gradients."""
    module, device = compiled_or_gpu_backend
    if op == "gate_apply":
        case = gate_apply_case(gen, device, dtype, "all", training, True, True, units=channels)
        _compare(op, module.gate_apply, reference.gate_apply, case, dtype, gen)
    elif op == "gated_linear":
        case = gated_linear_case(gen, device, dtype, ("all", "all"), training, "relu", True, channels=(5, channels))
        _compare(op, module.gated_linear, reference.gated_linear, case, dtype, gen)
    elif op == "gated_conv2d":
        case = gated_conv2d_case(gen, device, dtype, ("all", "all"), training, "relu", True, True,
                                 channels=(3, channels))
        _compare(op, module.gated_conv2d, reference.gated_conv2d, case, dtype, gen)
    else:
        case = bn_gate_act_case(gen, device, dtype, "all", training, "relu", True, True, units=channels)
        _compare(op, module.bn_gate_act, reference.bn_gate_act, case, dtype, gen)


@pytest.mark.parametrize("op", ["gated_linear", "gated_conv2d", "bn_gate_act"])
def test_gradcheck_float64(backend, gen, op):
    """Exact derivatives w.r.t. x and the parameters at a fixed gate sample (theta's gradient is
    an estimator, compared with the reference above)."""
    module, device = backend
    if device == "cuda":
        pytest.skip("float64 gradcheck runs on the CPU")
    if torch.float64 not in getattr(module, "SUPPORTED_DTYPES", (torch.float64,)):
        pytest.skip(f"{module.__name__} does not take float64 (its dtypes: {module.SUPPORTED_DTYPES}); "
                    "its gradients are compared with the reference in float32 and bf16 instead")
    kinds = ("subset", "subset")
    if op == "gated_linear":
        case = gated_linear_case(gen, device, torch.float64, kinds, True, "relu", True)
    elif op == "gated_conv2d":
        case = gated_conv2d_case(gen, device, torch.float64, kinds, True, "relu", True, False)
    else:
        case = bn_gate_act_case(gen, device, torch.float64, "subset", True, "relu", True, False)
        case.args[1:3] = [a.double() for a in case.args[1:3]]
    args = list(case.args)
    grad_args = [i for i in case.grad_args if i != (5 if op == "bn_gate_act" else 3)]
    for i in grad_args:
        args[i] = args[i].detach().clone().requires_grad_(True)

    def fn(*leaves):
        full = list(args)
        for i, leaf in zip(grad_args, leaves):
            full[i] = leaf
        if op == "bn_gate_act":  # running statistics are updated in place: keep each call independent
            full[3], full[4] = full[3].clone(), full[4].clone()
        return getattr(module, op)(*full)

    assert torch.autograd.gradcheck(fn, [args[i] for i in grad_args], eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Gates


def _gates_via_op(module, device, seed, n, theta, alive):
    ones = torch.ones(n, alive.numel(), device=device)
    return module.gate_apply(ones, theta.to(device), alive.to(device), seed, True).cpu()


def test_gates_bit_identical_to_philox(backend, gen):
    module, device = backend
    units = 100_003  # large offsets n * units + j
    alive = torch.randperm(units, generator=gen)[:257].sort().values
    theta = torch.rand(units, generator=gen)
    theta[alive[:5]] = 0.0
    theta[alive[5:10]] = 1.0
    for seed in (0, 2**40 + 12345, -7):
        seed_t = torch.tensor(seed, dtype=torch.int64)
        got = _gates_via_op(module, device, seed_t, 19, theta, alive)
        assert torch.equal(got, philox.sample_gates(seed_t, 19, theta, alive)), f"gates differ for seed {seed}"
    # Every unit sampled (no theta at 0 or 1), batch a multiple of four and not.
    theta = torch.rand(83, generator=gen) * 0.8 + 0.1
    alive = torch.arange(83)
    for n in (8, 6):
        got = _gates_via_op(module, device, torch.tensor(3), n, theta, alive)
        assert torch.equal(got, philox.sample_gates(torch.tensor(3), n, theta, alive)), f"gates differ at batch {n}"


def test_gate_mean_matches_theta(backend, gen):
    module, device = backend
    n, p = 20_000, torch.tensor([0.05, 0.3, 0.5, 0.9])
    seed = torch.tensor(int(torch.randint(2**62, (1,), generator=gen)), dtype=torch.int64)
    mean = _gates_via_op(module, device, seed, n, p, torch.arange(4)).mean(0)
    bound = 5 * (p * (1 - p) / n).sqrt()  # binomial standard error, 5 sigma
    assert ((mean - p).abs() <= bound).all(), f"gate means {mean.tolist()} vs theta {p.tolist()}"


def test_deterministic_for_fixed_seed(backend, gen):
    module, device = backend
    case = gated_conv2d_case(gen, device, torch.float32, ("subset", "all"), True, "relu", True, True)
    case.args[3] = torch.full_like(case.args[3], 0.5)
    first, second = run(module.gated_conv2d, case, 1), run(module.gated_conv2d, case, 1)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][i], second[1][i]) for i in case.grad_args)
    seed = case.args[6]
    theta = torch.full((64,), 0.5)
    gates = _gates_via_op(module, device, seed, 32, theta, torch.arange(64))
    assert not torch.equal(gates, _gates_via_op(module, device, seed + 1, 32, theta, torch.arange(64))), \
        "a new seed must resample the gates"


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 4, 5)], ids=["2d", "4d"])
def test_float64_eval_gate_is_theta_itself(backend, shape):
    """In eval a float64 gate is theta exactly, as the reference's theta.to(pre.dtype): 0.3, not theta
    rounded through float32 (0.30000001192092896), in the output and in the input gradient."""
    module, device = backend
    if torch.float64 not in module.SUPPORTED_DTYPES:
        pytest.skip(f"{module.__name__} refuses float64")
    theta = torch.tensor([0.3, 0.7, 0.1, 0.9], dtype=torch.float64)
    alive, seed = torch.tensor([0, 2, 3]), torch.tensor(5)
    pre = torch.ones(shape, dtype=torch.float64, device=device, requires_grad=True)
    y = module.gate_apply(pre, theta.to(device), alive.to(device), seed, False)
    y.sum().backward()
    expected = theta[alive].reshape(1, 3, *(1,) * (len(shape) - 2)).expand(shape)
    assert torch.equal(y.detach().cpu(), expected), f"eval gates {y.detach().cpu().unique().tolist()}"
    assert torch.equal(pre.grad.cpu(), expected)
    branch = torch.ones(shape, dtype=torch.float64, device=device, requires_grad=True)
    y = module.gated_residual(torch.zeros_like(branch), branch, theta.to(device), alive[:1].to(device), seed, False)
    y.sum().backward()
    assert torch.equal(y.detach().cpu(), torch.full(shape, 0.3, dtype=torch.float64))
    assert torch.equal(branch.grad.cpu(), torch.full(shape, 0.3, dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_momentum_none_is_one_type_error(backend, monkeypatch, training):
    """bn_gate_act's momentum is a float (nn.BatchNorm2d's None is the caller's to turn into one): every
    backend refuses None with one TypeError; the C++ one had raised a schema RuntimeError in training and
    taken it in eval, the Triton one failed inside its kernel, the reference raised F.batch_norm's."""
    module, device = backend
    monkeypatch.setenv("CADK_BACKEND", module.__name__.rsplit(".", 1)[-1].removesuffix("_backend"))
    x, alive = torch.randn(4, 3, 2, 2, device=device), torch.arange(3, device=device)
    with pytest.raises(TypeError, match="momentum must be a float"):
        kernels.bn_gate_act(x, None, None, torch.zeros(3, device=device), torch.ones(3, device=device), None, alive,
                            torch.tensor(1, device=device), None, 1e-5, "relu", training)


IN_PLACE_OPS = [("gate_apply", True)] + [(op, gated) for op in ("gated_linear", "gated_conv2d", "bn_gate_act")
                                           for gated in (True, False)]


@pytest.mark.parametrize("op,gated", IN_PLACE_OPS, ids=lambda v: v if isinstance(v, str) else ("gated" if v else "plain"))
def test_output_updated_in_place(backend, gen, op, gated):
    """A layer's output may be updated in place (out += shortcut, as torchvision's blocks do after a batch
    norm) wherever no backward reads it: with a gate (the backward reads pre), and with neither gate nor
    activation (nothing is saved). Autograd refused both where an op saved or returned a view of its output.
    The gradients are those of the same op's plain run (d(y + s)/dy = 1)."""
    module, device = backend
    fn, case = getattr(module, op), in_place_case(gen, device, op, gated)
    y, grads, _ = run(fn, case, 1)
    y_added, grads_added, _ = run(fn, case, 1, add_to_output=True)
    assert y_added.shape == y.shape
    for i in case.grad_args:
        assert torch.equal(grads_added[i], grads[i]), f"{op}: gradient {i} changed by the in-place update"


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_frozen_weight_gets_no_gradient(backend, gen, layer):
    """A weight that does not require grad (a frozen layer, or thetas learnt on fixed weights) gets no
    gradient, and the backward computes none: its product and the full-size scatter are skipped
    (FlopCounterMode counts one product, or none when x needs no gradient either). The other gradients
    are those of the full backward."""
    from torch.utils.flop_counter import FlopCounterMode

    module, device = backend
    f32 = torch.float32
    if layer == "linear":
        op, case = "gated_linear", gated_linear_case(gen, device, f32, ("subset", "subset"), True, "relu", True)
    else:
        op, case = "gated_conv2d", gated_conv2d_case(gen, device, f32, ("subset", "all"), True, "relu", True, True)
    fn = getattr(module, op)
    _, full, _ = run(fn, case, 1)
    flops = []
    for frozen in ([1], [0, 1]):
        kept = [i for i in case.grad_args if i not in frozen]
        partial = Case(case.args, kept)
        with FlopCounterMode(display=False) as counter:
            _, grads, _ = run(fn, partial, 1)
        flops.append(counter.get_total_flops())
        for i in kept:
            assert torch.equal(grads[i], full[i]), f"{op}: gradient {i} changed with {frozen} frozen"
    forward = flops[1]  # with x and weight frozen only the forward's product is counted
    assert forward > 0 and flops[0] == 2 * forward, f"{op}: FLOPs {flops} (x needs grad, then neither)"


def test_empty_batch(backend, gen, monkeypatch):
    """A batch of no examples (as a filtered or uneven last batch gives): empty outputs and input
    gradients, zero parameter and theta gradients, running statistics unchanged; the reference's values.
    The ops' BN in training refuses it (no statistics); the dispatch point runs it as eval, as
    nn.BatchNorm2d treats an empty batch."""
    module, device = backend
    f32 = torch.float32
    cases = [("gated_linear", gated_linear_case(gen, device, f32, ("subset", "subset"), True, "relu", True)),
             ("gated_conv2d", gated_conv2d_case(gen, device, f32, ("subset", "all"), True, "relu", True, True)),
             ("gate_apply", gate_apply_case(gen, device, f32, "subset", True, True, False)),
             ("bn_gate_act", bn_gate_act_case(gen, device, f32, "subset", False, "relu", True, True)),
             ("gated_residual", gated_residual_case(gen, device, f32, True, "nhwc"))]
    for op, case in cases:
        inputs = (0, 1) if op == "gated_residual" else (0,)
        for i in inputs:
            case.args[i] = case.args[i][:0]
        got, want = run(getattr(module, op), case, 1), run(getattr(reference, op), case, 1)
        assert got[0].shape == want[0].shape, f"{op}: output shape {tuple(got[0].shape)}"
        for i in case.grad_args:
            assert_close(got[1][i], want[1][i], f"{op} grad {i}", f32)
            if i not in inputs:
                assert not got[1][i].any(), f"{op}: nonzero gradient of argument {i} from no examples"
        for i in case.mutated:
            assert torch.equal(got[2][i], case.args[i]), f"{op}: argument {i} changed"
    bn = bn_gate_act_case(gen, device, f32, "subset", True, "relu", True, True)
    bn.args[0] = bn.args[0][:0]
    monkeypatch.setenv("CADK_BACKEND", module.__name__.rpartition(".")[2].removesuffix("_backend"))
    y, grads, mutated = run(kernels.bn_gate_act, bn, 1)
    assert y.shape == bn.args[0].shape and not any(g.any() for g in grads.values())
    assert all(torch.equal(mutated[i], bn.args[i]) for i in bn.mutated)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test; the previous setting is restored after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's values as integers of the same width: equal bits, not just equal values (0.0 and -0.0 differ)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_deterministic_algorithms_give_identical_sums(backend, gen, deterministic_algorithms):
    """Under torch.use_deterministic_algorithms two runs give bitwise-equal outputs and gradients, the
    per-unit sums included (theta, bias, and through BN's channel sums its input gradient). Thousands of
    rows per channel, so that on a GPU several blocks add into each unit; NCHW (one channel per CUDA
    block) and channels-last."""
    module, device = backend
    # Triton's interpreter runs every kernel program in Python, one after another (a fixed order anyway):
    # two examples and one layout keep it fast.
    interpreted = module.__name__.endswith("triton_backend") and device == "cpu"
    n = 2 if interpreted else 64
    f32, image = torch.float32, (16, 16)
    cases = []  # (op, case, position of theta)
    linear = gated_linear_case(gen, device, f32, ("subset", "subset"), True, "relu", True, channels=(16, 40))
    linear.args[0] = randn((n * 64, linear.args[4].numel()), gen, f32, device)
    cases.append(("gated_linear", linear, 3))
    for channels_last in (False,) if interpreted else (False, True):
        gate = gate_apply_case(gen, device, f32, "subset", True, True, channels_last, units=12)
        gate.args[0] = randn((n, gate.args[2].numel()) + image, gen, f32, device, channels_last)
        conv = gated_conv2d_case(gen, device, f32, ("subset", "subset"), True, "relu", True, channels_last,
                                 channels=(6, 12))
        conv.args[0] = randn((n, conv.args[4].numel()) + image, gen, f32, device, channels_last)
        bn = bn_gate_act_case(gen, device, f32, "subset", True, "relu", True, channels_last, units=12)
        bn.args[0] = randn((n, bn.args[6].numel()) + image, gen, f32, device, channels_last, scale=2.0, shift=0.5)
        cases += [("gate_apply", gate, 1), ("gated_conv2d", conv, 3), ("bn_gate_act", bn, 5)]
    residual = gated_residual_case(gen, device, f32, True, "nchw")
    residual.args[:2] = [randn((n, 8) + image, gen, f32, device) for _ in range(2)]
    cases.append(("gated_residual", residual, 2))
    for op, case, theta_at in cases:
        case.args[theta_at] = torch.full_like(case.args[theta_at], 0.5)
        fn = getattr(module, op)
        (y1, grads1, mutated1), (y2, grads2, mutated2) = run(fn, case, 1), run(fn, case, 1)
        assert torch.equal(_bits(y1), _bits(y2)), f"{op}: outputs differ between runs"
        for i in case.grad_args:
            assert torch.equal(_bits(grads1[i]), _bits(grads2[i])), f"{op}: gradients of argument {i} differ"
        for i in case.mutated:
            assert torch.equal(_bits(mutated1[i]), _bits(mutated2[i])), f"{op}: updates of argument {i} differ"
        # The same values as the default mode's (other sums, other orders): catches a repeatable mistake.
        torch.use_deterministic_algorithms(False)
        try:
            y0, grads0, _ = run(fn, case, 1)
        finally:
            torch.use_deterministic_algorithms(True)
        assert_close(y1, y0, f"{op} output", f32)
        for i in case.grad_args:
            assert_close(grads1[i], grads0[i], f"{op} grad {i}", f32, tol_scale=10)


# ---------------------------------------------------------------------------------------------
# Registration, compile, dispatch, input checks


def _compiled_ops_only(module):
    if not hasattr(torch.ops, "cadk") or not hasattr(torch.ops.cadk, "gated_linear_fwd"):
        pytest.skip("backend does not use the torch.ops.cadk ops")
    if module.__name__.endswith("triton_backend"):
        pytest.skip("the Triton backend registers its own ops")


def test_opcheck(backend, gen):
    module, device = backend
    _compiled_ops_only(module)
    ops = torch.ops.cadk
    cases = [
        (ops.gate_apply_fwd, gate_apply_case(gen, device, torch.float32, "subset", True, True, True)),
        (ops.gated_residual_fwd, gated_residual_case(gen, device, torch.float32, True, "nhwc")),
        (ops.gated_linear_fwd, gated_linear_case(gen, device, torch.float32, ("subset", "subset"), True, "relu",
                                                 True)),
        (ops.gated_conv2d_fwd, gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, "relu",
                                                 False, True)),
        (ops.bn_gate_act_fwd, bn_gate_act_case(gen, device, torch.float32, "subset", True, "relu", True, True)),
        # eval with every channel alive: mean and var must not alias the running statistics
        (ops.bn_gate_act_fwd, bn_gate_act_case(gen, device, torch.float32, "all", False, "relu", True, False)),
    ]
    frozen = gated_linear_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True)
    frozen.grad_args = [0, 2, 3]  # a weight that needs no gradient: the backward op skips it
    cases.append((ops.gated_linear_fwd, frozen))
    for op, case in cases:
        args = [a.detach().clone().requires_grad_(i in case.grad_args) if isinstance(a, torch.Tensor) else a
                for i, a in enumerate(case.args)]
        if op is ops.bn_gate_act_fwd:
            del args[8]  # the op takes no momentum: the Python wrapper applies it
        if op is ops.gated_conv2d_fwd:
            args[7:10] = [list(v) for v in args[7:10]]
        torch.library.opcheck(op, args)
    units = 9
    alive = torch.tensor([0, 4, 5, 8], device=device)
    stats = [torch.rand(units, device=device) for _ in range(2)] + [alive] + [torch.rand(4, device=device)
                                                                           for _ in range(2)]
    torch.library.opcheck(ops.bn_running_stats_, stats + [0.1, 7])
    # The conv's backward op, every gradient asked for or not, with no filter or no input channel alive
    # (zero-filled outputs) in channels-last: the real outputs must have the fake kernels' layout.
    for kinds in (("subset", "empty"), ("empty", "subset"), ("subset", "subset")):
        case = gated_conv2d_case(gen, device, torch.float32, kinds, True, "relu", True, True)
        head, tail = case.args[:7], [list(v) if isinstance(v, tuple) else v for v in case.args[7:]]
        y, pre = ops.gated_conv2d_fwd(*head, *tail)
        for need_grad_x, need_grad_weight in itertools.product((True, False), repeat=2):
            torch.library.opcheck(ops.gated_conv2d_bwd, [torch.randn_like(y), head[0], head[1], pre, *head[3:7], *tail,
                                                          True, need_grad_x, need_grad_weight],
                                  test_utils=("test_schema", "test_faketensor"))


def test_bn_running_stats_matches_unfused_update(backend, gen):
    """The one-kernel running-statistics update against nn.BatchNorm's (lerp at the alive entries), and
    its input checks."""
    module, device = backend
    _compiled_ops_only(module)
    units, count, momentum = 11, 5, 0.3
    alive = torch.tensor([1, 2, 6, 10], device=device)
    mean, var = torch.randn(4, generator=gen).to(device), torch.rand(4, generator=gen).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        rm, rv = (torch.rand(units, generator=gen).to(device, dtype) for _ in range(2))
        want_m, want_v = rm.clone(), rv.clone()
        want_m[alive] = torch.lerp(rm[alive], mean.to(dtype), momentum)
        want_v[alive] = torch.lerp(rv[alive], (var * (count / (count - 1))).to(dtype), momentum)
        versions = rm._version, rv._version
        torch.ops.cadk.bn_running_stats_(rm, rv, alive, mean, var, momentum, count)
        assert rm._version > versions[0] and rv._version > versions[1]  # seen as in-place updates
        torch.testing.assert_close(rm, want_m)  # ATen's lerp fuses its multiply-add or not, by CPU
        torch.testing.assert_close(rv, want_v)
    rm, rv = torch.zeros(units, device=device), torch.ones(units, device=device)
    with pytest.raises(RuntimeError, match="alive lists 3 channels"):
        torch.ops.cadk.bn_running_stats_(rm, rv, alive[:3], mean, var, momentum, count)
    with pytest.raises(RuntimeError, match="count .* must exceed 1"):
        torch.ops.cadk.bn_running_stats_(rm, rv, alive, mean, var, momentum, 1)
    with pytest.raises(RuntimeError, match="must be 1-D of one shape and dtype"):
        torch.ops.cadk.bn_running_stats_(rm, rv[:5], alive, mean, var, momentum, count)


def test_compile_fullgraph_matches_eager(backend, gen):
    module, device = backend
    torch._dynamo.reset()
    conv = gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, "none", False, True,
                             with_bias=False)
    x, weight, _, _, alive_in, alive_out, seed = conv.args[:7]
    units = weight.shape[0]
    gamma, beta = torch.rand(units, device=device) + 0.5, torch.randn(units, device=device)
    theta = torch.rand(units, device=device)

    def step(x, weight, gamma, beta, theta, running_mean, running_var):
        h = module.gated_conv2d(x, weight, None, None, alive_in, alive_out, seed, (1, 1), (1, 1), (1, 1),
                                "none", True)
        y = module.bn_gate_act(h, gamma, beta, running_mean, running_var, theta, alive_out, seed, 0.1, 1e-5,
                               "relu", True)
        return (y * y).sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, gamma, beta, theta)]
        stats = [torch.zeros(units, device=device), torch.ones(units, device=device)]
        loss = fn(*leaves, *stats)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves] + stats

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(grads(compiled), grads(step)):
        assert_close(got, want, "compiled vs eager", torch.float32)


def test_compile_fullgraph_residual_matches_eager(backend, gen):
    module, device = backend
    torch._dynamo.reset()
    shortcut, branch, theta, alive, seed, _ = gated_residual_case(gen, device, torch.float32, True, "nhwc").args

    def step(shortcut, branch, theta):
        return (module.gated_residual(shortcut, branch, theta, alive, seed, True) ** 2).sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (shortcut, branch, theta)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(grads(compiled), grads(step)):
        assert_close(got, want, "compiled vs eager", torch.float32)


def test_cadk_backend_env_routes_dispatch(backend, gen, monkeypatch):
    module, device = backend
    name = module.__name__.rsplit(".", 1)[-1].removesuffix("_backend")
    calls = []
    original = module.gated_linear

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "gated_linear", spy)
    monkeypatch.setenv("CADK_BACKEND", name)
    case = gated_linear_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True)
    assert kernels.backend_for(torch.device(device)) == name
    y = kernels.gated_linear(*case.args)
    assert len(calls) == 1 and torch.equal(y, original(*case.args))


def _forced(backend, monkeypatch):
    """(module, device) of `backend`, with the dispatch forced to it."""
    module, device = backend
    monkeypatch.setenv("CADK_BACKEND", module.__name__.rsplit(".", 1)[-1].removesuffix("_backend"))
    return module, device


def _leaf_grads(fn, leaves: list, grad_seed: int):
    """(output, gradients of leaves) of fn(*leaves) against a seeded random grad_y."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y = fn(*leaves)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype).to(y.device)
    return y, torch.autograd.grad(y, leaves, grad_y)


@pytest.mark.parametrize("op", ["gated_linear", "gated_conv2d"])
def test_autocast_runs_layers_in_its_dtype(backend, gen, monkeypatch, op):
    """Under torch.autocast the layer ops compute in the autocast dtype, as F.linear and F.conv2d do: the
    same result as float32 inputs and parameters cast by hand, with float32 parameter gradients. Before,
    a bfloat16 activation from an autocast op met the float32 weight and the op refused the mix."""
    module, device = _forced(backend, monkeypatch)
    make = gated_linear_case if op == "gated_linear" else gated_conv2d_case
    extra = () if op == "gated_linear" else (False,)
    case = make(gen, device, torch.float32, ("subset", "subset"), True, "relu", True, *extra)
    x, weight, bias, theta = case.args[:4]
    rest = case.args[4:]
    fn = getattr(kernels, op)
    grad_seed = int(torch.randint(2**31, (1,), generator=gen))

    def in_autocast(*leaves):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return fn(*leaves, *rest)

    def cast_by_hand(x, weight, bias, theta):
        return fn(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), theta, *rest)

    y, grads = _leaf_grads(in_autocast, [x, weight, bias, theta], grad_seed)
    y_ref, grads_ref = _leaf_grads(cast_by_hand, [x, weight, bias, theta], grad_seed)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    for name, g, g_ref in zip(("x", "weight", "bias", "theta"), grads, grads_ref):
        assert g.dtype == torch.float32, f"{op}: grad of {name} is {g.dtype}"
        assert torch.equal(g, g_ref), f"{op}: grad of {name} differs from the hand-cast op's"


def test_autocast_leaves_float64_layers_in_float64(backend, gen, monkeypatch):
    """Autocast casts float32 (and lower) inputs only; a float64 layer stays float64, as F.linear does."""
    module, device = _forced(backend, monkeypatch)
    if torch.float64 not in module.SUPPORTED_DTYPES:
        pytest.skip(f"{module.__name__} does not take float64")
    case = gated_linear_case(gen, device, torch.float64, ("subset", "subset"), True, "relu", True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = kernels.gated_linear(*case.args)
    assert y.dtype == torch.float64 and torch.equal(y, kernels.gated_linear(*case.args))


def test_autocast_residual_adds_in_the_promoted_type(backend, gen, monkeypatch):
    """Under autocast a float32 shortcut and a bfloat16 branch add in float32, as shortcut + branch
    would; outside autocast the mix is refused as before."""
    module, device = _forced(backend, monkeypatch)
    case = gated_residual_case(gen, device, torch.float32, True, "nchw")
    shortcut, branch, theta, alive, seed, training = case.args
    grad_seed = int(torch.randint(2**31, (1,), generator=gen))

    def in_autocast(shortcut, branch):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return kernels.gated_residual(shortcut, branch.bfloat16(), theta, alive, seed, training)

    def promoted_by_hand(shortcut, branch):
        return kernels.gated_residual(shortcut, branch.bfloat16().float(), theta, alive, seed, training)

    y, grads = _leaf_grads(in_autocast, [shortcut, branch], grad_seed)
    y_ref, grads_ref = _leaf_grads(promoted_by_hand, [shortcut, branch], grad_seed)
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert all(torch.equal(g, g_ref) for g, g_ref in zip(grads, grads_ref))
    with pytest.raises(RuntimeError, match="must match in shape and dtype"):
        kernels.gated_residual(shortcut, branch.bfloat16(), theta, alive, seed, training)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(backend, gen, monkeypatch, use_reentrant):
    """torch.utils.checkpoint around every op (fixed seeds, training mode): the forward runs again inside
    the backward, and the gradients equal those without checkpointing. The non-reentrant mode allows
    reading a node's saved tensors once only, which the Triton backward formulas had broken."""
    from torch.utils.checkpoint import checkpoint
    _, device = _forced(backend, monkeypatch)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    def alive(*idx):
        return torch.tensor(idx, device=device)

    seed = torch.tensor(int(torch.randint(2**40, (1,), generator=gen)))
    w1, b1, th1 = rand(6, 3, 3, 3, scale=0.3), rand(6), (torch.rand(6, generator=gen) * 0.8 + 0.1).to(device)
    gamma, beta = (torch.rand(6, generator=gen) + 0.5).to(device).requires_grad_(), rand(6)
    w2, th2 = rand(6, 6, 3, 3, scale=0.3), (torch.rand(6, generator=gen) * 0.8 + 0.1).to(device)
    w3, b3, th3 = rand(4, 6 * 16, scale=0.1), rand(4), (torch.rand(4, generator=gen) * 0.8 + 0.1).to(device)
    th_block = torch.full((2,), 0.6, device=device)
    thetas = [t.requires_grad_() for t in (th1, th2, th3, th_block)]
    leaves = [w1, b1, gamma, beta, w2, w3, b3, *thetas]
    x = torch.randn(3, 3, 4, 4, generator=gen).to(device)
    a1, a_all = alive(0, 2, 3, 4, 5), alive(0, 1, 2, 3, 4, 5)

    def net(x):
        z = kernels.gated_conv2d(x, w1, b1, None, alive(0, 1, 2), a1, seed, 1, 1, 1, "none", True)
        h = kernels.bn_gate_act(z, gamma, beta, torch.zeros(6, device=device), torch.ones(6, device=device),
                                th1, a1, seed, 0.1, 1e-5, "relu", True)
        branch = kernels.gated_conv2d(h, w2, None, th2, a1, a_all, seed, 1, 1, 1, "relu",
                                      True)[:, 1:]
        h = kernels.gated_residual(h, branch, th_block, alive(1), seed, True)
        h = kernels.gate_apply(h, th2, a1, seed + 1, True)
        return kernels.gated_linear(torch.cat([h, h[:, :1]], 1).flatten(1), w3, b3, th3, alive(*range(96)),
                                    alive(0, 1, 3), seed, "relu", True)

    def grads(run):  # .backward(): the reentrant mode does not support torch.autograd.grad
        for t in leaves:
            t.grad = None
        run().square().sum().backward()
        return [t.grad for t in leaves]

    plain = grads(lambda: net(x))
    checkpointed = grads(lambda: checkpoint(net, x.requires_grad_(use_reentrant), use_reentrant=use_reentrant))
    for g, g_ref in zip(checkpointed, plain):
        torch.testing.assert_close(g, g_ref)


def test_compiled_ops_refuse_an_argument_on_the_meta_device(gen):
    """One meta argument makes the dispatcher run the fake kernel: it must refuse the mix, not return
    uninitialised memory as the result."""
    from cadk.kernels import cpp_backend
    if not cpp_backend.AVAILABLE:
        pytest.skip("the cadk._C extension is not built")
    case = gated_linear_case(gen, "cpu", torch.float32, ("subset", "subset"), True, "relu", True)
    args = list(case.args)
    args[5] = args[5].to("meta")
    with pytest.raises(RuntimeError, match="alive_out is on meta but the activation on cpu"):
        cpp_backend.gated_linear(*args)
    pre = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="theta is on meta"):
        cpp_backend.gate_apply(pre, torch.full((3,), 0.5, device="meta"), torch.arange(3), torch.tensor(1), True)
    with pytest.raises(RuntimeError, match="seed is on meta but the activation on cpu"):
        cpp_backend.gate_apply(pre, torch.full((3,), 0.5), torch.arange(3), torch.tensor(1, device="meta"), True)


@pytest.mark.parametrize("geometry", [((0, 1), (0, 0), (1, 1)), ((1, 1), (-1, 0), (1, 1)), ((1, 1), (0, 0), (0, 1))])
def test_compiled_conv_fake_refuses_a_bad_geometry(geometry):
    """The fake kernel (meta tensors, torch.compile) refuses a bad stride, padding or dilation as the CPU
    kernel does: it had divided by zero or given an output shape the kernel would not."""
    from cadk.kernels import cpp_backend
    if not cpp_backend.AVAILABLE:
        pytest.skip("the cadk._C extension is not built")
    x, weight = torch.empty(2, 3, 5, 5, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    alive = torch.arange(3, device="meta")
    with pytest.raises(RuntimeError, match="need stride > 0, dilation > 0 and padding >= 0"):
        cpp_backend.gated_conv2d(x, weight, None, None, alive, alive, torch.tensor(1), *geometry, "relu", True)


def test_cpu_kernels_name_unsupported_dtypes(gen):
    """float16 activations on the CPU: an error that names the dtype and the fixes, not ATen's
    '"cadk_epilogue_forward" not implemented for Half' from inside a kernel."""
    from cadk.kernels import cpp_backend
    if not cpp_backend.AVAILABLE:
        pytest.skip("the cadk._C extension is not built")
    case = gated_linear_case(gen, "cpu", torch.float16, ("subset", "subset"), True, "relu", True)
    with pytest.raises(RuntimeError, match="x is Half, which the CPU kernels do not compute in; use float32"):
        cpp_backend.gated_linear(*case.args)
    pre = torch.randn(2, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="pre is Half.*bfloat16"):
        cpp_backend.gate_apply(pre, torch.full((3,), 0.5), torch.arange(3), torch.tensor(1), True)


def test_cadk_backend_env_leaves_unsupported_devices_to_auto(monkeypatch):
    """A forced backend that does not run on a device (Triton on CPU tensors without its interpreter)
    leaves that device to the automatic choice instead of failing inside a kernel launch."""
    gpu_only = types.SimpleNamespace(supports=lambda device: torch.device(device).type == "cuda")
    monkeypatch.setitem(kernels._BACKENDS, "gpu_only", gpu_only)
    monkeypatch.setenv("CADK_BACKEND", "gpu_only")
    assert kernels.backend_for(torch.device("cpu")) == kernels._auto(torch.device("cpu"))
    assert kernels.backend_for(torch.device("cuda")) == "gpu_only"
    monkeypatch.setenv("CADK_BACKEND", "cpu")  # a device, not a backend: no build would make it one
    with pytest.raises(RuntimeError, match=r"'cpu' names no cadk backend; set it to auto or one of \['reference'"):
        kernels.backend_for(torch.device("cpu"))
    monkeypatch.delitem(kernels._BACKENDS, "triton", raising=False)  # a backend that is not built here
    monkeypatch.setenv("CADK_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="not available here.*pip install -e"):
        kernels.backend_for(torch.device("cpu"))


def test_bad_inputs_raise_clear_errors(backend, gen):
    module, device = backend
    case = gated_conv2d_case(gen, device, torch.float32, ("subset", "subset"), True, "relu", True, False)
    args = list(case.args)
    with pytest.raises(RuntimeError, match="int64"):
        module.gated_conv2d(*args[:4], args[4].int(), *args[5:])
    with pytest.raises(RuntimeError, match="activation has"):
        module.gated_conv2d(torch.cat([args[0], args[0][:, :1]], 1), *args[1:])
    with pytest.raises(RuntimeError, match=r"must be \[N"):
        module.gated_conv2d(args[0][0], *args[1:])
    if device == "cpu":  # on a GPU alive's values are not read on the host: that would synchronise
        with pytest.raises(RuntimeError, match="sorted"):
            module.gated_conv2d(args[0][:, :1].repeat(1, 2, 1, 1), *args[1:4],
                                torch.tensor([2, 1], device=device), *args[5:])
    bn = bn_gate_act_case(gen, device, torch.float32, "subset", True, "relu", True, False)
    with pytest.raises(RuntimeError, match="0-dim int64"):
        module.bn_gate_act(*bn.args[:7], torch.tensor([1, 2]), *bn.args[8:])


def test_layout_rule_matches_pytorch():
    """format_of (C++) and its mirror for the fake kernels decide channels-last from the strides, as
    ATen's suggest_memory_format: [N, 1, H, W] weights moved to channels-last count as channels-last,
    so a gated conv's output has the layout F.conv2d would give."""
    from torch._prims_common import suggest_memory_format

    from cadk.kernels import cpp_backend

    cl = torch.channels_last
    cases = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).contiguous(memory_format=cl),
             torch.randn(4, 1, 3, 3).contiguous(memory_format=cl), torch.randn(4, 1, 3, 3),
             torch.randn(4, 1, 3, 3).to(memory_format=cl), torch.randn(2, 3, 1, 1).to(memory_format=cl),
             torch.randn(1, 3, 1, 5).transpose(1, 3), torch.randn(2, 6, 4, 4)[:, ::2],
             torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1), torch.randn(0, 3, 4, 5), torch.randn(2, 3)]
    for t in cases:
        want = t.dim() == 4 and suggest_memory_format(t) == cl
        assert cpp_backend._is_channels_last(t) == want, (tuple(t.shape), t.stride())
    if not cpp_backend.has_kernel("CPU"):
        pytest.skip("the C++ extension is not built")
    x = torch.randn(2, 1, 6, 6)
    w = torch.randn(3, 1, 3, 3).to(memory_format=cl)
    y = cpp_backend.gated_conv2d(x, w, None, None, torch.arange(1), torch.arange(3), 0, (1, 1), (1, 1), (1, 1),
                                 "none", False)
    assert y.stride() == torch.nn.functional.conv2d(x, w, padding=1).stride()


@pytest.mark.parametrize("op", ["gated_linear", "gated_conv2d"])
def test_input_gradient_skipped_when_not_needed(backend, gen, op):
    """An input that needs no gradient (a network's data) gets none, the other gradients are unchanged,
    and the backward op then returns an empty grad_x, also under the fake kernel (opcheck)."""
    module, device = backend
    _compiled_ops_only(module)
    if op == "gated_linear":
        case = gated_linear_case(gen, device, torch.float32, ("subset", "all"), True, "relu", True)
    else:
        case = gated_conv2d_case(gen, device, torch.float32, ("subset", "all"), True, "relu", True, True)
    fn = getattr(module, op)
    _, with_x, _ = run(fn, case, 3)
    case.grad_args = [i for i in case.grad_args if i != 0]
    args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in case.args]
    for i in case.grad_args:
        args[i].requires_grad_(True)
    y = fn(*args)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype).to(y.device))
    assert args[0].grad is None
    for i in case.grad_args:
        assert_close(args[i].grad, with_x[i], f"{op} grad {i} without grad_x", torch.float32)

    ops = torch.ops.cadk
    saved = [a.detach() if isinstance(a, torch.Tensor) else a for a in case.args]
    fwd, bwd = (ops.gated_linear_fwd, ops.gated_linear_bwd) if op == "gated_linear" else \
        (ops.gated_conv2d_fwd, ops.gated_conv2d_bwd)
    head, tail = saved[:7], saved[7:]  # (x, weight, bias, theta, alive_in, alive_out, seed), the rest
    y, pre = fwd(*head, *[list(t) if isinstance(t, tuple) else t for t in tail])
    bwd_args = [torch.randn_like(y), head[0], head[1], pre, *head[3:7],
                *[list(t) if isinstance(t, tuple) else t for t in tail], True, False]
    grads = bwd(*bwd_args)
    assert grads[0].numel() == 0
    torch.library.opcheck(bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_one_channel_channels_last_conv_is_correct(backend):
    """torch's CPU convolution (2.13) computes a one-channel channels-last input into a one-column output
    wrongly; every backend must still match a float64 NCHW convolution there."""
    module, device = backend
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, w, stride=(1, 2)).float()
    x_cl = x.float().as_strided(x.shape, (16, 1, 4, 1)).clone(memory_format=torch.preserve_format)
    w_cl = torch.empty_strided(w.shape, (9, 1, 3, 1)).copy_(w)
    for xs, ws in ((x_cl, w.float()), (x.float(), w_cl), (x_cl, w_cl)):
        y = module.gated_conv2d(xs.to(device), ws.to(device), None, None, torch.arange(1, device=device),
                                torch.arange(3, device=device), torch.tensor(0), (1, 2), (0, 0), (1, 1),
                                "none", False)
        assert_close(y, want.to(device), "one-channel conv output", torch.float32)


_ONE_COLUMN_DILATION_SCRIPT = """
import sys
import importlib
import torch
module = importlib.import_module(sys.argv[1])
device = sys.argv[2]
x = torch.randn(5, 2, 4, 1, dtype=torch.float64)
w = torch.randn(6, 2, 3, 1, dtype=torch.float64)
for pad_w, stride_w in ((1, 2), (2, 3)):
    want = torch.nn.functional.conv2d(x, w, None, (2, stride_w), (0, pad_w))
    for x_cl, w_cl in ((True, False), (False, True), (True, True)):
        xs, ws = x.bfloat16(), w.bfloat16()
        xs = xs.contiguous(memory_format=torch.channels_last) if x_cl else xs
        ws = ws.contiguous(memory_format=torch.channels_last) if w_cl else ws
        y = module.gated_conv2d(xs.to(device), ws.to(device), None, None, torch.arange(2, device=device),
                                torch.arange(6, device=device), torch.tensor(0), (2, stride_w), (0, pad_w),
                                (1, 2), "none", False)
        torch.testing.assert_close(y.double().cpu(), want, rtol=3e-2, atol=1e-1)
print("ok")
"""


@pytest.mark.parametrize("use_reference", [False, True], ids=["backend", "reference"])
def test_dilation_of_a_one_column_kernel_runs(backend, use_reference):
    """torch's CPU convolution (2.13) crashes the process in bfloat16 when an input one column wide, padded
    and strided across, meets a one-column kernel with a dilation > 1 across and either operand has
    channels-last strides. A dilation across a one-column kernel changes nothing, so every backend must
    give the plain convolution's values. Run in a child process: the failure is a segmentation fault."""
    module, device = backend
    name = reference.__name__ if use_reference else module.__name__
    run_ = subprocess.run([sys.executable, "-c", _ONE_COLUMN_DILATION_SCRIPT, name, str(device)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert run_.returncode == 0 and run_.stdout.strip().endswith("ok"), (run_.returncode, run_.stderr[-2000:])


@pytest.mark.parametrize("use_reference", [False, True], ids=["backend", "reference"])
def test_bfloat16_channels_last_conv_into_one_strided_column_has_right_gradients(backend, use_reference):
    """torch's CPU convolution backward (2.13) returns wrong input and weight gradients (stale memory, at
    times NaN) in bfloat16 when either operand has channels-last strides and the output is one column
    wide with a stride > 1 across; every backend must match a float64 NCHW convolution there."""
    module, device = backend
    module = reference if use_reference else module
    gen = torch.Generator().manual_seed(0)
    # (x, weight, stride, padding): outputs [.., 2, 1], [.., 1, 1] and [.., 3, 1]
    shapes = (((2, 5, 3, 1), (3, 5, 3, 3), (2, 2), (1, 1)), ((2, 2, 3, 2), (3, 2, 3, 3), (1, 3), (1, 1)),
              ((2, 5, 3, 1), (3, 5, 1, 3), (1, 3), (0, 1)))
    for (x_shape, w_shape, stride, padding), x_cl, _ in itertools.product(shapes, (True, False), range(4)):
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
        w = torch.randn(w_shape, generator=gen, dtype=torch.float64)
        want = torch.nn.functional.conv2d(x.requires_grad_(), w.requires_grad_(), None, stride, padding)
        grad_y = torch.randn(want.shape, generator=gen).bfloat16()
        want_grads = torch.autograd.grad(want, (x, w), grad_y.double())
        fmt = torch.channels_last
        leaves = [x.detach().bfloat16(), w.detach().bfloat16()]
        leaves[0 if x_cl else 1] = leaves[0 if x_cl else 1].contiguous(memory_format=fmt)
        leaves = [t.to(device).requires_grad_() for t in leaves]
        y = module.gated_conv2d(*leaves, None, None, torch.arange(x_shape[1], device=device),
                                torch.arange(w_shape[0], device=device), torch.tensor(0), stride, padding, (1, 1),
                                "none", True)
        grads = torch.autograd.grad(y, leaves, grad_y.to(device))
        for got, w_, name in zip(grads, want_grads, ("x", "weight")):
            assert_close(got.float().cpu(), w_.float(), f"grad of {name}", torch.bfloat16)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_vector_paths_this_cpu_skips(capability):
    """CADK_CPU_CAPABILITY caps the C++ CPU kernels' vector paths (Philox, weight gather, gradient
    scatter for 4- and 2-byte elements, the AVX-512 builds of the epilogues and bn_gate_act), so the
    AVX2, baseline and scalar code runs here too: gates, outputs and gradients against the reference."""
    import os
    import subprocess
    import sys

    from cadk.kernels import cpp_backend
    if not cpp_backend.has_kernel("CPU"):
        pytest.skip("the C++ extension is not built")
    env = dict(os.environ, CADK_CPU_CAPABILITY=capability)
    select = ("(cpp-cpu and ((float32 and (bit_identical or test_gated_linear or test_gate_apply)) "
              "or test_wide_layers or test_bn_gate_act or (test_gated_conv2d and nhwc))) or test_recycled")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_cpu_capability_that_names_none_is_refused():
    """A CADK_CPU_CAPABILITY typo ("AVX2") was ignored: the run tested the vector paths it meant to skip."""
    import os
    import subprocess
    import sys

    from cadk.kernels import cpp_backend
    if not cpp_backend.has_kernel("CPU"):
        pytest.skip("the C++ extension is not built")
    code = ("import torch; from cadk.kernels import cpp_backend\n"
            "cpp_backend.gate_apply(torch.ones(8, 3), torch.full((3,), 0.5), torch.arange(3), torch.tensor(1), True)")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CADK_CPU_CAPABILITY="AVX2"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "CADK_CPU_CAPABILITY=AVX2 is not one of avx512, avx2, default" in run.stderr, \
        run.stderr[-2000:]


def test_batch_times_units_past_counter_range_is_refused(backend):
    """Counters are int32: batch * units must stay below 2^31. Just below it gates still match philox.py;
    past it every backend and the reference refuse with the fix in the message."""
    module, device = backend
    units = 2**22
    theta = torch.full((units,), 0.5, device=device)
    alive, seed = torch.tensor([units - 3], device=device), torch.tensor(11)
    ok = torch.ones(511, 1, device=device)  # 511 * 2^22 < 2^31
    got = module.gate_apply(ok, theta, alive, seed, True)
    assert torch.equal(got.cpu(), philox.sample_gates(seed, 511, theta.cpu(), alive.cpu()))
    too_big = torch.ones(512, 1, device=device)  # 512 * 2^22 = 2^31
    for op, dev in ((module.gate_apply, device), (reference.gate_apply, "cpu")):  # one kind of error for all
        with pytest.raises(RuntimeError, match="split the batch"):
            op(too_big.to(dev), theta.to(dev), alive.to(dev), seed, True)


@pytest.mark.parametrize("layer", ["linear", "linear-large", "linear-large-bf16", "conv-nhwc", "conv-nhwc-large",
                                   "conv-nchw"])
def test_recycled_weight_gradient_buffers(gen, layer):
    """The C++ CPU backward writes full-size weight gradients of 256 KiB and more into buffers it takes
    back once the caller has dropped them. A gradient still held is never written again; entries dead
    in this call are zero where a recycled buffer held earlier values. Gradients of 1 MiB and more
    ("linear-large") are written with streaming stores."""
    from cadk.kernels import cpp_backend
    if not cpp_backend.has_kernel("CPU"):
        pytest.skip("the C++ extension is not built")
    # 312 KB, 1.1 MB, 1.1 MB (rows 32- but not 64-byte aligned), 1.2 MB and 328 KB: from 1 MiB on, rows
    # go out with streaming stores.
    c_out, c_in = {"linear": (300, 260), "linear-large": (528, 512), "linear-large-bf16": (1056, 528),
                   "conv-nhwc-large": (256, 128)}.get(layer, (130, 70))
    dtype = torch.bfloat16 if layer.endswith("bf16") else torch.float32
    taps = () if layer.startswith("linear") else (3, 3)
    fmt = torch.channels_last if layer.startswith("conv-nhwc") else torch.contiguous_format
    weight = torch.randn(c_out, c_in, *taps, generator=gen).to(dtype).contiguous(memory_format=fmt)
    theta, seed = torch.rand(c_out, generator=gen), torch.tensor(7)

    def subset(full, count):
        return torch.randperm(full, generator=gen)[:count].sort().values

    def weight_grad(module, alive_in, alive_out, x, grad_y):
        w = weight.clone(memory_format=torch.preserve_format).requires_grad_(True)
        if layer.startswith("linear"):
            y = module.gated_linear(x, w, None, theta, alive_in, alive_out, seed, "relu", True)
        else:
            y = module.gated_conv2d(x, w, None, theta, alive_in, alive_out, seed, (1, 1), (1, 1), (1, 1), "relu",
                                    True)
        y.backward(grad_y)
        return w.grad

    def call(alive_in, alive_out):
        spatial = () if layer.startswith("linear") else (5, 4)
        x = torch.randn(3, alive_in.numel(), *spatial, generator=gen).to(dtype).contiguous(memory_format=fmt)
        grad_y = torch.randn(3, alive_out.numel(), *spatial, generator=gen).to(dtype).contiguous(memory_format=fmt)
        got = weight_grad(cpp_backend, alive_in, alive_out, x, grad_y)
        assert_close(got, weight_grad(reference, alive_in, alive_out, x, grad_y), "weight gradient", dtype)
        return got

    first = call(subset(c_in, c_in - 10), subset(c_out, c_out - 10))
    kept = first.clone()
    second = call(subset(c_in, c_in - 20), subset(c_out, c_out - 20))
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept), "a gradient the caller holds was overwritten"
    used = {first.data_ptr(), second.data_ptr()}
    del first, second
    third = call(subset(c_in, 40), subset(c_out, 30))  # compared with the reference inside call()
    assert third.data_ptr() in used, "a dropped gradient buffer was not reused"
    # A gradient changed in place after use, even by a write its version counter does not see, leaves
    # nothing behind in the next gradient written into its buffer.
    del third
    kernels.release_cached_memory()  # the next gradient gets the one free buffer below
    alive_out = subset(c_out, 30)
    fourth = call(subset(c_in, 40), alive_out)
    fourth.data.fill_(5.0)  # through .data: unseen by the version counter, as NumPy views or collectives
    at = fourth.data_ptr()
    del fourth
    fifth = call(subset(c_in, 50), alive_out)  # the same rows alive as in the changed gradient
    assert fifth.data_ptr() == at, "the gradient buffer changed in place was not the one reused"


@pytest.mark.parametrize("how", ["frozen", "no_grad"])
def test_forward_without_backward_keeps_nothing(how):
    """A training forward that gets no backward (no input needs a gradient, or torch.no_grad) keeps no
    gathered weight or gate table for one: the weight is freed with its layer, no cache holds it."""
    import gc
    import weakref

    from cadk.kernels import cpp_backend
    if not cpp_backend.has_kernel("CPU"):
        pytest.skip("the C++ extension is not built")
    from cadk.nn import GatedConv2d, GatedLinear

    makers = (lambda: (GatedLinear(64, 48, theta_init=0.7), torch.randn(8, 64)),
              lambda: (GatedConv2d(6, 8, 3, batch_norm=True, activation="relu", theta_init=0.7),
                       torch.randn(2, 6, 5, 5)))
    for make in makers:  # made here, so the loop holds no reference
        layer, x = make()
        layer.gate.prune(torch.arange(0, layer.out_units, 2))
        if how == "frozen":
            layer.requires_grad_(False)
        with torch.set_grad_enabled(how != "no_grad"):
            layer.train()(x)
        ref = weakref.ref(layer.weight)
        del layer
        gc.collect()
        assert ref() is None, f"a cache still holds the weight of a {how} training forward"


def test_release_cached_memory_changes_no_result(gen):
    """cadk.kernels.release_cached_memory between a forward and its backward (dropping the gate table and
    gathered weight kept for it) and between steps (dropping free gradient buffers) changes no result,
    and leaves a gradient the caller holds alone."""
    from cadk.kernels import cpp_backend
    if not cpp_backend.has_kernel("CPU"):
        pytest.skip("the C++ extension is not built")
    c_out, c_in = 300, 260
    weight, theta, seed = torch.randn(c_out, c_in, generator=gen), torch.rand(c_out, generator=gen), torch.tensor(3)
    alive_in = torch.randperm(c_in, generator=gen)[:200].sort().values
    alive_out = torch.randperm(c_out, generator=gen)[:250].sort().values

    def step(module, release):
        x = torch.randn(5, alive_in.numel(), generator=gen)
        grad_y = torch.randn(5, alive_out.numel(), generator=gen)
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, theta)]
        y = module.gated_linear(leaves[0], leaves[1], None, leaves[2], alive_in, alive_out, seed, "relu", True)
        if release:
            kernels.release_cached_memory()
        y.backward(grad_y)
        return [t.grad for t in leaves], (x, grad_y)

    state = gen.get_state()
    got, _ = step(cpp_backend, True)
    gen.set_state(state)
    want, _ = step(reference, False)
    for g, w, name in zip(got, want, ("x", "weight", "theta")):
        assert_close(g, w, f"grad of {name} after release_cached_memory", torch.float32)
    held = got[1].clone()
    kernels.release_cached_memory()
    step(cpp_backend, False)
    assert torch.equal(got[1], held), "a gradient the caller holds changed"


def _permuted_dense(kind: str, gen) -> torch.Tensor:
    """Dense inputs in neither NCHW nor channels-last order, 3 channels."""
    if kind == "ncl-transposed":
        return torch.randn(4, 6, 3, generator=gen).transpose(1, 2)
    if kind == "nc-transposed":
        return torch.randn(3, 8, generator=gen).t()
    return torch.randn(3, 4, 2, 3, generator=gen).transpose(0, 1)  # NCHW with N and C swapped


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("kind", ["ncl-transposed", "nc-transposed", "n-c-swapped"])
def test_bn_gate_act_on_permuted_dense_input(backend, gen, kind, activation, training):
    """x dense in another order (a transposed [N, L, C], ...): pre is saved in y's layout, so the ReLU mask
    and theta's estimate read the values written (the Triton backend stored pre in y's order into a buffer
    of x's order: wrong gradients)."""
    module, device = backend
    x = _permuted_dense(kind, gen).to(device)
    units, alive = 5, torch.tensor([0, 2, 3], device=device)
    weight, bias = torch.rand(units, generator=gen) + 0.5, torch.randn(units, generator=gen)
    theta = torch.rand(units, generator=gen) * 0.8 + 0.1
    args = [x, weight.to(device), bias.to(device), torch.zeros(units, device=device), torch.ones(units, device=device),
            theta.to(device), alive, torch.tensor(7), 0.1, 1e-5, activation, training]
    case = Case(args, [0, 1, 2, 5], mutated=[3, 4])
    (y, grads, stats), (y_ref, grads_ref, stats_ref) = (run(m.bn_gate_act, case, 3) for m in (module, reference))
    assert_close(y, y_ref, "y", torch.float32)
    for i in case.grad_args:
        assert_close(grads[i], grads_ref[i], f"grad {i}", torch.float32)


@pytest.mark.parametrize("op", ["gated_linear", "gated_conv2d"])
@pytest.mark.parametrize("bias_kind", ["short", "dtype", "rank"])
def test_malformed_bias_is_refused(backend, op, bias_kind):
    """A bias of the wrong length, dtype or rank is refused by name: a kernel reads bias[alive_out[j]]
    through a raw pointer, so a short bias was read out of bounds on the Triton backend."""
    module, device = backend
    storage = torch.zeros(6, device=device)
    storage[5] = 1000.0  # what a one-short bias would read past its end
    bias = {"short": storage[:5], "dtype": torch.zeros(6, device=device, dtype=torch.float64),
            "rank": torch.zeros(6, 1, device=device)}[bias_kind]
    alive_in, alive_out = torch.tensor([0, 1], device=device), torch.tensor([0, 2, 5], device=device)
    seed = torch.tensor(1)
    with pytest.raises((RuntimeError, ValueError, IndexError), match="bias"):
        if op == "gated_linear":
            module.gated_linear(torch.randn(3, 2, device=device), torch.randn(6, 4, device=device), bias, None,
                                alive_in, alive_out, seed, "none", True)
        else:
            module.gated_conv2d(torch.randn(2, 2, 5, 5, device=device), torch.randn(6, 4, 3, 3, device=device), bias,
                                None, alive_in, alive_out, seed, 1, 1, 1, "none", True)


@pytest.mark.parametrize("empty", ["no-filter", "no-example", "no-input-channel"])
def test_conv_kernel_larger_than_input_is_refused(backend, empty):
    """Also where no convolution runs (no filter, example or input channel alive), a kernel larger than the
    padded input is refused as F.conv2d refuses it, not answered with an empty or negative-size output."""
    module, device = backend
    none = torch.zeros(0, dtype=torch.int64)
    x, alive_in, alive_out = {"no-filter": (torch.randn(2, 2, 2, 2), torch.tensor([0, 1]), none),
                              "no-example": (torch.randn(0, 2, 1, 1), torch.tensor([0, 1]), torch.tensor([0, 2])),
                              "no-input-channel": (torch.randn(2, 0, 1, 1), none, torch.tensor([0, 2]))}[empty]
    with pytest.raises(RuntimeError, match="(?i)kernel"):
        module.gated_conv2d(x.to(device), torch.randn(6, 4, 3, 3, device=device), None, torch.rand(6, device=device),
                            alive_in.to(device), alive_out.to(device), torch.tensor(1))


@pytest.mark.parametrize("empty", ["no-filter", "no-input-channel"])
def test_conv_kernel_larger_than_input_by_less_than_a_stride_is_refused(backend, empty):
    """A 2x2 input under a 3x3 kernel with stride 2: (2 - 3) // 2 + 1 is 0 output rows, but C++ division
    rounds -1 / 2 up to 0 and made it 1. Where no convolution runs to refuse it, the op answered with a
    [N, C, 1, 1] output (the bias alone) instead of refusing the input as F.conv2d does."""
    module, device = backend
    none = torch.zeros(0, dtype=torch.int64)
    x, alive_in, alive_out = {"no-filter": (torch.randn(2, 2, 2, 2), torch.tensor([0, 1]), none),
                              "no-input-channel": (torch.randn(2, 0, 2, 2), none, torch.tensor([0, 2]))}[empty]
    with pytest.raises(RuntimeError, match="(?i)kernel"):
        module.gated_conv2d(x.to(device), torch.randn(6, 4, 3, 3, device=device), torch.randn(6, device=device),
                            torch.rand(6, device=device), alive_in.to(device), alive_out.to(device), torch.tensor(1),
                            (2, 2))


def test_bn_vector_of_the_wrong_size_is_named(backend):
    """A BN weight of 5 entries for 6 units (its running statistics) is reported as the weight's fault, not
    as an alive list out of range."""
    module, device = backend
    c = 6
    with pytest.raises(RuntimeError, match="weight"):
        module.bn_gate_act(torch.randn(3, 3, 2, device=device), torch.randn(5, device=device),
                           torch.randn(c, device=device), torch.zeros(c, device=device), torch.ones(c, device=device),
                           torch.rand(c, device=device), torch.tensor([0, 2, 5], device=device), torch.tensor(1))
