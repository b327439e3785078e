"""What the curvature code needs to know about a loss function.

Curvature is defined for the loss of a whole data set, ``L(θ) = c · Σ_r ℓ_r(θ)``, where the
model's output is flattened to rows ``r`` (an example, or one position of a sequence), ``ℓ_r`` is
the loss of one row with ``reduction="sum"``, and ``c`` is the reduction's normalisation: ``1``
for ``"sum"``, ``1/R`` for mean cross-entropy over ``R`` rows, and ``1/(R·C)`` for mean squared
error over ``R`` rows of ``C`` outputs (torch averages over elements). Every operator and every
Kronecker factor uses this same ``c``, so they agree with ``torch.autograd`` on the full loss.

Output cotangents (gradients of ``ℓ_r`` with respect to the output, fed to backward) come in
three kinds: ``"exact"`` (columns of a square root of the output Hessian, so that their outer
products sum to the exact GGN, with no sampling), ``"sample"`` (gradients at targets drawn from
the model's predictive distribution: the Monte-Carlo Fisher) and ``"empirical"`` (gradients at the
data's own targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional

FisherType = Literal["exact", "sample", "empirical"]
FISHER_TYPES: tuple[str, ...] = ("exact", "sample", "empirical")


@dataclass(frozen=True)
class LossSpec:
    """A supported loss: ``kind`` is ``"cross_entropy"`` or ``"mse"``, ``reduction`` ``"mean"`` or ``"sum"``."""

    kind: Literal["cross_entropy", "mse"]
    reduction: Literal["mean", "sum"]

    @classmethod
    def from_module(cls, loss_function: nn.Module) -> LossSpec:
        """Read the kind and reduction of an ``nn.CrossEntropyLoss`` or ``nn.MSELoss``."""
        if isinstance(loss_function, nn.CrossEntropyLoss):
            if loss_function.weight is not None or loss_function.label_smoothing != 0.0:
                raise ValueError("loss_function: CrossEntropyLoss with class weights or label smoothing is not supported")
            kind: Literal["cross_entropy", "mse"] = "cross_entropy"
        elif isinstance(loss_function, nn.MSELoss):
            kind = "mse"
        else:
            raise TypeError(
                f"loss_function: expected nn.CrossEntropyLoss or nn.MSELoss, got {type(loss_function).__name__}"
            )
        if loss_function.reduction not in ("mean", "sum"):
            raise ValueError(f"loss_function: reduction must be 'mean' or 'sum', got {loss_function.reduction!r}")
        return cls(kind, loss_function.reduction)  # type: ignore[arg-type]

    def rows(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flatten ``output (..., C)`` to ``(R, C)`` and the target to ``(R,)`` (classes) or ``(R, C)``."""
        classes = output.shape[-1]
        if self.kind == "cross_entropy":
            if target.shape != output.shape[:-1]:
                raise ValueError(
                    f"targets: cross-entropy expects class indices of shape {tuple(output.shape[:-1])}, "
                    f"got {tuple(target.shape)}"
                )
            return output.reshape(-1, classes), target.reshape(-1)
        if output.ndim < 2:
            raise ValueError(f"output: MSE needs outputs of shape (N, ..., C), got {tuple(output.shape)}; unsqueeze a last dimension")
        if target.shape != output.shape:
            raise ValueError(f"targets: MSE expects the output's shape {tuple(output.shape)}, got {tuple(target.shape)}")
        return output.reshape(-1, classes), target.reshape(-1, classes).to(output.dtype)

    def row_losses(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``ℓ_r`` for rows ``(R, C)``: the per-row loss with ``reduction="sum"``, shape ``(R,)``."""
        if self.kind == "cross_entropy":
            return functional.cross_entropy(output, target, reduction="none")
        return (output - target).square().sum(-1)

    def scale(self, rows: int, classes: int) -> float:
        """The normalisation ``c`` of the data set's loss over ``rows`` rows of ``classes`` outputs."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (rows * classes) if self.kind == "mse" else 1.0 / rows

    def output_hessian_product(self, output: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``H_r u_r`` per row: the Hessian of ``ℓ_r`` in the output applied to ``direction`` ``(R, C)``."""
        if self.kind == "mse":
            return 2.0 * direction
        probabilities = output.softmax(-1)
        return probabilities * direction - probabilities * (probabilities * direction).sum(-1, keepdim=True)

    def cotangents(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        fisher_type: FisherType,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Output cotangents ``(K, R, C)`` whose outer products, summed over ``K``, give the per-row
        curvature of ``ℓ_r``: exactly (``"exact"``, ``K = C``), in expectation (``"sample"``,
        scaled by ``1/√samples``), or with the data's targets (``"empirical"``, ``K = 1``)."""
        output = output.detach()
        classes = output.shape[-1]
        if fisher_type == "empirical":
            if self.kind == "mse":
                return (2.0 * (output - target)).unsqueeze(0)
            return (output.softmax(-1) - functional.one_hot(target, classes).to(output.dtype)).unsqueeze(0)
        if fisher_type == "exact":
            eye = torch.eye(classes, dtype=output.dtype, device=output.device)
            if self.kind == "mse":
                return (2.0**0.5 * eye).unsqueeze(1).expand(classes, output.shape[0], classes)
            probabilities = output.softmax(-1)
            # Rows k of sqrt(p_k)·(e_k − p): Σ_k their outer products is diag(p) − p pᵀ.
            return probabilities.mT.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - probabilities.unsqueeze(0))
        if fisher_type == "sample":
            weight = samples**-0.5
            draw_on = generator.device if generator is not None else output.device  # a generator draws on its own device
            if self.kind == "mse":
                # Targets from N(f, I/2), the density whose negative log is ℓ up to a constant.
                noise = torch.randn((samples, *output.shape), generator=generator, dtype=output.dtype, device=draw_on)
                return weight * 2.0**0.5 * noise.to(output.device)
            probabilities = output.softmax(-1)
            drawn = torch.multinomial(probabilities.to(draw_on), samples, replacement=True, generator=generator)
            drawn = drawn.to(output.device).mT
            return weight * (probabilities.unsqueeze(0) - functional.one_hot(drawn, classes).to(output.dtype))
        raise ValueError(f"fisher_type: must be one of {FISHER_TYPES}, got {fisher_type!r}")
