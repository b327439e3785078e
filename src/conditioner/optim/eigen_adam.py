"""Adam in a Kronecker eigenbasis: the common core of SOAP and eigenvalue-corrected Shampoo.

Per stack of blocks, with factors ``F_i`` (EMAs of ``G_(i) G_(i)ᵀ``) and bases ``Q_i``:
project ``Ĝ = G ×_i Q_iᵀ``, keep Adam's moments ``m``, ``v`` of ``Ĝ`` in the basis, project the
Adam direction back, and fold ``G`` into the factors; when the refresh policy says so, move the
bases, either after the update (SOAP reference) or before it, so that the step's gradient is
projected into the new bases (eigenvalue-corrected Shampoo as its authors run it). The first
moment in the basis is carried to a new basis exactly (back and forward); the second moment
follows the sort permutation only (SOAP), is left as it is, or is rotated with ``(R ⊙ R)ᵀ``.
Blocks without a preconditioned dimension get plain Adam. SOAP and EigenvalueCorrectedShampoo
differ in the choices gathered in :class:`EigenAdamRules` (per group:
:meth:`EigenAdam.rules_for`) and in their refresh policy (:meth:`EigenAdam.new_bases`,
:meth:`EigenAdam.stale_blocks`), which each of them owns in its own module.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from conditioner.blocks import Stack
from conditioner.checks import choice, count, flag, in_range, optional
from conditioner.linalg import Staleness, descending_order, safe_eigh, staleness
from conditioner.optim import eigenpairs
from conditioner.optim.base import COMMON_CHECKS, StackedOptimizer, StackResult, bias_step, learning_rate
from conditioner.optim.compiled import run_kernel
from conditioner.optim.eigenpairs import eigenbasis_key, eigenvalues_key, paired_dims
from conditioner.optim.kernels import adam_in_basis
from conditioner.optim.kronecker import (
    factor_key,
    fold_in,
    project,
    project_back,
    transport_diagonal,
    unfold,
)
from conditioner.optim.precision import PRECISIONS


@dataclass(frozen=True)
class EigenAdamRules:
    """What distinguishes the members of the family.

    - ``initial_basis``: ``"eigh"`` of the first factors (SOAP) or ``"identity"`` (ECS).
    - ``second_moment_transport``: on a basis change, ``"permute"`` (SOAP: follow the sort
      only), ``"keep"`` (left as it is) or ``"rotate"`` (``(R ⊙ R)ᵀ``, ``R = Q_oldᵀ Q_new``).
    - ``epsilon_outside_correction``: ε added to ``sqrt(v)`` before bias correction (SOAP
      reference: step ``lr·sqrt(1−β2ᵗ)/(1−β1ᵗ)``) rather than to ``sqrt(v/(1−β2ᵗ))`` (Adam).
    - ``refresh_before_update``: on a refresh step, fold the gradient in and move the bases
      first, then project the gradient into the new bases and update with them; otherwise the
      step is taken in the old bases and the refresh follows.
    - ``ascending_bases``: the refresh policy (:meth:`EigenAdam.new_bases`) orders the columns
      of a new basis by ascending eigenvalue (``eigh``'s order, the ECS authors'); otherwise
      descending. The tracked eigenbasis of a 4-bit factor is descending either way and is
      adopted as it is (reordering it would requantise it).
    """

    initial_basis: str
    second_moment_transport: str
    epsilon_outside_correction: bool
    refresh_before_update: bool = False
    ascending_bases: bool = False


def _basis_key(dim: int) -> str:
    return f"basis{dim}"


class EigenAdam(StackedOptimizer):
    """Base of SOAP and EigenvalueCorrectedShampoo; use those classes.

    Schedule: the factors take in the gradient every ``statistics_interval`` (T1) steps, only
    the gradients of those steps (the others are not accumulated: the 4-bit Shampoo authors'
    sampling); the first gradient initialises them. The bases are refreshed every
    ``precondition_frequency`` (T2) steps, from the factors as they stand. Full and bfloat16
    state default to T1 = 1 and the optimizer's own T2; ``"4bit"`` to the paper's T1 = 100,
    T2 = 500 (:func:`conditioner.optim.precision.schedule`).

    ``state_precision``: ``"full"`` keeps every statistic in the statistics dtype;
    ``"bfloat16"`` stores the moments and the large factors and bases in bfloat16; ``"4bit"``
    stores the large bases 4-bit quantised and keeps each large factor only as its eigenpairs,
    a 4-bit eigenbasis ``Q_f`` and float32 eigenvalues λ (4-bit Shampoo, docs/algorithms.md §4,
    :mod:`conditioner.optim.eigenpairs`): a statistics step rectifies ``Q_f`` by one Björck
    step, rebuilds ``F = Q_f diag(λ) Q_fᵀ``, folds the gradient in, takes one warm-started QR
    step (columns sorted by ``diag(Q_fᵀ F Q_f)`` descending) and requantises. The basis the
    gradients and moments live in is a second 4-bit matrix, fixed between refreshes; a refresh
    makes it the tracked ``Q_f`` (its codes, for the blocks the refresh policy moves: all, or
    the stale ones of the adaptive policy), with the usual transport of the moments. An
    ordinary step dequantises that basis once and does no Björck step, QR or fold. Smaller
    factors (< 4096 elements) stay whole in float32 and are refreshed as in full precision.
    State saved in another precision is converted on loading (:meth:`restate`: factor ↔
    eigenpairs).
    """

    rules: EigenAdamRules
    checks = {
        **COMMON_CHECKS,
        "shampoo_beta": optional(in_range(-math.inf, 1.0, high_open=True)),
        "eps": in_range(0.0),
        "max_precond_dim": count(0),
        "correct_bias": flag,
        "update_first_step": flag,
        "normalize_grads": flag,
        "state_precision": choice(*PRECISIONS),
        "statistics_interval": count(1),
    }
    exact_entries = ("refreshes", "eigenvalues")
    state_roles = {
        "basis": "basis",
        "eigenbasis": "basis",
        "factor": "matrix",
        "exp_avg": "moment",
        "exp_avg_sq": "moment",
    }

    def rules_for(self, group: dict[str, Any]) -> EigenAdamRules:
        """The rules a param group runs under; by default the class's ``rules``."""
        return self.rules

    def _factor_beta(self, group: dict[str, Any]) -> float:
        """``shampoo_beta``; None or a negative value (the SOAP reference's -1) means β2."""
        beta = group["shampoo_beta"]
        return group["betas"][1] if beta is None or beta < 0 else beta

    def restate(self, group: dict[str, Any], stack: Stack, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Factors kept as eigenpairs under the group's precision (4-bit, large) from the whole
        factor by ``eigh``, as at a block's first step; whole factors from eigenpairs as
        ``Q_f diag(λ) Q_fᵀ``. Everything else is kept."""
        return eigenpairs.restate_factors(state, stack.preconditioned_dims, paired_dims(group, stack))

    def stale_blocks(self, group: dict[str, Any], current: Staleness) -> torch.Tensor | None:
        """Which blocks a refresh moves, given the factors' staleness in their current bases
        (bool ``(B,)``); None: every block. Used for factors kept as eigenpairs."""
        return None

    def _initial_state(self, group: dict[str, Any], stack: Stack, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        dims = stack.preconditioned_dims
        beta = self._factor_beta(group)
        state: dict[str, torch.Tensor] = {
            "exp_avg": torch.zeros_like(grad),
            "exp_avg_sq": torch.zeros_like(grad),
            "refreshes": torch.zeros(grad.shape[0], len(dims), dtype=torch.int64, device=grad.device),
        }
        paired = paired_dims(group, stack)
        initial_basis = self.rules_for(group).initial_basis
        for dim in dims:
            d = stack.shape[dim]
            zeros = grad.new_zeros(grad.shape[0], d, d)
            factor = fold_in(zeros, unfold(grad, dim), beta)
            eig = safe_eigh(factor) if initial_basis == "eigh" or dim in paired else None
            if initial_basis == "eigh":
                basis = eig.eigenvectors.to(grad.dtype)
            else:
                basis = torch.eye(d, dtype=grad.dtype, device=grad.device).expand_as(zeros).clone()
            state[_basis_key(dim)] = basis
            if dim in paired:
                state[eigenbasis_key(dim)] = eig.eigenvectors.to(grad.dtype)
                state[eigenvalues_key(dim)] = eig.eigenvalues.to(grad.dtype)
            else:
                state[factor_key(dim)] = factor
        return state

    def stack_step(
        self,
        group: dict[str, Any],
        stack: Stack,
        state: dict[str, torch.Tensor],
        grad: torch.Tensor,
        step: int,
        taken: torch.Tensor | None = None,
    ) -> StackResult:
        dims = stack.preconditioned_dims
        skip_first_update = not group["update_first_step"]
        if step == 0:
            # the first gradient initialises the factors (and is then not folded in again)
            new_state = ChainMap(self._initial_state(group, stack, grad), {})
            if skip_first_update:
                return StackResult(new_state.maps[0])
        else:
            # entries are written to the first map only, and only those are handed back: an
            # entry the step does not read (a 4-bit eigenbasis between statistics) stays encoded
            new_state = ChainMap({}, state)
        t = step if skip_first_update else step + 1
        fold_gradient = step > 0 and t % group["statistics_interval"] == 0
        beta1, beta2 = group["betas"]
        rules = self.rules_for(group)
        refresh = bool(dims) and t % group["precondition_frequency"] == 0
        paired = paired_dims(group, stack)
        beta = self._factor_beta(group)
        factors: dict[int, torch.Tensor] = {}
        folds: dict[str, tuple[torch.Tensor, float]] = {}
        for d in dims:
            if d in paired and fold_gradient:
                factors[d] = eigenpairs.update(new_state, d, unfold(grad, d), beta)
            elif refresh:
                factors[d] = eigenpairs.factor(new_state, d)
                if fold_gradient:
                    factors[d] = fold_in(factors[d], unfold(grad, d), beta)
            elif fold_gradient:
                folds[factor_key(d)] = (unfold(grad, d), beta)
        if refresh and rules.refresh_before_update:
            self._refresh(group, rules, dims, new_state, factors)

        counted = bias_step(t, step, taken, grad)
        correction1 = 1.0 - beta1**counted if group["correct_bias"] else 1.0
        correction2 = 1.0 - beta2**counted if group["correct_bias"] else 1.0
        # m̂ / (sqrt(v̂) + ε) = (sqrt(c2)/c1) · m / (sqrt(v) + ε·sqrt(c2)); SOAP adds ε before correcting.
        eps = group["eps"] if rules.epsilon_outside_correction else group["eps"] * correction2**0.5
        exp_avg, exp_avg_sq, update = run_kernel(
            group["compile_kernels"],
            adam_in_basis,
            (grad, new_state["exp_avg"], new_state["exp_avg_sq"], [new_state[_basis_key(d)] for d in dims]),
            (1.0 - beta1, beta2, 1.0 - beta2, eps),
            dims=tuple(dims),
            normalize=group["normalize_grads"],
        )
        new_state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        if refresh and not rules.refresh_before_update:
            self._refresh(group, rules, dims, new_state, factors)
        return StackResult(new_state.maps[0], update, learning_rate(group) * correction2**0.5 / correction1, folds)

    def new_bases(
        self, group: dict[str, Any], factors: dict[int, torch.Tensor], bases: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Refreshed bases for the dims that change, the per-block mask of what changed (int64),
        and for the "permute" transport the sort order used per dim."""
        raise NotImplementedError

    def _refresh(
        self,
        group: dict[str, Any],
        rules: EigenAdamRules,
        dims: list[int],
        state: MutableMapping[str, torch.Tensor],
        factors: dict[int, torch.Tensor],
    ) -> None:
        """Move the bases (and the moments with them) to the refreshed ``factors``. A factor kept
        as eigenpairs has been tracked already: its blocks that the policy moves take the tracked
        eigenbasis; the others are refreshed by :meth:`new_bases` and stored whole."""
        old = {d: state[_basis_key(d)] for d in dims}
        whole = {d: f for d, f in factors.items() if eigenvalues_key(d) not in state}
        paired = {d: f for d, f in factors.items() if eigenvalues_key(d) in state}
        if not whole:
            changed_bases, changed_mask, orders = {}, {}, {}
        elif self.executor is None:
            changed_bases, changed_mask, orders = self.new_bases(group, whole, old)
        else:
            changed_bases, changed_mask, orders = self.executor.new_bases(partial(self.new_bases, group), whole, old)
        for d, factor in whole.items():
            state[factor_key(d)] = factor
        for d, factor in paired.items():
            current = staleness(factor, old[d])
            stale = self.stale_blocks(group, current)
            tracked = state[eigenbasis_key(d)]
            # adopted whole, the basis keeps the tracked eigenbasis's 4-bit codes (no requantising)
            changed_bases[d] = tracked if stale is None else torch.where(stale[:, None, None], tracked, old[d])
            if stale is None:
                stale = torch.ones(factor.shape[0], dtype=torch.bool, device=factor.device)
            changed_mask[d] = stale.to(torch.int64)
            # The tracked basis is sorted by eigenvalue: column i follows the old column of rank i.
            identity = torch.arange(factor.shape[-1], device=factor.device).expand(factor.shape[0], -1)
            orders[d] = torch.where(stale[:, None], descending_order(current.estimated_eigenvalues), identity)
        if not changed_bases:
            return
        old_changed = {d: old[d] for d in changed_bases}
        exp_avg = project(project_back(state["exp_avg"], old_changed), changed_bases)
        exp_avg_sq = state["exp_avg_sq"]
        if rules.second_moment_transport == "permute":
            for d, order in orders.items():
                exp_avg_sq = _permute_along(exp_avg_sq, order, d)
        elif rules.second_moment_transport == "rotate":
            exp_avg_sq = transport_diagonal(exp_avg_sq, old_changed, changed_bases)
        state["exp_avg"] = exp_avg
        state["exp_avg_sq"] = exp_avg_sq
        refreshes = state["refreshes"].clone()
        for position, d in enumerate(dims):
            if d in changed_bases:
                state[_basis_key(d)] = changed_bases[d]
                refreshes[:, position] += changed_mask[d]
        state["refreshes"] = refreshes


def _permute_along(x: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder block dimension ``dim`` of ``x`` (``(B, ...)``) by the per-block ``order`` ``(B, d)``."""
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim + 1] = x.shape[dim + 1]
    index = order.reshape(shape).expand_as(x)
    return torch.gather(x, dim + 1, index)


__all__ = ["EigenAdam", "EigenAdamRules"]
