"""cadk: complexity-aware training for PyTorch.

Every unit/filter and residual block carries a learned Bernoulli gate; structures whose gate probability
reaches zero are pruned during training and skipped at compute time; `compact` turns the result into a
plain, smaller PyTorch model.
"""
from . import kernels, nn
from .compaction import compact, flop_count, param_count, save_compact
from .complexity import ComplexityCost, ComplexityModel
from .models import build_model
from .optim import Pruner, ThetaAdam, ThetaSGD, split_parameters

__version__ = "0.1.0"
__all__ = ["nn", "kernels", "compact", "save_compact", "flop_count", "param_count", "ComplexityModel",
           "ComplexityCost", "Pruner", "ThetaSGD", "ThetaAdam", "split_parameters", "build_model"]
