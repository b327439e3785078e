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


def factor_ema(factor: torch.Tensor, g: torch.Tensor, dim: int, beta: float) -> torch.Tensor:
    """``β·F + w·G_(dim) G_(dim)ᵀ`` with ``w = 1 − β`` (or 1 when β = 1, a running sum), where
    ``G_(dim)`` is the unfolding of each block along ``dim``. One fused batched matmul."""
    pre, d, post = _split(g.shape, dim)
    batch = g.shape[0]
    weight = 1.0 if beta == 1.0 else 1.0 - beta
    if pre == 1:
        unfolded = g.reshape(batch, d, post)
    elif post == 1:
        unfolded = g.reshape(batch, pre, d).mT
    else:
        unfolded = g.reshape(batch, pre, d, post).transpose(1, 2).reshape(batch, d, pre * post)
    return torch.baddbmm(factor, unfolded, unfolded.mT, beta=beta, alpha=weight)


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
