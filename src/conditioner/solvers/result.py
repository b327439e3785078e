"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SolveResult:
    """``solution`` ``(P, K)`` approximates ``(B + λI)⁻¹ v`` column by column. ``residuals`` holds
    one ``(K,)`` tensor per iteration: the relative residual ``‖(B + λI)x − v‖ / ‖v‖`` (CG, on the
    exact operator) or its mini-batch estimate (LiSSA, ASTRA); empty for the direct solve.
    ``warnings``: what went wrong on the way (an ASTRA restart, a result equal to its start).
    ``step_size``: the step the stochastic solvers started with (None for direct and CG)."""

    method: str
    solution: torch.Tensor
    damping: float
    residuals: list[torch.Tensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    step_size: float | None = None

    @property
    def iterations(self) -> int:
        return len(self.residuals)
