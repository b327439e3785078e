"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's factors (docs/algorithms.md §2)."""

from __future__ import annotations

from typing import Any

import torch

from conditioner.linalg import descending_order, orthogonal_iteration_step, staleness
from conditioner.optim.eigen_adam import EigenAdam, EigenAdamRules


class SOAP(EigenAdam):
    """SOAP, faithful to the reference implementation by default.

    Reference behaviour: the first step only initialises the factors and their eigenbases (full
    ``eigh``) and leaves the parameters alone; every ``precondition_frequency`` steps each basis
    is refreshed by ONE warm-started QR step after sorting its columns by estimated eigenvalue in
    descending order, with the second moment permuted the same way and the first moment carried
    to the new basis; dimensions above ``max_precond_dim`` and 1-D parameters are left
    unpreconditioned (plain Adam); weight decay is decoupled and applied after the update.

    Departures from the reference, all off by default: ``update_first_step`` (also update on the
    first step, with the basis just computed), ``split_large_dims`` (split dimensions above
    ``max_precond_dim`` into blocks instead of leaving them unpreconditioned), ``merge_dims``
    (merge small neighbouring dimensions), ``precondition_1d``, ``one_sided_above`` (never
    precondition dimensions above this size). ``state_dtype`` (default float32, float64 for
    float64 parameters) sets the dtype of all statistics, ``state_precision`` (``"full"``,
    ``"bfloat16"``, ``"4bit"``; see :class:`EigenAdam`) how they are stored; ``nonfinite`` is ``"raise"`` or
    ``"skip"`` for a step whose gradient holds NaN or Inf.
    """

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
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        correct_bias: bool = True,
        update_first_step: bool = False,
        split_large_dims: bool = False,
        one_sided_above: int | None = None,
        state_dtype: torch.dtype | None = None,
        state_precision: str = "full",
        nonfinite: str = "raise",
    ) -> None:
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
            correct_bias=correct_bias,
            update_first_step=update_first_step,
            split_large_dims=split_large_dims,
            one_sided_above=one_sided_above,
            state_dtype=state_dtype,
            state_precision=state_precision,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

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
