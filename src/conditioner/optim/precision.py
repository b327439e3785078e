"""How optimizer state is stored between steps: full precision, bfloat16, or 4-bit eigenbases.

Kernels always compute in the statistics dtype (float32, or float64 for float64 parameters);
only what is kept between steps changes. Every state entry has a role, declared by its optimizer:

- ``"basis"``: an orthogonal matrix per block (eigenbases). bfloat16, or with ``"4bit"`` block
  quantised (:mod:`conditioner.linalg.quantize`) and Björck-rectified when read back.
- ``"matrix"``: any other matrix per block (Kronecker factors, inverse roots). bfloat16 with
  ``"bfloat16"``; kept as it is with ``"4bit"`` (optimizers that support 4-bit bases keep their
  large factors as eigenpairs instead, see :mod:`conditioner.optim.eigen_adam`).
- ``"moment"``: element-wise moments. bfloat16 with ``"bfloat16"``, kept with ``"4bit"``.
- ``"exact"``: counters, eigenvalues: never rounded.

Matrices with fewer than :data:`SMALL_MATRIX` elements stay in full precision: they cost little,
and the quantisation blocks of 64 values would hold few of their entries. A 4-bit basis ``K`` is
stored as ``K#codes`` and ``K#scales``.
"""

from __future__ import annotations

import math

import torch

from conditioner.linalg.quantize import Quantized, dequantize_basis, quantize

PRECISIONS = ("full", "bfloat16", "4bit")
ROLES = ("basis", "matrix", "moment", "exact")
SMALL_MATRIX = 4096
_CODES, _SCALES = "#codes", "#scales"

#: decoded entries: key → (the working tensor handed to the kernel, the stored entries it came from)
Decoded = dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]


def is_large_matrix(value: torch.Tensor) -> bool:
    """A stack ``(B, d, d)`` of matrices with at least :data:`SMALL_MATRIX` elements each."""
    return value.ndim == 3 and value.shape[1] == value.shape[2] and math.prod(value.shape[1:]) >= SMALL_MATRIX


def stored_form(role: str, precision: str, value: torch.Tensor) -> str:
    """``"as-is"``, ``"bfloat16"`` or ``"4bit"``: how ``value`` of ``role`` is kept under ``precision``."""
    if role not in ROLES:
        raise ValueError(f"unknown state role {role!r}; expected one of {ROLES}")
    if precision == "full" or role == "exact" or not value.is_floating_point():
        return "as-is"
    if role == "moment":
        return "bfloat16" if precision == "bfloat16" else "as-is"
    if not is_large_matrix(value):
        return "as-is"
    if precision == "4bit":
        return "4bit" if role == "basis" else "as-is"
    return "bfloat16"


def encode(key: str, value: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
    """The stored entries for working tensor ``value`` kept in ``form``."""
    if form == "as-is":
        return {key: value}
    if form == "bfloat16":
        return {key: value.to(torch.bfloat16)}
    codes, scales = quantize(value)
    return {key + _CODES: codes, key + _SCALES: scales}


def decode(stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Decoded]:
    """Working tensors (in ``dtype``) from stored entries, and what each decoded one came from.

    Entries already in ``dtype`` (or not floating point) are handed over as they are.
    """
    working: dict[str, torch.Tensor] = {}
    decoded: Decoded = {}
    for key, value in stored.items():
        if key.endswith(_SCALES):
            continue
        if key.endswith(_CODES):
            name = key[: -len(_CODES)]
            scales = stored[name + _SCALES]
            working[name] = dequantize_basis(Quantized(value, scales)).to(dtype)
            decoded[name] = (working[name], {key: value, name + _SCALES: scales})
        elif value.is_floating_point() and value.dtype != dtype:
            working[key] = value.to(dtype)
            decoded[key] = (working[key], {key: value})
        else:
            working[key] = value
    return working, decoded


__all__ = ["PRECISIONS", "ROLES", "SMALL_MATRIX", "Decoded", "decode", "encode", "is_large_matrix", "stored_form"]
