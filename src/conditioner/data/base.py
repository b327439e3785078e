"""The data-set record, the registry of loaders and the error for missing data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class DataUnavailableError(RuntimeError):
    """The package holding a data set is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Dataset:
    """A data set split once, reproducibly, into training and validation parts.

    Classification: ``x_*`` float32 features of shape ``(N, *input_shape)``, ``y_*`` int64 labels
    in ``[0, num_classes)``. Language modelling: ``x_*`` int64 windows ``(N, context)`` of token
    ids and ``y_*`` the same windows shifted by one token; ``num_classes`` is the vocabulary size.
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


_LOADERS: dict[str, Callable[[int], Dataset]] = {}


def register(name: str) -> Callable[[Callable[[int], Dataset]], Callable[[int], Dataset]]:
    def decorator(loader: Callable[[int], Dataset]) -> Callable[[int], Dataset]:
        _LOADERS[name] = loader
        return loader

    return decorator


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`) with the split fixed by ``seed``."""
    from conditioner.data import loaders  # noqa: F401  (registers the loaders)

    if name not in _LOADERS:
        raise ValueError(f"dataset must be one of {sorted(_LOADERS)}, got {name!r}")
    return _LOADERS[name](seed)


DATASETS = ("digits", "fashion-mnist", "mnist5k", "chars")
