"""How optimizer state is stored between steps: full precision, bfloat16, or 4-bit eigenbases.

Kernels always compute in the statistics dtype (float32, or float64 for float64 parameters);
only what is kept between steps changes. Every state entry has a role, declared by its optimizer:

- ``"basis"``: an orthogonal matrix per block (eigenbases). bfloat16, or with ``"4bit"`` block
  quantised (:mod:`conditioner.linalg.quantize`) and read back by dequantisation alone (the
  optimizers rectify where their schedule needs an orthogonal matrix, docs/algorithms.md §4).
- ``"matrix"``: any other matrix per block (Kronecker factors). bfloat16 with
  ``"bfloat16"``; kept as it is with ``"4bit"`` (optimizers that support 4-bit bases keep their
  large factors as eigenpairs instead, see :mod:`conditioner.optim.eigen_adam`).
- ``"root"``: a symmetric matrix whose diagonal carries much of its weight (Shampoo's inverse
  roots). bfloat16 with ``"bfloat16"``; with ``"4bit"`` its off-diagonal entries are block
  quantised and its diagonal kept in the working dtype (the 4-bit Shampoo authors' storage of
  inverse roots: the diagonal neither spends a code nor sets the blocks' scales).
- ``"moment"``: element-wise moments. bfloat16 with ``"bfloat16"``, kept with ``"4bit"``.
- ``"exact"``: counters, eigenvalues: never rounded.

Entries are decoded when a kernel first reads them (:class:`StoredState`): an ordinary 4-bit
step dequantises only the bases it applies, not the statistics it leaves alone.

Matrices with fewer than :data:`SMALL_MATRIX` elements stay in full precision: they cost little,
and the quantisation blocks of 64 values would hold few of their entries. A 4-bit basis ``K`` is
stored as ``K#codes`` and ``K#scales``, a 4-bit root also as ``K#diagonal``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from conditioner.linalg.quantize import Quantized, dequantize, quantize

PRECISIONS = ("full", "bfloat16", "4bit")
ROLES = ("basis", "matrix", "root", "moment", "exact")
SMALL_MATRIX = 4096
#: the 4-bit Shampoo paper's intervals (Wang et al. 2024, and their code's defaults): statistics
#: every T1 = 100 steps, what is applied (inverse roots, eigenbases) every T2 = 500
PAPER_STATISTICS_INTERVAL = 100
PAPER_PRECONDITION_FREQUENCY = 500
_CODES, _SCALES, _DIAGONAL = "#codes", "#scales", "#diagonal"

#: decoded entries: key → (the working tensor handed to the kernel, the stored entries it came from)
Decoded = dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]


def schedule(
    precision: str, statistics_interval: int | None, precondition_frequency: int | None, frequency: int
) -> tuple[int, int]:
    """The intervals a constructor stores: those given, else the 4-bit Shampoo paper's under
    ``"4bit"`` state (:data:`PAPER_STATISTICS_INTERVAL`, :data:`PAPER_PRECONDITION_FREQUENCY`)
    and otherwise statistics on every step and the optimizer's own ``frequency``."""
    paper = precision == "4bit"
    if statistics_interval is None:
        statistics_interval = PAPER_STATISTICS_INTERVAL if paper else 1
    if precondition_frequency is None:
        precondition_frequency = PAPER_PRECONDITION_FREQUENCY if paper else frequency
    return statistics_interval, precondition_frequency


def entry_name(stored_key: str) -> str:
    """The working entry a stored key belongs to: ``"basis0"`` for ``"basis0#codes"``."""
    return stored_key.split("#", 1)[0]


def is_large_matrix(value: torch.Tensor) -> bool:
    """A stack ``(B, d, d)`` of matrices with at least :data:`SMALL_MATRIX` elements each."""
    return value.ndim == 3 and value.shape[1] == value.shape[2] and math.prod(value.shape[1:]) >= SMALL_MATRIX


def stored_form(role: str, precision: str, value: torch.Tensor) -> str:
    """``"as-is"``, ``"bfloat16"``, ``"4bit"`` or ``"4bit-off-diagonal"``: how ``value`` of ``role``
    is kept under ``precision``."""
    if role not in ROLES:
        raise ValueError(f"unknown state role {role!r}; expected one of {ROLES}")
    if precision == "full" or role == "exact" or not value.is_floating_point():
        return "as-is"
    if role == "moment":
        return "bfloat16" if precision == "bfloat16" else "as-is"
    if not is_large_matrix(value):
        return "as-is"
    if precision == "4bit":
        return {"basis": "4bit", "root": "4bit-off-diagonal"}.get(role, "as-is")
    return "bfloat16"


def encode(key: str, value: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
    """The stored entries for working tensor ``value`` kept in ``form``."""
    if form == "as-is":
        return {key: value}
    if form == "bfloat16":
        return {key: value.to(torch.bfloat16)}
    if form == "4bit":
        codes, scales = quantize(value)
        return {key + _CODES: codes, key + _SCALES: scales}
    diagonal = torch.diagonal(value, dim1=-2, dim2=-1)
    codes, scales = quantize(value - torch.diag_embed(diagonal))
    return {key + _CODES: codes, key + _SCALES: scales, key + _DIAGONAL: diagonal.clone()}


class StoredState(Mapping[str, torch.Tensor]):
    """The working tensors (in ``dtype``) of stored entries, each decoded on its first read.

    Entries already in ``dtype`` (or not floating point) are handed over as they are; a 4-bit one
    is dequantised (not rectified: the kernels rectify where they need it). :attr:`decoded`
    records what each decoded working tensor came from.
    """

    def __init__(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self._stored = stored
        self._dtype = dtype
        self._names = [k.removesuffix(_CODES) for k in stored if not k.endswith((_SCALES, _DIAGONAL))]
        self._working: dict[str, torch.Tensor] = {}
        self.decoded: Decoded = {}

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._stored or (isinstance(key, str) and key + _CODES in self._stored)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._working:
            return self._working[key]
        if key + _CODES in self._stored:
            entries = {k: self._stored[k] for k in (key + _CODES, key + _SCALES, key + _DIAGONAL) if k in self._stored}
            value = dequantize(Quantized(entries[key + _CODES], entries[key + _SCALES])).to(self._dtype)
            if key + _DIAGONAL in entries:  # the off-diagonal part's codes for its zero diagonal are replaced
                torch.diagonal(value, dim1=-2, dim2=-1).copy_(entries[key + _DIAGONAL])
        else:
            value = self._stored[key]
            if not (value.is_floating_point() and value.dtype != self._dtype):
                return value
            entries = {key: value}
            value = value.to(self._dtype)
        self._working[key] = value
        self.decoded[key] = (value, entries)
        return value


def decode(stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Decoded]:
    """Every working tensor of ``stored`` (see :class:`StoredState`), and what each decoded one
    came from."""
    state = StoredState(stored, dtype)
    return dict(state), state.decoded


__all__ = [
    "PAPER_PRECONDITION_FREQUENCY",
    "PAPER_STATISTICS_INTERVAL",
    "PRECISIONS",
    "ROLES",
    "SMALL_MATRIX",
    "Decoded",
    "StoredState",
    "decode",
    "encode",
    "entry_name",
    "is_large_matrix",
    "schedule",
    "stored_form",
]
