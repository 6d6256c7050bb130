"""Optimizers for theta and the pruning schedule."""
from .pruning import Pruner
from .theta import ThetaAdam, ThetaSGD, split_parameters

__all__ = ["Pruner", "ThetaSGD", "ThetaAdam", "split_parameters"]
