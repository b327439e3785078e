"""Eigenvalue-corrected Shampoo with per-factor adaptive eigenbasis refresh (docs/algorithms.md §3)."""

from __future__ import annotations

from typing import Any

import torch

from conditioner.checks import choice, count, in_range
from conditioner.linalg import qr_algorithm, qr_refresh, safe_eigh, staleness
from conditioner.optim.base import ON_DEVICE
from conditioner.optim.eigen_adam import EigenAdam, EigenAdamRules
from conditioner.optim.precision import schedule

REFRESH_POLICIES = ("fixed", "adaptive")
REFRESH_METHODS = ("eigh", "qr")

#: ``eigenvalue_transport`` → the rules it selects: ``"keep"`` is the authors' algorithm (Meta's
#: Distributed Shampoo), ``"rotate"`` this library's earlier variant (docs/algorithms.md §3).
RULES = {
    "keep": EigenAdamRules(
        initial_basis="identity",
        second_moment_transport="keep",
        epsilon_outside_correction=False,
        refresh_before_update=True,
        ascending_bases=True,
    ),
    "rotate": EigenAdamRules(
        initial_basis="identity",
        second_moment_transport="rotate",
        epsilon_outside_correction=False,
    ),
}


class EigenvalueCorrectedShampoo(EigenAdam):
    """Shampoo's eigenbases with corrected eigenvalues ``D = EMA_β2((QᵀGQ)²)``; no grafting.

    The bases start as the identity (so the first steps are exactly Adam) and are refreshed at
    every ``precondition_frequency``-th step: with ``refresh="fixed"`` every factor is
    recomputed; with ``refresh="adaptive"`` only factors whose staleness
    ``ρ = ‖QᵀAQ − Diag‖/‖QᵀAQ‖`` exceeds ``tolerance`` are, so each factor finds its own
    frequency. A refresh uses ``eigh`` or, with ``refresh_method="qr"``, warm-started QR
    iterations (at most ``max_qr_iterations``; with the adaptive policy they stop once
    ``ρ ≤ tolerance``). The momentum (kept in the basis) is carried exactly to a new basis.
    Refresh counts per factor: :meth:`refresh_counts`, :meth:`total_refreshes`.

    ``eigenvalue_transport`` selects the semantics of a refresh step:

    - ``"keep"`` (default): the algorithm of the authors (Eschenhagen et al. 2025, as run in
      Meta's Distributed Shampoo). The gradient is folded into the factors and the bases are
      refreshed first; the corrected eigenvalues D are then updated with the gradient projected
      into the NEW bases and the step uses them. D is left as it is across a basis change (no
      rotation, permutation or reset). Bases keep ``eigh``'s ascending column order; the QR
      refresh is the QR algorithm on ``QᵀAQ`` from the current basis (no sorting between steps,
      columns sorted ascending after them), and the adaptive ``eigh`` keeps a basis whose
      ``ρ ≤ tolerance`` unchanged.
    - ``"rotate"``: this library's earlier variant. The step is taken in the old bases and the
      refresh follows; D is rotated into each new basis (``(R ⊙ R)ᵀ D`` with
      ``R = Q_oldᵀ Q_new``); columns in descending order, and each QR step sorts them
      descending before ``qr(A Q)``.

    Defaults that differ from the authors' (docs/algorithms.md §3): ``eps`` 1e-8 (theirs
    1e-12), ``precondition_frequency`` 10 (100 in their README example), and 1-D parameters
    (biases) get Adam where they precondition them with a factor (``precondition_1d=True`` does
    that here too). A conv kernel is one ``[out, in·kh·kw]`` block in both.

    Blocking: dimensions above ``max_precond_dim`` are split into blocks (``split_large_dims``)
    and small neighbouring dimensions merged (``merge_dims``) by default, the leading dimension
    kept apart (a conv kernel becomes ``[out, in·kh·kw]``; SOAP's ``merge_dims`` is the SOAP
    reference's rule, which merges the leading dimension too); 1-D parameters get Adam.
    ``state_precision``: ``"full"``, ``"bfloat16"`` or ``"4bit"`` storage (see :class:`EigenAdam`).
    ``compile_kernels``: compile the per-stack math (:mod:`conditioner.optim.compiled`).
    In 4-bit mode a large factor's eigenbasis is tracked by one QR step every T1 steps, and a
    refresh adopts it (``refresh_method`` and ``max_qr_iterations`` apply to the small factors);
    under ``"keep"`` the tracking runs before the step's update on a refresh step, which then
    uses the adopted basis; that basis keeps the tracking's descending column order (reversing
    it would requantise it), and D is left as it is.
    """

    checks = {
        **EigenAdam.checks,
        "refresh": choice(*REFRESH_POLICIES),
        "tolerance": in_range(0.0, 1.0),
        "refresh_method": choice(*REFRESH_METHODS),
        "max_qr_iterations": count(1),
        "eigenvalue_transport": choice(*RULES),
    }
    rules = RULES["keep"]

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        precondition_frequency: int | None = None,
        refresh: str = "fixed",
        tolerance: float = 0.01,
        refresh_method: str = "eigh",
        max_qr_iterations: int = 1,
        eigenvalue_transport: str = "keep",
        max_precond_dim: int = 1024,
        merge_dims: bool = True,
        split_large_dims: bool = True,
        precondition_1d: bool = False,
        one_sided_above: int | None = None,
        correct_bias: bool = True,
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
            refresh=refresh,
            tolerance=tolerance,
            refresh_method=refresh_method,
            max_qr_iterations=max_qr_iterations,
            eigenvalue_transport=eigenvalue_transport,
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
            statistics_interval=statistics_interval,
            nonfinite=nonfinite,
            compile_kernels=compile_kernels,
        )
        super().__init__(params, defaults)

    def rules_for(self, group: dict[str, Any]) -> EigenAdamRules:
        """The rules of the group's ``eigenvalue_transport``."""
        return RULES[group["eigenvalue_transport"]]

    def stale_blocks(self, group, current):
        return current.rho > group["tolerance"] if group["refresh"] == "adaptive" else None

    def new_bases(self, group, factors, bases):
        tolerance = group["tolerance"] if group["refresh"] == "adaptive" else None
        ascending = self.rules_for(group).ascending_bases
        return corrected_refresh(
            factors,
            bases,
            group["refresh_method"],
            tolerance,
            group["max_qr_iterations"],
            ascending,
            synchronise=self.nonfinite != ON_DEVICE,
        )


def corrected_refresh(
    factors: dict[int, torch.Tensor],
    bases: dict[int, torch.Tensor],
    method: str,
    tolerance: float | None,
    max_qr_iterations: int,
    ascending: bool = False,
    synchronise: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Refresh by ``eigh`` or warm-started QR; with a ``tolerance`` only the stale factors.

    The staleness ρ of every factor comes from one product and no host synchronisation; one
    synchronisation then picks the stale blocks so that only they pay for a decomposition (a
    refresh-step exception to the step's one host read; a fixed refresh, every block stale,
    reads nothing). ``synchronise=False`` (the on-device
    policy) reads nothing on the host: every block is decomposed and the stale ones take the
    result (``torch.where``), so a fresh block costs its decomposition too.
    Descending order: ``eigh`` columns by descending eigenvalue, QR by :func:`qr_refresh`
    (columns sorted descending before each step). ``ascending`` (the authors' refresh, Meta's
    Distributed Shampoo): ``eigh``'s ascending order, and QR by :func:`qr_algorithm` on every
    block, from its current basis, stopping at ``ρ ≤ tolerance`` (fixed refresh: 0); a block
    that takes no step still has its columns sorted ascending by ``diag(QᵀAQ)``. The mask
    counts the blocks decomposed or stepped.
    """
    if ascending and method == "qr":
        return _qr_algorithm_refresh(factors, bases, tolerance or 0.0, max_qr_iterations)
    new, changed = {}, {}
    for d, factor in factors.items():
        basis = bases[d]
        if tolerance is None:
            stale = torch.ones(factor.shape[0], dtype=torch.bool, device=factor.device)
            current = None
        else:
            current = staleness(factor, basis)
            stale = current.rho > tolerance
        if tolerance is None or not synchronise:  # every block decomposed: nothing to pick on the host
            refreshed = _refreshed(factor, basis, method, tolerance, max_qr_iterations, ascending, current)
            new[d] = refreshed if tolerance is None else torch.where(stale[:, None, None], refreshed, basis)
            changed[d] = stale.to(torch.int64)
            continue
        index = stale.nonzero().flatten()
        if index.numel() == 0:
            continue
        sub_factor = factor.index_select(0, index)
        sub_basis = basis.index_select(0, index)
        initial = None if current is None else type(current)(*(x.index_select(0, index) for x in current))
        refreshed = _refreshed(sub_factor, sub_basis, method, tolerance, max_qr_iterations, ascending, initial)
        new[d] = basis.index_copy(0, index, refreshed)
        changed[d] = stale.to(torch.int64)
    return new, changed, {}


def _refreshed(
    factor: torch.Tensor,
    basis: torch.Tensor,
    method: str,
    tolerance: float | None,
    max_qr_iterations: int,
    ascending: bool,
    current: Any,
) -> torch.Tensor:
    """The refreshed basis of every block of ``factor`` by ``eigh`` or warm-started QR."""
    if method == "eigh":
        return safe_eigh(factor, previous=basis, descending=not ascending).eigenvectors.to(basis.dtype)
    return qr_refresh(factor, basis, tolerance or 0.0, max_qr_iterations, current).basis


def _qr_algorithm_refresh(
    factors: dict[int, torch.Tensor], bases: dict[int, torch.Tensor], tolerance: float, max_qr_iterations: int
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """:func:`qr_algorithm` on every block of every factor; the mask marks the blocks stepped."""
    new, changed = {}, {}
    for d, factor in factors.items():
        refreshed = qr_algorithm(factor, bases[d], tolerance, max_qr_iterations)
        new[d] = refreshed.basis
        changed[d] = (refreshed.iterations > 0).to(torch.int64)
    return new, changed, {}
