"""Mini-batch curvature operators for the stochastic solvers (LiSSA, ASTRA).

A batch's operator is rescaled so that its expectation over batches is the full data set's
operator, whatever the batch sizes. The full operator is ``B = c Σ_b Σ_{r∈b} B_r`` (``c`` the
normalisation of :mod:`conditioner.curvature.losses` over all ``R`` rows, ``B_r`` one row's
curvature) and batch ``b`` alone gives ``B_b = c_b Σ_{r∈b} B_r`` with its own normalisation
``c_b``. Drawing one of the ``K`` batches uniformly, ``E[s_b B_b] = (1/K) Σ_b s_b c_b Σ_{r∈b} B_r``,
which is ``B`` exactly when ``s_b = K·c / c_b``: for a mean loss ``K·R_b / R`` (1 only when every
batch holds ``R / K`` rows; a short last batch is scaled down), for a sum ``K``.
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
    estimates = []
    for batch in data:
        single = make([batch])
        estimates.append(ScaledOperator(single, len(data) * operator.scale / single.scale))
    while True:
        for index in torch.randperm(len(estimates), generator=generator).tolist():
            yield estimates[index]
