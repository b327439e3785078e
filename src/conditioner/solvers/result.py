"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SolveResult:
    """``solution`` ``(P, K)`` approximates ``(B + λI)⁻¹ v`` column by column. ``residuals`` holds
    one ``(K,)`` tensor per iteration: the relative residual ``‖(B + λI)x − v‖ / ‖v‖`` (CG, on the
    exact operator) or its mini-batch estimate (LiSSA, ASTRA); empty for the direct solve."""

    method: str
    solution: torch.Tensor
    damping: float
    residuals: list[torch.Tensor] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.residuals)
