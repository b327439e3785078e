"""Spectra of symmetric operators from products alone: Lanczos, SLQ densities, trace estimators.

Everything here works on any object with ``matmat((P, K)) -> (P, K)``, ``dim``, ``dtype`` and
``device`` (every :class:`~conditioner.curvature.operator.CurvatureOperator`), and on a square
tensor. Operators are applied to blocks of columns, so the probes of SLQ and Hutchinson share
each pass over the data.

- :func:`lanczos`: the top-``k`` eigenpairs, Lanczos with full re-orthogonalisation (the Krylov
  basis is kept orthogonal to working precision, so no ghost eigenvalues; it stops at an invariant
  Krylov space, or goes on from a fresh random direction when that space holds fewer than k pairs).
- :func:`slq`: stochastic Lanczos quadrature: per probe ``v``, nodes ``θ_j`` and weights ``w_j``
  with ``Σ_j w_j f(θ_j) ≈ vᵀ f(A) v / ‖v‖²`` (exact for polynomials of degree < 2·steps).
- :func:`spectral_density`: those quadratures broadened by Gaussians, averaged over probes.
- :func:`hutchinson_trace`, :func:`hutchpp_trace`: trace estimates with Rademacher probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from conditioner.checks import check_count


class Operator(Protocol):
    """What the functions here need of a symmetric ``(dim, dim)`` operator."""

    dim: int

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Matrix:
    """A dense symmetric matrix seen as an :class:`Operator`."""

    matrix: torch.Tensor

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.matrix @ matrix


def _operator(operator: Any) -> Operator:
    if isinstance(operator, torch.Tensor):
        if operator.ndim != 2 or operator.shape[0] != operator.shape[1]:
            raise ValueError(f"operator: a tensor must be a square matrix, got shape {tuple(operator.shape)}")
        return _Matrix(operator)
    if not all(hasattr(operator, name) for name in ("matmat", "dim", "dtype", "device")):
        raise TypeError(
            f"operator: expected a CurvatureOperator, an object with matmat/dim/dtype/device or a "
            f"square tensor, got {type(operator).__name__}"
        )
    return operator


def _rademacher(dim: int, count: int, op: Operator, generator: torch.Generator | None) -> torch.Tensor:
    """``(dim, count)`` independent ±1 entries (drawn on the generator's device, then moved)."""
    device = generator.device if generator is not None else torch.device("cpu")
    signs = torch.randint(0, 2, (dim, count), generator=generator, device=device)
    return (2 * signs - 1).to(op.device, op.dtype)


def _gaussian(dim: int, count: int, op: Operator, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn((dim, count), generator=generator, device=device, dtype=torch.float64).to(op.device, op.dtype)


def _orthogonalise(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from ``vectors (..., P)`` their components along the rows of ``basis (..., j, P)``;
    twice, since one classical Gram-Schmidt pass loses orthogonality in floating point."""
    for _ in range(2):
        vectors = vectors - (basis.mT @ (basis @ vectors.unsqueeze(-1))).squeeze(-1)
    return vectors


def _broke_down(norm: torch.Tensor, scale: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Whether a new Krylov direction of norm ``norm`` is rounding noise: the space built so far is
    invariant. ``scale`` estimates ``‖A‖`` (the largest |Ritz value| so far)."""
    finfo = torch.finfo(dtype)
    return norm <= math.sqrt(dim) * finfo.eps * scale.clamp_min(finfo.tiny)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alpha (m,)`` and off-diagonal ``beta (m-1,)``."""
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


# --- Lanczos --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanczosResult:
    """Top eigenpairs, largest algebraic first: ``eigenvalues (k,)``, ``eigenvectors (P, k)`` (unit
    columns), ``residuals (k,)`` the norms ``‖A x − θ x‖`` of each pair (from the recurrence), ``steps`` the operator
    products used, ``converged`` whether every residual met the tolerance."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    steps: int
    converged: bool


def lanczos(
    operator: Any,
    k: int,
    steps: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
) -> LanczosResult:
    """The ``k`` largest (algebraic) eigenpairs of a symmetric operator.

    Lanczos with full re-orthogonalisation from a Gaussian start vector, at most ``steps``
    products (default ``min(dim, max(4k, 32))``); it stops early once the top ``k`` Ritz pairs'
    residuals are at most ``tol`` times the largest |Ritz value| (default ``√eps`` of the
    operator's dtype, which makes the eigenvalues accurate to about ``eps`` relative to their gap).
    The tridiagonal problem is solved in float64. Like any single-vector Krylov method it sees
    one direction per distinct eigenvalue: an exactly repeated eigenvalue is found once, unless
    rounding or a restart (an invariant space with fewer than ``k`` pairs) reveals its copies.
    """
    op = _operator(operator)
    dim = op.dim
    check_count("k", k, 1)
    if k > dim:
        raise ValueError(f"k: must be at most the operator's dimension {dim}, got {k}")
    steps = min(dim, max(4 * k, 32)) if steps is None else steps
    check_count("steps", steps, 1)
    if steps < k:
        raise ValueError(f"steps: must be at least k ({k}), got {steps}")
    steps = min(steps, dim)
    tol = math.sqrt(torch.finfo(op.dtype).eps) if tol is None else tol
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol}")

    basis = torch.empty(steps, dim, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    vector = _gaussian(dim, 1, op, generator)[:, 0]
    vector = vector / vector.norm()
    for j in range(steps):
        basis[j] = vector
        w = op.matmat(vector.unsqueeze(1))[:, 0]
        alpha[j] = float(vector @ w)
        w = _orthogonalise(w, basis[: j + 1])
        beta[j] = float(w.norm())
        m = j + 1
        values, ritz = torch.linalg.eigh(_tridiagonal(alpha[:m], beta[: m - 1]))
        scale = values.abs().max()
        # Breakdown: the Krylov space is invariant and its Ritz pairs are exact.
        invariant = bool(_broke_down(beta[j], scale, dim, op.dtype))
        if invariant:
            beta[j] = 0.0
        converged = m >= k and bool((beta[j] * ritz[-1, -k:].abs() <= tol * scale).all())
        if converged or m == steps:
            break
        if invariant:  # fewer than k pairs in an invariant space: go on from a fresh direction
            w = _orthogonalise(_gaussian(dim, 1, op, generator)[:, 0], basis[:m])
            vector = w / w.norm()
        else:
            vector = w / beta[j].to(op.dtype)
    order = values.flip(0)[:k]
    top = ritz.flip(1)[:, :k]
    eigenvectors = basis[:m].mT @ top.to(op.device, op.dtype)
    residuals = beta[m - 1] * top[-1].abs()
    return LanczosResult(order.to(op.dtype), eigenvectors, residuals.to(op.dtype), m, converged)


# --- stochastic Lanczos quadrature ----------------------------------------------------------------


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of a trace, its standard error (``nan`` when there is none) and the probes used."""

    estimate: float
    standard_error: float
    probes: int


def _mean_and_error(samples: torch.Tensor) -> tuple[float, float]:
    count = samples.numel()
    error = float(samples.std() / math.sqrt(count)) if count > 1 else math.nan
    return float(samples.mean()), error


@dataclass(frozen=True)
class SLQResult:
    """Gauss quadratures of the spectral measure, one row per probe: ``nodes (n, m)`` and
    ``weights (n, m)`` (a probe whose Krylov space ended early is padded with zero weights);
    ``dim`` the operator's dimension."""

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int

    def moments(self, power: int) -> torch.Tensor:
        """Per probe, ``Σ_j w_j θ_j^power ≈ vᵀ A^power v / ‖v‖²``."""
        return (self.weights * self.nodes**power).sum(-1)

    def trace(self) -> TraceEstimate:
        """``dim`` times the first moment, averaged over probes (Hutchinson's estimate for Rademacher probes)."""
        estimate, error = _mean_and_error(self.dim * self.moments(1))
        return TraceEstimate(estimate, error, self.nodes.shape[0])

    def density(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        return spectral_density(self.nodes, self.weights, grid, sigma)


def slq(operator: Any, probes: int | torch.Tensor, steps: int, generator: torch.Generator | None = None) -> SLQResult:
    """Stochastic Lanczos quadrature with ``steps`` Lanczos steps per probe.

    ``probes``: a count of Rademacher probes, or a ``(P, n)`` tensor of start vectors (any
    nonzero columns; each is normalised). All probes run together: one ``(P, n)`` product a step.
    """
    op = _operator(operator)
    dim = op.dim
    if isinstance(probes, torch.Tensor):
        if probes.ndim != 2 or probes.shape[0] != dim or probes.shape[1] < 1:
            raise ValueError(f"probes: a tensor must have shape ({dim}, n) with n >= 1, got {tuple(probes.shape)}")
        start = probes.to(op.device, op.dtype).mT
        if bool((start.norm(dim=1) == 0).any()):
            raise ValueError("probes: every start vector must be nonzero")
    else:
        check_count("probes", probes, 1)
        start = _rademacher(dim, probes, op, generator).mT
    check_count("steps", steps, 1)
    steps = min(steps, dim)
    count = start.shape[0]

    basis = torch.zeros(count, steps, dim, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(count, steps, dtype=torch.float64)
    beta = torch.zeros(count, steps, dtype=torch.float64)
    lengths = torch.full((count,), steps)  # a probe stops at its first breakdown: its quadrature is exact
    vectors = start / start.norm(dim=1, keepdim=True)
    active = torch.ones(count, dtype=torch.bool)
    for j in range(steps):
        basis[:, j] = vectors
        w = op.matmat(vectors.mT).mT
        alpha[:, j] = (vectors * w).sum(1).double().where(active, 0.0)
        w = _orthogonalise(w, basis[:, : j + 1])
        norms = w.norm(dim=1).double()
        scale = alpha[:, : j + 1].abs().amax(1) + beta[:, : j + 1].amax(
            1
        )  # an estimate of ‖A‖ (within a factor 2 of ‖T‖)
        ended = active & _broke_down(norms, scale, dim, op.dtype)
        lengths[ended] = j + 1
        active &= ~ended
        if not bool(active.any()) or j == steps - 1:
            break
        beta[:, j] = norms.where(active, 0.0)
        vectors = (w / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1).to(op.dtype)) * active.unsqueeze(1)

    nodes = torch.zeros(count, steps, dtype=torch.float64)
    weights = torch.zeros(count, steps, dtype=torch.float64)
    for i in range(count):
        m = int(lengths[i])
        values, vectors_t = torch.linalg.eigh(_tridiagonal(alpha[i, :m], beta[i, : m - 1]))
        nodes[i, :m], weights[i, :m] = values, vectors_t[0].square()
    return SLQResult(nodes, weights, dim)


def spectral_density(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """The SLQ estimate of the spectral density on ``grid``: each probe's nodes broadened by a
    Gaussian of width ``sigma``, weighted, averaged over probes. It integrates to one; multiply by
    the dimension for an eigenvalue count per unit."""
    if nodes.shape != weights.shape or nodes.ndim != 2:
        raise ValueError(
            f"nodes, weights: expected equal shapes (probes, m), got {tuple(nodes.shape)} and {tuple(weights.shape)}"
        )
    if not sigma > 0:
        raise ValueError(f"sigma: must be > 0, got {sigma}")
    grid = grid.to(torch.float64)
    gaussians = torch.exp(-0.5 * ((grid[:, None, None] - nodes.double()) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return (gaussians * weights.double()).sum(-1).mean(-1)


# --- trace estimators -----------------------------------------------------------------------------


def _quadratic_forms(op: Operator, vectors: torch.Tensor, chunk: int) -> torch.Tensor:
    """``vᵀ A v`` for each column ``v`` of ``vectors``, ``chunk`` columns per product."""
    return torch.cat([(block * op.matmat(block)).sum(0) for block in vectors.split(chunk, dim=1)]).double()


def hutchinson_trace(
    operator: Any, probes: int, generator: torch.Generator | None = None, chunk: int = 64
) -> TraceEstimate:
    """Hutchinson's unbiased trace estimate, the mean of ``vᵀ A v`` over ``probes`` Rademacher vectors,
    with its standard error; ``chunk`` probes share each product (memory against passes)."""
    op = _operator(operator)
    check_count("probes", probes, 1)
    check_count("chunk", chunk, 1)
    estimate, error = _mean_and_error(_quadratic_forms(op, _rademacher(op.dim, probes, op, generator), chunk))
    return TraceEstimate(estimate, error, probes)


def hutchpp_trace(
    operator: Any, probes: int, generator: torch.Generator | None = None, chunk: int = 64
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021) with ``probes`` products in all (at least 3): the exact trace on
    the range of ``A S`` for ``probes // 3`` sketch vectors ``S``, plus Hutchinson on the rest of the
    space with the remaining products. Its standard error is that of the Hutchinson part (the
    first part has none given the sketch); far smaller than Hutchinson's when the spectrum decays."""
    op = _operator(operator)
    check_count("probes", probes, 1)
    if probes < 3:
        raise ValueError(f"probes: Hutch++ needs at least 3, got {probes}")
    check_count("chunk", chunk, 1)
    sketch = probes // 3
    product = torch.cat([op.matmat(block) for block in _rademacher(op.dim, sketch, op, generator).split(chunk, 1)], 1)
    q, _ = torch.linalg.qr(product)
    low_rank = float(_quadratic_forms(op, q, chunk).sum())
    remaining = probes - 2 * sketch
    g = _rademacher(op.dim, remaining, op, generator)
    g = g - q @ (q.mT @ g)
    estimate, error = _mean_and_error(_quadratic_forms(op, g, chunk))
    return TraceEstimate(low_rank + estimate, error, probes)
