"""Inverse p-th roots ``(A + εI)^(-1/p)`` of stacks of symmetric positive semi-definite matrices.

Two routes, as in Shampoo: through an eigendecomposition (exact, uses :func:`safe_eigh`), and the
coupled Newton iteration of Guo & Higham (2006), which needs only matrix products and falls back
to the eigendecomposition for the matrices where it does not converge.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from conditioner.linalg.eigh import safe_eigh


def _check_root_arguments(a: torch.Tensor, p: float, epsilon: float) -> None:
    if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be a stack of square matrices (B, d, d), got shape {tuple(a.shape)}")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")


def inverse_root_from_eigh(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, p: float, epsilon: float) -> torch.Tensor:
    """``Q diag((λ⁺ + ε)^(-1/p)) Qᵀ`` from an eigendecomposition; negative λ (round-off) clamp to 0."""
    scale = (eigenvalues.clamp_min(0.0) + epsilon).pow(-1.0 / p)
    return (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.mT


def inverse_root_eigh(a: torch.Tensor, p: float, epsilon: float = 0.0) -> torch.Tensor:
    """``(A + εI)^(-1/p)`` by eigendecomposition. With ε = 0 a singular A has no inverse root:
    its zero eigenvalues map to inf, which the caller must avoid by choosing ε > 0. A matrix that
    cannot be decomposed (non-finite input) gets NaN, as with :func:`inverse_root_newton`."""
    _check_root_arguments(a, p, epsilon)
    vals, vecs, failed = safe_eigh(a)
    root = inverse_root_from_eigh(vals, vecs, p, epsilon)
    return torch.where(failed[:, None, None], torch.nan, root).to(a.dtype)


def _integer_power(x: torch.Tensor, n: int) -> torch.Tensor:
    result = None
    base = x
    while n:
        if n & 1:
            result = base if result is None else result @ base
        n >>= 1
        if n:
            base = base @ base
    return result


class NewtonRoot(NamedTuple):
    """Result of :func:`newton_root`: the inverse roots ``(B, d, d)``; ``fell_back`` ``(B,)``,
    True where the Newton iteration did not converge and the root is the eigh root instead; and
    ``fallbacks``, their number: a host integer, or with ``synchronise=False`` a 0-dim device
    tensor."""

    root: torch.Tensor
    fell_back: torch.Tensor
    fallbacks: int | torch.Tensor


def newton_root(
    a: torch.Tensor,
    p: int,
    epsilon: float = 0.0,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    synchronise: bool = True,
) -> NewtonRoot:
    """``(A + εI)^(-1/p)`` by the coupled Newton iteration, for an integer ``p ≥ 1``, with
    :func:`inverse_root_eigh` for the matrices where the iteration does not converge.

    With ``c^p = (p+1)‖A‖_F / 2``: ``X₀ = I/c``, ``M₀ = A/c^p``, then ``T = ((p+1)I − M)/p``,
    ``X ← X T``, ``M ← T^p M``. The invariant ``M = X^p A`` holds, and M → I. Each matrix stops
    when ``max|M − I| < tolerance``; the iteration runs in float64 for matrices of float64 and in
    float32 otherwise. The Frobenius norm bounds the spectral norm, so the eigenvalues of M₀ lie
    in (0, 2/(p+1)], inside the region of convergence.

    That holds in exact arithmetic for A ⪰ 0. A matrix that is singular to working precision
    (a rank-deficient float32 factor with a tiny ε) or indefinite gives M an eigenvalue ≤ 0,
    which the iteration drives away from 1: X grows without bound. A matrix whose residual is
    not finite stops iterating; one whose residual is still above ``tolerance`` after
    ``max_iterations`` (or not finite) did not converge, and exactly those are recomputed by
    eigh (negative eigenvalues clamped to 0, as :func:`inverse_root_from_eigh`). The iteration
    synchronises with the host once per step, to stop as soon as every matrix has; the fallback
    adds one synchronisation only when some matrix did not converge.

    ``synchronise=False`` reads nothing on the host: all ``max_iterations`` steps run (a matrix
    that has stopped is masked with ``torch.where``, so every root is bit for bit the one of the
    synchronising loop), and the eigh roots of the whole stack are computed and taken where the
    iteration did not converge. That costs the steps an early stop would save and one eigh of
    every matrix; it is the price of never waiting for the device.
    """
    _check_root_arguments(a, p, epsilon)
    if int(p) != p:
        raise ValueError(f"p must be an integer for the Newton iteration, got {p}")
    p = int(p)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    work = a.to(dtype)
    dim = work.shape[-1]
    eye = torch.eye(dim, dtype=dtype, device=a.device).expand_as(work)
    work = 0.5 * (work + work.mT) + epsilon * eye
    norm = torch.linalg.matrix_norm(work).clamp_min(torch.finfo(dtype).tiny)[:, None, None]
    c_pow = (p + 1) * norm / 2
    x = eye / c_pow.pow(1.0 / p)
    m = work / c_pow
    for iteration in range(max_iterations + 1):
        error = (m - eye).abs().flatten(-2).amax(-1)
        unconverged = ~(error < tolerance)
        active = unconverged & torch.isfinite(error)
        if synchronise:
            any_active, any_unconverged = torch.stack([active.any(), unconverged.any()]).tolist()
            if not any_active:
                break
        if iteration == max_iterations:
            break
        t = ((p + 1) * eye - m) / p
        mask = active[:, None, None]
        x = torch.where(mask, x @ t, x)
        m = torch.where(mask, _integer_power(t, p) @ m, m)
    if not synchronise:
        eigh_root = inverse_root_eigh(a.to(dtype), p, epsilon)
        x = torch.where(unconverged[:, None, None], eigh_root, x)
        return NewtonRoot(x.to(a.dtype), unconverged, unconverged.sum())
    if not any_unconverged:
        return NewtonRoot(x.to(a.dtype), unconverged, 0)
    index = unconverged.nonzero().flatten()
    x = x.index_copy(0, index, inverse_root_eigh(a.index_select(0, index).to(dtype), p, epsilon))
    return NewtonRoot(x.to(a.dtype), unconverged, index.numel())


def inverse_root_newton(
    a: torch.Tensor,
    p: int,
    epsilon: float = 0.0,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
) -> torch.Tensor:
    """``(A + εI)^(-1/p)`` by the coupled Newton iteration, eigh where it does not converge:
    the root of :func:`newton_root`."""
    return newton_root(a, p, epsilon, max_iterations, tolerance).root
