"""The data-set record, the registry of loaders and the error for missing data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class DataUnavailableError(RuntimeError):
    """The package holding a data set is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Dataset:
    """A data set split once, reproducibly, into training and validation parts.

    Classification: ``x_*`` float32 features of shape ``(N, *input_shape)``, ``y_*`` int64 labels
    in ``[0, num_classes)``. Regression (``task == "regression"``): ``x_*`` as for classification,
    ``y_*`` float32 targets ``(N, num_classes)``, so ``num_classes`` is the number of outputs.
    Language modelling: ``x_*`` int64 windows ``(N, context)`` of token
    ids and ``y_*`` the same windows shifted by one token; ``num_classes`` is the vocabulary size
    and ``vocabulary`` the character of each id (empty for classification).
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    vocabulary: tuple[str, ...] = ()

    def decode(self, ids: Any) -> str:
        """The text spelled by token ids ``ids`` (language data sets only)."""
        if not self.vocabulary:
            raise ValueError(f"data set {self.name!r} has no vocabulary to decode with")
        from conditioner.app.data.text import decode

        return decode(ids, self.vocabulary)


Loader = Callable[..., Dataset]
_LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def decorator(loader: Loader) -> Loader:
        _LOADERS[name] = loader
        return loader

    return decorator


def load_dataset(name: str, seed: int = 0, **options: Any) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`) with the split fixed by ``seed``.

    ``options`` are the loader's own keywords, all optional: ``digits`` takes ``val_fraction`` (default
    0.2); ``fashion-mnist`` takes ``limit``
    (a seeded subset of that many training images); ``chars`` takes ``context`` (window length,
    default 128), ``max_chars`` (use only the corpus's first characters) and ``max_vocab``.
    Raises :class:`DataUnavailableError` when the package holding the data is not installed.
    """
    from conditioner.app.data import loaders, tabular  # noqa: F401  (registers the loaders)

    if name not in _LOADERS:
        raise ValueError(f"dataset must be one of {sorted(_LOADERS)}, got {name!r}")
    return _LOADERS[name](seed, **options)


DATASETS = ("digits", "fashion-mnist", "mnist5k", "chars", "concrete")
