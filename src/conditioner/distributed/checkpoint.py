"""``torch.distributed.checkpoint`` (DCP) save and load of an optimizer's state, with its model's.

The stack state is string-keyed (``"group0/6x6:PP"``) and per stack, which
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (keyed by parameter names)
cannot describe, so the optimizer's own :meth:`state_dict` is stored under flat keys:

- ``optimizer/meta``: param groups, the non-tensor state (each block's step count) and the world
  size, as JSON in a uint8 tensor (:mod:`conditioner.distributed.metadata`);
- ``optimizer/state/{stack key}/{name}``: every state tensor (factors, bases, moments, ...);
- ``model/{name}``: the model's ``state_dict()`` when a model is given (FSDP2's DTensors included).

The state is the same on every rank in both modes (DDP and FSDP2), so DCP writes each tensor once
and any number of ranks can load it: a checkpoint saved on 2 ranks resumes on 3, or on 1. DCP
reshards the model's DTensors itself.

Loading never unpickles: DCP pickles its own index (the ``.metadata`` file), which is read with
an unpickler that accepts only the classes such an index holds, and every entry read is a tensor.
A checkpoint that would need more (a crafted payload, or one from a version that pickled its
metadata) is refused with a ValueError before anything is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from conditioner.distributed.metadata import SafeFileSystemReader, decode_json, encode_json

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
    entries[META] = encode_json(meta)
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
    of ranks; a collective. Returns the world size the checkpoint was saved with. Nothing is
    unpickled (see the module docstring): a checkpoint that needs it is refused."""
    reader = SafeFileSystemReader(checkpoint_id)
    metadata = reader.read_metadata().state_dict_metadata
    if META not in metadata:
        raise ValueError(f"checkpoint_id {str(checkpoint_id)!r} holds no optimizer state saved by conditioner")
    model_state = model.state_dict() if model is not None else {}
    missing = [k for k in model_state if MODEL + k not in metadata]
    if missing:
        raise ValueError(f"checkpoint_id {str(checkpoint_id)!r} has no model entries for {missing[:5]}")
    wanted = [META, *(fqn for fqn in metadata if fqn.startswith(STATE)), *(MODEL + k for k in model_state)]
    not_tensors = [fqn for fqn in wanted if not isinstance(metadata[fqn], TensorStorageMetadata)]
    if not_tensors:
        raise ValueError(
            f"checkpoint_id {str(checkpoint_id)!r}: entries {not_tensors[:5]} are pickled objects, not tensors; "
            "loading them would unpickle, so the checkpoint is refused (a checkpoint saved by an older "
            "conditioner must be re-saved with this version, from a process that trusts it)"
        )
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    entries: dict[str, Any] = {}
    for fqn in wanted[: len(wanted) - len(model_state)]:
        meta = metadata[fqn]
        entries[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu" if fqn == META else device)
    entries.update({MODEL + k: v for k, v in model_state.items()})
    dcp.load(entries, checkpoint_id=checkpoint_id, process_group=process_group, storage_reader=reader)
    if model is not None:
        model.load_state_dict({k: entries[MODEL + k] for k in model_state})
    meta = decode_json(entries[META])
    state: dict[str, dict[str, Any]] = {key: dict(values) for key, values in meta["other"].items()}
    for fqn, tensor in entries.items():
        if fqn.startswith(STATE):
            key, name = fqn[len(STATE) :].rsplit("/", 1)
            state.setdefault(key, {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["world_size"]
