"""Batched Kronecker algebra on stacks of blocks ``X`` of shape ``(B, d_0, ..., d_{k-1})``.

A factor or basis for block dimension ``i`` is a stack ``(B, d_i, d_i)``. Every contraction is a
single (broadcast) batched matmul: the block is viewed as ``(B, pre, d_i, post)`` so that no
dimension ever has to be moved in memory, except the factor product of a middle dimension of an
order-3+ block, which needs one copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def factor_key(dim: int) -> str:
    """The state key of the Kronecker factor of block dimension ``dim``."""
    return f"factor{dim}"


def _split(shape: torch.Size, dim: int) -> tuple[int, int, int]:
    block = shape[1:]
    return math.prod(block[:dim]), block[dim], math.prod(block[dim + 1 :])


def apply_along(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply every fibre of block dimension ``dim`` by ``matrix`` (``(B, d, d)``): the mode
    product ``X ×_dim M``, i.e. ``M @ X`` for ``dim = 0`` and ``X @ Mᵀ`` for the last dimension."""
    pre, d, post = _split(x.shape, dim)
    batch = x.shape[0]
    if post == 1:
        out = torch.matmul(x.reshape(batch, pre, d), matrix.mT)
    elif pre == 1:
        out = torch.matmul(matrix, x.reshape(batch, d, post))
    else:
        out = torch.matmul(matrix.unsqueeze(1), x.reshape(batch, pre, d, post))
    return out.reshape(x.shape)


def project(x: torch.Tensor, bases: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Into the eigenbasis: ``X ×_i Q_iᵀ`` for each preconditioned dimension (``Q_Lᵀ G Q_R``)."""
    for dim, q in bases.items():
        x = apply_along(x, q.mT, dim)
    return x


def project_back(x: torch.Tensor, bases: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Out of the eigenbasis: ``X ×_i Q_i`` for each preconditioned dimension (``Q_L X Q_Rᵀ``)."""
    for dim, q in bases.items():
        x = apply_along(x, q, dim)
    return x


def unfold(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Each block of ``g`` unfolded along block dimension ``dim``: ``(B, d, N)`` with
    ``unfolded @ unfoldedᵀ = G_(dim) G_(dim)ᵀ`` (``G`` for dim 0 of a matrix, ``Gᵀ`` for dim 1).
    A view, except for a middle dimension of an order-3+ block."""
    pre, d, post = _split(g.shape, dim)
    batch = g.shape[0]
    if pre == 1:
        return g.reshape(batch, d, post)
    if post == 1:
        return g.reshape(batch, pre, d).mT
    return g.reshape(batch, pre, d, post).transpose(1, 2).reshape(batch, d, pre * post)


def _weights(beta: float) -> tuple[float, float]:
    return (1.0, 1.0) if beta == 1.0 else (beta, 1.0 - beta)


def fold_in(factor: torch.Tensor, unfolded: torch.Tensor, beta: float) -> torch.Tensor:
    """``β·F + (1 − β)·U Uᵀ`` (β = 1: the running sum ``F + U Uᵀ``) as one fused batched matmul,
    into a new tensor."""
    keep, weight = _weights(beta)
    return torch.baddbmm(factor, unfolded, unfolded.mT, beta=keep, alpha=weight)


def fold_in_(
    factor: torch.Tensor, unfolded: torch.Tensor, beta: float, applied: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`fold_in` in place: the matmul accumulates straight into ``factor``.

    ``applied`` (a device bool): fold only where it is True, without reading it on the host:
    ``F ← keep'·F + (1 − β)·U Uᵀ`` with ``keep' = where(applied, keep, 1)``, ``U`` then zeroed by
    the caller where not applied (a multiplication by 0 would keep a NaN). Not applied, F keeps
    its values exactly (a −0.0 entry may come back as +0.0)."""
    keep, weight = _weights(beta)
    if applied is None:
        return factor.baddbmm_(unfolded, unfolded.mT, beta=keep, alpha=weight)
    if keep != 1.0:
        factor.mul_(torch.where(applied, torch.full((), keep, dtype=factor.dtype, device=factor.device), 1.0))
    return factor.baddbmm_(unfolded, unfolded.mT, alpha=weight)


def transport_diagonal(values: torch.Tensor, old: Mapping[int, torch.Tensor], new: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Carry an element-wise second moment from the bases ``old`` to ``new``.

    With ``R = Q_oldᵀ Q_new`` per dimension, a diagonal ``D`` in the old basis has diagonal
    ``(R ⊙ R)ᵀ D`` in the new one along that dimension (exact for the diagonal of a rotated
    diagonal matrix; a permutation is the special case of a permutation matrix R).
    """
    for dim, q_new in new.items():
        rotation = torch.matmul(old[dim].mT, q_new)
        values = apply_along(values, (rotation * rotation).mT, dim)
    return values


def block_norms(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block: ``(B,)``, shaped to broadcast against ``x``."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).reshape((-1,) + (1,) * (x.ndim - 1))
