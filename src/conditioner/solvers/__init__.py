"""Damped inverse-curvature-vector products ``(B + λI)⁻¹ v``: direct (K-FAC / EK-FAC), CG, LiSSA, ASTRA."""

from conditioner.solvers.iterative import astra, conjugate_gradient, lissa
from conditioner.solvers.result import SolveResult
from conditioner.solvers.solve import METHODS, solve
from conditioner.solvers.stochastic import ScaledOperator, minibatch_operators

__all__ = ["METHODS", "ScaledOperator", "SolveResult", "astra", "conjugate_gradient", "lissa", "minibatch_operators", "solve"]
