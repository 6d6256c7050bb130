"""Gated MLP and VGG-style nets."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import GatedConv2d, GatedLinear, GatedSequential
from ..nn.gates import seed_gates


class GatedMLP(nn.Module):
    """Flatten, then hidden GatedLinear+ReLU layers with unit gates, then an ungated classifier."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, theta_init: float = 1.0,
                 seed: int = 0):
        super().__init__()
        dims = [in_features] + list(hidden)
        layers = [GatedLinear(a, b, activation="relu", theta_init=theta_init) for a, b in zip(dims, dims[1:])]
        self.layers = GatedSequential(*layers, GatedLinear(dims[-1], num_classes, gate=False))
        seed_gates(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))

    def compact(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(1), self.layers.compact())


def mlp(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden=(512, 256), **kw) -> GatedMLP:
    return GatedMLP(in_channels * image_size * image_size, list(hidden), num_classes, **kw)


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class GatedVGG(nn.Module):
    """VGG-style: gated conv-BN-ReLU layers and max-pools, global average pool, ungated classifier."""

    def __init__(self, cfg: list, in_channels: int, num_classes: int, theta_init: float = 1.0, seed: int = 0):
        super().__init__()
        layers, c, gate = [], in_channels, None
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            conv = GatedConv2d(c, v, 3, 1, 1, bias=False, batch_norm=True, activation="relu", in_gate=gate,
                               theta_init=theta_init)
            layers.append(conv)
            c, gate = v, conv.out_gate
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = GatedLinear(c, num_classes, gate=False, in_gate=gate)
        seed_gates(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def compact(self) -> nn.Module:
        from ..compaction import compact_module
        return nn.Sequential(*[compact_module(m) for m in self.features], compact_module(self.pool), nn.Flatten(1),
                             self.fc.compact())


def vgg11(in_channels: int = 3, num_classes: int = 10, **kw) -> GatedVGG:
    return GatedVGG(VGG11, in_channels, num_classes, **kw)


def vgg16(in_channels: int = 3, num_classes: int = 10, **kw) -> GatedVGG:
    return GatedVGG(VGG16, in_channels, num_classes, **kw)
