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
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from conditioner.blocks import Stack
from conditioner.checks import choice, count, flag, in_range, optional
from conditioner.linalg import (
    Staleness,
    descending_order,
    qr_refresh,
    safe_eigh,
    staleness,
)
from conditioner.optim.base import COMMON_CHECKS, StackedOptimizer, StackResult, learning_rate
from conditioner.optim.kronecker import (
    factor_key,
    fold_in,
    project,
    project_back,
    transport_diagonal,
    unfold,
)
from conditioner.optim.precision import PRECISIONS, SMALL_MATRIX


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


def _eigenvalues_key(dim: int) -> str:
    return f"eigenvalues{dim}"


def _eigenbasis_key(dim: int) -> str:
    return f"eigenbasis{dim}"


class EigenAdam(StackedOptimizer):
    """Base of SOAP and EigenvalueCorrectedShampoo; use those classes.

    ``state_precision``: ``"full"`` keeps every statistic in the statistics dtype;
    ``"bfloat16"`` stores the moments and the large factors and bases in bfloat16; ``"4bit"``
    stores the large bases 4-bit quantised and keeps each large factor only as its eigenpairs,
    a 4-bit eigenbasis ``Q_f`` and float32 eigenvalues λ (4-bit Shampoo, docs/algorithms.md §4).
    On every step the pair takes in the whole new statistic: ``F = Q_f diag(λ) Q_fᵀ`` is
    rebuilt in float32, ``F ← β·F + (1 − β)·G Gᵀ``, ``Q_f`` takes one warm-started QR step
    (columns sorted by ``diag(Q_fᵀ F Q_f)`` descending, ``qr(F Q_f)``) and λ becomes
    ``diag(Q_fᵀ F Q_f)`` of the new ``Q_f``, sorted descending. The basis the gradients and
    moments live in is a second 4-bit matrix, fixed between refreshes; a refresh makes it the
    tracked ``Q_f`` (for the blocks the refresh policy moves: all, or the stale ones of the
    adaptive policy), with the usual transport of the moments. Smaller factors (< 4096
    elements) stay whole in float32 and are refreshed as in full precision. State saved in
    another precision is converted on loading (:meth:`restate`: factor ↔ eigenpairs).
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
    }
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

    @staticmethod
    def _paired_dims(group: dict[str, Any], stack: Stack) -> list[int]:
        """Dims whose factor is kept as eigenpairs (4-bit state, large factors only)."""
        if group.get("state_precision") != "4bit":
            return []
        return [d for d in stack.preconditioned_dims if stack.shape[d] ** 2 >= SMALL_MATRIX]

    @staticmethod
    def _factor(state: dict[str, torch.Tensor], dim: int) -> torch.Tensor:
        """The factor of ``dim``: stored, or rebuilt from its eigenpairs as ``Q_f diag(λ) Q_fᵀ``."""
        if factor_key(dim) in state:
            return state[factor_key(dim)]
        basis = state[_eigenbasis_key(dim)]
        return torch.matmul(basis * state[_eigenvalues_key(dim)].unsqueeze(-2), basis.mT)

    @staticmethod
    def _track(state: dict[str, torch.Tensor], dim: int, factor: torch.Tensor) -> None:
        """Move the eigenpairs of ``dim`` to ``factor`` (already holding the new gradient): one
        warm-started QR step from the tracked eigenbasis, eigenvalues ``diag(Q_fᵀ F Q_f)`` sorted
        descending with their columns."""
        tracked = qr_refresh(factor, state[_eigenbasis_key(dim)], 0.0, 1)
        state[_eigenbasis_key(dim)] = tracked.basis
        state[_eigenvalues_key(dim)] = tracked.estimated_eigenvalues

    def restate(self, group: dict[str, Any], stack: Stack, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Factors kept as eigenpairs under the group's precision (4-bit, large) from the whole
        factor by ``eigh``, as at a block's first step; whole factors from eigenpairs as
        ``Q_f diag(λ) Q_fᵀ``. Everything else is kept."""
        state = dict(state)
        paired = self._paired_dims(group, stack)
        for d in stack.preconditioned_dims:
            if d in paired and factor_key(d) in state:
                factor = state.pop(factor_key(d))
                eig = safe_eigh(factor)
                state[_eigenbasis_key(d)] = eig.eigenvectors.to(factor.dtype)
                state[_eigenvalues_key(d)] = eig.eigenvalues.to(factor.dtype)
            elif d not in paired and _eigenvalues_key(d) in state:
                state[factor_key(d)] = self._factor(state, d)
                del state[_eigenbasis_key(d)], state[_eigenvalues_key(d)]
        return state

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
        paired = self._paired_dims(group, stack)
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
                state[_eigenbasis_key(dim)] = eig.eigenvectors.to(grad.dtype)
                state[_eigenvalues_key(dim)] = eig.eigenvalues.to(grad.dtype)
            else:
                state[factor_key(dim)] = factor
        return state

    def stack_step(
        self, group: dict[str, Any], stack: Stack, state: dict[str, torch.Tensor], grad: torch.Tensor, step: int
    ) -> StackResult:
        dims = stack.preconditioned_dims
        fold_gradient = True
        skip_first_update = not group["update_first_step"]
        if step == 0:
            state = self._initial_state(group, stack, grad)
            if skip_first_update:
                return StackResult(state)
            fold_gradient = False
        t = step if skip_first_update else step + 1
        beta1, beta2 = group["betas"]
        rules = self.rules_for(group)
        refresh = bool(dims) and t % group["precondition_frequency"] == 0
        paired = self._paired_dims(group, stack)
        beta = self._factor_beta(group)
        new_state = dict(state)
        factors = {d: self._factor(state, d) for d in dims if refresh or (fold_gradient and d in paired)}
        folds: dict[str, tuple[torch.Tensor, float]] = {}
        if fold_gradient:
            factors = {d: fold_in(f, unfold(grad, d), beta) for d, f in factors.items()}
            folds = {factor_key(d): (unfold(grad, d), beta) for d in dims if d not in factors}
            for d in paired:
                self._track(new_state, d, factors[d])
        if refresh and rules.refresh_before_update:
            self._refresh(group, rules, dims, new_state, factors)

        bases = {d: new_state[_basis_key(d)] for d in dims}
        projected = project(grad, bases)
        exp_avg = torch.lerp(new_state["exp_avg"], projected, 1.0 - beta1)
        exp_avg_sq = torch.mul(new_state["exp_avg_sq"], beta2).addcmul_(projected, projected, value=1.0 - beta2)
        correction1 = 1.0 - beta1**t if group["correct_bias"] else 1.0
        correction2 = 1.0 - beta2**t if group["correct_bias"] else 1.0
        # m̂ / (sqrt(v̂) + ε) = (sqrt(c2)/c1) · m / (sqrt(v) + ε·sqrt(c2)); SOAP adds ε before correcting.
        eps = group["eps"] if rules.epsilon_outside_correction else group["eps"] * correction2**0.5
        direction = exp_avg / exp_avg_sq.sqrt().add_(eps)
        update = project_back(direction, bases)
        if group["normalize_grads"]:  # the SOAP reference's: each block's update to unit RMS
            rms = update.square().mean(dim=tuple(range(1, update.ndim)), keepdim=True).sqrt()
            update = update / rms.add_(1e-30)

        new_state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        if refresh and not rules.refresh_before_update:
            self._refresh(group, rules, dims, new_state, factors)
        return StackResult(new_state, update, learning_rate(group) * correction2**0.5 / correction1, folds)

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
        state: dict[str, torch.Tensor],
        factors: dict[int, torch.Tensor],
    ) -> None:
        """Move the bases (and the moments with them) to the refreshed ``factors``. A factor kept
        as eigenpairs has been tracked already: its blocks that the policy moves take the tracked
        eigenbasis; the others are refreshed by :meth:`new_bases` and stored whole."""
        old = {d: state[_basis_key(d)] for d in dims}
        whole = {d: f for d, f in factors.items() if _eigenvalues_key(d) not in state}
        paired = {d: f for d, f in factors.items() if _eigenvalues_key(d) in state}
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
            if stale is None:
                stale = torch.ones(factor.shape[0], dtype=torch.bool, device=factor.device)
            changed_bases[d] = torch.where(stale[:, None, None], state[_eigenbasis_key(d)], old[d])
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
