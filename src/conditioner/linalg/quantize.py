"""4-bit block quantisation of stacks of (nearly) orthogonal matrices (docs/algorithms.md §4).

Wang et al. (2024) store Shampoo's eigenvector matrices in 4 bits. Here each matrix of a stack
``(B, d, d)`` is read row-major as ``d·d`` values (rows padded to an even length), cut into blocks of
:data:`BLOCK` = 64 values, and every value is replaced by the nearest of 16 levels of a signed
linear-square code book times its block's absolute maximum (a float32 scale). Two 4-bit codes share
one ``uint8``: a ``d × d`` matrix costs ``d·⌈d/2⌉`` bytes of codes plus 4 bytes per block.

The code book ``sign(t)·t²`` for ``t`` on 16 equispaced points of ``[−1, 1]`` spends its levels
near zero, where most entries of an eigenvector matrix lie. Its widest gap is the last one,
``1 − (13/15)² = 56/225``, so a value is reconstructed to within ``28/225 ≈ 0.124`` times its
block's absolute maximum (:data:`MAX_RELATIVE_ERROR`). Dequantised bases are not orthogonal;
:func:`dequantize_basis` repairs them by Björck rectification.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from conditioner.linalg.orthogonal import bjorck_rectify

BLOCK = 64
LEVELS = 16
_T = torch.linspace(-1.0, 1.0, LEVELS, dtype=torch.float64)
#: the code book, ascending: ``sign(t)·t²`` for 16 equispaced ``t`` in [−1, 1]
CODE_BOOK = (_T.sign() * _T.square()).to(torch.float32)
#: half the widest gap of the code book: the worst error relative to the block's absolute maximum
MAX_RELATIVE_ERROR = float((CODE_BOOK[-1] - CODE_BOOK[-2]) / 2)
#: Björck steps after dequantisation (two bring ‖VᵀV − I‖ from ~1e-1 to float32 round-off)
RECTIFY_STEPS = 2


class Quantized(NamedTuple):
    """A quantised stack: ``codes`` ``(B, d, ⌈d/2⌉)`` uint8 (two codes a byte, low nibble first)
    and ``scales`` ``(B, blocks)`` float32, the absolute maximum of each block of 64 values."""

    codes: torch.Tensor
    scales: torch.Tensor


def quantized_bytes(batch: int, d: int) -> int:
    """Bytes that :func:`quantize` uses for a stack of ``batch`` matrices ``d × d``."""
    padded = d * 2 * math.ceil(d / 2)
    return batch * (padded // 2 + 4 * math.ceil(padded / BLOCK))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``(B, d, d)`` → ``(B, blocks, 64)``: rows padded to even length, the tail block with zeros."""
    batch, cols = x.shape[0], x.shape[-1]
    x = torch.nn.functional.pad(x, (0, cols % 2)).reshape(batch, -1)
    return torch.nn.functional.pad(x, (0, -x.shape[1] % BLOCK)).reshape(batch, -1, BLOCK)


def quantize(x: torch.Tensor) -> Quantized:
    """Quantise a stack of square matrices ``(B, d, d)`` to 4-bit codes with per-block scales."""
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be a stack of square matrices (B, d, d), got shape {tuple(x.shape)}")
    batch, d, _ = x.shape
    blocks = _blocks(x.float())
    scales = blocks.abs().amax(-1)
    normalised = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)
    book = CODE_BOOK.to(x.device)
    codes = torch.bucketize(normalised, (book[1:] + book[:-1]) / 2).to(torch.uint8)
    codes = codes.reshape(batch, -1)[:, : d * 2 * math.ceil(d / 2)].reshape(batch, d, -1, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return Quantized(packed, scales)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 stack ``(B, d, d)`` that :func:`quantize` encoded."""
    batch, d, half = q.codes.shape
    codes = torch.stack((q.codes & 0xF, q.codes >> 4), dim=-1).reshape(batch, -1).long()
    values = CODE_BOOK.to(q.codes.device)[codes]
    values = torch.nn.functional.pad(values, (0, -values.shape[1] % BLOCK)).reshape(batch, -1, BLOCK)
    values = (values * q.scales.unsqueeze(-1)).reshape(batch, -1)
    return values[:, : d * 2 * half].reshape(batch, d, 2 * half)[..., :d]


def dequantize_basis(q: Quantized, steps: int = RECTIFY_STEPS) -> torch.Tensor:
    """Dequantise a stack of orthogonal matrices and pull it back onto the orthogonal group."""
    return bjorck_rectify(dequantize(q), steps)


__all__ = [
    "BLOCK",
    "CODE_BOOK",
    "MAX_RELATIVE_ERROR",
    "RECTIFY_STEPS",
    "Quantized",
    "dequantize",
    "dequantize_basis",
    "quantize",
    "quantized_bytes",
]
