"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): gather what a block needs, write
back only the local shard.

A block can straddle the boundary between two ranks' shards, and its factors need the whole
block, so the optimizer works on FULL gradients (one all-gather per parameter, as FSDP's own
forward does for the weights) and computes the exact single-process update on every rank; each
rank then adds the part of the update that falls in its own shard. The optimizer state is
therefore replicated, as under DDP, and the refresh can be spread in the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch


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


class ShardedUpdates:
    """Full-size zero buffers that stand in for DTensor parameters while updates are added, then
    pass this rank's part of each buffer to its shard."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def targets(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> list[torch.Tensor]:
        """``params`` with each DTensor among ``indices`` replaced by its buffer."""
        result = list(params)
        for i in indices:
            p = params[i]
            if is_sharded(p):
                if id(p) not in self._buffers:
                    self._buffers[id(p)] = (p, torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device))
                result[i] = self._buffers[id(p)][1]
        return result

    def apply(self) -> None:
        """Add each buffer's local part (sliced here, no communication) to its parameter's shard."""
        for p, buffer in self._buffers.values():
            from torch.distributed.tensor import distribute_tensor

            part = distribute_tensor(buffer, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().add_(part)
