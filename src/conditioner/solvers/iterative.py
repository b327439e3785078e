"""Iterative solvers of ``(B + λI) x = v`` for a batch of right-hand sides ``v`` ``(P, K)``.

- :func:`conjugate_gradient`: CG on exact products, optionally preconditioned (by a K-FAC /
  EK-FAC inverse, say); every column runs its own recurrence, all share each operator product.
- :func:`lissa`: the stochastic Neumann iteration ``x ← x − α((B_b + λI)x − v)`` on fresh
  mini-batch estimates ``B_b``; stopping after ``J`` steps acts like extra damping ``≈ 1/(αJ)``.
- :func:`astra`: stochastic gradient descent with momentum on ``½ xᵀ(B + λI)x − vᵀx``,
  preconditioned by an EK-FAC inverse ``(P + λI)⁻¹`` and started at the EK-FAC answer, with the
  step size halved every ``halve_every`` iterations (Wang et al. 2025).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from conditioner.checks import check_count, check_positive, check_range
from conditioner.curvature.operator import CurvatureOperator
from conditioner.curvature.spectra import lanczos
from conditioner.solvers.result import SolveResult

logger = logging.getLogger(__name__)


def _column_norms(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(matrix, dim=0)


def _damped(operator: Any, x: torch.Tensor, damping: float) -> torch.Tensor:
    return operator.matmat(x) + damping * x


def conjugate_gradient(
    operator: CurvatureOperator,
    v: torch.Tensor,
    damping: float,
    preconditioner: Any | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
) -> SolveResult:
    """Solve ``(B + λI) x = v`` by (preconditioned) CG until every column's relative residual is
    below ``tolerance`` or ``max_iterations`` products were spent. Exact in at most ``P`` steps
    in exact arithmetic; the residual is tracked by the recurrence and recomputed at the end."""
    check_count("max_iterations", max_iterations, 1)
    check_positive("tolerance", tolerance)
    scale = _column_norms(v).clamp_min(torch.finfo(v.dtype).tiny)
    x = torch.zeros_like(v)
    residual = v.clone()
    z = residual if preconditioner is None else preconditioner.matmat(residual)
    direction = z.clone()
    rz = (residual * z).sum(0)
    history: list[torch.Tensor] = []
    for _ in range(max_iterations):
        product = _damped(operator, direction, damping)
        curvature = (direction * product).sum(0)
        active = (_column_norms(residual) / scale > tolerance) & (curvature > 0)
        step = torch.where(active, rz / torch.where(active, curvature, 1.0), 0.0)
        x = x + step * direction
        residual = residual - step * product
        history.append(_column_norms(residual) / scale)
        if not bool((history[-1] > tolerance).any()):
            break
        z = residual if preconditioner is None else preconditioner.matmat(residual)
        rz_next = (residual * z).sum(0)
        beta = torch.where(active, rz_next / torch.where(active, rz, 1.0), 0.0)
        direction = z + beta * direction
        rz = rz_next
    final = _column_norms(v - _damped(operator, x, damping)) / scale
    history[-1] = final
    return SolveResult("cg", x, damping, history)


def lissa(
    operators: Iterator[CurvatureOperator],
    v: torch.Tensor,
    damping: float,
    step_size: float,
    iterations: int = 200,
) -> SolveResult:
    """The stochastic Neumann series ``x ← x − α((B_b + λI) x − v)`` from ``x = 0``: after ``J`` steps
    ``x = α Σ_j (I − α(B + λI))ʲ v`` in expectation; it converges when ``α < 2 / (λ_max + λ)``."""
    check_positive("step_size", step_size)
    check_count("iterations", iterations, 1)
    scale = _column_norms(v).clamp_min(torch.finfo(v.dtype).tiny)
    x = torch.zeros_like(v)
    history: list[torch.Tensor] = []
    for _ in range(iterations):
        residual = _damped(next(operators), x, damping) - v
        history.append(_column_norms(residual) / scale)
        x = x - step_size * residual
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"lissa: the iteration diverged; step_size {step_size} is too large for this operator")
    return SolveResult("lissa", x, damping, history, step_size=step_size)


class SymmetricPreconditioned:
    """``R (B + λI) R`` with ``R = (P + λI)^(−1/2)``: the preconditioned operator in symmetric form,
    similar to ``(P + λI)⁻¹(B + λI)`` (same eigenvalues), as :func:`~conditioner.curvature.lanczos` needs it."""

    def __init__(self, operator: CurvatureOperator, root: Any, damping: float) -> None:
        self.operator, self.root, self.damping = operator, root, damping
        self.dim, self.dtype, self.device = operator.dim, operator.dtype, operator.device

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.root.matmat(_damped(self.operator, self.root.matmat(matrix), self.damping))


def preconditioned_largest_eigenvalue(
    operator: CurvatureOperator, root: Any, damping: float, steps: int = 40, tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
) -> float:
    """``λ_max`` of ``(P + λI)⁻¹(B + λI)`` on the FULL operator ``B``, by Lanczos on its symmetric form
    (``root`` applies ``(P + λI)^(−1/2)``), stopped once the top Ritz pair's residual is below
    ``tolerance`` times it. Lanczos reads the extreme eigenvalue far sooner than power iteration,
    whose estimate from 20 random mini-batches read it 2–4× low on a digits MLP."""
    check_count("steps", steps, 1)
    return float(lanczos(SymmetricPreconditioned(operator, root, damping), 1, steps=steps, tol=tolerance, generator=generator).eigenvalues[0])


def astra(
    operators: Iterator[CurvatureOperator],
    v: torch.Tensor,
    damping: float,
    preconditioner: Any,
    step_size: float,
    momentum: float = 0.9,
    iterations: int = 200,
    halve_every: int | None = None,
    *,
    full: CurvatureOperator | None = None,
    anchor_every: int = 1,
) -> SolveResult:
    """EK-FAC-preconditioned SGD with momentum: ``x_0 = P⁻¹ v`` (the EK-FAC answer), then
    ``u ← μu + P⁻¹ g``, ``x ← x − α u``, where ``g`` estimates the residual ``(B + λI)x − v`` from
    one mini-batch operator ``B_b`` of ``operators``; ``preconditioner`` applies ``(P + λI)⁻¹``
    (e.g. ``EKFAC(...).inverse(λ)``).

    - ``full=None`` (Wang et al. 2025): ``g = (B_b + λI)x − v``. Its noise ``(B_b − B)x`` does not
      vanish at the answer, so ``α`` is halved every ``halve_every`` iterations (default 50).
    - ``full`` given (variance reduced, SVRG): every ``anchor_every`` iterations the exact residual
      ``r̃ = (B + λI)x̃ − v`` is taken at the anchor ``x̃ = x`` (one product with ``full``), and
      ``g = r̃ + (B_b + λI)(x − x̃)``: unbiased, with noise that vanishes as ``x`` settles, so a
      constant step converges linearly (no halving unless ``halve_every`` is given). It costs one
      pass over the data per anchor on top of the mini-batch products.

    Should the residual estimate grow tenfold over the first one (or stop being finite), the
    iteration restarts from the EK-FAC answer with half the step, so it cannot run away; every
    restart, and a result equal to the starting point, is warned about (``warnings.warn``) and
    recorded in ``SolveResult.warnings``."""
    check_positive("step_size", step_size)
    check_count("iterations", iterations, 0)
    if halve_every is not None:
        check_count("halve_every", halve_every, 1)
    check_count("anchor_every", anchor_every, 1)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    if full is None and halve_every is None:
        halve_every = 50
    scale = _column_norms(v).clamp_min(torch.finfo(v.dtype).tiny)
    initial_step = step_size
    start = preconditioner.matmat(v)
    x, velocity = start, torch.zeros_like(v)
    anchor, anchor_residual = start, torch.zeros_like(v)
    history: list[torch.Tensor] = []
    notes: list[str] = []
    moved, since_anchor = False, 0
    for iteration in range(iterations):
        if full is None:
            residual = _damped(next(operators), x, damping) - v
        else:
            if iteration == 0 or since_anchor == anchor_every:
                anchor, anchor_residual, since_anchor = x, _damped(full, x, damping) - v, 0
            since_anchor += 1
            residual = anchor_residual + _damped(next(operators), x - anchor, damping)
        history.append(_column_norms(residual) / scale)
        if not bool(torch.isfinite(history[-1]).all()) or float((history[-1] / history[0]).max()) > 10.0:
            step_size, x, velocity, moved = step_size / 2, start, torch.zeros_like(v), False
            since_anchor = anchor_every  # a fresh anchor at the restart
            notes.append(
                f"astra: the residual grew tenfold at iteration {iteration}; restarted from the EK-FAC answer "
                f"with the step size halved to {step_size:.3g}"
            )
            continue
        velocity = momentum * velocity + preconditioner.matmat(residual)
        factor = 1.0 if halve_every is None else 0.5 ** (iteration // halve_every)
        x = x - step_size * factor * velocity
        moved = True
    if iterations > 0 and not moved:
        notes.append("astra: returned its starting point, the EK-FAC answer: no step after the last restart was kept")
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
        logger.warning(note)
    return SolveResult("astra", x, damping, history, notes, initial_step)
