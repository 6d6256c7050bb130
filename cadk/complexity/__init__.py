"""The complexity model (expected FLOPs/params in theta) and the complexity-aware cost."""
from .cost import ComplexityCost
from .model import ComplexityModel

__all__ = ["ComplexityModel", "ComplexityCost"]
