"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's factors (docs/algorithms.md §2)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from conditioner.blocks import BlockPolicy
from conditioner.checks import choice
from conditioner.linalg import descending_order, orthogonal_iteration_step, staleness
from conditioner.optim.eigen_adam import EigenAdam, EigenAdamRules
from conditioner.optim.precision import schedule

DATA_FORMATS = ("channels_first", "channels_last")


class SOAP(EigenAdam):
    """SOAP, faithful to the reference implementation by default.

    Reference behaviour: the first step only initialises the factors and their eigenbases (full
    ``eigh``) and leaves the parameters alone; every ``precondition_frequency`` steps each basis
    is refreshed by ONE warm-started QR step after sorting its columns by estimated eigenvalue in
    descending order, with the second moment permuted the same way and the first moment carried
    to the new basis; dimensions above ``max_precond_dim`` and 1-D parameters are left
    unpreconditioned (plain Adam); weight decay is decoupled and applied after the update.

    The reference's options, with its meaning: ``shampoo_beta`` (factor EMA; None or a negative
    value such as the reference's default -1 means β2), ``precondition_1d``, ``correct_bias``,
    ``normalize_grads`` (divide each parameter's projected-back update by its root mean square,
    plus 1e-30, before the step size), ``merge_dims`` (multiply a parameter's dimensions
    together left to right while the product stays within ``max_precond_dim``: a conv kernel
    ``[64, 3, 3, 3]`` becomes one 1728 dimension with its factor, a small matrix one vector,
    ``[256, 784]`` stays as it is; EigenvalueCorrectedShampoo's and Shampoo's ``merge_dims``
    keep the leading dimension apart instead) and ``data_format`` (``"channels_last"``: with
    ``merge_dims``, a 4-D parameter stored as ``[out, h, w, in]`` is read as ``[out, in, h, w]``
    before merging).

    Departures from the reference, all off by default: ``update_first_step`` (also update on the
    first step, with the basis just computed), ``split_large_dims`` (split dimensions above
    ``max_precond_dim`` into blocks instead of leaving them unpreconditioned; ``normalize_grads``
    then normalises each block), ``one_sided_above`` (never precondition dimensions above this
    size). ``state_dtype`` (None: float32, float64 for float64 parameters; or float32, float64)
    sets the dtype of all statistics, ``state_precision`` (``"full"``, ``"bfloat16"``,
    ``"4bit"``; see :class:`EigenAdam`) how they are stored; ``nonfinite`` is ``"raise"`` or
    ``"skip"`` for a step whose gradient holds NaN or Inf; ``compile_kernels`` (False, True or a
    ``torch.compile`` backend's name) compiles the per-stack math (:mod:`conditioner.optim.compiled`).
    """

    checks = {**EigenAdam.checks, "data_format": choice(*DATA_FORMATS)}

    rules = EigenAdamRules(
        initial_basis="eigh",
        second_moment_transport="permute",
        epsilon_outside_correction=True,
    )

    def __init__(
        self,
        params: Any,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int | None = None,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        update_first_step: bool = False,
        split_large_dims: bool = False,
        one_sided_above: int | None = None,
        state_dtype: torch.dtype | None = None,
        state_precision: str = "full",
        statistics_interval: int | None = None,
        nonfinite: str = "raise",
        compile_kernels: bool | str = False,
    ) -> None:
        statistics_interval, precondition_frequency = schedule(
            state_precision, statistics_interval, precondition_frequency, 10
        )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
            update_first_step=update_first_step,
            split_large_dims=split_large_dims,
            one_sided_above=one_sided_above,
            state_dtype=state_dtype,
            state_precision=state_precision,
            statistics_interval=statistics_interval,
            nonfinite=nonfinite,
            compile_kernels=compile_kernels,
        )
        super().__init__(params, defaults)

    def block_policy(self, group: dict[str, Any]) -> BlockPolicy:
        """The shared policy with the reference's merge rule and ``data_format``."""
        policy = super().block_policy(group)
        return dataclasses.replace(policy, merge_all_dims=True, channels_last=group["data_format"] == "channels_last")

    def new_bases(self, group, factors, bases):
        return soap_refresh(factors, bases)


def soap_refresh(
    factors: dict[int, torch.Tensor], bases: dict[int, torch.Tensor]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The SOAP reference refresh: sort columns by ``diag(QᵀFQ)`` descending, one ``qr(F Q)``."""
    new, orders, changed = {}, {}, {}
    for d, factor in factors.items():
        current = staleness(factor, bases[d])
        order = descending_order(current.estimated_eigenvalues)
        new[d] = orthogonal_iteration_step(current.aq, order)
        orders[d] = order
        changed[d] = torch.ones(factor.shape[0], dtype=torch.int64, device=factor.device)
    return new, changed, orders
