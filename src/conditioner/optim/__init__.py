"""Kronecker-factored and orthogonalised optimizers with the ``torch.optim.Optimizer`` face."""

from conditioner.optim.base import NonFiniteGradientError, StackedOptimizer
from conditioner.optim.ecshampoo import EigenvalueCorrectedShampoo
from conditioner.optim.memory import StateMemory, state_bytes, state_memory
from conditioner.optim.muon import Muon
from conditioner.optim.shampoo import Shampoo
from conditioner.optim.soap import SOAP

__all__ = [
    "SOAP",
    "EigenvalueCorrectedShampoo",
    "Muon",
    "NonFiniteGradientError",
    "Shampoo",
    "StackedOptimizer",
    "StateMemory",
    "state_bytes",
    "state_memory",
]
