"""Running the optimizers on torch.distributed: data parallel (DDP) and FSDP2.

- :func:`spread_refresh` makes an optimizer spread its eigenbasis / inverse-root refreshes over
  the ranks (each rank decomposes its share of the factors, one collective per stack refreshed).
- DTensor parameters (FSDP2's ``fully_shard``) are handled by the optimizers themselves: full
  gradients are gathered, the exact update computed, each rank's shard updated
  (:mod:`conditioner.distributed.sharded`).
- :mod:`conditioner.distributed.checkpoint`: ``torch.distributed.checkpoint`` save and load of
  the optimizer state (imported on demand: torch's checkpoint package is slow to import).
"""

from conditioner.distributed.assignment import assign_lpt, decomposition_cost
from conditioner.distributed.spread import BlockWork, SpreadRefresh, spread_refresh

__all__ = ["SpreadRefresh", "BlockWork", "assign_lpt", "decomposition_cost", "spread_refresh"]
