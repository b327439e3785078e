"""Sharded optimizer state: each rank owns a share of the blocks, keeps their state only, computes
only their updates, and the ranks exchange the updates with one all-gather per step.

Ownership: every block of every stack of every param group is one item of cost
:func:`~conditioner.distributed.assignment.block_cost` (``Σ d³`` over its factors plus its
elements), assigned by :func:`~conditioner.distributed.assignment.assign_lpt` group after group,
the loads carried over (balanced over all groups, and a group added later leaves the earlier
groups' blocks where they are). Every rank computes the same assignment from the same shapes, so agreeing on it needs no
communication; a rank may own nothing (more ranks than blocks), and a block costlier than a
rank's fair share simply makes its owner the most loaded rank.

The optimizer then sees only its owned blocks (:meth:`StackedOptimizer.layout`), so its state,
its kernels, the first decomposition of SOAP and every refresh run on the owned blocks alone.
After the kernels, :meth:`ShardedState.exchange` packs this rank's updates into ONE flat buffer
(one dtype: the widest statistics dtype of the groups, float32 unless a group computes in
float64; a float32 update travels exactly in float64) and all-gathers the buffers. Each rank's
buffer holds a flag saying whether its gradients were finite, then per owned block with a
gradient whether it has an update and its step scale, then the updates themselves. Every rank
then applies every block's update with the same arithmetic as one process, so the parameters
stay replicated (DDP) or each rank updates its own shard (FSDP2).

Gradients (:meth:`ShardedState.gradients`). Under DDP they are averaged already and a rank reads
only its owned blocks. Under FSDP2 a rank needs the full gradient of a parameter only if it owns
one of its blocks (a block is a tile that may straddle the shards of several ranks): every rank
sends its local shard of each gradient to those owners only, in ONE ``all_to_all_single`` per
step and gradient dtype, and each owner concatenates the shards (uneven or empty ones included)
into the full gradient; the other ranks get nothing of it. A DTensor gradient not sharded in one
dimension over this process group's ranks (replicated, a 2-D mesh) is all-gathered as without
sharding. The update exchange then replaces the full update every rank computed before.

Failures. A rank that raises in its kernels, dies, or stops calling ``step()`` leaves the others
waiting in the all-gather; ``timeout`` (or else the process group's own timeout, 30 minutes by
default for gloo, 10 for NCCL) bounds the wait, after which a RuntimeError names the step and the
rank. Nothing has been applied by then: the exchanges come before any state or parameter changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from conditioner.blocks import Stack
from conditioner.distributed.assignment import assign_lpt, block_cost
from conditioner.distributed.sharded import full_tensor, is_sharded
from conditioner.distributed.spread import _all_gather_single

#: (key of the full stack, index of the block in it, the stack, its group): one block's place
Slot = tuple[str, int, Stack, dict[str, Any]]
#: (the list the full gradient goes into, its index there, the DTensor gradient, its sharded
#: dimension, the ranks that read it): one gradient's route
Route = tuple[list[torch.Tensor | None], int, torch.Tensor, int, set[int]]


class ShardedState:
    """Block ownership and the update exchange for one optimizer on the ranks of a process group.

    ``updated`` counts the blocks whose update this rank computed, ``exchanges`` the update
    exchanges it took part in (one per step) and ``received_bytes`` what they brought in (the
    padded buffers of all ranks, its own included); ``gradient_bytes`` what the gradient
    all-to-alls brought in (the shards of the gradients it reads, its own included).
    """

    def __init__(self, optimizer: Any, process_group: Any = None, timeout: timedelta | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard_state needs torch.distributed: call torch.distributed.init_process_group first")
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout <= timedelta(0)):
            raise ValueError(f"timeout: must be None or a positive datetime.timedelta, got {timeout!r}")
        self.optimizer = optimizer
        self.process_group = process_group
        self.timeout = timeout
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.updated = 0
        self.exchanges = 0
        self.received_bytes = 0
        self.gradient_bytes = 0
        self._owners: dict[str, list[int]] = {}
        self._signature: tuple = ()

    def owners(self) -> dict[str, list[int]]:
        """The rank owning each block, per stack key (in block order); extended when a param
        group is added. Groups are assigned in order, each with the loads the earlier ones left,
        so adding a group never moves the blocks (and the state) of the groups before it."""
        optimizer = self.optimizer
        groups = len(optimizer.param_groups)
        signature = tuple((g, len(optimizer.full_layout(g))) for g in range(groups))
        if signature != self._signature:
            loads = [0.0] * self.world_size
            self._owners = {}
            for g in range(groups):
                stacks = [(optimizer.stack_key(g, s), s) for s in optimizer.full_layout(g)]
                costs = [block_cost(s.shape, s.preconditioned) for _, s in stacks for _ in s.blocks]
                flat, start = assign_lpt(costs, loads), 0
                for key, s in stacks:
                    self._owners[key] = flat[start : start + len(s.blocks)]
                    start += len(s.blocks)
            self._signature = signature
        return self._owners

    def rows(self, key: str) -> list[int]:
        """The indices, in the full stack ``key``, of the blocks this rank owns."""
        return [m for m, r in enumerate(self.owners()[key]) if r == self.rank]

    def owned(self, group_index: int) -> list[Stack]:
        """The stacks of param group ``group_index`` restricted to the blocks this rank owns."""
        stacks = []
        for s in self.optimizer.full_layout(group_index):
            rows = self.rows(self.optimizer.stack_key(group_index, s))
            if rows:
                stacks.append(Stack(s.key, s.shape, s.preconditioned, [s.blocks[m] for m in rows]))
        return stacks

    def gradients(self) -> list[list[torch.Tensor | None]]:
        """Per param group, per parameter, the gradient this rank reads its owned blocks from: a
        plain gradient as it is, a DTensor's full gradient, or None (no gradient, or a DTensor
        gradient none of whose blocks this rank owns). Every rank must call it, in lockstep."""
        optimizer, owners = self.optimizer, self.owners()
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        result: list[list[torch.Tensor | None]] = []
        routes: dict[torch.dtype, list[Route]] = {}
        for g, group in enumerate(optimizer.param_groups):
            readers: list[set[int]] = [set() for _ in group["params"]]
            for s in optimizer.full_layout(g):
                for block, rank in zip(s.blocks, owners[optimizer.stack_key(g, s)]):
                    readers[block.param_index].add(rank)
            grads: list[torch.Tensor | None] = []
            for i, p in enumerate(group["params"]):
                dim = None if p.grad is None else _shard_dim(p.grad, ranks)
                if dim is not None:
                    routes.setdefault(p.grad.dtype, []).append((grads, i, p.grad, dim, readers[i]))
                grads.append(full_tensor(p.grad) if p.grad is not None and dim is None else None)
            result.append(grads)
        for items in routes.values():
            self._route(items)
        return result

    def _route(self, items: list[Route]) -> None:
        """One all_to_all_single of gradient shards of one dtype: each rank sends its shard of
        each gradient to the readers of that gradient; each reader stores the concatenated full
        gradient at its place in its list."""
        from torch.distributed.tensor import Shard

        def shape(grad: torch.Tensor, dim: int, rank: int) -> list[int]:
            size = list(grad.shape)
            size[dim] = Shard.local_shard_size_and_offset(size[dim], self.world_size, rank)[0]
            return size

        shards = [(grad.to_local().reshape(-1), readers) for _, _, grad, _, readers in items]
        send = [[shard for shard, readers in shards if r in readers] for r in range(self.world_size)]
        send_sizes = [sum(shard.numel() for shard in per_rank) for per_rank in send]
        mine = [item for item in items if self.rank in item[4]]
        shapes = [[shape(grad, dim, r) for _, _, grad, dim, _ in mine] for r in range(self.world_size)]
        received_sizes = [sum(math.prod(s) for s in per_rank) for per_rank in shapes]
        local = shards[0][0]
        sent = torch.cat([shard for per_rank in send for shard in per_rank] or [local.new_empty(0)])
        received = local.new_empty(sum(received_sizes))
        self._wait(
            lambda: dist.all_to_all_single(
                received, sent, received_sizes, send_sizes, group=self.process_group, async_op=True
            ),
            "gradient exchange",
        )
        self.gradient_bytes += received.numel() * received.element_size()
        pieces = iter(received.split([math.prod(s) for per_rank in shapes for s in per_rank]))
        parts: list[list[torch.Tensor]] = [[] for _ in mine]
        for r in range(self.world_size):
            for j, size in enumerate(shapes[r]):
                parts[j].append(next(pieces).view(size))
        for (grads, i, _, dim, _), part in zip(mine, parts):
            grads[i] = torch.cat(part, dim)

    def _slots(self) -> tuple[list[list[Slot]], torch.dtype, torch.device]:
        """Per rank, the blocks with a gradient it owns, in the order of its buffer; the buffer's
        dtype and device."""
        from conditioner.optim.base import statistics_dtype

        optimizer, owners = self.optimizer, self.owners()
        slots: list[list[Slot]] = [[] for _ in range(self.world_size)]
        dtype, device = torch.float32, None
        for g, group in enumerate(optimizer.param_groups):
            params = group["params"]
            has_grad = [p.grad is not None for p in params]
            if not any(has_grad):
                continue
            dtype = torch.promote_types(dtype, statistics_dtype(params, group.get("state_dtype")))
            device = device or params[0].device
            for s in optimizer.full_layout(g):
                key = optimizer.stack_key(g, s)
                for m, (block, rank) in enumerate(zip(s.blocks, owners[key])):
                    if has_grad[block.param_index]:
                        slots[rank].append((key, m, s, group))
        return slots, dtype, device or torch.device("cpu")

    @staticmethod
    def _length(slots: Sequence[Slot]) -> int:
        return 1 + 2 * len(slots) + sum(math.prod(s.shape) for _, _, s, _ in slots)

    def exchange(self, updates: list[Any], finite: bool) -> tuple[bool, list[Any]]:
        """All-gather this rank's ``updates`` (of its owned stacks) and whether its gradients were
        ``finite``; returns whether every rank's were, and every block's update (full stacks)."""
        slots, dtype, device = self._slots()
        longest = max(self._length(mine) for mine in slots)
        send = torch.zeros(longest, dtype=dtype, device=device)
        send[0] = float(finite)
        mine = slots[self.rank]
        place = {(key, m): i for i, (key, m, _, _) in enumerate(mine)}
        starts = [1 + 2 * len(mine)]
        for _, _, s, _ in mine:
            starts.append(starts[-1] + math.prod(s.shape))
        for update in updates:
            rows = self.rows(update.key)
            indices = [place[update.key, rows[j]] for j in update.members]
            send[[1 + i for i in indices]] = 1.0
            send[[1 + len(mine) + i for i in indices]] = update.scale
            if indices[-1] - indices[0] == len(indices) - 1:
                send[starts[indices[0]] : starts[indices[-1] + 1]] = update.update.reshape(-1)
            else:
                for row, i in enumerate(indices):
                    send[starts[i] : starts[i + 1]] = update.update[row].reshape(-1)
            self.updated += len(indices)
        received = send.new_empty(longest * self.world_size)
        self._wait(
            lambda: _all_gather_single(received, send, group=self.process_group, async_op=True), "update exchange"
        )
        self.exchanges += 1
        self.received_bytes += received.numel() * received.element_size()
        received = received.view(self.world_size, longest)
        header = received[:, : 1 + 2 * max(len(s) for s in slots)].tolist()
        everyone_finite = all(row[0] == 1.0 for row in header)
        return everyone_finite, [
            u for r in range(self.world_size) for u in self._runs(slots[r], header[r], received[r])
        ]

    @staticmethod
    def _runs(slots: list[Slot], header: list[float], buffer: torch.Tensor) -> list[Any]:
        """One rank's updates, as :class:`~conditioner.optim.base.Update` views of its ``buffer``,
        one per run of consecutive blocks of a stack that have an update with the same scale."""
        from conditioner.optim.base import Update

        runs: list[list[Any]] = []  # [key, group, stack, members, start, end, scale]
        offset = 1 + 2 * len(slots)
        for i, (key, m, s, group) in enumerate(slots):
            size = math.prod(s.shape)
            scale = header[1 + len(slots) + i]
            if header[1 + i] == 1.0:
                last = runs[-1] if runs else None
                if last is not None and last[0] == key and last[5] == offset and last[6] == scale:
                    last[3].append(m)
                    last[5] = offset + size
                else:
                    runs.append([key, group, s, [m], offset, offset + size, scale])
            offset += size
        return [
            Update(key, group, s, members, buffer[start:end].view(len(members), *s.shape), scale)
            for key, group, s, members, start, end, scale in runs
        ]

    def _wait(self, start: Callable[[], Any], what: str) -> None:
        """Start an asynchronous collective and wait for it, within the timeout."""
        try:
            work = start()
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise RuntimeError(
                f"shard_state: the {what} of step {self.exchanges + 1} failed on rank {self.rank} of {self.world_size} "
                "(another rank died, raised, or did not call step(); the timeout is the process group's unless "
                f"shard_state was given one): {error}"
            ) from error


def _shard_dim(grad: torch.Tensor, ranks: list[int]) -> int | None:
    """The dimension a DTensor gradient is sharded in over a 1-D mesh of exactly ``ranks`` (in
    their order), else None."""
    if not is_sharded(grad):
        return None
    from torch.distributed.tensor import Shard

    placements, mesh = grad.placements, grad.device_mesh
    if len(placements) != 1 or type(placements[0]) is not Shard or mesh.mesh.tolist() != ranks:
        return None
    return placements[0].dim % grad.ndim


def shard_state(optimizer: Any, process_group: Any = None, timeout: timedelta | None = None) -> ShardedState:
    """Make ``optimizer`` (SOAP, EigenvalueCorrectedShampoo, Shampoo or Muon) keep and compute only
    the blocks this rank owns and exchange the updates with the other ranks of ``process_group``
    (default: the world) in one all-gather per step. Call it right after building the optimizer,
    before its first step, on every rank; every rank must then call ``step()`` in lockstep with
    the same gradients (DDP, or FSDP2). ``timeout`` bounds each exchange (default: the process
    group's timeout). Not combined with :func:`spread_refresh`: the owner of a block refreshes it.
    Nor with ``nonfinite="skip_on_device"``: the ranks agree on skipping a step through the update
    exchange, which reads its verdict on the host. Returns the :class:`ShardedState`."""
    if not hasattr(optimizer, "sharding"):
        raise TypeError(f"optimizer: must be a conditioner optimizer, got {type(optimizer).__name__}")
    if optimizer.nonfinite == "skip_on_device":
        raise ValueError(
            "optimizer: nonfinite='skip_on_device' cannot be combined with shard_state, whose update exchange "
            "agrees on a skip on the host; use nonfinite='raise' or 'skip'"
        )
    if optimizer.executor is not None:
        raise ValueError("optimizer: already spreads its refreshes (spread_refresh); shard_state replaces that")
    if optimizer.state:
        raise ValueError(
            "optimizer: has state already; call shard_state before its first step (or load a checkpoint after)"
        )
    sharding = ShardedState(optimizer, process_group, timeout)
    optimizer.sharding = sharding
    optimizer.forget_layouts()
    return sharding
