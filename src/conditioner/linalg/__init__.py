"""The eigenbasis engine: batched routines on stacks ``(B, d, d)`` of equal-shape matrices."""

from conditioner.linalg.eigh import Eigh, safe_eigh
from conditioner.linalg.orthogonal import CUBIC_COEFFICIENTS, MUON_COEFFICIENTS, bjorck_rectify, newton_schulz
from conditioner.linalg.quantize import Quantized, dequantize, dequantize_basis, quantize
from conditioner.linalg.roots import (
    NewtonRoot,
    inverse_root_eigh,
    inverse_root_from_eigh,
    inverse_root_newton,
    newton_root,
)
from conditioner.linalg.tracking import (
    QRRefresh,
    Staleness,
    dense_staleness,
    descending_order,
    orthogonal_iteration_step,
    orthonormal_factor,
    permute_columns,
    qr_algorithm,
    qr_refresh,
    staleness,
)

__all__ = [
    "CUBIC_COEFFICIENTS",
    "MUON_COEFFICIENTS",
    "NewtonRoot",
    "Eigh",
    "QRRefresh",
    "Quantized",
    "Staleness",
    "bjorck_rectify",
    "dense_staleness",
    "dequantize",
    "dequantize_basis",
    "descending_order",
    "inverse_root_eigh",
    "inverse_root_from_eigh",
    "inverse_root_newton",
    "newton_root",
    "newton_schulz",
    "orthogonal_iteration_step",
    "orthonormal_factor",
    "permute_columns",
    "qr_algorithm",
    "qr_refresh",
    "quantize",
    "safe_eigh",
    "staleness",
]
