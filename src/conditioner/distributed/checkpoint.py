"""``torch.distributed.checkpoint`` (DCP) save and load of an optimizer's state, with its model's.

The stack state is string-keyed (``"group0/6x6:PP"``) and per stack, which
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (keyed by parameter names)
cannot describe, so the optimizer's own :meth:`state_dict` is stored under flat keys:

- ``optimizer/meta``: param groups, any other non-tensor state and the world size, as JSON in a
  uint8 tensor (:mod:`conditioner.distributed.metadata`);
- ``optimizer/state/{stack key}/{name}``: every state tensor (factors, bases, moments, ...), one
  row per block of the stack, and ``.../step``, each block's step count as int64;
- ``model/{name}``: the model's ``state_dict()`` when a model is given (FSDP2's DTensors included).

Without sharding the state is the same on every rank, so DCP writes each tensor once. Under
:func:`~conditioner.distributed.shard_state` each rank holds the rows of the blocks it owns and
hands them to DCP as chunks of the whole stack tensor (:class:`Rows`), so each rank writes its
own blocks and the checkpoint holds the same whole tensors. Loading reads, on each rank, the rows
it keeps now: all of them, or those of the blocks it owns under the new number of ranks, so a
checkpoint saved on 2 ranks resumes on 3, or on 1, sharded or not. DCP reshards the model's
DTensors itself. Checkpoints of earlier versions (step counts in the metadata) load unsharded.

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
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from conditioner.distributed.metadata import SafeFileSystemReader, decode_json, encode_json

META = "optimizer/meta"
STATE = "optimizer/state/"
MODEL = "model/"
#: the per-block list of the state stored as an int64 tensor entry, to be sharded like the others
STEP = "step"


class Rows(torch.Tensor):
    """Some rows of a ``size``-row tensor, for DCP: ``local`` holds rows ``rows`` (ascending) in
    order, and is handed to DCP as one chunk per run of consecutive rows, so that DCP writes, or
    reads into ``local``, just those rows of the whole tensor. For ``writing``, DCP gets each chunk
    as a copy of its own (``torch.save``, which DCP writes with, would store a view's whole
    storage: every chunk would carry all of ``local``); for reading, views of ``local``. It only
    describes; computing with it raises."""

    @staticmethod
    def __new__(cls, local: torch.Tensor, rows: list[int], size: int, writing: bool = False) -> Rows:  # noqa: PYI034
        shape = (size, *local.shape[1:])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=local.dtype, device=local.device)

    def __init__(self, local: torch.Tensor, rows: list[int], size: int, writing: bool = False) -> None:
        self.writing = writing
        self.chunks: list[tuple[torch.Size, torch.Tensor]] = []
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                offsets = torch.Size([rows[start]] + [0] * (local.ndim - 1))
                self.chunks.append((offsets, local[start:i]))
                start = i

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(f"Rows only describes a checkpoint entry; {func} is not supported")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets, chunk.size()),
                    properties=TensorProperties.create_from_tensor(chunk),
                    size=self.size(),
                ),
            )
            for offsets, chunk in self.chunks
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets, chunk.size()) for offsets, chunk in self.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offsets, chunk in self.chunks:
            if offsets == index.offset:
                return chunk.clone() if self.writing else chunk
        raise ValueError(f"{index.fqn}: no rows at {list(index.offset or [])}")


def _world_size(process_group: Any) -> int:
    return dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1


def _rows(optimizer: torch.optim.Optimizer, key: str) -> tuple[int, list[int]] | None:
    """The number of blocks of stack ``key`` and the rows of it ``optimizer`` keeps here; None
    for a stack it does not know (its state is then loaded whole, and refused by the optimizer)."""
    try:
        return optimizer.stack_rows(key)
    except (AttributeError, ValueError):
        return None


def _entry(tensor: torch.Tensor, rows: tuple[int, list[int]] | None, writing: bool) -> torch.Tensor:
    """``tensor`` as the whole entry, or as its rows of it (see :class:`Rows`)."""
    if rows is None or rows[1] == list(range(rows[0])):
        return tensor
    return Rows(tensor, rows[1], rows[0], writing)


def optimizer_entries(optimizer: torch.optim.Optimizer, process_group: Any = None) -> dict[str, Any]:
    """The optimizer's state dict as flat DCP entries (see the module docstring)."""
    packed = optimizer.state_dict()
    entries: dict[str, Any] = {}
    other: dict[str, dict[str, Any]] = {}
    for key, values in packed["state"].items():
        if not isinstance(key, str):
            raise TypeError(f"optimizer must keep its state per stack under string keys, got key {key!r}")
        rows = _rows(optimizer, key)
        for name, value in values.items():
            if name == STEP:
                value = torch.tensor(value, dtype=torch.int64)
            if isinstance(value, torch.Tensor):
                entries[f"{STATE}{key}/{name}"] = _entry(value, rows, writing=True)
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
    entries: dict[str, Any] = {META: torch.empty(metadata[META].size, dtype=torch.uint8)}
    kept: dict[str, torch.Tensor] = {}
    for fqn in wanted[1 : len(wanted) - len(model_state)]:
        meta = metadata[fqn]
        rows = _rows(optimizer, fqn[len(STATE) :].rsplit("/", 1)[0])
        if rows is not None and not rows[1]:
            continue  # a stack of which this rank owns no block
        shape = (len(rows[1]), *meta.size[1:]) if rows is not None else meta.size
        kept[fqn] = torch.empty(shape, dtype=meta.properties.dtype, device=device)
        entries[fqn] = _entry(kept[fqn], rows, writing=False)
    entries.update({MODEL + k: v for k, v in model_state.items()})
    dcp.load(entries, checkpoint_id=checkpoint_id, process_group=process_group, storage_reader=reader)
    if model is not None:
        model.load_state_dict({k: entries[MODEL + k] for k in model_state})
    meta = decode_json(entries[META])
    state: dict[str, dict[str, Any]] = {key: dict(values) for key, values in meta["other"].items()}
    for fqn, tensor in kept.items():
        key, name = fqn[len(STATE) :].rsplit("/", 1)
        state.setdefault(key, {})[name] = tensor.tolist() if name == STEP else tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["world_size"]
