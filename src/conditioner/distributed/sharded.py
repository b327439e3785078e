"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): gather what a block needs, write
back only the local shard.

A block can straddle the boundary between two ranks' shards, and its factors need the whole
block, so the optimizer works on FULL gradients (one all-gather per parameter, as FSDP's own
forward does for the weights) and computes the exact single-process update on every rank; each
rank then adds the part of the update that falls in its own shard. The optimizer state is
therefore replicated, as under DDP, and the refresh can be spread in the same way; or, under
:func:`~conditioner.distributed.shard_state`, each rank keeps and computes only its own blocks,
receives the full gradients of their parameters only (one all-to-all per step,
:meth:`~conditioner.distributed.ShardedState.gradients`), and the updates are exchanged.
:class:`UpdateBuffers` also serves parameters whose blocks are not views of them (read in another
dimension order, or laid out in memory so that merged dimensions are apart).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from conditioner.blocks import Block, laid_out


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor. Checked without importing ``torch.distributed.tensor`` (slow to
    import): while that module is not loaded, no tensor can be a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered for a DTensor, ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds: the local shard of a DTensor (an alias), ``t`` otherwise."""
    return t.to_local() if is_sharded(t) else t


class UpdateBuffers:
    """Full-size stand-ins for the parameters whose blocks are not views of them, while the
    updates are added. A DTensor gets zeros, and :meth:`apply` adds this rank's part of them to
    its shard. A parameter read in another dimension order (:attr:`conditioner.blocks.Block.dim_order`)
    or laid out so that its blocks are no views (a ``channels_last`` conv kernel merged to
    ``[out, in·kh·kw]``) gets a copy laid out in its blocks' order; the updates are added to the
    copy exactly as they would be to a contiguous parameter, and :meth:`apply` copies it back, so
    the parameter keeps its identity, its strides, and bit for bit the contiguous result."""

    def __init__(self) -> None:
        #: id of a parameter → (the parameter, its stand-in)
        self._stand_ins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def targets(self, params: Sequence[torch.Tensor], blocks: Sequence[Block]) -> list[torch.Tensor]:
        """``params`` with the parameter of each of ``blocks`` that needs one replaced by its stand-in."""
        result = list(params)
        for block in blocks:
            p = params[block.param_index]
            if id(p) not in self._stand_ins:
                if is_sharded(p):
                    self._stand_ins[id(p)] = (p, laid_out(local_tensor(p).new_empty(p.shape), block.dim_order, zeros=True))
                elif not block.is_view_of(p):
                    self._stand_ins[id(p)] = (p, laid_out(p, block.dim_order))
            if id(p) in self._stand_ins:
                result[block.param_index] = self._stand_ins[id(p)][1]
        return result

    def apply(self) -> None:
        """Copy each staged parameter back; add to each DTensor's shard this rank's part of its
        buffer (sliced here, no communication)."""
        for p, stand_in in self._stand_ins.values():
            if not is_sharded(p):
                p.copy_(stand_in)
                continue
            from torch.distributed.tensor import distribute_tensor

            part = distribute_tensor(stand_in.contiguous(), p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().add_(part)
