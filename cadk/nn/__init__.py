"""Gates, gated layers and gated residual blocks."""
from .blocks import GatedBasicBlock, GatedBottleneck, GatedResidualBlock, Residual
from .gates import UnitGate, gates_of, seed_gates
from .layers import GatedConv2d, GatedLayer, GatedLinear, GatedSequential

__all__ = ["UnitGate", "gates_of", "seed_gates", "GatedLayer", "GatedLinear", "GatedConv2d", "GatedSequential",
           "GatedResidualBlock", "GatedBasicBlock", "GatedBottleneck", "Residual"]
