"""Eigenvalue-corrected Shampoo with per-factor adaptive eigenbasis refresh (docs/algorithms.md §3)."""

from __future__ import annotations

from typing import Any

import torch

from conditioner.checks import choice, count, in_range
from conditioner.linalg import qr_refresh, safe_eigh, staleness
from conditioner.optim.eigen_adam import EigenAdam, EigenAdamRules

REFRESH_POLICIES = ("fixed", "adaptive")
REFRESH_METHODS = ("eigh", "qr")


class EigenvalueCorrectedShampoo(EigenAdam):
    """Shampoo's eigenbases with corrected eigenvalues ``D = EMA_β2((QᵀGQ)²)``; no grafting.

    The bases start as the identity (so the first steps are exactly Adam) and are refreshed at
    every ``precondition_frequency``-th step: with ``refresh="fixed"`` every factor is
    recomputed; with ``refresh="adaptive"`` only factors whose staleness
    ``ρ = ‖QᵀAQ − Diag‖/‖QᵀAQ‖`` exceeds ``tolerance`` are, so each factor finds its own
    frequency. A refresh uses ``eigh`` or, with ``refresh_method="qr"``, warm-started QR
    iterations (at most ``max_qr_iterations``; with the adaptive policy they stop once
    ``ρ ≤ tolerance``). The corrected eigenvalues are rotated into each new basis
    (``(R ⊙ R)ᵀ D`` with ``R = Q_oldᵀ Q_new``), the momentum (kept in the basis) is carried
    exactly. Refresh counts per factor: :meth:`refresh_counts`, :meth:`total_refreshes`.

    Blocking: dimensions above ``max_precond_dim`` are split into blocks (``split_large_dims``)
    and small neighbouring dimensions merged (``merge_dims``) by default, the leading dimension
    kept apart (a conv kernel becomes ``[out, in·kh·kw]``; SOAP's ``merge_dims`` is the SOAP
    reference's rule, which merges the leading dimension too); 1-D parameters get Adam.
    ``state_precision``: ``"full"``, ``"bfloat16"`` or ``"4bit"`` storage (see :class:`EigenAdam`).
    In 4-bit mode a large factor's eigenbasis is tracked by one QR step on every step, and a
    refresh adopts it (``refresh_method`` and ``max_qr_iterations`` apply to the small factors).
    """

    checks = {
        **EigenAdam.checks,
        "refresh": choice(*REFRESH_POLICIES),
        "tolerance": in_range(0.0, 1.0),
        "refresh_method": choice(*REFRESH_METHODS),
        "max_qr_iterations": count(1),
    }
    rules = EigenAdamRules(
        initial_basis="identity",
        second_moment_transport="rotate",
        epsilon_outside_correction=False,
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        refresh: str = "fixed",
        tolerance: float = 0.01,
        refresh_method: str = "eigh",
        max_qr_iterations: int = 1,
        max_precond_dim: int = 1024,
        merge_dims: bool = True,
        split_large_dims: bool = True,
        precondition_1d: bool = False,
        one_sided_above: int | None = None,
        correct_bias: bool = True,
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
            refresh=refresh,
            tolerance=tolerance,
            refresh_method=refresh_method,
            max_qr_iterations=max_qr_iterations,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            split_large_dims=split_large_dims,
            precondition_1d=precondition_1d,
            one_sided_above=one_sided_above,
            correct_bias=correct_bias,
            update_first_step=True,
            normalize_grads=False,
            state_dtype=state_dtype,
            state_precision=state_precision,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def stale_blocks(self, group, current):
        return current.rho > group["tolerance"] if group["refresh"] == "adaptive" else None

    def new_bases(self, group, factors, bases):
        tolerance = group["tolerance"] if group["refresh"] == "adaptive" else None
        return corrected_refresh(factors, bases, group["refresh_method"], tolerance, group["max_qr_iterations"])


def corrected_refresh(
    factors: dict[int, torch.Tensor],
    bases: dict[int, torch.Tensor],
    method: str,
    tolerance: float | None,
    max_qr_iterations: int,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Refresh by ``eigh`` or warm-started QR; with a ``tolerance`` only the stale factors.

    The staleness ρ of every factor comes from one product and no host synchronisation; one
    synchronisation then picks the stale blocks so that only they pay for a decomposition.
    """
    new, changed = {}, {}
    for d, factor in factors.items():
        basis = bases[d]
        if tolerance is None:
            stale = torch.ones(factor.shape[0], dtype=torch.bool, device=factor.device)
            current = None
        else:
            current = staleness(factor, basis)
            stale = current.rho > tolerance
        index = stale.nonzero().flatten()
        if index.numel() == 0:
            continue
        sub_factor = factor.index_select(0, index)
        sub_basis = basis.index_select(0, index)
        if method == "eigh":
            refreshed = safe_eigh(sub_factor, previous=sub_basis).eigenvectors.to(basis.dtype)
        else:
            initial = None if current is None else type(current)(*(x.index_select(0, index) for x in current))
            refreshed = qr_refresh(sub_factor, sub_basis, tolerance or 0.0, max_qr_iterations, initial).basis
        new[d] = basis.index_copy(0, index, refreshed)
        changed[d] = stale.to(torch.int64)
    return new, changed, {}
