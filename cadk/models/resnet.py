"""Gated ResNets: CIFAR-style (ResNet-20/32/44/56/110, 3 stages of basic blocks) and ImageNet-style
(ResNet-18/34 basic, ResNet-50 bottleneck). Any input channel count (Fashion-MNIST has 1)."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import GatedBasicBlock, GatedBottleneck, GatedConv2d, GatedLinear
from ..nn.gates import seed_gates


class GatedResNet(nn.Module):
    def __init__(self, block, layers: list[int], widths: list[int], in_channels: int, num_classes: int,
                 imagenet_stem: bool, theta_init: float = 1.0, seed: int = 0):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        stem_w = widths[0] if not imagenet_stem else 64
        k, s, p = (7, 2, 3) if imagenet_stem else (3, 1, 1)
        self.stem = GatedConv2d(in_channels, stem_w, k, s, p, bias=False, batch_norm=True, activation="relu",
                                theta_init=theta_init)
        self.pool0 = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        blocks, in_planes, gate = [], stem_w, self.stem.out_gate
        for stage, (n, w) in enumerate(zip(layers, widths)):
            for i in range(n):
                stride = 2 if (i == 0 and stage > 0) else 1
                b = block(in_planes, w, stride, in_gate=gate, theta_init=theta_init)
                blocks.append(b)
                in_planes, gate = w * block.expansion, b.out_gate
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = GatedLinear(in_planes, num_classes, gate=False, in_gate=gate)
        seed_gates(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.pool0(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def compact(self) -> nn.Module:
        from ..compaction import compact_module  # copies: the compacted model's pools have hooks of their own

        return nn.Sequential(self.stem.compact(), compact_module(self.pool0), *[b.compact() for b in self.blocks],
                             compact_module(self.pool), nn.Flatten(1), self.fc.compact())


def _cifar(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(in_channels: int = 3, num_classes: int = 10, **kw) -> GatedResNet:
        return GatedResNet(GatedBasicBlock, [n] * 3, [16, 32, 64], in_channels, num_classes, False, **kw)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR-style gated ResNet-{depth} (3 stages x {n} basic blocks, widths 16/32/64)."
    return build


resnet20, resnet32, resnet44, resnet56, resnet110 = (_cifar(d) for d in (20, 32, 44, 56, 110))


def resnet18(in_channels: int = 3, num_classes: int = 1000, **kw) -> GatedResNet:
    return GatedResNet(GatedBasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes, True, **kw)


def resnet34(in_channels: int = 3, num_classes: int = 1000, **kw) -> GatedResNet:
    return GatedResNet(GatedBasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], in_channels, num_classes, True, **kw)


def resnet50(in_channels: int = 3, num_classes: int = 1000, **kw) -> GatedResNet:
    return GatedResNet(GatedBottleneck, [3, 4, 6, 3], [64, 128, 256, 512], in_channels, num_classes, True, **kw)
