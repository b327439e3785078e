"""How much memory an optimizer's state takes, for any ``torch.optim.Optimizer``.

Our optimizers count their state tensors exactly (``StackedOptimizer.state_bytes``: codes, scales,
eigenvalues, moments, each in the dtype it is stored in). For any other optimizer the bytes are
those of every tensor storage reachable from ``optimizer.state``, each storage counted once
(views share one); scalars such as a ``step`` tensor count too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StateMemory:
    """``total`` state bytes, trainable ``parameters`` (elements), their ratio ``per_parameter``,
    and ``by_entry``: bytes per kind of state entry (digits of per-dimension keys dropped)."""

    total: int
    parameters: int
    per_parameter: float
    by_entry: dict[str, int]


def _storage_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        key = value.untyped_storage().data_ptr() if value.numel() else id(value)
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes() if value.numel() else 0
    if isinstance(value, dict):
        return sum(_storage_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_storage_bytes(v, seen) for v in value)
    return 0


def _exact_bytes(value: Any, seen: set[int]) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _entries(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes per kind of entry: exactly as ``state_bytes()`` counts where the optimizer has it."""
    count = _exact_bytes if callable(getattr(optimizer, "state_bytes", None)) else _storage_bytes
    seen: set[int] = set()
    by_entry: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            name = re.sub(r"\d+", "", str(key))
            by_entry[name] = by_entry.get(name, 0) + count(value, seen)
    return by_entry


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: ``state_bytes()`` where the optimizer has it, else the storages
    reachable from ``optimizer.state``."""
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return int(own())
    return sum(_entries(optimizer).values())


def state_memory(optimizer: torch.optim.Optimizer) -> StateMemory:
    """The optimizer-state memory report of ``optimizer``: total, per parameter, per entry."""
    parameters = sum(p.numel() for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    total = state_bytes(optimizer)
    return StateMemory(total, parameters, total / parameters if parameters else 0.0, _entries(optimizer))


__all__ = ["StateMemory", "state_bytes", "state_memory"]
