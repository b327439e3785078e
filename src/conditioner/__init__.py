"""conditioner: eigenbasis preconditioning for deep learning."""

from conditioner.optim import EigenvalueCorrectedShampoo, NonFiniteGradientError, Shampoo, SOAP

__version__ = "0.1.0"

__all__ = ["EigenvalueCorrectedShampoo", "NonFiniteGradientError", "SOAP", "Shampoo", "__version__"]
