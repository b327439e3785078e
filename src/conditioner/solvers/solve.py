"""One entry point for every solver: ``solve(operator, v, damping, method=...)``."""

from __future__ import annotations

import logging

import torch

from conditioner.checks import check_choice, check_positive
from conditioner.curvature.exact import ExactCurvature
from conditioner.curvature.kfac import KroneckerOperator
from conditioner.curvature.operator import CurvatureOperator
from conditioner.curvature.spectra import lanczos
from conditioner.solvers.iterative import astra, conjugate_gradient, lissa, preconditioned_step_size
from conditioner.solvers.result import SolveResult
from conditioner.solvers.stochastic import minibatch_operators

logger = logging.getLogger(__name__)

METHODS = ("direct", "cg", "lissa", "astra")


def largest_eigenvalue(operator: CurvatureOperator, generator: torch.Generator | None = None) -> float:
    """A few Lanczos steps' estimate of ``λ_max`` (it only sets step sizes, so 20 steps do)."""
    return float(lanczos(operator, 1, steps=min(20, operator.dim), generator=generator).eigenvalues[0])


def solve(
    operator: CurvatureOperator,
    v: torch.Tensor,
    damping: float,
    method: str = "cg",
    *,
    preconditioner: KroneckerOperator | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    iterations: int = 200,
    step_size: float | None = None,
    momentum: float = 0.9,
    halve_every: int = 50,
    generator: torch.Generator | None = None,
) -> SolveResult:
    """``(B + damping·I)⁻¹ v`` for ``v`` of shape ``(P,)`` or ``(P, K)`` (the result has ``(P, K)``).

    - ``"direct"``: ``operator`` is a K-FAC / EK-FAC operator, inverted in its eigenbasis.
    - ``"cg"``: conjugate gradient on ``operator``'s products (``max_iterations``, ``tolerance``),
      preconditioned by ``preconditioner``'s damped inverse when one is given.
    - ``"lissa"``: ``iterations`` steps on mini-batch estimates of an exact ``operator``, step size
      ``step_size`` (default ``1 / (λ_max + damping)`` from a short Lanczos run).
    - ``"astra"``: ``iterations`` preconditioned steps with ``momentum`` on mini-batch estimates of an
      exact ``operator``; ``preconditioner`` (EK-FAC, required) gives the start and the metric;
      ``step_size`` (default ``(1 − momentum) / λ_max`` of the preconditioned mini-batch operators,
      by 20 power steps) is halved every ``halve_every`` iterations.
    """
    damping = check_positive("damping", damping)
    check_choice("method", method, METHODS)
    if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or v.shape[0] != operator.dim:
        raise ValueError(f"v: expected a tensor of shape ({operator.dim},) or ({operator.dim}, K)")
    rhs = (v if v.ndim == 2 else v.unsqueeze(1)).to(operator.dtype)
    if method == "direct":
        if not isinstance(operator, KroneckerOperator):
            raise TypeError(f"operator: method 'direct' needs a KFAC or EKFAC operator, got {type(operator).__name__}")
        return SolveResult("direct", operator.inverse(damping).matmat(rhs), damping)
    inverse = None if preconditioner is None else preconditioner.inverse(damping)
    if method == "cg":
        return conjugate_gradient(operator, rhs, damping, inverse, max_iterations, tolerance)
    if not isinstance(operator, ExactCurvature):
        raise TypeError(f"operator: method {method!r} draws mini-batches and needs a GGN, Hessian or EmpiricalFisher")
    batches = minibatch_operators(operator, generator)
    if method == "lissa":
        if step_size is None:
            step_size = 1.0 / (largest_eigenvalue(operator, generator) + damping)
            logger.info("lissa: step size %.3g = 1 / (λ_max + damping)", step_size)
        return lissa(batches, rhs, damping, step_size, iterations)
    if inverse is None:
        raise ValueError("preconditioner: method 'astra' needs an EKFAC (or KFAC) operator to precondition with")
    if step_size is None:
        # Heavy ball moves by about α / (1 − μ) per unit of gradient: keep that at 1 / λ_max. A
        # larger step (α·λ_max up to 2(1 + μ) is stable for one fixed operator) diverged on
        # mini-batches of a digits MLP at zero training loss.
        largest = 1.0 / preconditioned_step_size(batches, inverse, damping, operator.dim, operator.dtype, operator.device, generator=generator)
        step_size = (1.0 - momentum) / largest
        logger.info("astra: step size %.3g = (1 − momentum) / λ_max of the preconditioned mini-batch operators", step_size)
    return astra(batches, rhs, damping, inverse, step_size, momentum, iterations, halve_every)
