"""Edge cases of the C++ CPU kernels and their autograd, each against the reference backend: what the
kernels keep from a forward for its backward, torch's CPU convolution backward on a downsampling 1x1
kernel, in-place updates of a layer's output, torch.inference_mode."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import cadk.kernels as kernels
from cadk.kernels import cpp_backend, reference
from kernel_cases import assert_close

pytestmark = pytest.mark.skipif(not cpp_backend.has_kernel("CPU"), reason="the C++ extension is not built")


def test_forward_keeps_its_gathered_weight_after_many_backwards():
    """Gathered weights a forward keeps are taken by their backward however many backwards ran before
    (the cache's byte count once grew with every one taken, and past 32 MiB each forward evicted the
    weights of the layers before it). Seen through a write to the first layer's weight between forward
    and backward that its version counter misses (.data): the backward must use the weight its
    forward gathered, as the reference's, which saves its gathered copy."""
    seed = torch.tensor(3)
    x = torch.randn(4, 6)
    w1, w2 = torch.randn(8, 10), torch.randn(4, 4)
    alive_in, alive_out = torch.tensor([0, 2, 3, 5, 7, 9]), torch.tensor([1, 2, 4, 6])

    def x_grad(module):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
        h = module.gated_linear(leaves[0], leaves[1], None, None, alive_in, alive_out, seed, "none", True)
        y = module.gated_linear(h, leaves[2], None, None, torch.arange(4), torch.tensor([0, 1]), seed, "none", True)
        leaves[1].data.mul_(2)
        y.sum().backward()
        return leaves[0].grad

    kernels.release_cached_memory()
    big = torch.randn(1100, 1100, requires_grad=True)  # 4 MiB gathered: 12 backwards take 48 MiB
    every = torch.arange(1024)
    for _ in range(12):
        cpp_backend.gated_linear(torch.randn(2, 1024), big, None, None, every, every, seed, "none", True).sum().backward()
    assert_close(x_grad(cpp_backend), x_grad(reference), "grad of x", torch.float32)


_DOWNSAMPLE_SCRIPT = textwrap.dedent("""
    import itertools

    import torch
    from cadk.kernels import cpp_backend, reference
    torch.manual_seed(0)
    cases = ((5, 3, 1, (1, 2)), (3, 3, 1, (2, 1)), (5, 8, 4, (1, 2)), (5, 2, 16, (2, 1)))
    # x channels-last; or a weight with channels-last strides (as model.to(memory_format=torch.channels_last)
    # gives a 1x1 weight), x in either layout; filters all alive (the weight itself) or some (its gather)
    layouts = ((True, False), (False, True), (True, True))
    for (n, c_in, c_out, stride), (x_cl, w_cl), some in itertools.product(cases, layouts, (0, 1)):
        for _ in range(3):
            x = torch.randn(n, c_in, 8, 8)
            x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
            w = torch.randn(c_out + some, c_in, 1, 1)
            alive_out = torch.arange(some, c_out + some)
            grads = []
            for module in (cpp_backend, reference):
                leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
                if w_cl:
                    leaves[1] = w.as_strided(w.shape, (c_in, 1, c_in, c_in)).clone().requires_grad_(True)
                    assert leaves[1].stride() == (c_in, 1, c_in, c_in)
                y = module.gated_conv2d(*leaves, None, None, torch.arange(c_in), alive_out, 0, stride,
                                        (0, 0), (1, 1), "none", True)
                grads.append(torch.autograd.grad(y, leaves, torch.ones_like(y)))
                junk = [torch.empty(k) for k in range(1, 200)]  # allocations that meet a corrupted heap
            if w_cl:  # the gradient keeps the weight's layout (the fake kernel's)
                assert grads[0][1].stride() == (c_in, 1, c_in, c_in), grads[0][1].stride()
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want)
    print("ok")
""")


def test_conv_backward_of_channels_last_1x1_stride_2_keeps_the_heap_intact():
    """torch's CPU convolution backward (2.13) corrupts the heap for a 1x1 kernel and stride > 1 (a ResNet
    downsampling shortcut) when it computes the weight gradient and the input or the weight has
    channels-last strides: the process crashed. Run in a child process with glibc's heap checks on."""
    env = dict(os.environ, MALLOC_CHECK_="3")
    run = subprocess.run([sys.executable, "-c", _DOWNSAMPLE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_training_forward_without_backward_does_not_keep_the_weight_alive():
    """A training forward whose graph is dropped without a backward (a skipped step, an evaluation with
    gradients on) leaves its gathered weight in the cache until evicted, but not the layer's weight."""
    from cadk.nn import GatedLinear

    layer, x = GatedLinear(64, 48, theta_init=0.7), torch.randn(8, 64, requires_grad=True)
    layer.gate.prune(torch.arange(0, layer.out_units, 2))
    layer.train()(x)
    ref = weakref.ref(layer.weight)
    del layer
    gc.collect()
    assert ref() is None, "the cache of a forward without backward still holds the layer's weight"


def test_training_forward_under_inference_mode_keeps_nothing():
    """A training forward under torch.inference_mode (gates sampled at inference, batch-norm statistics
    recalibrated) gets no backward: no cache keeps its gathered weight or the weight itself."""
    from cadk.nn import GatedLinear

    layer, x = GatedLinear(64, 48, theta_init=0.7), torch.randn(8, 64)
    layer.gate.prune(torch.arange(0, layer.out_units, 2))
    with torch.inference_mode():
        layer.train()(x)
    ref = weakref.ref(layer.weight)
    del layer
    gc.collect()
    assert ref() is None, "a cache still holds the weight of a forward under torch.inference_mode"
