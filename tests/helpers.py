"""Shared test utilities: small random models with random gate states."""
from __future__ import annotations

import torch

import cadk
from cadk.nn import gates_of


def randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so equality checks mean something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)


def random_thetas(model: torch.nn.Module, gen: torch.Generator, binary: bool, p_zero: float = 0.3) -> None:
    """Random theta per gate: 0/1 (at least one unit on per unit gate) or fractional in [0.2, 1]."""
    with torch.no_grad():
        for g in gates_of(model):
            if binary:
                on = torch.rand(g.num_units, generator=gen) >= p_zero
                if g.kind == "unit" and not on.any():
                    on[torch.randint(g.num_units, (1,), generator=gen)] = True
                g.theta.copy_(on.float())
            else:
                g.theta.copy_(0.2 + 0.8 * torch.rand(g.num_units, generator=gen))


def small_models():
    """(name, gated model, example input) for every builder, at sizes that keep tests fast."""
    return [
        ("mlp", cadk.build_model("mlp", 1, 10, image_size=8, hidden=(24, 17)), torch.randn(5, 1, 8, 8)),
        ("resnet20", cadk.build_model("resnet20", 1, 10), torch.randn(3, 1, 28, 28)),
        ("resnet18", cadk.build_model("resnet18", 3, 7), torch.randn(2, 3, 40, 40)),
        ("resnet50", cadk.build_model("resnet50", 3, 7), torch.randn(2, 3, 40, 40)),
        ("vgg11", cadk.build_model("vgg11", 3, 10), torch.randn(2, 3, 32, 32)),
    ]
