"""Checkpoint metadata without pickle.

- :func:`encode_json` / :func:`decode_json`: the optimizer's non-tensor state (param groups, step
  counts) as JSON in a uint8 tensor, so that DCP stores and reads it as a tensor. JSON has no
  tuples, dtypes or tensors, so those are tagged (``{"tuple": [...]}``, ``{"dtype": "float32"}``,
  ``{"tensor": [...], "dtype": ...}``) and come back as they went in.
- :class:`SafeFileSystemReader`: DCP's file-system reader whose index (the ``.metadata`` file,
  which DCP writes with pickle) is read by an unpickler that resolves only the classes such an
  index holds; any other global, such as a callable a crafted file would use to run code, is
  refused before it is resolved.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

#: (module, name) pairs a DCP index may refer to; torch dtypes, layouts and memory formats are
#: accepted by value (see :meth:`_IndexUnpickler.find_class`).
_INDEX_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeFileSystemReader(dcp.FileSystemReader):
    """:class:`torch.distributed.checkpoint.FileSystemReader` that reads its index without
    resolving anything but the index's own classes; raises ValueError for any other file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = pathlib.Path(os.fspath(self.path)) / ".metadata"
        try:
            with open(path, "rb") as index:
                metadata = _IndexUnpickler(index).load()
        except OSError as error:
            raise ValueError(f"checkpoint_id {str(self.path)!r}: cannot read its index: {error}") from None
        except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as error:
            raise ValueError(
                f"checkpoint_id {str(self.path)!r}: its index is not a torch.distributed.checkpoint index "
                f"({error}); refusing to load it"
            ) from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"checkpoint_id {str(self.path)!r}: its index holds {type(metadata).__name__}, not Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _tagged(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"tuple": [_tagged(v) for v in value]}
    if isinstance(value, list):
        return [_tagged(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _tagged(v) for k, v in value.items()}}
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in checkpoint metadata")


def _untagged(value: Any) -> Any:
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "tuple" in value:
        return tuple(_untagged(v) for v in value["tuple"])
    if "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if "dtype" in value:
        dtype = getattr(torch, value["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"checkpoint metadata names an unknown dtype {value['dtype']!r}")
        return dtype
    return {k: _untagged(v) for k, v in value["dict"].items()}


def encode_json(value: Any) -> torch.Tensor:
    """``value`` (nested dicts with string keys, lists, tuples, numbers, strings, None, dtypes, small
    tensors) as UTF-8 JSON in a uint8 tensor."""
    data = json.dumps(_tagged(value), allow_nan=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_json(tensor: torch.Tensor) -> Any:
    """The value :func:`encode_json` stored in ``tensor``."""
    return _untagged(json.loads(bytes(tensor.tolist()).decode()))
