"""Shampoo with learning-rate grafting (Gupta et al. 2018; Anil et al. 2020; Shi et al. 2023).

Per block: factors ``F_i ← EMA_β2(G_(i) G_(i)ᵀ)`` (β2 = 1: running sums), inverse roots
``P_i = (F̂_i + εI)^(-1/p)`` recomputed every ``precondition_frequency`` steps (``F̂`` bias
corrected when β2 < 1; ``p = 2k`` for k preconditioned dimensions unless overridden), direction
``U = M ×_i P_i`` for the momentum M of G, and per block the step size of the grafted diagonal
method: ``U ← U · ‖U_graft‖ / ‖U‖`` (docs/algorithms.md §1).
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import MutableMapping
from typing import Any

import torch

from conditioner.blocks import Stack
from conditioner.checks import choice, count, flag, in_range, optional
from conditioner.linalg import inverse_root_from_eigh, newton_root, safe_eigh
from conditioner.linalg.deferred import warn_later
from conditioner.optim import eigenpairs
from conditioner.optim.base import COMMON_CHECKS, ON_DEVICE, StackedOptimizer, StackResult, bias_step, learning_rate
from conditioner.optim.compiled import run_kernel
from conditioner.optim.eigenpairs import eigenbasis_key, eigenvalues_key, paired_dims
from conditioner.optim.kernels import shampoo_direction
from conditioner.optim.kronecker import factor_key, fold_in, unfold
from conditioner.optim.precision import PRECISIONS, schedule

_FALLBACK_WARNING = (
    "Shampoo: %d inverse roots did not converge by the coupled Newton iteration and were computed by eigh "
    "instead (per factor: fallback_counts())"
)
GRAFTING_TYPES = ("adam", "adagrad", "rmsprop", "sgd", "none")
ROOT_METHODS = ("eigh", "newton")

logger = logging.getLogger(__name__)


def _root_key(dim: int) -> str:
    return f"root{dim}"


class Shampoo(StackedOptimizer):
    """Shampoo with grafting, on stacked blocks.

    - ``betas = (β1, β2)``: β1 the EMA of the gradient used as momentum (bias corrected; 0 turns
      it off), β2 the factor EMA (1.0 for AdaGrad-style sums).
    - ``grafting``: ``"adam"`` (second moment EMA ``grafting_beta2``, bias corrected),
      ``"rmsprop"`` (same EMA, no correction), ``"adagrad"`` (sum of squares), ``"sgd"`` (unit
      scaling) or ``"none"`` (raw Shampoo step). Before ``start_preconditioning_step`` (default:
      ``precondition_frequency``) the grafted method alone is applied, and blocks without a
      preconditioned dimension always use it.
    - ``root_method``: ``"eigh"`` or ``"newton"`` (coupled Newton iteration; a root where it does
      not converge, as for a factor singular to working precision, is computed by eigh instead,
      counted per factor by :meth:`fallback_counts` and logged as one warning per step that had
      any; under ``spread_refresh`` each process logs the roots it computed itself, while the
      counts, exchanged with the roots, are complete on every process);
      ``exponent_override``: use ``p`` instead of ``2k`` in ``F^(-1/p)``.
    - ``nesterov``: use the look-ahead ``lerp(m, G, 1 − β1)`` instead of ``m``.
    - ``compile_kernels``: compile the per-stack math (:mod:`conditioner.optim.compiled`).
    - Blocking as in Distributed Shampoo: dimensions above ``max_preconditioner_dim`` split
      (``split_large_dims``), small neighbours merged; 1-D parameters on the grafted method.
    - Schedule: the factors take in the gradient every ``statistics_interval`` (T1) steps (only
      those steps' gradients; bias correction ``1 − β2ⁿ`` for the n folds so far), the inverse
      roots are recomputed every ``precondition_frequency`` (T2) steps. Defaults: T1 = 1 and
      T2 = 20, or under ``"4bit"`` state the 4-bit Shampoo paper's T1 = 100, T2 = 500.
    - ``state_precision``: ``"full"``; ``"bfloat16"`` (factors, roots and moments stored in
      bfloat16); ``"4bit"`` (Wang et al. 2024, docs/algorithms.md §4): each factor of
      ``d² ≥ 4096`` elements is kept as a 4-bit eigenbasis and float32 eigenvalues
      (:mod:`conditioner.optim.eigenpairs`; the first statistic by ``eigh``, later ones by one
      warm-started QR step); its inverse root ``Q diag((λ̂ + ε)^(-1/p)) Qᵀ`` is formed from the
      eigenbasis after four Björck steps and stored with its off-diagonal entries in 4 bits and
      its diagonal in float32, as the authors store roots (``root_method`` applies to the smaller
      factors, which stay whole). An ordinary step dequantises each root and applies it, one
      product per dimension as in float32. Moments stay float32.
    """

    checks = {
        **COMMON_CHECKS,
        "epsilon": in_range(0.0),
        "start_preconditioning_step": count(1),
        "max_preconditioner_dim": count(0),
        "grafting": choice(*GRAFTING_TYPES),
        "grafting_beta2": in_range(0.0, 1.0),
        "grafting_epsilon": in_range(0.0),
        "root_method": choice(*ROOT_METHODS),
        "exponent_override": optional(in_range(0.0, low_open=True)),
        "nesterov": flag,
        "state_precision": choice(*PRECISIONS),
        "statistics_interval": count(1),
    }
    max_dim_option = "max_preconditioner_dim"
    exact_entries = ("refreshes", "fallbacks", "eigenvalues")
    state_roles = {
        "factor": "matrix",
        "root": "root",
        "eigenbasis": "basis",
        "exp_avg": "moment",
        "graft_sq": "moment",
    }

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int | None = None,
        start_preconditioning_step: int | None = None,
        max_preconditioner_dim: int = 1024,
        grafting: str = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        root_method: str = "eigh",
        exponent_override: float | None = None,
        nesterov: bool = False,
        merge_dims: bool = True,
        split_large_dims: bool = True,
        precondition_1d: bool = False,
        one_sided_above: int | None = None,
        state_dtype: torch.dtype | None = None,
        state_precision: str = "full",
        statistics_interval: int | None = None,
        nonfinite: str = "raise",
        compile_kernels: bool | str = False,
    ) -> None:
        statistics_interval, precondition_frequency = schedule(
            state_precision, statistics_interval, precondition_frequency, 20
        )
        if start_preconditioning_step is None:
            start_preconditioning_step = precondition_frequency
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            epsilon=epsilon,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            grafting=grafting,
            grafting_beta2=grafting_beta2,
            grafting_epsilon=grafting_epsilon,
            root_method=root_method,
            exponent_override=exponent_override,
            nesterov=nesterov,
            merge_dims=merge_dims,
            split_large_dims=split_large_dims,
            precondition_1d=precondition_1d,
            one_sided_above=one_sided_above,
            state_dtype=state_dtype,
            state_precision=state_precision,
            statistics_interval=statistics_interval,
            nonfinite=nonfinite,
            compile_kernels=compile_kernels,
        )
        super().__init__(params, defaults)

    def validate(self, options: dict[str, Any]) -> None:
        super().validate(options)
        if options.get("root_method") == "newton" and options.get("exponent_override") is not None:
            if int(options["exponent_override"]) != options["exponent_override"]:
                raise ValueError(
                    f"exponent_override must be an integer with root_method='newton', got {options['exponent_override']!r}"
                )

    def _initial_state(self, group: dict[str, Any], stack: Stack, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        dims = stack.preconditioned_dims
        counts = torch.zeros(grad.shape[0], len(dims), dtype=torch.int64, device=grad.device)
        state = {"refreshes": counts, "fallbacks": counts.clone()}
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(grad)
        if group["grafting"] in ("adam", "rmsprop", "adagrad"):
            state["graft_sq"] = torch.zeros_like(grad)
        paired = paired_dims(group, stack)
        for dim in dims:
            d = stack.shape[dim]
            identity = torch.eye(d, dtype=grad.dtype, device=grad.device).expand(grad.shape[0], d, d).clone()
            state[_root_key(dim)] = identity
            if dim in paired:  # no statistics yet
                state[eigenbasis_key(dim)] = identity.clone()
                state[eigenvalues_key(dim)] = grad.new_zeros(grad.shape[0], d)
            else:
                state[factor_key(dim)] = grad.new_zeros(grad.shape[0], d, d)
        return state

    def restate(self, group: dict[str, Any], stack: Stack, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under the group's precision: large factors as eigenpairs (``eigh``), or whole; the roots
        and the rest are kept (their stored form follows the precision)."""
        return eigenpairs.restate_factors(state, stack.preconditioned_dims, paired_dims(group, stack))

    def _inverse_roots(
        self,
        group: dict[str, Any],
        state: MutableMapping[str, torch.Tensor],
        dims: list[int],
        statistics: int | torch.Tensor,
    ) -> int:
        """Recompute the stack's inverse roots from factors holding ``statistics`` gradients (for
        the bias correction; under the on-device policy a per-block tensor); returns how many of
        those this process computed fell back from Newton to eigh (a host count; under the
        on-device policy 0, the count being deferred to :meth:`report_failures`). A factor kept
        as eigenpairs gives its root from them (:meth:`_eigen_root`)."""
        beta2 = group["betas"][1]
        correction = 1.0 if beta2 == 1.0 else 1.0 - beta2**statistics
        if isinstance(correction, torch.Tensor):  # per block: shaped for the (B, d, d) factors
            correction = correction.reshape(-1, 1, 1)
        p = group["exponent_override"] or 2 * len(dims)
        synchronise = self.nonfinite != ON_DEVICE
        factors = {d: state[factor_key(d)] / correction for d in dims if factor_key(d) in state}
        fallbacks = 0

        def compute(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            nonlocal fallbacks
            root, ok, fell_back, count = self._inverse_root(group, p, factor, synchronise)
            if isinstance(count, torch.Tensor):  # Newton without host reads: counted on the device
                warn_later(logger, _FALLBACK_WARNING, count)
            else:
                fallbacks += count
            return root, ok, fell_back

        if self.executor is None:
            roots = {d: compute(factor) for d, factor in factors.items()}
        else:
            roots = self.executor.inverse_roots(compute, factors)
        refreshes = state["refreshes"].clone()
        fell_backs = state["fallbacks"].clone() if "fallbacks" in state else torch.zeros_like(refreshes)
        for position, d in enumerate(dims):
            if d in roots:
                root, ok, fell_back = roots[d]
                state[_root_key(d)] = torch.where(ok[:, None, None], root, state[_root_key(d)])
                fell_backs[:, position] += fell_back.to(fell_backs.dtype)
            else:
                ok = self._eigen_root(group, p, state, d, correction)
            refreshes[:, position] += ok.to(refreshes.dtype)
        state["refreshes"] = refreshes
        state["fallbacks"] = fell_backs
        return fallbacks

    @staticmethod
    def _eigen_root(
        group: dict[str, Any],
        p: float,
        state: MutableMapping[str, torch.Tensor],
        d: int,
        correction: float | torch.Tensor,
    ) -> torch.Tensor:
        """The root of a factor kept as eigenpairs, ``V diag(((λ/c)⁺ + ε)^(-1/p)) Vᵀ`` for the
        eigenbasis V after :data:`~conditioner.optim.eigenpairs.ROOT_RECTIFY_STEPS` Björck steps
        (Wang et al. 2024); blocks whose root is not finite keep their old one, as in
        :meth:`_inverse_root`. Returns the per-block mask of roots replaced."""
        if isinstance(correction, torch.Tensor):  # (B, 1, 1) for the factors: (B, 1) for the eigenvalues
            correction = correction.reshape(-1, 1)
        basis = eigenpairs.rectified_basis(state, d, eigenpairs.ROOT_RECTIFY_STEPS)
        root = inverse_root_from_eigh(state[eigenvalues_key(d)] / correction, basis, p, group["epsilon"])
        ok = torch.isfinite(root).flatten(1).all(1)
        state[_root_key(d)] = torch.where(ok[:, None, None], root, state[_root_key(d)])
        return ok

    @staticmethod
    def _inverse_root(
        group: dict[str, Any], p: float, factor: torch.Tensor, synchronise: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """``(F + εI)^(-1/p)`` of each factor in the stack, whether it can be trusted, whether
        Newton fell back to eigh for it, and the number of those fallbacks (a host integer; with
        ``synchronise=False`` a device count, Newton then reading nothing on the host)."""
        if group["root_method"] == "newton":
            result = newton_root(factor, int(p), group["epsilon"], synchronise=synchronise)
            return result.root, torch.isfinite(result.root).flatten(1).all(1), result.fell_back, result.fallbacks
        eig = safe_eigh(factor)
        root = inverse_root_from_eigh(eig.eigenvalues, eig.eigenvectors, p, group["epsilon"]).to(factor.dtype)
        ok = ~eig.failed & torch.isfinite(root).flatten(1).all(1)
        return root, ok, torch.zeros_like(ok), 0

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
        paired = paired_dims(group, stack)
        # writes go to the first map, which is handed back: entries not read stay encoded
        state = ChainMap(self._initial_state(group, stack, grad), {}) if step == 0 else ChainMap({}, state)
        t = step + 1
        counted = bias_step(t, step, taken, grad)
        beta1, beta2 = group["betas"]
        interval = group["statistics_interval"]
        statistics = t // interval  # gradients the factors hold after this step
        folds = {}
        if t % interval == 0:
            folds = {factor_key(d): (unfold(grad, d), beta2) for d in dims if d not in paired}
            for d in paired:
                eigenpairs.update(state, d, unfold(grad, d), beta2, first=statistics == 1)
        start = group["start_preconditioning_step"]
        refresh = bool(dims) and statistics > 0 and t >= start and (t - start) % group["precondition_frequency"] == 0
        result = StackResult(state.maps[0], scale=learning_rate(group))
        if refresh:
            state.update({key: fold_in(state[key], u, b) for key, (u, b) in folds.items()})
            # on-device policy: each skipped step counted as a statistic missed (exact for an interval of 1)
            held = statistics if taken is None else (statistics - (t - counted.flatten())).clamp_min(1)
            result.fallbacks = self._inverse_roots(group, state, dims, held)
        else:
            result.folds = folds
        grafting = group["grafting"]
        # the grafted method's second moment: s ← κ·s + ω·G², read as s / c2 (AdaGrad: a running sum)
        beta = group["grafting_beta2"]
        keep, weight = beta, 1.0 - beta
        correction2 = 1.0 - beta**counted if grafting == "adam" else 1.0
        correction1 = 1.0 - beta1 ** (counted + 1) if group["nesterov"] else 1.0 - beta1**counted
        precondition = bool(dims) and t >= start
        roots = [state[_root_key(d)] for d in dims if precondition]
        exp_avg, graft_sq, result.update = run_kernel(
            group["compile_kernels"],
            shampoo_direction,
            (grad, state.get("exp_avg"), state.get("graft_sq"), roots),
            (1.0 - beta1, correction1, keep, weight, correction2, group["grafting_epsilon"]),
            dims=tuple(dims),
            nesterov=group["nesterov"],
            grafting=grafting,
            precondition=precondition,
        )
        state.update({k: v for k, v in (("exp_avg", exp_avg), ("graft_sq", graft_sq)) if v is not None})
        return result

    def report_fallbacks(self, count: int) -> None:
        """Log the step's Newton-to-eigh fallbacks in one warning (under sharded state: those of
        the blocks this rank owns)."""
        if count:
            logger.warning(_FALLBACK_WARNING, count)

    def fallback_counts(self) -> dict[str, torch.Tensor]:
        """Inverse roots the Newton iteration did not converge on, so that eigh computed them, per
        stack: ``(blocks, preconditioned dims)`` int64 counts, keyed as :meth:`refresh_counts`."""
        return {
            k: v.get("fallbacks", torch.zeros_like(v["refreshes"])).clone()
            for k, v in self.state.items()
            if isinstance(k, str) and "refreshes" in v
        }

    def total_fallbacks(self) -> int:
        """Newton-to-eigh fallbacks summed over all blocks and factors."""
        return int(sum(int(c.sum()) for c in self.fallback_counts().values()))
