"""The machinery every Kronecker optimizer shares: stacks, checked steps, state handling.

A step first checks that every gradient is finite: one host synchronisation, which also reports
updates withheld by an earlier step (below). A non-finite gradient raises or skips the step, per
``nonfinite``, before anything changes. Then the step works through its stacks in chunks of at
most :data:`CHUNK_ELEMENTS` gradient elements (or one block): each chunk's kernel computes the
new state and the update out of place, the state is written back (a chunk of a stack into its
rows, in place) and the update applied at once, so the memory a step allocates beyond the state
is one chunk's temporaries whatever the model's size. An update that holds NaN or Inf despite
finite gradients (degenerate settings such as ``eps=0``, or overflow) is replaced by zeros on
the device and counted; the next step's check reports it under the policy, so it never reaches
the parameters and is never silent (the state of those blocks did take the step). Weight decay
follows once every chunk is applied. The kernels raise nothing for bad numbers (a failed
decomposition keeps the old basis or root); an exception from elsewhere in the middle of a step,
such as running out of memory, leaves the chunks before it stepped, as in torch's own in-place
optimizers.

Refresh failures (an eigh that could not be trusted; :mod:`conditioner.linalg.deferred`) are
counted on the device under every policy and logged at the next step's check, which reads them
with the gradients' flags (or by :meth:`report_failures`). Two refresh paths still read the host
under ``"raise"`` and ``"skip"``, to save work: the adaptive policy picks its stale blocks
(ECShampoo, one read per refreshed factor) and Newton's roots stop once converged (Shampoo, one
read per iteration); these are the refresh-step exceptions to the one-read budget.

``nonfinite="skip_on_device"`` (:data:`ON_DEVICE`) reads nothing on the host: the gradients'
finiteness is a device bool; each chunk's kernel sees ``where(finite, grad, 0)``, and its state is
written with ``where(finite, new, old)`` (a fold in place weighs the old factor by 1), its update
and the weight decay masked likewise; a non-finite update is withheld as above. The refreshes then
run without host reads too (every block decomposed; Newton for all its iterations). Bias
corrections follow a per-block device count of the steps taken (state entry ``"taken"``), while
``step`` counts the steps attempted and drives the schedule (docs/algorithms.md §0).

Under sharded state the step keeps two phases, since the ranks exchange every update before any
is applied: all chunks are computed out of place, checked together with the gradients, and
committed only then.

State lives per stack, under a string key ``"group{g}/{shape}:{pattern}"`` in ``self.state``:
tensors with a leading dimension of one entry per block, and ``step``, a list with each block's
count of steps taken. ``torch.optim.Optimizer.state_dict`` keeps such keys as they are.

Sharded state (:func:`conditioner.distributed.shard_state`): each rank keeps the state of the
blocks it owns only. :meth:`layout` then holds only those blocks (under the same stack keys, so
the state of a stack has one row per owned block), the kernels run on them alone, and the
``sharding`` object hands each rank only the gradients of its blocks' parameters (under FSDP2 one
all-to-all per step) and exchanges the updates of every block between the ranks (one collective
per step) before any is applied; the finiteness checks see every rank's gradients and updates, so
every rank commits, skips or raises alike.

Storage precision (``state_precision``, :mod:`conditioner.optim.precision`): kernels see the
state decoded to the statistics dtype and return it in that dtype; it is encoded (bfloat16,
4-bit bases) at commit, by the role each optimizer declares for its entries in ``state_roles``.
The optimizer remembers the precision each group's state is encoded in; state loaded from a
checkpoint of another precision, or of a group whose ``state_precision`` was changed, is
decoded and re-encoded (``restate`` adapts the entries) before it is used.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from conditioner.blocks import BlockPolicy, Stack, build_stacks
from conditioner.checks import (
    Check,
    check_betas,
    check_real_tensor,
    choice,
    count,
    dtypes,
    flag,
    in_range,
    optional,
    scalar,
)
from conditioner.distributed.sharded import UpdateBuffers, full_tensor, local_tensor
from conditioner.linalg.deferred import DeferredWarning, deferring_warnings, log_counts, merge_counts
from conditioner.optim.compiled import check_compile_kernels
from conditioner.optim.kronecker import fold_in, fold_in_
from conditioner.optim.precision import Decoded, StoredState, decode, encode, entry_name, stored_form

logger = logging.getLogger(__name__)


def _kind(key: str) -> str:
    """A state entry's key without its dimension (``"root0"`` → ``"root"``), as ``state_roles``
    and ``exact_entries`` name entries."""
    return key.rstrip("0123456789")


#: the policy that decides on the device whether a step is applied (no host synchronisation)
ON_DEVICE = "skip_on_device"
NONFINITE_POLICIES = ("raise", "skip", ON_DEVICE)
#: updates withheld under the on-device policy (:meth:`StackedOptimizer._guarded`), counted on the device
_WITHHELD = DeferredWarning(
    logger.name,
    "%d block update(s) of %s held NaN or Inf (from finite gradients) and were not applied; the state of "
    "those blocks took the step",
    (),
)
#: The most gradient elements one chunk of a step holds (16 MiB in float32; a larger block is a
#: chunk of its own): the memory a step allocates beyond its state is a chunk's, not the model's.
CHUNK_ELEMENTS = 2**22


class NonFiniteGradientError(FloatingPointError):
    """A gradient (or the update it produced) held NaN or Inf; nothing was changed."""


@dataclass
class StackResult:
    """What a kernel hands back for one cohort of a stack.

    ``state``: the new state tensors (fresh tensors, or the old ones where unchanged).
    ``update``: the change to subtract from the parameters, times ``scale`` (a number, or under
    the on-device policy possibly a tensor ``(B, 1, ...)`` of per-block bias corrections); None
    for no update.
    ``folds``: state key → (U, β): fold the gradient into that factor at commit,
    ``F ← β·F + (1 − β)·U Uᵀ`` (β = 1: ``F ← F + U Uᵀ``), in place, the matmul accumulating
    straight into F. Deferring the fold keeps the old factor intact until every check has passed
    and avoids both a temporary product and a copy of the factor.
    ``fallbacks``: decompositions that needed a fallback method (Shampoo: eigh for Newton roots
    that did not converge), counted on the host; reported once per step, at commit.
    """

    state: dict[str, torch.Tensor]
    update: torch.Tensor | None = None
    scale: float | torch.Tensor = 1.0
    folds: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    fallbacks: int = 0


@dataclass
class Update:
    """The update of some blocks of the stack ``key``: ``update`` ``(len(members), *stack.shape)``
    is subtracted from their parameters times ``scale``."""

    key: str
    group: dict[str, Any]
    stack: Stack
    members: list[int]
    update: torch.Tensor
    scale: float | torch.Tensor


class GroupGradients(NamedTuple):
    """A param group's gradients for one step: one full tensor per parameter (the parameter where
    it has none), and the group's statistics dtype, which the blocks are gathered in."""

    tensors: list[torch.Tensor]
    dtype: torch.dtype


@dataclass
class _Pending:
    key: str
    stack: Stack
    group: dict[str, Any]
    members: list[int]
    result: StackResult
    #: the state the kernel read (decoded on demand); a kernel hands back only what it changed
    source: StoredState | None = None


#: Checks of the hyperparameters every stacked optimizer has; subclasses add their own.
COMMON_CHECKS: dict[str, Check] = {
    "lr": scalar(in_range(0.0)),
    "betas": check_betas,
    "weight_decay": in_range(0.0),
    "precondition_frequency": count(1),
    "merge_dims": flag,
    "split_large_dims": flag,
    "precondition_1d": flag,
    "one_sided_above": optional(count(1)),
    "state_dtype": dtypes(
        torch.float32,
        torch.float64,
        hint=" (the statistics and all arithmetic on them, eigh and QR included, run in it; to store "
        "the state in bfloat16 pass state_precision='bfloat16')",
    ),
    "state_precision": choice("full", "bfloat16"),
    "nonfinite": choice(*NONFINITE_POLICIES),
    "compile_kernels": check_compile_kernels,
}


def _consecutive(members: list[int]) -> slice | None:
    """The rows ``members`` as a slice when they follow one another, else None."""
    first = members[0]
    return slice(first, first + len(members)) if members == list(range(first, first + len(members))) else None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b``'s memory seen the same way (a kernel handed a state view back)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def learning_rate(group: dict[str, Any]) -> float:
    """The group's ``lr`` as a float: a number, or a 1-element tensor (torch.optim accepts one; a
    scheduler updates it in place, so it is read at every step)."""
    return float(group["lr"])


def bias_step(t: int, step: int, taken: torch.Tensor | None, like: torch.Tensor) -> int | torch.Tensor:
    """The step number of the bias corrections: the kernel's ``t`` (counted from the host
    ``step``), or under the on-device policy the same offset from each block's count of steps
    taken, as a tensor in ``like``'s dtype shaped ``(B, 1, ...)`` to broadcast against it (at
    least 1: a block whose first, initialising step was skipped corrects its first update as one)."""
    if taken is None:
        return t
    return (taken + (t - step)).clamp_min(1).to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def statistics_dtype(params: Iterable[torch.Tensor], requested: torch.dtype | None) -> torch.dtype:
    """float32 for float32/bfloat16/float16 parameters, float64 when any parameter is float64."""
    if requested is not None:
        return requested
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


class StackedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses give their hyperparameter checks and a functional per-stack kernel.

    Every param group (the defaults, and each group added later) is validated against
    ``checks``: an invalid value raises ValueError naming the argument and what is allowed.
    """

    checks: dict[str, Check] = COMMON_CHECKS
    #: the storage role (see :mod:`conditioner.optim.precision`) of each state entry, by its key
    #: without trailing digits; entries not named are ``"exact"``
    state_roles: dict[str, str] = {}
    #: the other entries a stack's state may hold (exact: counters, eigenvalues), named the same
    #: way; with ``state_roles`` and the step counts, every entry a loaded state may have
    exact_entries: tuple[str, ...] = ()
    #: the name of the option that bounds a factor's dimension (each paper's own spelling)
    max_dim_option = "max_precond_dim"
    #: computes the per-block decompositions of a refresh; None: all on this process, else a
    #: :class:`conditioner.distributed.SpreadRefresh` that spreads them over ranks
    executor: Any = None
    #: None: this process keeps the state of every block; else a
    #: :class:`conditioner.distributed.ShardedState`: the blocks this rank owns, and the exchange
    #: of the updates
    sharding: Any = None

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self.validate(defaults)
        self.nonfinite = defaults["nonfinite"]
        self._layouts: dict[int, list[Stack]] = {}
        self._full_layouts: dict[int, list[Stack]] = {}
        #: per group, the ``state_precision`` its stored state is encoded in
        self._stored_precisions: list[str] = []
        #: per update applied since the last check: was it finite (a device bool; False: withheld)
        self._guards: list[torch.Tensor] = []
        self._forget_device_counts()
        super().__init__(params, defaults)

    def _forget_device_counts(self) -> None:
        #: steps the on-device policy skipped (a device int64 scalar, None before the first step)
        #: and the device counts of the refresh warnings not yet logged (:meth:`report_failures`)
        self._skipped: torch.Tensor | None = None
        self._unreported: dict[DeferredWarning, torch.Tensor] = {}

    def validate(self, options: dict[str, Any]) -> None:
        for name, check in self.checks.items():
            if name in options:
                check(name, options[name])

    def block_policy(self, group: dict[str, Any]) -> BlockPolicy:
        return BlockPolicy(
            max_preconditioner_dim=group[self.max_dim_option],
            split_large_dims=group["split_large_dims"],
            merge_small_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            one_sided_above=group["one_sided_above"],
        )

    def stack_step(
        self,
        group: dict[str, Any],
        stack: Stack,
        state: dict[str, torch.Tensor],
        grad: torch.Tensor,
        step: int,
        taken: torch.Tensor | None = None,
    ) -> StackResult:
        """Return the stack's new state, its update and the factor folds to apply at commit.

        ``state`` holds this cohort's tensors (absent on a block's first step, ``step == 0``);
        ``grad`` is ``(B, *stack.shape)`` in the statistics dtype. ``step`` (a host integer)
        counts the steps the blocks have taken, or under the on-device policy attempted, and
        drives the schedule; ``taken`` is None, or under that policy each block's count of steps
        taken (int64 ``(B,)`` on the device), which the bias corrections follow
        (:func:`bias_step`). Must not modify its inputs.
        """
        raise NotImplementedError

    def restate(self, group: dict[str, Any], stack: Stack, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoded ``state`` of ``stack`` in the entries the group's ``state_precision`` keeps
        (used when the state changes precision); by default the same entries."""
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.forget_layouts()
        self.nonfinite = self.defaults["nonfinite"]
        self._guards = []
        self._forget_device_counts()
        self._stored_precisions = [group.get("state_precision", "full") for group in self.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, after checking the group's options and its
        parameters: a complex (or integer) tensor raises ValueError and nothing is added."""
        self.validate(param_group)
        self._check_parameters(param_group)
        super().add_param_group(param_group)
        self.forget_layouts()
        self._stored_precisions.append(self.param_groups[-1]["state_precision"])

    def _check_parameters(self, param_group: dict[str, Any]) -> None:
        """Refuse tensors that are not real floating point, and a tensor given twice in the group
        (its blocks would be stepped twice; torch only warns), naming each by its group and index
        (and its name when given as ``(name, tensor)``). The factors and moments of a complex
        tensor would need Hermitian algebra this library does not have; a real view of it would
        precondition its real and imaginary parts as unrelated coordinates.

        An iterator of parameters is listed here, in the group, as torch would list it."""
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets with its own message
            params = param_group["params"] = list(params)
        group = len(self.param_groups)
        seen: dict[int, int] = {}
        for i, entry in enumerate(params):
            label = f"param group {group}, params[{i}]"
            if isinstance(entry, tuple) and len(entry) == 2:
                label, entry = f"{label} ({entry[0]!r})", entry[1]
            check_real_tensor(label, entry)
            if id(entry) in seen:
                raise ValueError(f"{label}: is the same tensor as params[{seen[id(entry)]}]; a tensor may appear once")
            seen[id(entry)] = i

    def full_layout(self, group_index: int) -> list[Stack]:
        """Every stack of param group ``group_index``, with all its blocks (cached)."""
        if group_index not in self._full_layouts:
            group = self.param_groups[group_index]
            self._full_layouts[group_index] = build_stacks([p.shape for p in group["params"]], self.block_policy(group))
        return self._full_layouts[group_index]

    def layout(self, group_index: int) -> list[Stack]:
        """The stacks whose state this process keeps: :meth:`full_layout`, or under sharding the
        blocks this rank owns (stacks it owns nothing of left out; cached)."""
        if group_index not in self._layouts:
            stacks = self.full_layout(group_index)
            self._layouts[group_index] = stacks if self.sharding is None else self.sharding.owned(group_index)
        return self._layouts[group_index]

    def forget_layouts(self) -> None:
        """Drop the cached layouts (the parameters, their groups or the sharding changed)."""
        self._layouts = {}
        self._full_layouts = {}

    def stack_rows(self, key: str) -> tuple[int, list[int]]:
        """For the stack ``key`` this process keeps state of: its number of blocks in all, and the
        index among them of each row of its state here (all of them unless sharded)."""
        for group_index in range(len(self.param_groups)):
            for stack in self.full_layout(group_index):
                if self.stack_key(group_index, stack) == key:
                    rows = list(range(len(stack.blocks))) if self.sharding is None else self.sharding.rows(key)
                    return len(stack.blocks), rows
        raise ValueError(f"key: these parameters have no block stack {key!r}")

    def stack_key(self, group_index: int, stack: Stack) -> str:
        return f"group{group_index}/{stack.key}"

    def _cohorts(self, key: str, stack: Stack, has_grad: list[bool]) -> list[list[int]]:
        """Members with a gradient, grouped by their step count (usually one cohort: all)."""
        steps = self.state.get(key, {}).get("step", [0] * len(stack.blocks))
        by_step: dict[int, list[int]] = {}
        for m, block in enumerate(stack.blocks):
            if has_grad[block.param_index]:
                by_step.setdefault(steps[m], []).append(m)
        return list(by_step.values())

    def _gradients(self) -> dict[int, GroupGradients]:
        """Per param group with a gradient, the full gradient of each parameter (the parameter
        itself where it has none) and the group's statistics dtype: a DTensor's gradient is
        all-gathered, or under sharding fetched only by the ranks that own one of its blocks
        (:meth:`ShardedState.gradients`)."""
        for group_index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.grad is not None and p.is_meta:
                    raise ValueError(
                        f"param group {group_index}, params[{i}]: is on the meta device, which holds no values to "
                        "step; materialise the parameters in place first (torch.__future__."
                        "set_swap_module_params_on_conversion(True), then module.to_empty(device=...))"
                    )
        routed = None if self.sharding is None else self.sharding.gradients()
        grads = {}
        for group_index, group in enumerate(self.param_groups):
            params = group["params"]
            if any(p.grad is not None for p in params):
                tensors = (
                    [full_tensor(p.grad) if p.grad is not None else p for p in params]
                    if routed is None
                    else routed[group_index]
                )
                grads[group_index] = GroupGradients(tensors, statistics_dtype(params, group.get("state_dtype")))
        return grads

    def _plan(self, grads: dict[int, GroupGradients]) -> list[tuple[int, Stack, list[int]]]:
        """The chunks a step works through: (group index, stack, members), members of one cohort
        (blocks with a gradient and equal step counts) holding at most :data:`CHUNK_ELEMENTS`
        elements of gradient, or one block."""
        plan = []
        for group_index in grads:
            has_grad = [p.grad is not None for p in self.param_groups[group_index]["params"]]
            for stack in self.layout(group_index):
                per_chunk = max(1, CHUNK_ELEMENTS // math.prod(stack.shape))
                for members in self._cohorts(self.stack_key(group_index, stack), stack, has_grad):
                    plan.extend(
                        (group_index, stack, members[i : i + per_chunk]) for i in range(0, len(members), per_chunk)
                    )
        return plan

    @staticmethod
    def _gather(group_index: int, stack: Stack, members: list[int], grads: dict[int, GroupGradients]) -> torch.Tensor:
        tensors, dtype = grads[group_index]
        return stack.gather(tensors, members, dtype)

    def _gradient_norms(self, grads: dict[int, GroupGradients]) -> list[torch.Tensor]:
        """The norm of every gradient in its group's statistics dtype (one fused call per group); a
        gradient whose squares overflow, and would poison the statistics, has an infinite norm too."""
        norms: list[torch.Tensor] = []
        for group_index, (tensors, dtype) in grads.items():
            params = self.param_groups[group_index]["params"]
            present = [g for g, p in zip(tensors, params) if p.grad is not None and g.numel()]
            if present:
                norms.extend(torch._foreach_norm(present, 2, dtype=dtype))
        return norms

    def _allowed(self, finite: bool, what: str) -> bool:
        """Go on when ``finite``; otherwise raise or warn, per the policy."""
        if finite:
            return True
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"{type(self).__name__}: {what} holds NaN or Inf; parameters and optimizer state were "
                "left unchanged (pass nonfinite='skip' to skip such steps)"
            )
        logger.warning("%s: skipped a step because %s holds NaN or Inf", type(self).__name__, what)
        return False

    def _checked(self, norms: list[torch.Tensor]) -> bool:
        """The step's one host synchronisation: are the gradients finite, were updates of an
        earlier step withheld (:meth:`_guarded`), and how many refreshes of earlier steps failed
        (logged here)? Withheld updates are reported here, under the policy, and forgotten; a
        non-finite gradient raises or skips the step before anything changes."""
        flags = [torch.stack(norms).isfinite().all().to(torch.int64)] if norms else []
        if self._guards:
            flags.append((~torch.stack(self._guards)).sum())
        warnings = list(self._unreported)
        flags.extend(self._unreported[w] for w in warnings)
        if not flags:
            return True
        values = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        withheld = values[len(flags) - len(warnings) - 1] if self._guards else 0
        self._guards = []
        self._unreported = {}
        log_counts(dict(zip(warnings, values[len(flags) - len(warnings) :])))
        if withheld:
            message = (
                f"{type(self).__name__}: {withheld} block update(s) of an earlier step held NaN or Inf "
                "(from finite gradients) and were not applied; the state of those blocks took the step"
            )
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(message + "; nothing was changed in this step")
            logger.warning(message)
        return not norms or self._allowed(bool(values[0]), "a gradient")

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` re-evaluates the model and returns the loss.

        Never traced by ``torch.compile``: in a compiled training step it runs as it is (one graph
        break), since tracing its host bookkeeping (step counts in lists) would recompile it at
        every step; its per-stack math is compiled by the ``compile_kernels`` option instead."""
        self._convert_precisions()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._gradients()
        plan = self._plan(grads)
        if self.sharding is None:
            finite = None
            with deferring_warnings() as warnings:
                if self.nonfinite == ON_DEVICE:
                    finite = self._step_on_device(plan, grads)
                elif self._checked(self._gradient_norms(grads)):
                    self._step_in_chunks(plan, grads)
            self._hold(warnings, finite)
            return loss
        work = [(g, stack, members, self._gather(g, stack, members, grads)) for g, stack, members in plan]
        finite = self._finite([torch.linalg.vector_norm(grad) for *_, grad in work])
        with deferring_warnings() as warnings:
            pending = self._compute(work) if finite else []
        self._hold(warnings, None)
        finite, updates = self.sharding.exchange(self._updates(pending), finite)
        if not self._allowed(finite, "a gradient"):
            return loss
        if not self._allowed(self._finite([u.update.sum() for u in updates]), "an update"):
            return loss
        buffers, decayed = UpdateBuffers(), {}
        for item in pending:
            self._store(item)
        self._apply_updates(updates, buffers, decayed)
        self._finish(sum(item.result.fallbacks for item in pending), buffers, decayed)
        return loss

    def _step_on_device(
        self, plan: list[tuple[int, Stack, list[int]]], grads: dict[int, GroupGradients]
    ) -> torch.Tensor | None:
        """The step under the on-device policy: the gradients' finiteness stays a device bool
        (returned; None without gradients), and every chunk is committed masked by it. Updates
        withheld by :meth:`_guarded` are counted with the refresh warnings (:meth:`report_failures`)."""
        norms = self._gradient_norms(grads)
        if not norms:
            return None
        finite = torch.stack(norms).isfinite().all()
        self._step_in_chunks(plan, grads, finite)
        skipped = (~finite).to(torch.int64)
        self._skipped = skipped if self._skipped is None else self._skipped + skipped
        if self._guards:
            withheld = (~torch.stack(self._guards)).sum()
            self._guards = []
            self._add_unreported(_WITHHELD, withheld, type(self).__name__)
        return finite

    def _step_in_chunks(
        self,
        plan: list[tuple[int, Stack, list[int]]],
        grads: dict[int, GroupGradients],
        finite: torch.Tensor | None = None,
    ) -> None:
        """Compute and commit chunk after chunk: the memory a step allocates beyond the state is
        one chunk's, whatever the model's size. The gradients were checked, or (on-device policy)
        ``finite`` says on the device whether they are: the kernels then see zeros for them when
        they are not, and the commit leaves state, parameters and decay as they were."""
        buffers: UpdateBuffers = UpdateBuffers()
        decayed: dict[int, tuple[torch.Tensor, float]] = {}
        fallbacks = 0
        for group_index, stack, members in plan:
            grad = self._gather(group_index, stack, members, grads)
            if finite is not None:
                grad = torch.where(finite, grad, 0.0)
            [item] = self._compute([(group_index, stack, members, grad)])
            del grad
            self._store(item, finite)
            fallbacks += item.result.fallbacks
            updates = self._updates([item])
            del item  # the chunk's new state is stored: let its temporaries go before the update
            self._apply_updates(self._guarded(updates, finite), buffers, decayed)
        self._finish(fallbacks, buffers, decayed, finite)

    def _guarded(self, updates: list[Update], finite: torch.Tensor | None = None) -> list[Update]:
        """The updates, each that holds NaN or Inf replaced by zeros, counted on the device (no
        synchronisation) and reported at the next step's check. From finite gradients and state
        this takes degenerate settings (``eps=0`` with a coordinate that never moved) or
        overflow; the parameters never see the values. ``finite`` (on-device policy): zeros too
        where the gradients were not finite."""
        for change in updates:
            ok = change.update.sum().isfinite()  # a sum is NaN or Inf when any term is (or overflows)
            self._guards.append(ok if finite is None else ok | ~finite)
            # In place: a kernel's update is its own tensor (or a finite gradient, left as it is).
            change.update.masked_fill_(~(ok if finite is None else ok & finite), 0.0)
        return updates

    def _add_unreported(self, warning: DeferredWarning, count: torch.Tensor, *args: object) -> None:
        if args:
            warning = DeferredWarning(warning.logger, warning.message, args)
        previous = self._unreported.get(warning)
        self._unreported[warning] = count if previous is None else previous + count.to(previous.device)

    def _hold(self, warnings: list[tuple[DeferredWarning, torch.Tensor]], finite: torch.Tensor | None) -> None:
        """Keep the device counts of a step's deferred warnings until they are read (the next
        step's check, or :meth:`report_failures`); a step the on-device policy skipped adds none."""
        for warning, found in merge_counts(warnings).items():
            self._add_unreported(warning, found if finite is None else torch.where(finite, found, 0))

    def skipped_steps(self) -> torch.Tensor:
        """How many steps the on-device policy skipped since this optimizer was built (or copied,
        or unpickled; the count is not part of the state dict): an int64 scalar on the
        parameters' device, handed over without waiting; reading its value (``int(...)``) waits
        for the device. Zero under the other policies, which skip on the host (with a warning)
        or raise."""
        if self._skipped is None:
            return torch.zeros((), dtype=torch.int64)
        return self._skipped.clone()

    def report_failures(self) -> dict[str, int]:
        """Log the warnings held on the device and not yet logged (decompositions that failed,
        inverse roots that fell back to eigh, updates withheld under the on-device policy; only
        those of steps applied) and forget them. One host synchronisation; returns each
        warning's message with its positive count. Under ``"raise"`` and ``"skip"`` the next
        step's check logs them anyway; the on-device policy has no such check."""
        if not self._unreported:
            return {}
        warnings = list(self._unreported)
        first = self._unreported[warnings[0]].device
        values = torch.stack([self._unreported[w].to(first) for w in warnings]).tolist()
        self._unreported = {}
        counts = dict(zip(warnings, values))
        log_counts(counts)
        return {w.message % (c, *w.args): c for w, c in counts.items() if c > 0}

    @staticmethod
    def _finite(tensors: list[torch.Tensor]) -> bool:
        """One host synchronisation: are all ``tensors`` finite?"""
        return not tensors or bool(torch.stack(tensors).isfinite().all())

    @staticmethod
    def _updates(pending: list[_Pending]) -> list[Update]:
        return [
            Update(item.key, item.group, item.stack, item.members, item.result.update, item.result.scale)
            for item in pending
            if item.result.update is not None
        ]

    def _compute(self, work: list[tuple[int, Stack, list[int], torch.Tensor]]) -> list[_Pending]:
        """Every cohort's new state and update, out of place."""
        pending = []
        for group_index, stack, members, grad in work:
            group = self.param_groups[group_index]
            key = self.stack_key(group_index, stack)
            stored = self.state.get(key, {})
            step = stored.get("step", [0] * len(stack.blocks))[members[0]]
            old = self._select(stored, members, len(stack.blocks)) if step > 0 else {}
            taken = old.pop("taken", None)
            if self.nonfinite != ON_DEVICE:
                taken = None
            elif taken is None:  # a first step: steps taken = steps attempted = 0
                taken = torch.full((len(members),), step, dtype=torch.int64, device=grad.device)
            working = StoredState(old, grad.dtype)
            result = self.stack_step(group, stack, working, grad, step, taken)
            pending.append(_Pending(key, stack, group, members, result, working))
        return pending

    @staticmethod
    def _select(stored: dict[str, Any], members: list[int], size: int) -> dict[str, torch.Tensor]:
        """The rows of ``members`` of each stored tensor: views when they are consecutive."""
        rows = _consecutive(members)
        if rows is not None:
            return {k: v[rows] for k, v in stored.items() if k != "step"}
        index = torch.tensor(members)
        return {k: v.index_select(0, index.to(v.device)) for k, v in stored.items() if k != "step"}

    def _check_entries(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything is loaded, a stack state with an entry this optimizer does not
        keep (saved by another optimizer, or by a version that stored it otherwise)."""
        known = {*self.state_roles, *self.exact_entries, "step", "taken"}
        for key, stored in state_dict.get("state", {}).items():
            if not isinstance(key, str):
                continue
            unknown = sorted({n for n in map(entry_name, stored) if _kind(n) not in known})
            if unknown:
                raise ValueError(
                    f"state_dict: the state of {key!r} has entries {unknown} that {type(self).__name__} does not "
                    f"keep (its entries: {sorted(known)}); was it saved by another optimizer, or another version?"
                )

    def state_role(self, key: str) -> str:
        return self.state_roles.get(_kind(key), "exact")

    def _encode(self, item: _Pending) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, float]]]:
        """The entries to store for a kernel's result, and the folds still to apply in place.

        A fold goes in place only into a tensor stored as it is; any other is folded into the
        working tensor first and then encoded. A working tensor the kernel handed back unchanged,
        under its own key or another (a 4-bit basis adopting a tracked eigenbasis), keeps the
        entries it was decoded from, so that a stored basis is not quantised again; a new tensor
        stored under two keys is encoded once.
        """
        precision = item.group.get("state_precision", "full")
        result = item.result
        if precision == "full":
            return result.state, result.folds
        working = dict(result.state)
        decoded: Decoded = {} if item.source is None else item.source.decoded
        in_place = {}
        for k, (unfolded, beta) in result.folds.items():
            target = working[k] if k in working else item.source[k]
            if stored_form(self.state_role(k), precision, target) == "as-is" and k not in decoded:
                in_place[k] = (unfolded, beta)
            else:
                working[k] = fold_in(target, unfolded, beta)
        sources = {
            (id(v), stored_form(self.state_role(name), precision, v)): (name, stored)
            for name, (v, stored) in decoded.items()
        }
        entries: dict[str, torch.Tensor] = {}
        for k, v in working.items():
            form = stored_form(self.state_role(k), precision, v)
            if (id(v), form) not in sources:
                sources[id(v), form] = (k, encode(k, v, form))
            name, stored = sources[id(v), form]
            entries.update({k + entry[len(name) :]: value for entry, value in stored.items()})
        return entries, in_place

    def _store(self, item: _Pending, finite: torch.Tensor | None = None) -> None:
        """Write a chunk's new state and fold its gradient into the factors, and count its step.
        A whole stack's entries replace the stored ones; a chunk of a stack is written into its
        rows in place (a tensor the kernel handed back as it was is left alone).

        ``finite`` (on-device policy): a device bool; where it is False every entry keeps its
        old value (``torch.where``; a fold in place weighs the factor by 1 and adds a zeroed
        gradient) and the count of steps taken (``"taken"``) does not advance. The host ``step``
        counts advance either way."""
        entries, folds = self._encode(item)
        stored = self.state.setdefault(item.key, {})
        size = len(item.stack.blocks)
        steps = stored.get("step", [0] * size)
        members = item.members
        rows = _consecutive(members)
        if finite is not None:
            taken = stored.get("taken")
            if taken is None:
                taken = torch.zeros(size, dtype=torch.int64, device=finite.device)
            entries = {**entries, "taken": self._select({"taken": taken}, members, size)["taken"] + finite}
            folds = {k: (torch.where(finite, u, 0.0), beta) for k, (u, beta) in folds.items()}
        if len(members) == size:
            for k, v in entries.items():
                old = stored.get(k)
                keep = finite is None or old is None or _same_memory(v, old)
                stored[k] = v if keep else torch.where(finite, v, old)
            for k, (unfolded, beta) in folds.items():
                fold_in_(stored[k], unfolded, beta, finite)
        elif rows is not None:
            for k, v in entries.items():
                if k not in stored:
                    stored[k] = v.new_zeros((size,) + tuple(v.shape[1:]))
                target = stored[k][rows]
                if not _same_memory(v, target):
                    target.copy_(v if finite is None else torch.where(finite, v, target))
            for k, (unfolded, beta) in folds.items():
                fold_in_(stored[k][rows], unfolded, beta, finite)
        else:
            # a kernel hands back only what it changed: a factor it only folds is read here
            folded = {
                k: fold_in(entries[k] if k in entries else item.source[k], unfolded, beta)
                for k, (unfolded, beta) in folds.items()
            }
            index = torch.tensor(members)
            for k, v in {**entries, **folded}.items():
                if k not in stored:
                    stored[k] = v.new_zeros((size,) + tuple(v.shape[1:]))
                if finite is not None:
                    v = torch.where(finite, v, stored[k].index_select(0, index.to(v.device)))
                stored[k].index_copy_(0, index.to(v.device), v)
        stored["step"] = [s + 1 if m in members else s for m, s in enumerate(steps)]

    @staticmethod
    def _apply_updates(
        updates: list[Update], buffers: UpdateBuffers, decayed: dict[int, tuple[torch.Tensor, float]]
    ) -> None:
        """Subtract the updates from their parameters' blocks (through ``buffers`` where a block
        is no view of its parameter) and note each parameter's weight decay in ``decayed``."""
        moves: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for change in updates:
            params = change.group["params"]
            tensors = buffers.targets(params, [change.stack.blocks[m] for m in change.members])
            views = change.stack.views(tensors, change.members)
            update, scale = change.update, change.scale
            if isinstance(scale, torch.Tensor):  # per-block bias corrections (on-device policy)
                update, scale = update * scale, 1.0
            targets, deltas = moves.setdefault(-scale, ([], []))
            targets.extend(views)
            deltas.extend(u.to(v.dtype) for u, v in zip(update.unbind(0), views))
            factor = 1.0 - learning_rate(change.group) * change.group["weight_decay"]
            for m in change.members:
                p = params[change.stack.blocks[m].param_index]
                decayed[id(p)] = (p, factor)
        for alpha, (targets, deltas) in moves.items():
            torch._foreach_add_(targets, deltas, alpha=alpha)

    def _finish(
        self,
        fallbacks: int,
        buffers: UpdateBuffers,
        decayed: dict[int, tuple[torch.Tensor, float]],
        finite: torch.Tensor | None = None,
    ) -> None:
        """After every chunk: write the staged parameters back, decay the weights (under the
        on-device policy by 1 where ``finite`` is False), and report the step's fallbacks
        (:meth:`report_fallbacks`)."""
        buffers.apply()
        by_factor: dict[float, list[torch.Tensor]] = {}
        for p, factor in decayed.values():
            if factor != 1.0:
                by_factor.setdefault(factor, []).append(local_tensor(p))
        for factor, params in by_factor.items():
            if finite is None:
                torch._foreach_mul_(params, factor)
                continue
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p)
            for dtype, same in by_dtype.items():
                kept = torch.full((), factor, dtype=dtype, device=finite.device)
                torch._foreach_mul_(same, torch.where(finite, kept, 1.0))
        self.report_fallbacks(fallbacks)

    def report_fallbacks(self, count: int) -> None:
        """Log the decompositions of one step that needed a fallback method; none by default."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; stack state is copied onto the parameters'
        device and checked against this optimizer's blocks.

        Hyperparameters come from the checkpoint, as in torch.optim, except ``state_precision``:
        each group keeps the precision this optimizer was built with (the one asked for now), and
        state saved in another precision is converted to it (for example a full-precision
        checkpoint resumed with 4-bit bases to save memory, or back), and ``compile_kernels``, a
        choice of how this process runs the step rather than of what it computes. Options newer
        than the checkpoint take this optimizer's defaults.
        """
        self._check_entries(state_dict)
        precisions = [group["state_precision"] for group in self.param_groups]
        compiling = [group["compile_kernels"] for group in self.param_groups]
        saved = [group.get("state_precision", "full") for group in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        self.forget_layouts()
        self._stored_precisions = saved
        for group, precision, compile_kernels in zip(self.param_groups, precisions, compiling):
            for name in self.checks.keys() & self.defaults.keys():
                group.setdefault(name, self.defaults[name])
            group["state_precision"] = precision
            group["compile_kernels"] = compile_kernels
        for group_index, group in enumerate(self.param_groups):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            stacks = {self.stack_key(group_index, s): s for s in self.layout(group_index)}
            for key in [k for k in self.state if isinstance(k, str) and k.startswith(f"group{group_index}/")]:
                if key not in stacks:
                    raise ValueError(f"loaded state has block stack {key!r}, which these parameters do not have")
                size = len(stacks[key].blocks)
                loaded = self.state[key]
                if len(loaded.get("step", [])) != size:
                    raise ValueError(
                        f"loaded state for {key!r} has {len(loaded.get('step', []))} blocks, expected {size}"
                    )
                self.state[key] = self._count_steps_for_policy(
                    {
                        k: v.detach().clone().to(device) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in loaded.items()
                    }
                )
        self._convert_precisions()

    def _count_steps_for_policy(self, state: dict[str, Any]) -> dict[str, Any]:
        """Loaded stack state as this optimizer's policy counts steps: under the on-device policy
        a device count ``"taken"`` next to ``step`` (from ``step`` when the checkpoint was saved
        under another policy, where the two agree); under the others ``step`` alone, now the
        steps taken (a checkpoint of the on-device policy counted the steps attempted)."""
        taken = state.get("taken")
        if self.nonfinite == ON_DEVICE and taken is None and "step" in state:
            device = next((v.device for v in state.values() if isinstance(v, torch.Tensor)), None)
            state["taken"] = torch.tensor(state["step"], dtype=torch.int64, device=device)
        elif self.nonfinite != ON_DEVICE and taken is not None:
            state["step"] = [int(t) for t in state.pop("taken").tolist()]
        return state

    def _convert_precisions(self) -> None:
        """Re-encode the state of every group whose ``state_precision`` differs from the one its
        state is stored in (after :meth:`load_state_dict`, or after ``param_groups[i]
        ["state_precision"]`` was changed): decode it, bring it to the entries the new precision
        keeps (:meth:`restate`), encode it."""
        for group_index, group in enumerate(self.param_groups):
            precision = group["state_precision"]
            if precision == self._stored_precisions[group_index]:
                continue
            self.validate({"state_precision": precision})
            dtype = statistics_dtype(group["params"], group.get("state_dtype"))
            for stack in self.layout(group_index):
                key = self.stack_key(group_index, stack)
                stored = self.state.get(key)
                if not stored:
                    continue
                counts = {k: stored[k] for k in ("step", "taken") if k in stored}
                working, _ = decode({k: v for k, v in stored.items() if k not in counts}, dtype)
                entries: dict[str, Any] = {}
                for k, v in self.restate(group, stack, working).items():
                    entries.update(encode(k, v, stored_form(self.state_role(k), precision, v)))
                self.state[key] = {**entries, **counts}
            self._stored_precisions[group_index] = precision

    def refresh_counts(self) -> dict[str, torch.Tensor]:
        """Basis (or inverse-root) refreshes so far per stack: ``(blocks, preconditioned dims)`` int64 counts."""
        return {k: v["refreshes"].clone() for k, v in self.state.items() if isinstance(k, str) and "refreshes" in v}

    def total_refreshes(self) -> int:
        """Refreshes (one per factor recomputed) summed over all blocks."""
        return int(sum(int(c.sum()) for c in self.refresh_counts().values()))

    def state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors."""
        total = 0
        for value in self.state.values():
            for v in value.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total
