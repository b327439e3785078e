"""Longest-processing-time-first assignment of work items to ranks.

Every rank runs the same function on the same inputs and so computes the same assignment: no
communication is needed to agree on who decomposes what.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def assign_lpt(costs: Sequence[float], loads: list[float]) -> list[int]:
    """The rank of each item: items in decreasing cost, each to the least loaded rank.

    ``loads`` (one entry per rank) is the work the ranks already have and is updated in place, so
    that successive calls balance their sum. Ties go to the earlier item and the lower rank, which
    makes the result deterministic. Greedy LPT is within 4/3 of the best makespan.
    """
    if not loads:
        raise ValueError("loads must have one entry per rank, got an empty list")
    owners = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(len(loads)), key=lambda r: loads[r])
        owners[item] = rank
        loads[rank] += costs[item]
    return owners


def decomposition_cost(dim: int) -> float:
    """Estimated cost of one eigendecomposition (or QR step, or inverse root) of a ``dim × dim``
    factor: ``dim³`` flops up to a constant common to all items."""
    return float(dim) ** 3


def block_cost(shape: Sequence[int], preconditioned: Sequence[bool]) -> float:
    """Estimated cost of keeping one block: the decompositions of its factors (``d³`` each) and
    the work on its elements at every step (projections, moments, the update: ``numel``)."""
    elements = math.prod(shape)
    return sum(decomposition_cost(d) for d, p in zip(shape, preconditioned) if p) + float(elements)
