"""Objects from an R lazy-load data base, parsed by the pure-Python ``rdata`` package.

An installed R package keeps its data sets in ``data/Rdata.rdb`` with the index ``data/Rdata.rdx``
(Debian's ``r-cran-*`` packages install them this way, not as ``.rda`` files). The index is a
(gzip-compressed) serialised R list: ``variables`` maps each object's name to the ``(offset,
length)`` of its record in the ``.rdb`` file and ``compressed`` says how records are compressed.
A record is a big-endian uint32 holding the length of the uncompressed bytes, then:

- ``compressed`` 1 (``TRUE``): a zlib stream;
- ``compressed`` 2 or 3: one type byte, then the bytes it names: ``Z`` raw LZMA2 (xz without its
  container), ``2`` bzip2, ``1`` zlib, ``0`` stored as is.

The uncompressed bytes are the R serialisation of the object, which ``rdata`` parses.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

_LZMA_DICT_MIN = 4096  # liblzma's smallest dictionary


def decompress_record(record: bytes, compressed: int) -> bytes:
    """The serialised object held by one ``.rdb`` ``record`` compressed the ``compressed`` way.

    Raises ``ValueError`` for an unknown method or type byte, a corrupt stream, or a length that
    does not match the record's header.
    """
    if len(record) < 5:
        raise ValueError(f"lazy-load record of {len(record)} bytes is too short")
    (length,) = struct.unpack(">I", record[:4])
    try:
        if compressed == 1:
            data = zlib.decompress(record[4:])
        elif compressed in (2, 3):
            kind, body = record[4:5], record[5:]
            if kind == b"Z":
                # Any dictionary at least as long as the output decodes the stream.
                lzma2 = {"id": lzma.FILTER_LZMA2, "dict_size": max(length, _LZMA_DICT_MIN)}
                data = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[lzma2])
            elif kind == b"2":
                data = bz2.decompress(body)
            elif kind == b"1":
                data = zlib.decompress(body)
            elif kind == b"0":
                data = body
            else:
                raise ValueError(f"unknown lazy-load compression type byte {kind!r}")
        else:
            raise ValueError(f"unknown lazy-load compression method {compressed}")
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as error:
        raise ValueError(f"corrupt lazy-load record: {error}") from error
    if len(data) != length:
        raise ValueError(f"lazy-load record decompressed to {len(data)} bytes, its header says {length}")
    return data


def _convert(serialised: bytes) -> Any:
    """The Python value of an R serialisation; tibbles convert like the data frames they are."""
    import rdata

    frame = rdata.conversion.dataframe_constructor
    constructors = {**rdata.conversion.DEFAULT_CLASS_MAP, "tbl_df": frame, "tbl": frame}
    try:
        return rdata.conversion.convert(rdata.parser.parse_data(serialised, extension=".rds"), constructors)
    except Exception as error:  # a third-party parser of arbitrary bytes: any failure means bad data
        raise ValueError(f"not a readable R serialisation ({type(error).__name__}: {error})") from error


def read_index(index: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """(name -> (offset, length) of its record, compression method) from the ``.rdx`` file ``index``."""
    table = _convert(index.read_bytes())
    try:
        variables = {str(name): (int(span[0]), int(span[1])) for name, span in table["variables"].items()}
        compressed = int(table["compressed"][0])
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as error:
        raise ValueError(f"{index} is not a lazy-load index: {error!r}") from error
    return variables, compressed


def read_object(directory: Path, name: str, base: str = "Rdata") -> Any:
    """The R object ``name`` of the lazy-load data base ``directory/base.rdb`` (index ``base.rdx``),
    converted by ``rdata``; data frames and tibbles become pandas data frames.

    Raises ``KeyError`` when the data base holds no such object, ``ValueError`` when its files are
    malformed, ``OSError`` when they cannot be read and ``ImportError`` without ``rdata``.
    """
    variables, compressed = read_index(directory / f"{base}.rdx")
    if name not in variables:
        raise KeyError(f"no object {name!r} in {directory / base}.rdb; it holds {sorted(variables)}")
    offset, length = variables[name]
    with open(directory / f"{base}.rdb", "rb") as handle:
        handle.seek(offset)
        record = handle.read(length)
    if len(record) != length:
        raise ValueError(f"{directory / base}.rdb ends inside the record of {name!r}")
    return _convert(decompress_record(record, compressed))
