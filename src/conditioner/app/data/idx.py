"""The idx file format of MNIST and Fashion-MNIST, read and written with numpy alone.

An idx file is a 4-byte magic number, ``0x00 0x00 <type code> <number of dimensions>``, then one
big-endian uint32 per dimension, then the array in C order, big-endian. Files ending in ``.gz``
(or starting with gzip's magic bytes) are decompressed first.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype.newbyteorder("="): code for code, dtype in _TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes) -> np.ndarray:
    """The array held by the (uncompressed) idx bytes ``data``, in native byte order.

    Raises ``ValueError`` on a bad magic number, an unknown type code or a size that does not
    match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an idx file: the magic number must start with two zero bytes")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise ValueError(f"not an idx file: unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"idx file truncated: header of {ndim} dimensions needs {header} bytes, got {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"idx file of shape {shape} holds {len(data) - header} data bytes, expected {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array in the idx file at ``path``, gzip-compressed or not (see :func:`parse_idx`)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    return parse_idx(data)


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` encoded as an idx file (the inverse of :func:`parse_idx`)."""
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"idx cannot hold dtype {array.dtype}")
    if array.ndim > 255:
        raise ValueError("idx holds at most 255 dimensions")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=_TYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an idx file at ``path``, gzip-compressed when the name ends in ``.gz``."""
    data = idx_bytes(array)
    if os.fspath(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with open(path, "wb") as handle:
        handle.write(data)
