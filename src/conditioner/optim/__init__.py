"""Kronecker-factored optimizers with the ``torch.optim.Optimizer`` face."""

from conditioner.optim.base import NonFiniteGradientError, StackedOptimizer
from conditioner.optim.ecshampoo import EigenvalueCorrectedShampoo
from conditioner.optim.shampoo import Shampoo
from conditioner.optim.soap import SOAP

__all__ = ["EigenvalueCorrectedShampoo", "NonFiniteGradientError", "SOAP", "Shampoo", "StackedOptimizer"]
