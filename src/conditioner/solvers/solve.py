"""One entry point for every solver: ``solve(operator, v, damping, method=...)``."""

from __future__ import annotations

import logging

import torch

from conditioner.checks import check_choice, check_positive
from conditioner.curvature.exact import ExactCurvature
from conditioner.curvature.kfac import KroneckerOperator
from conditioner.curvature.operator import CurvatureOperator
from conditioner.curvature.spectra import lanczos
from conditioner.solvers.iterative import astra, conjugate_gradient, lissa, preconditioned_largest_eigenvalue
from conditioner.solvers.result import SolveResult
from conditioner.solvers.stochastic import minibatch_operators

logger = logging.getLogger(__name__)

METHODS = ("direct", "cg", "lissa", "astra")
# ASTRA's default step as a fraction of 1 / λ_max of the full preconditioned operator. Heavy ball
# with momentum 0.9 is stable on ONE operator up to 3.8 / λ_max, but on mini-batch operators (whose
# preconditioned λ_max was 1.5–2.3× the full one's on trained MLPs) 0.5 diverged and 0.25 converged
# (so did 0.25 with momentum 0.95 only on some seeds: 0.9 stays).
ASTRA_STEP_FRACTION = 0.25
# Iterations of the stochastic solvers when not given. ASTRA's paper runs about 200; at our default
# damping (0.1 × the mean GGN eigenvalue) the preconditioned operator of a trained MLP had a
# condition number near 800, and 200 iterations ended 5.3% from the exact scores, 300 ended 3.1%.
DEFAULT_ITERATIONS = {"lissa": 200, "astra": 300}


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
    iterations: int | None = None,
    step_size: float | None = None,
    momentum: float = 0.9,
    halve_every: int | None = None,
    variance_reduction: bool = True,
    generator: torch.Generator | None = None,
) -> SolveResult:
    """``(B + damping·I)⁻¹ v`` for ``v`` of shape ``(P,)`` or ``(P, K)`` (the result has ``(P, K)``).

    - ``"direct"``: ``operator`` is a K-FAC / EK-FAC operator, inverted in its eigenbasis.
    - ``"cg"``: conjugate gradient on ``operator``'s products (``max_iterations``, ``tolerance``),
      preconditioned by ``preconditioner``'s damped inverse when one is given.
    - ``"lissa"``: ``iterations`` (default 200) steps on mini-batch estimates of an exact ``operator``, step size
      ``step_size`` (default ``1 / (λ_max + damping)`` from a short Lanczos run).
    - ``"astra"``: ``iterations`` (default 300) preconditioned steps with ``momentum`` on mini-batch estimates of an
      exact ``operator``; ``preconditioner`` (EK-FAC, required) gives the start and the metric;
      ``step_size`` (default ``0.25 / λ_max`` of the full preconditioned operator ``(P + λI)⁻¹(B + λI)``,
      by Lanczos). ``variance_reduction`` (default): the residual's mini-batch estimate is
      corrected by an exact residual taken once per pass over the batches (SVRG), so the constant
      step converges; ``False``: the paper's plain estimate with the step halved every
      ``halve_every`` (default 50) iterations.
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
        return lissa(batches, rhs, damping, step_size, DEFAULT_ITERATIONS["lissa"] if iterations is None else iterations)
    if inverse is None:
        raise ValueError("preconditioner: method 'astra' needs an EKFAC (or KFAC) operator to precondition with")
    iterations = DEFAULT_ITERATIONS["astra"] if iterations is None else iterations
    if step_size is None:
        root = preconditioner.inverse(damping, exponent=0.5)
        largest = preconditioned_largest_eigenvalue(operator, root, damping, generator=generator)
        step_size = ASTRA_STEP_FRACTION / largest
        logger.info("astra: step size %.3g = %g / λ_max of the preconditioned operator", step_size, ASTRA_STEP_FRACTION)
    if not variance_reduction:
        return astra(batches, rhs, damping, inverse, step_size, momentum, iterations, halve_every)
    anchor_every = len(list(operator.data))
    return astra(batches, rhs, damping, inverse, step_size, momentum, iterations, halve_every, full=operator, anchor_every=anchor_every)
