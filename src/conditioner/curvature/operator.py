"""Curvature as a linear operator on a model's parameters.

Every curvature object (exact products, K-FAC, EK-FAC, their inverses) acts on vectors shaped
like its parameters. ``operator @ v`` accepts a flat vector ``(P,)``, a matrix of columns
``(P, K)``, or a list of parameter-shaped tensors, and answers in the same form; ``to_dense()``
builds the ``(P, P)`` matrix for small models. Subclasses implement one method,
``_matmat(vectors)``, on lists of parameter-shaped tensors with a leading batch dimension ``K``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

Vector = torch.Tensor | Sequence[torch.Tensor]


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters that require gradients; a model without any is an error."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters (none with requires_grad=True)")
    return params


def batches(data: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` from a data loader, and fail clearly when it yields nothing or
    something that is not a pair of tensors."""
    count = 0
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
            raise TypeError(f"data: each batch must be a pair (inputs, targets) of tensors, got {type(batch).__name__}")
        count += 1
        yield batch[0], batch[1]
    if count == 0:
        raise ValueError("data: the data loader yielded no batches")


class CurvatureOperator:
    """A symmetric ``(P, P)`` operator on the parameters ``params``."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.dim = sum(p.numel() for p in self.params)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def flatten(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped tensors with a leading ``K`` to a ``(P, K)`` matrix."""
        return torch.cat([v.reshape(v.shape[0], -1) for v in vectors], dim=1).mT

    def unflatten(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """A ``(P, K)`` matrix to parameter-shaped tensors with a leading ``K``."""
        pieces = matrix.mT.split([p.numel() for p in self.params], dim=1)
        return [piece.reshape(matrix.shape[1], *p.shape) for piece, p in zip(pieces, self.params)]

    def _check_parameter_shaped(self, vectors: Sequence[torch.Tensor], batched: bool) -> None:
        if len(vectors) != len(self.params):
            raise ValueError(f"vector: expected {len(self.params)} parameter-shaped tensors, got {len(vectors)}")
        for v, p in zip(vectors, self.params):
            shape = v.shape[1:] if batched else v.shape
            if shape != p.shape:
                raise ValueError(f"vector: a tensor of shape {tuple(v.shape)} does not match parameter shape {tuple(p.shape)}")

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """Apply the operator to the columns of a ``(P, K)`` matrix."""
        if matrix.ndim != 2 or matrix.shape[0] != self.dim:
            raise ValueError(f"vector: expected shape ({self.dim},) or ({self.dim}, K), got {tuple(matrix.shape)}")
        vectors = self.unflatten(matrix.to(self.dtype))
        return self.flatten(self._matmat(vectors))

    def __matmul__(self, vector: Vector) -> Vector:
        if isinstance(vector, torch.Tensor):
            if vector.ndim == 1:
                return self.matmat(vector.unsqueeze(1)).squeeze(1)
            return self.matmat(vector)
        vectors = list(vector)
        self._check_parameter_shaped(vectors, batched=False)
        return [v.squeeze(0) for v in self._matmat([v.unsqueeze(0).to(self.dtype) for v in vectors])]

    def to_dense(self, chunk: int = 256) -> torch.Tensor:
        """The ``(P, P)`` matrix, built ``chunk`` columns at a time (small models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[:, i : i + chunk]) for i in range(0, self.dim, chunk)], dim=1)
