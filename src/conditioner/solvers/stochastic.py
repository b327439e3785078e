"""Mini-batch curvature operators for the stochastic solvers (LiSSA, ASTRA).

A batch's operator is rescaled so that its expectation over batches is the full data set's
operator: with the normalisation ``c`` of :mod:`conditioner.curvature.losses`, a batch of ``R_b``
of the ``R`` rows is multiplied by ``(c·R) / (c_b·R_b)`` (1 for a mean loss, ``R/R_b`` for a sum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from conditioner.curvature.exact import ExactCurvature
from conditioner.curvature.operator import CurvatureOperator


class ScaledOperator(CurvatureOperator):
    """``factor · operator``."""

    def __init__(self, operator: CurvatureOperator, factor: float) -> None:
        super().__init__(operator.params)
        self.operator, self.factor = operator, factor

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.factor * v for v in self.operator._matmat(vectors)]


def minibatch_operators(
    operator: ExactCurvature, generator: torch.Generator | None = None
) -> Iterator[CurvatureOperator]:
    """Endless unbiased one-batch estimates of ``operator`` (a :class:`GGN`, :class:`Hessian` or
    :class:`EmpiricalFisher`), visiting its batches in a fresh random order every epoch."""
    data: Sequence[Any] = list(operator.data)
    make: Callable[[list[Any]], ExactCurvature] = lambda batch: type(operator)(
        operator.model, operator.loss_function, batch, operator.params
    )
    total = operator.scale * operator.rows
    estimates = []
    for batch in data:
        single = make([batch])
        estimates.append(ScaledOperator(single, total / (single.scale * single.rows)))
    while True:
        for index in torch.randperm(len(estimates), generator=generator).tolist():
            yield estimates[index]
