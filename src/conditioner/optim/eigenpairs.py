"""Large Kronecker factors kept as eigenpairs under 4-bit state (4-bit Shampoo, docs/algorithms.md §4).

With ``state_precision="4bit"`` a factor ``F`` of ``d² ≥ 4096`` elements is never stored whole:
it is a 4-bit eigenbasis ``Q`` (state role ``"basis"``) and float32 eigenvalues λ. A statistics
update (every ``statistics_interval`` steps) rectifies the dequantised ``Q`` by one Björck step,
rebuilds ``F = Q diag(λ) Qᵀ``, folds the gradient in, takes one warm-started QR step from ``Q``
and keeps ``diag(Qᵀ F Q)`` of the new ``Q`` as λ (Wang et al. 2024; their code's ``rect_t1 = 1``).
The steps in between neither read nor decode these entries.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from conditioner.blocks import Stack
from conditioner.linalg import bjorck_rectify, qr_refresh, safe_eigh
from conditioner.optim.kronecker import factor_key, fold_in
from conditioner.optim.precision import SMALL_MATRIX

#: Björck steps on a dequantised eigenbasis before its factor is rebuilt (the authors' ``rect_t1``)
STATISTICS_RECTIFY_STEPS = 1
#: Björck steps on a dequantised eigenbasis before an inverse root is formed from it (``rect_t2``)
ROOT_RECTIFY_STEPS = 4

State = MutableMapping[str, torch.Tensor]


def eigenbasis_key(dim: int) -> str:
    return f"eigenbasis{dim}"


def eigenvalues_key(dim: int) -> str:
    return f"eigenvalues{dim}"


def paired_dims(group: dict[str, Any], stack: Stack) -> list[int]:
    """The dims of ``stack`` whose factor is kept as eigenpairs: large ones, under 4-bit state."""
    if group.get("state_precision") != "4bit":
        return []
    return [d for d in stack.preconditioned_dims if stack.shape[d] ** 2 >= SMALL_MATRIX]


def rectified_basis(state: State, dim: int, steps: int = STATISTICS_RECTIFY_STEPS) -> torch.Tensor:
    """The eigenbasis of ``dim`` after ``steps`` Björck steps."""
    return bjorck_rectify(state[eigenbasis_key(dim)], steps)


def rebuild(basis: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` for stacks ``(B, d, d)`` and ``(B, d)``."""
    return torch.matmul(basis * eigenvalues.unsqueeze(-2), basis.mT)


def factor(state: State, dim: int) -> torch.Tensor:
    """The factor of ``dim``: stored whole, or rebuilt from its (rectified) eigenpairs."""
    if factor_key(dim) in state:
        return state[factor_key(dim)]
    return rebuild(rectified_basis(state, dim), state[eigenvalues_key(dim)])


def decompose(state: State, dim: int, whole: torch.Tensor) -> None:
    """Keep ``whole`` as its eigenpairs by ``eigh`` (descending)."""
    eig = safe_eigh(whole)
    state[eigenbasis_key(dim)] = eig.eigenvectors.to(whole.dtype)
    state[eigenvalues_key(dim)] = eig.eigenvalues.to(whole.dtype)


def track(state: State, dim: int, whole: torch.Tensor, start: torch.Tensor) -> None:
    """Move the eigenpairs of ``dim`` to ``whole`` (the updated factor) by one QR step warm-started
    from ``start``; columns sorted by ``diag(Qᵀ F Q)`` descending, which become λ."""
    tracked = qr_refresh(whole, start, 0.0, 1)
    state[eigenbasis_key(dim)] = tracked.basis
    state[eigenvalues_key(dim)] = tracked.estimated_eigenvalues


def update(state: State, dim: int, unfolded: torch.Tensor, beta: float, first: bool = False) -> torch.Tensor:
    """One statistics update of the eigenpairs of ``dim``: rebuild, fold ``unfolded`` in with
    ``beta``, track by one QR step (``first``: the first statistic, decomposed by ``eigh``).
    Returns the updated factor."""
    start = rectified_basis(state, dim)
    whole = fold_in(rebuild(start, state[eigenvalues_key(dim)]), unfolded, beta)
    if first:
        decompose(state, dim, whole)
    else:
        track(state, dim, whole, start)
    return whole


def restate_factors(state: dict[str, torch.Tensor], dims: list[int], paired: list[int]) -> dict[str, torch.Tensor]:
    """Factors of ``paired`` dims as eigenpairs (``eigh`` of the whole factor), the others whole
    (``Q diag(λ) Qᵀ``); the caller's ``state`` is not modified."""
    state = dict(state)
    for d in dims:
        if d in paired and factor_key(d) in state:
            decompose(state, d, state.pop(factor_key(d)))
        elif d not in paired and eigenvalues_key(d) in state:
            state[factor_key(d)] = rebuild(state.pop(eigenbasis_key(d)), state.pop(eigenvalues_key(d)))
    return state


__all__ = [
    "ROOT_RECTIFY_STEPS",
    "STATISTICS_RECTIFY_STEPS",
    "decompose",
    "eigenbasis_key",
    "eigenvalues_key",
    "factor",
    "paired_dims",
    "rebuild",
    "rectified_basis",
    "restate_factors",
    "track",
    "update",
]
