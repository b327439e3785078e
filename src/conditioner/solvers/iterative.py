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
from collections.abc import Iterator
from typing import Any

import torch

from conditioner.checks import check_count, check_positive, check_range
from conditioner.curvature.operator import CurvatureOperator
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
    return SolveResult("lissa", x, damping, history)


def preconditioned_step_size(
    operators: Iterator[CurvatureOperator], preconditioner: Any, damping: float, dim: int, dtype: torch.dtype,
    device: torch.device, iterations: int = 20, generator: torch.Generator | None = None,
) -> float:
    """``1 / λ_max`` of the mini-batch preconditioned operators ``P⁻¹(B_b + λI)``, by power iteration
    on a fresh mini-batch each step, keeping the largest growth seen."""
    start = generator.device if generator is not None else device
    x = torch.randn(dim, 1, generator=generator, dtype=dtype, device=start).to(device)
    largest = 0.0
    for _ in range(iterations):
        x = x / torch.linalg.vector_norm(x)
        x = preconditioner.matmat(_damped(next(operators), x, damping))
        largest = max(largest, float(torch.linalg.vector_norm(x)))
    return 1.0 / largest


def astra(
    operators: Iterator[CurvatureOperator],
    v: torch.Tensor,
    damping: float,
    preconditioner: Any,
    step_size: float,
    momentum: float = 0.9,
    iterations: int = 200,
    halve_every: int = 50,
) -> SolveResult:
    """EK-FAC-preconditioned SGD with momentum: ``x_0 = P⁻¹ v`` (the EK-FAC answer), then
    ``u ← μu + P⁻¹[(B_b + λI)x − v]``, ``x ← x − α u``, with ``α`` halved every ``halve_every``
    iterations; ``preconditioner`` applies ``(P + λI)⁻¹`` (e.g. ``EKFAC(...).inverse(λ)``).
    :func:`preconditioned_step_size` gives a stable ``α``. Should a mini-batch residual still grow
    tenfold over the first one, the iteration restarts from the EK-FAC answer with half the step,
    so it cannot run away."""
    check_positive("step_size", step_size)
    check_count("iterations", iterations, 0)
    check_count("halve_every", halve_every, 1)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    scale = _column_norms(v).clamp_min(torch.finfo(v.dtype).tiny)
    start = preconditioner.matmat(v)
    x, velocity = start, torch.zeros_like(v)
    history: list[torch.Tensor] = []
    for iteration in range(iterations):
        residual = _damped(next(operators), x, damping) - v
        history.append(_column_norms(residual) / scale)
        if not bool(torch.isfinite(history[-1]).all()) or float((history[-1] / history[0]).max()) > 10.0:
            # Diverging: restart from the EK-FAC answer with half the step.
            step_size, x, velocity = step_size / 2, start, torch.zeros_like(v)
            logger.info("astra: residual grew tenfold at iteration %d; step size halved to %.3g", iteration, step_size)
            continue
        velocity = momentum * velocity + preconditioner.matmat(residual)
        x = x - step_size * 0.5 ** (iteration // halve_every) * velocity
    return SolveResult("astra", x, damping, history)
