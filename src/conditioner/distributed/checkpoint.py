"""``torch.distributed.checkpoint`` (DCP) save and load of an optimizer's state, with its model's.

The stack state is string-keyed (``"group0/6x6:PP"``) and per stack, which
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (keyed by parameter names)
cannot describe, so the optimizer's own :meth:`state_dict` is stored under flat keys:

- ``optimizer/meta``: param groups, the non-tensor state (each block's step count) and the world
  size, pickled into one bytes value (DCP would otherwise flatten the nested dict into keys);
- ``optimizer/state/{stack key}/{name}``: every state tensor (factors, bases, moments, ...);
- ``model/{name}``: the model's ``state_dict()`` when a model is given (FSDP2's DTensors included).

The state is the same on every rank in both modes (DDP and FSDP2), so DCP writes each tensor once
and any number of ranks can load it: a checkpoint saved on 2 ranks resumes on 3, or on 1. DCP
reshards the model's DTensors itself.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

META = "optimizer/meta"
STATE = "optimizer/state/"
MODEL = "model/"


def _world_size(process_group: Any) -> int:
    return dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1


def optimizer_entries(optimizer: torch.optim.Optimizer, process_group: Any = None) -> dict[str, Any]:
    """The optimizer's state dict as flat DCP entries (see the module docstring)."""
    packed = optimizer.state_dict()
    entries: dict[str, Any] = {}
    other: dict[str, dict[str, Any]] = {}
    for key, values in packed["state"].items():
        if not isinstance(key, str):
            raise TypeError(f"optimizer must keep its state per stack under string keys, got key {key!r}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                entries[f"{STATE}{key}/{name}"] = value
            else:
                other.setdefault(key, {})[name] = value
    meta = {"param_groups": packed["param_groups"], "other": other, "world_size": _world_size(process_group)}
    entries[META] = pickle.dumps(meta)
    return entries


def save(
    checkpoint_id: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    process_group: Any = None,
) -> None:
    """Save ``optimizer``'s state (and ``model``'s) to the directory ``checkpoint_id``; a collective:
    every rank of ``process_group`` calls it."""
    entries = optimizer_entries(optimizer, process_group)
    if model is not None:
        entries.update({MODEL + k: v for k, v in model.state_dict().items()})
    dcp.save(entries, checkpoint_id=checkpoint_id, process_group=process_group)


def load(
    checkpoint_id: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    process_group: Any = None,
) -> int:
    """Load a checkpoint written by :func:`save` into ``optimizer`` (and ``model``), on any number
    of ranks; a collective. Returns the world size the checkpoint was saved with. Like
    ``torch.load`` of a full checkpoint, this unpickles: load only checkpoints you trust."""
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    if META not in metadata:
        raise ValueError(f"checkpoint_id {str(checkpoint_id)!r} holds no optimizer state saved by conditioner")
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    entries: dict[str, Any] = {}
    for fqn, meta in metadata.items():
        if fqn.startswith(STATE) and isinstance(meta, TensorStorageMetadata):
            entries[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
    entries[META] = b""
    model_state = model.state_dict() if model is not None else {}
    missing = [k for k in model_state if MODEL + k not in metadata]
    if missing:
        raise ValueError(f"checkpoint_id {str(checkpoint_id)!r} has no model entries for {missing[:5]}")
    entries.update({MODEL + k: v for k, v in model_state.items()})
    dcp.load(entries, checkpoint_id=checkpoint_id, process_group=process_group)
    if model is not None:
        model.load_state_dict({k: entries[MODEL + k] for k in model_state})
    meta = pickle.loads(entries[META])
    state: dict[str, dict[str, Any]] = {key: dict(values) for key, values in meta["other"].items()}
    for fqn, tensor in entries.items():
        if fqn.startswith(STATE):
            key, name = fqn[len(STATE) :].rsplit("/", 1)
            state.setdefault(key, {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["world_size"]
