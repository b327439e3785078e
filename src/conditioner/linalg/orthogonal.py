"""Orthogonalisation by matrix products only: Newton–Schulz iterations toward the polar factor.

``newton_schulz`` gives ``orth(G) = U Vᵀ`` for ``G = U Σ Vᵀ`` (Muon's update; docs/algorithms.md §5).
Its default quintic coefficients converge fast but only to singular values in roughly
[0.7, 1.2]; the cubic coefficients ``(1.5, −0.5, 0)`` converge to the exact polar factor and are
the Björck rectification used to repair a nearly orthogonal basis after quantisation.
"""

from __future__ import annotations

import torch

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)


def _iterate(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram) if c != 0 else b * gram
        x = a * x + poly @ x
    return x


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
    epsilon: float = 1e-7,
) -> torch.Tensor:
    """Approximate polar factor of each matrix in ``g`` (shape ``(..., m, n)``).

    ``X ← G / ‖G‖_F``, then ``X ← aX + (bA + cA²)X`` with ``A = X Xᵀ``, on the wide orientation
    (the Gram matrix is min(m, n) square). Runs in ``g``'s dtype, so bfloat16 input stays cheap.
    """
    if g.ndim < 2:
        raise ValueError(f"g must have at least 2 dimensions, got shape {tuple(g.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x / (torch.linalg.matrix_norm(x.to(norm_dtype), keepdim=True) + epsilon).to(x.dtype)
    x = _iterate(x, steps, coefficients)
    return x.mT if tall else x


def bjorck_rectify(v: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Björck step(s) ``V ← 1.5 V − 0.5 V Vᵀ V`` pulling a nearly orthogonal ``V`` back onto the
    orthogonal group (no normalisation: V is assumed close to orthogonal already)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return _iterate(v, steps, CUBIC_COEFFICIENTS)
