"""Keeping an eigenbasis of a slowly changing symmetric matrix up to date.

For a factor ``A`` and an orthogonal basis ``Q`` let ``B = Qᵀ A Q``; Q is an exact eigenbasis iff B
is diagonal. The staleness ``ρ = ‖B − Diag(B)‖ / ‖B‖`` (docs/algorithms.md §3) is computed from the
single product ``A Q``: ``‖B‖ = ‖A‖`` and ``diag(B)`` is the column sum of ``(A Q) ⊙ Q``. The same
product is the first half of a warm-started orthogonal (QR) iteration, so the criterion and the
refresh share it. Nothing here synchronises with the host: per-matrix decisions are taken with
``torch.where``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Staleness(NamedTuple):
    """``rho`` ``(B,)``, the estimated eigenvalues ``diag(QᵀAQ)`` ``(B, d)``, and the product
    ``A Q`` ``(B, d, d)`` that produced them (reusable by a QR step)."""

    rho: torch.Tensor
    estimated_eigenvalues: torch.Tensor
    aq: torch.Tensor


def staleness(a: torch.Tensor, q: torch.Tensor) -> Staleness:
    """Relative off-diagonal mass of ``Qᵀ A Q`` for stacks ``a``, ``q`` of shape ``(B, d, d)``.

    An all-zero ``A`` is perfectly diagonal in any basis: its ρ is 0. ρ is scale invariant, so the
    squares are taken of ``A / max|A|``, which neither underflow nor overflow. Because
    ``ρ² = 1 − Σ diag² / ‖A‖²`` cancels, ρ is resolved down to about ``sqrt(d · eps)`` (≈ 1e-3 in
    float32): a tolerance below that cannot be met and means "refresh every time".
    """
    aq = torch.matmul(a, q)
    diag = (aq * q).sum(-2)
    scale = a.abs().amax((-2, -1)).clamp_min(torch.finfo(a.dtype).tiny)
    scaled_diag = diag / scale[:, None]
    norm_sq = (a / scale[:, None, None]).square().sum((-2, -1))
    off_sq = norm_sq - scaled_diag.square().sum(-1)
    ratio = off_sq / norm_sq.clamp_min(torch.finfo(a.dtype).tiny)
    rho = torch.where(norm_sq > 0, ratio.clamp(0.0, 1.0), torch.zeros_like(ratio)).sqrt()
    return Staleness(rho, diag, aq)


def dense_staleness(a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Reference formula ``‖B − Diag(B)‖ / ‖B‖`` with ``B = Qᵀ A Q`` formed explicitly (tests)."""
    b = q.mT @ a @ q
    b = b / b.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    off = b - torch.diag_embed(torch.diagonal(b, dim1=-2, dim2=-1))
    norm = torch.linalg.matrix_norm(b)
    return torch.where(norm > 0, torch.linalg.matrix_norm(off) / norm.clamp_min(torch.finfo(a.dtype).tiny), 0.0)


def descending_order(estimated_eigenvalues: torch.Tensor) -> torch.Tensor:
    """Column permutation ``(B, d)`` that sorts estimated eigenvalues in descending order."""
    return torch.argsort(estimated_eigenvalues, dim=-1, descending=True, stable=True)


def permute_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b][:, order[b]]`` for a stack ``x`` of shape ``(B, d, d)``."""
    return torch.gather(x, -1, order.unsqueeze(-2).expand_as(x))


def orthonormal_factor(x: torch.Tensor) -> torch.Tensor:
    """The Q of a QR decomposition of each matrix in ``x``; R is never formed (Householder
    reflectors, then their product: the same Q as ``torch.linalg.qr``, without its cost for R)."""
    reflectors, tau = torch.geqrf(x)
    return torch.linalg.householder_product(reflectors, tau)


def orthogonal_iteration_step(aq: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """One warm-started QR step ``Q ← qr((A Q)[:, order]).Q``, reusing the product ``A Q``."""
    return orthonormal_factor(permute_columns(aq, order))


class QRRefresh(NamedTuple):
    """Result of :func:`qr_refresh` (:func:`qr_algorithm`): the new basis with columns in
    descending (ascending) order of estimated eigenvalue, those estimates, ``rho`` of the new
    basis, and the QR steps taken per matrix."""

    basis: torch.Tensor
    estimated_eigenvalues: torch.Tensor
    rho: torch.Tensor
    iterations: torch.Tensor


def qr_refresh(
    a: torch.Tensor,
    q: torch.Tensor,
    tolerance: float,
    max_iterations: int,
    initial: Staleness | None = None,
) -> QRRefresh:
    """Warm-started orthogonal iteration on stacks ``a``, ``q`` until ``ρ ≤ tolerance`` per matrix.

    Each step sorts the columns by estimated eigenvalue in descending order (started from
    ascending order the unshifted iteration stalls) and takes ``qr(A Q)``. A matrix whose ρ is
    already within tolerance keeps its basis untouched; the loop always runs ``max_iterations``
    masked steps so that no host synchronisation is needed. ``initial`` passes a :func:`staleness`
    of ``(a, q)`` already computed, saving one product. Every returned basis, stepped or not, has
    its columns sorted by estimated eigenvalue in descending order.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    current = initial if initial is not None else staleness(a, q)
    iterations = torch.zeros(a.shape[0], dtype=torch.int64, device=a.device)
    for _ in range(max_iterations):
        active = current.rho > tolerance
        order = descending_order(current.estimated_eigenvalues)
        stepped = orthogonal_iteration_step(current.aq, order)
        q = torch.where(active[:, None, None], stepped, q)
        iterations = iterations + active.to(iterations.dtype)
        current = staleness(a, q)
    order = descending_order(current.estimated_eigenvalues)
    return QRRefresh(
        permute_columns(q, order),
        torch.gather(current.estimated_eigenvalues, -1, order),
        current.rho,
        iterations,
    )


def qr_algorithm(a: torch.Tensor, q: torch.Tensor, tolerance: float, max_iterations: int) -> QRRefresh:
    """The unshifted QR algorithm on ``B = Qᵀ A Q`` in the form of Meta's Distributed Shampoo,
    for stacks ``a``, ``q`` of shape ``(B, d, d)``.

    Per matrix, while fewer than ``max_iterations`` steps were taken and NOT
    ``sqrt(‖B‖² − ‖diag B‖²) ≤ tolerance·‖B‖``: ``Q_p, R = qr(B)``, ``B ← R Q_p``, ``Q ← Q Q_p``.
    The columns are not sorted before the steps; afterwards every basis, stepped or not, has its
    columns sorted by ``diag(B)`` ASCENDING (stable). A difference of squares that rounding made
    negative counts as not converged, as in the authors' code. Converged matrices are masked with
    ``torch.where``: no host synchronisation.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    b = q.mT @ a @ q
    iterations = torch.zeros(a.shape[0], dtype=torch.int64, device=a.device)
    for _ in range(max_iterations):
        norm, off = _norm_and_off_diagonal(b)
        active = ~(off <= tolerance * norm)
        q_p, r = torch.linalg.qr(b)
        b = torch.where(active[:, None, None], r @ q_p, b)
        q = torch.where(active[:, None, None], q @ q_p, q)
        iterations = iterations + active.to(iterations.dtype)
    norm, off = _norm_and_off_diagonal(b)
    rho = torch.where(norm > 0, off.nan_to_num(0.0) / norm.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
    estimates = torch.diagonal(b, dim1=-2, dim2=-1)
    order = torch.argsort(estimates, dim=-1, stable=True)
    return QRRefresh(permute_columns(q, order), torch.gather(estimates, -1, order), rho, iterations)


def _norm_and_off_diagonal(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖B‖`` and ``sqrt(‖B‖² − ‖diag B‖²)`` per matrix (NaN where rounding made it negative)."""
    norm = torch.linalg.matrix_norm(b)
    return norm, (norm.square() - torch.diagonal(b, dim1=-2, dim2=-1).square().sum(-1)).sqrt()
