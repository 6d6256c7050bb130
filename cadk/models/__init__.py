"""Model builders made of gated layers, and their dense twins for comparison runs."""
from __future__ import annotations

from .resnet import GatedResNet, resnet18, resnet20, resnet32, resnet34, resnet44, resnet50, resnet56, resnet110
from .small import GatedMLP, GatedVGG, mlp, vgg11, vgg16

MODELS = {f.__name__: f for f in (mlp, vgg11, vgg16, resnet20, resnet32, resnet44, resnet56, resnet110, resnet18,
                                  resnet34, resnet50)}


def build_model(name: str, in_channels: int, num_classes: int, **kw):
    """Build a gated model by name (see MODELS)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, **kw)


__all__ = ["MODELS", "build_model", "GatedResNet", "GatedMLP", "GatedVGG"] + list(MODELS)
