"""Running the optimizers on torch.distributed: data parallel (DDP) and FSDP2.

- :func:`spread_refresh` makes an optimizer spread its eigenbasis / inverse-root refreshes over
  the ranks (each rank decomposes its share of the factors, one collective per stack refreshed).
- :func:`shard_state` shards the optimizer state itself: each rank keeps and computes only its
  share of the blocks, and the ranks exchange the updates in one all-gather per step
  (:mod:`conditioner.distributed.ownership`).
- DTensor parameters (FSDP2's ``fully_shard``) are handled by the optimizers themselves: full
  gradients are gathered (under ``shard_state`` only by the owners of their blocks), the exact
  update computed, each rank's shard updated (:mod:`conditioner.distributed.sharded`).
- :mod:`conditioner.distributed.checkpoint`: ``torch.distributed.checkpoint`` save and load of
  the optimizer state (imported on demand: torch's checkpoint package is slow to import).
"""

from conditioner.distributed.assignment import assign_lpt, block_cost, decomposition_cost
from conditioner.distributed.ownership import ShardedState, shard_state
from conditioner.distributed.spread import BlockWork, SpreadRefresh, spread_refresh

__all__ = [
    "BlockWork",
    "ShardedState",
    "SpreadRefresh",
    "assign_lpt",
    "block_cost",
    "decomposition_cost",
    "shard_state",
    "spread_refresh",
]
