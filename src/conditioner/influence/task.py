"""What a model means to influence: its training loss, the query measurement, the tracked layers.

Measurements are oriented so that HIGHER IS BETTER for the query: the correct-class margin for
classification (``logit_y − logsumexp_{k≠y} logit_k``), the negative absolute error or the
negative loss for regression. With that orientation one sign convention serves every task: a
positive influence score means the training example helps the query, so removing it would hurt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from conditioner.checks import check_choice
from conditioner.curvature.losses import LossSpec

Measurement = Literal["margin", "negative_absolute_error", "negative_loss"]
MEASUREMENTS: tuple[str, ...] = ("margin", "negative_absolute_error", "negative_loss")


@dataclass(frozen=True)
class Task:
    """``loss_function``: the training loss (``nn.CrossEntropyLoss`` or ``nn.MSELoss``; its
    reduction sets the curvature's normalisation). ``measurement``: one of :data:`MEASUREMENTS`.
    ``modules``: names of the layers whose parameters are tracked (default: every Linear, Conv2d
    and Embedding layer); other parameters are held fixed."""

    loss_function: nn.Module
    measurement: Measurement
    modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        spec = LossSpec.from_module(self.loss_function)
        check_choice("measurement", self.measurement, MEASUREMENTS)
        if self.measurement == "margin" and spec.kind != "cross_entropy":
            raise ValueError("measurement: 'margin' needs a cross-entropy loss")
        if self.measurement == "negative_absolute_error" and spec.kind != "mse":
            raise ValueError("measurement: 'negative_absolute_error' needs a regression (MSE) loss")

    @classmethod
    def classification(cls, modules: Sequence[str] | None = None) -> Task:
        return cls(nn.CrossEntropyLoss(), "margin", None if modules is None else tuple(modules))

    @classmethod
    def regression(cls, measurement: Measurement = "negative_absolute_error", modules: Sequence[str] | None = None) -> Task:
        return cls(nn.MSELoss(), measurement, None if modules is None else tuple(modules))

    @property
    def spec(self) -> LossSpec:
        return LossSpec.from_module(self.loss_function)

    def measure_rows(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The measurement of each output row ``(R, C)`` with its targets, shape ``(R,)``."""
        if self.measurement == "margin":
            correct = rows.gather(1, targets[:, None]).squeeze(1)
            others = rows.scatter(1, targets[:, None], float("-inf"))
            return correct - others.logsumexp(1)
        if self.measurement == "negative_absolute_error":
            return -(rows - targets).abs().sum(1)
        return -self.spec.row_losses(rows, targets)

    @torch.no_grad()
    def measure(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The measurement of each example (summed over its rows), shape ``(N,)``."""
        rows, row_targets = self.spec.rows(model(inputs), targets)
        return self.measure_rows(rows, row_targets).reshape(inputs.shape[0], -1).sum(1)
