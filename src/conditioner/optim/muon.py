"""Muon: orthogonalised momentum (docs/algorithms.md §5), on the stacked-block engine.

Per matrix block: momentum ``m ← β·m + (1 − β)·G`` (Nesterov: the direction is
``β·m + (1 − β)·G`` with the new m), then the update ``orth(direction)``, its approximate polar
factor from ``ns_steps`` Newton–Schulz steps, times ``max(1, rows/cols)^½`` (Keller Jordan's
scale, also heavyball's: the RMS of a tall orthogonal update grows like that of a square one).
Blocks without a matrix shape use AdamW in the same optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from conditioner.blocks import BlockPolicy, Stack
from conditioner.checks import count, flag, in_range
from conditioner.linalg import MUON_COEFFICIENTS
from conditioner.optim.base import COMMON_CHECKS, StackedOptimizer, StackResult, bias_step, learning_rate
from conditioner.optim.compiled import run_kernel
from conditioner.optim.kernels import adam_in_basis, muon_direction

#: no dimension is ever split, and every merge is allowed: a matrix is orthogonalised whole
_UNBOUNDED = 2**62


def _check_coefficients(name: str, value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(c, (int, float)) for c in value)):
        raise ValueError(f"{name} must be three numbers (a, b, c), got {value!r}")


class Muon(StackedOptimizer):
    """Muon with AdamW for what is not a matrix, sharing the block handling of the other optimizers.

    Blocks: size-1 dimensions are squeezed and a tensor of order 3 or more is merged into a
    matrix ``[out, in·kh·kw·…]`` (a conv kernel ``[out, in, kh, kw]`` becomes ``[out, in·kh·kw]``,
    the usual choice for convolutions); matrices are never split, so the polar factor is that of
    the whole weight. Equal-shape matrices of a group are orthogonalised in one batched call.

    1-D parameters (biases, norm gains) and, in a param group with ``orthogonalize=False``, any
    parameter use AdamW at the group's learning rate, with ``adam_betas`` and ``eps``. Muon is
    meant for hidden matrices: put embeddings and the output head in such a group (with their
    own, smaller ``lr``), as heavyball's ``MuonAdamW`` does for 1-D parameters only.

    ``ns_coefficients``: the quintic ``(3.4445, −4.7750, 2.0315)`` by default, whose singular
    values end in about [0.7, 1.2]; ``(1.5, −0.5, 0)`` with more ``ns_steps`` converges to the
    exact polar factor. Weight decay is decoupled; ``state_precision="bfloat16"`` stores the
    momentum in bfloat16; ``compile_kernels`` compiles the per-stack math
    (:mod:`conditioner.optim.compiled`).
    """

    checks = {
        **COMMON_CHECKS,
        "momentum": in_range(0.0, 1.0, high_open=True),
        "nesterov": flag,
        "ns_steps": count(0),
        "ns_coefficients": _check_coefficients,
        "adam_betas": COMMON_CHECKS["betas"],
        "eps": in_range(0.0),
        "orthogonalize": flag,
    }
    state_roles = {"momentum": "moment", "exp_avg": "moment", "exp_avg_sq": "moment"}

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        orthogonalize: bool = True,
        state_dtype: torch.dtype | None = None,
        state_precision: str = "full",
        nonfinite: str = "raise",
        compile_kernels: bool | str = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            adam_betas=tuple(adam_betas),
            eps=eps,
            orthogonalize=orthogonalize,
            state_dtype=state_dtype,
            state_precision=state_precision,
            nonfinite=nonfinite,
            compile_kernels=compile_kernels,
        )
        super().__init__(params, defaults)

    def block_policy(self, group: dict[str, Any]) -> BlockPolicy:
        return BlockPolicy(max_preconditioner_dim=_UNBOUNDED, merge_small_dims=True)

    def stack_step(
        self,
        group: dict[str, Any],
        stack: Stack,
        state: dict[str, torch.Tensor],
        grad: torch.Tensor,
        step: int,
        taken: torch.Tensor | None = None,
    ) -> StackResult:
        if len(stack.shape) == 2 and group["orthogonalize"]:
            return self._muon(group, stack, state, grad)
        return self._adamw(group, state, grad, bias_step(step + 1, step, taken, grad))

    def _muon(self, group: dict[str, Any], stack: Stack, state: dict[str, torch.Tensor], grad: torch.Tensor) -> StackResult:
        beta = group["momentum"]
        momentum, update = run_kernel(
            group["compile_kernels"],
            muon_direction,
            (grad, state.get("momentum")),
            (1.0 - beta, beta),
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            ns_coefficients=group["ns_coefficients"],
        )
        rows, cols = stack.shape
        return StackResult({"momentum": momentum}, update, learning_rate(group) * max(1.0, rows / cols) ** 0.5)

    def _adamw(
        self, group: dict[str, Any], state: dict[str, torch.Tensor], grad: torch.Tensor, t: int | torch.Tensor
    ) -> StackResult:
        beta1, beta2 = group["adam_betas"]
        correction1, correction2 = 1.0 - beta1**t, 1.0 - beta2**t
        exp_avg, exp_avg_sq, direction = run_kernel(
            group["compile_kernels"],
            adam_in_basis,
            (grad, state.get("exp_avg"), state.get("exp_avg_sq"), []),
            (1.0 - beta1, beta2, 1.0 - beta2, group["eps"] * correction2**0.5),
            dims=(),
        )
        scale = learning_rate(group) * correction2**0.5 / correction1
        return StackResult({"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, direction, scale)
