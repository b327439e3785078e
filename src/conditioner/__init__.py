"""conditioner: eigenbasis preconditioning for deep learning."""

from conditioner.optim import (
    SOAP,
    EigenvalueCorrectedShampoo,
    Muon,
    NonFiniteGradientError,
    Shampoo,
    StateMemory,
    state_bytes,
    state_memory,
)

__version__ = "0.1.0"

__all__ = [
    "SOAP",
    "EigenvalueCorrectedShampoo",
    "Muon",
    "NonFiniteGradientError",
    "Shampoo",
    "StateMemory",
    "__version__",
    "state_bytes",
    "state_memory",
]
