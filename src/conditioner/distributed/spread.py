"""Spreading the eigenbasis (or inverse-root) refresh over the ranks of a process group.

Under data parallelism every rank holds the same averaged gradient, hence the same Kronecker
factors and the same refresh decisions. Refreshing every factor on every rank would repeat the
most expensive part of the step ``world_size`` times. :class:`SpreadRefresh` instead assigns each
(block, factor) of a stack to one rank by longest-processing-time first on the estimated cost
``d³``, lets each rank decompose its share with the optimizer's own, unchanged refresh function,
packs all its results into one flat buffer and exchanges the buffers with ONE all-gather
(``all_gather_single``, formerly ``all_gather_into_tensor``) per stack refreshed. Loads carry
over from stack to stack within an optimizer step (and are reset at the start of each step), so
the step as a whole is balanced.

Nothing here is specific to a backend: the same code runs on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from conditioner.distributed.assignment import assign_lpt, decomposition_cost

Spec = tuple[tuple[int, ...], torch.dtype]
# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); keep older torch working
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class BlockWork(NamedTuple):
    """One batch of independent per-block work: ``inputs`` stacked along dim 0 (one row per
    block), the shape and dtype of each per-block ``outputs``, the ``cost`` of one block."""

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[Spec, ...]
    cost: float


class SpreadRefresh:
    """Computes per-block work on the rank that owns the block and gathers the results everywhere.

    ``computed`` counts the (block, factor) items this rank computed itself, ``exchanges`` the
    collectives it issued; both let tests and benchmarks check that the work is really split.
    Integer and boolean outputs travel in the buffer's floating dtype, exact below 2²⁴.
    """

    def __init__(self, process_group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("SpreadRefresh needs torch.distributed: call torch.distributed.init_process_group first")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.computed = 0
        self.exchanges = 0
        self._loads = [0.0] * self.world_size

    def start_step(self) -> None:
        """Forget the loads of the previous step (the assignment depends on this step alone)."""
        self._loads = [0.0] * self.world_size

    def run(
        self, fn: Callable[..., tuple[torch.Tensor, ...]], work: dict[Hashable, BlockWork]
    ) -> dict[Hashable, list[torch.Tensor]]:
        """``fn(key, *inputs_of_some_blocks)`` for every task, each block on its owner; returns for
        every key its outputs for all blocks, in block order, identical on every rank."""
        keys = [k for k in work if work[k].inputs[0].shape[0] > 0]
        if not keys:
            return {}
        items = [(k, b) for k in keys for b in range(work[k].inputs[0].shape[0])]
        owners = assign_lpt([work[k].cost for k, _ in items], self._loads)
        owned: dict[Hashable, list[list[int]]] = {k: [[] for _ in range(self.world_size)] for k in keys}
        for (k, b), r in zip(items, owners):
            owned[k][r].append(b)
        first = work[keys[0]].inputs[0]
        dtype = first.dtype if first.is_floating_point() else torch.float32
        width = {k: sum(math.prod(shape) for shape, _ in work[k].outputs) for k in keys}
        sizes = [sum(len(owned[k][r]) * width[k] for k in keys) for r in range(self.world_size)]
        longest = max(sizes)

        send = first.new_zeros(longest, dtype=dtype)
        offset = 0
        for k in keys:
            mine = owned[k][self.rank]
            if not mine:
                continue
            index = torch.tensor(mine, device=first.device)
            outputs = fn(k, *(x.index_select(0, index) for x in work[k].inputs))
            packed = torch.cat([o.reshape(len(mine), -1).to(dtype) for o in outputs], dim=1).flatten()
            send[offset : offset + packed.numel()] = packed
            offset += packed.numel()
            self.computed += len(mine)
        received = first.new_empty(longest * self.world_size, dtype=dtype)
        _all_gather_single(received, send, group=self.process_group)
        self.exchanges += 1
        return self._unpack(work, keys, owned, width, received.view(self.world_size, longest))

    def _unpack(
        self,
        work: dict[Hashable, BlockWork],
        keys: list[Hashable],
        owned: dict[Hashable, list[list[int]]],
        width: dict[Hashable, int],
        received: torch.Tensor,
    ) -> dict[Hashable, list[torch.Tensor]]:
        results = {}
        for k in keys:
            count = work[k].inputs[0].shape[0]
            device = work[k].inputs[0].device
            results[k] = [torch.empty((count, *shape), dtype=dt, device=device) for shape, dt in work[k].outputs]
        for r in range(self.world_size):
            offset = 0
            for k in keys:
                blocks = owned[k][r]
                if not blocks:
                    continue
                rows = received[r, offset : offset + len(blocks) * width[k]].view(len(blocks), width[k])
                offset += len(blocks) * width[k]
                index = torch.tensor(blocks, device=rows.device)
                column = 0
                for (shape, dt), out in zip(work[k].outputs, results[k]):
                    size = math.prod(shape)
                    out.index_copy_(0, index, rows[:, column : column + size].reshape(len(blocks), *shape).to(dt))
                    column += size
        return results

    def new_bases(
        self,
        refresh: Callable[[dict[int, torch.Tensor], dict[int, torch.Tensor]], tuple[dict, dict, dict]],
        factors: dict[int, torch.Tensor],
        bases: dict[int, torch.Tensor],
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """``refresh(factors, bases)`` (an eigen-Adam ``new_bases``) computed block by block on
        the owners: the same bases, changed masks and sort orders, for the dims where any block
        changed (as the refresh itself reports them, or its basis differs: a refresh may reorder
        a basis's columns without counting a decomposition)."""

        def one(dim: int, factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
            new, changed, orders = refresh({dim: factor}, {dim: basis})
            count, size = factor.shape[0], factor.shape[-1]
            unchanged = torch.zeros(count, dtype=torch.int64, device=factor.device)
            identity = torch.arange(size, device=factor.device).expand(count, size)
            return new.get(dim, basis), changed.get(dim, unchanged), orders.get(dim, identity)

        work = {
            d: BlockWork(
                (f, bases[d]), (((n, n), bases[d].dtype), ((), torch.int64), ((n,), torch.int64)), decomposition_cost(n)
            )
            for d, f in factors.items()
            for n in [f.shape[-1]]
        }
        results = self.run(one, work)
        any_changed = (
            torch.stack([mask.any() | (basis != bases[d]).any() for d, (basis, mask, _) in results.items()]).tolist()
            if results
            else []
        )
        new, changed, orders = {}, {}, {}
        for (d, (basis, mask, order)), keep in zip(results.items(), any_changed):
            if keep:
                new[d], changed[d], orders[d] = basis, mask, order
        return new, changed, orders

    def inverse_roots(
        self,
        root: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        factors: dict[int, torch.Tensor],
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``root(factor)`` → (inverse root, ok mask, fell-back mask) for every dim's factors,
        block by block on the owners."""
        work = {
            d: BlockWork((f,), (((n, n), f.dtype), ((), torch.bool), ((), torch.bool)), decomposition_cost(n))
            for d, f in factors.items()
            for n in [f.shape[-1]]
        }
        return {d: tuple(out) for d, out in self.run(lambda d, f: root(f), work).items()}


def spread_refresh(optimizer: torch.optim.Optimizer, process_group: Any = None) -> SpreadRefresh:
    """Make ``optimizer`` (SOAP, EigenvalueCorrectedShampoo or Shampoo) spread its refreshes over
    the ranks of ``process_group`` (default: the world). Every rank must hold the same gradients
    (DDP, or FSDP2 whose gradients the optimizer gathers) and call ``step()`` in lockstep.
    Returns the executor, whose ``computed`` counter says how much this rank decomposed."""
    if not hasattr(optimizer, "executor"):
        raise TypeError(f"optimizer must be a conditioner optimizer, got {type(optimizer).__name__}")
    if optimizer.sharding is not None:
        raise ValueError("optimizer: its state is sharded (shard_state), where each block's owner refreshes it")
    executor = SpreadRefresh(process_group)
    optimizer.executor = executor
    optimizer.register_step_pre_hook(lambda *_: executor.start_step())
    return executor
