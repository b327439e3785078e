"""Character-level tokenisation: a vocabulary from a text, the token stream, and next-token windows."""

from __future__ import annotations

import numpy as np

UNKNOWN = "\ufffd"
"""The symbol that stands for every character left out of a capped vocabulary."""


def char_vocabulary(text: str, max_vocab: int | None = None) -> tuple[str, ...]:
    """The sorted set of characters of ``text``.

    With ``max_vocab`` and more distinct characters than that, the ``max_vocab - 1`` most frequent
    characters are kept (ties broken by code point) and :data:`UNKNOWN` is appended for the rest.
    """
    codes = _code_points(text)
    counts = np.bincount(codes)
    present = np.flatnonzero(counts)
    counts = counts[present]
    if max_vocab is not None and len(present) > max_vocab:
        if max_vocab < 2:
            raise ValueError(f"max_vocab must be at least 2 to hold the unknown symbol, got {max_vocab}")
        order = np.lexsort((present, -counts))  # most frequent first, then by code point
        present = np.sort(present[order[: max_vocab - 1]])
        return tuple(map(chr, present.tolist())) + (UNKNOWN,)
    return tuple(map(chr, present.tolist()))


def encode(text: str, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Token ids of ``text`` (int64); characters outside ``vocabulary`` map to :data:`UNKNOWN`'s id,
    and raise ``ValueError`` when the vocabulary has no such symbol."""
    codes = _code_points(text)
    if not vocabulary:
        if len(codes):
            raise ValueError("cannot encode text with an empty vocabulary")
        return np.zeros(0, dtype=np.int64)
    vocab_codes = np.array([ord(c) for c in vocabulary], dtype=np.int64)
    order = np.argsort(vocab_codes)
    sorted_codes = vocab_codes[order]
    slots = np.searchsorted(sorted_codes, codes).clip(max=len(sorted_codes) - 1)
    found = sorted_codes[slots] == codes
    ids = order[slots]
    if not found.all():
        if UNKNOWN not in vocabulary:
            missing = sorted({chr(c) for c in codes[~found].tolist()})
            raise ValueError(f"characters outside the vocabulary and no unknown symbol: {missing[:10]!r}")
        ids[~found] = vocabulary.index(UNKNOWN)
    return ids.astype(np.int64)


def decode(ids, vocabulary: tuple[str, ...]) -> str:
    """The text spelled by the token ids ``ids`` (any integer sequence, array or tensor)."""
    return "".join(vocabulary[i] for i in np.asarray(ids).reshape(-1).tolist())


def windows(stream: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``context`` tokens from ``stream`` and their targets, the same
    windows shifted one token on: ``y[i, t] == x[i, t + 1]`` and ``y[i, -1]`` is the token after
    the window. Both ``(N, context)`` with ``N = (len(stream) - 1) // context``; a tail too short
    for a window is dropped."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    n = max((len(stream) - 1) // context, 0)
    x = stream[: n * context].reshape(n, context)
    y = stream[1 : n * context + 1].reshape(n, context)
    return x, y


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
