"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): gather what a block needs, write
back only the local shard.

A block can straddle the boundary between two ranks' shards, and its factors need the whole
block, so the optimizer works on FULL gradients (one all-gather per parameter, as FSDP's own
forward does for the weights) and computes the exact single-process update on every rank; each
rank then adds the part of the update that falls in its own shard. The optimizer state is
therefore replicated, as under DDP, and the refresh can be spread in the same way.
:class:`UpdateBuffers` also serves parameters whose blocks are read in another dimension order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from conditioner.blocks import Block, laid_out_zeros


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
    """Full-size zero buffers that stand in for the parameters whose blocks are not views of them
    while the updates are added: DTensors, and parameters read in another dimension order
    (:attr:`conditioner.blocks.Block.dim_order`). A buffer is laid out in memory in its blocks'
    order; :meth:`apply` adds it to its parameter (to a DTensor: this rank's part)."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def targets(self, params: Sequence[torch.Tensor], blocks: Sequence[Block]) -> list[torch.Tensor]:
        """``params`` with the parameter of each of ``blocks`` that needs one replaced by its buffer."""
        result = list(params)
        for block in blocks:
            p = params[block.param_index]
            if block.dim_order is None and not is_sharded(p):
                continue
            if id(p) not in self._buffers:
                zeros = laid_out_zeros(p.shape, block.dim_order, p.dtype, local_tensor(p).device)
                self._buffers[id(p)] = (p, zeros)
            result[block.param_index] = self._buffers[id(p)][1]
        return result

    def apply(self) -> None:
        """Add each buffer to its parameter; for a DTensor, this rank's part of it (sliced here, no
        communication) to its shard."""
        for p, buffer in self._buffers.values():
            if not is_sharded(p):
                p.add_(buffer)
                continue
            from torch.distributed.tensor import distribute_tensor

            part = distribute_tensor(buffer.contiguous(), p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().add_(part)
