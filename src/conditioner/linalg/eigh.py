"""Batched symmetric eigendecomposition that never leaves a bad basis behind.

Kronecker factors are accumulated in float32 and can be singular, badly scaled, or (after a
corrupted gradient) non-finite. LAPACK's ``syevd`` then either raises or returns garbage. Every
function here takes a stack ``A`` of shape ``(B, d, d)`` and handles each matrix on its own:
non-finite input is never decomposed, a failing decomposition is retried in float64 and then with
diagonal jitter, and a matrix that still fails keeps the basis it had before (or the identity).

Nothing here reads a tensor on the host unless LAPACK raised: per-matrix decisions are
``torch.where`` masks, and the warning about failed matrices goes through
:func:`conditioner.linalg.deferred.warn_later` (logged at the caller's synchronisation inside an
optimizer step). ``torch.linalg.eigh`` itself checks LAPACK's / cuSOLVER's ``info`` on the host
(``_linalg_check_errors``, one read per call on CUDA); torch 2.13 has no variant without that
check: there is no ``eigh_ex``, and ``torch._linalg_eigh`` (no ``check_errors`` argument) raises
the same ``LinAlgError`` on a matrix of NaN, so the check is inside it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from conditioner.linalg.deferred import warn_later

logger = logging.getLogger(__name__)

_JITTER_SCALES = (1e-10, 1e-7, 1e-4)


class Eigh(NamedTuple):
    """Result of :func:`safe_eigh`: eigenvalues ``(B, d)`` in descending order (ascending when
    asked), eigenvectors as columns ``(B, d, d)`` in the same order, and ``failed`` ``(B,)``, True where the previous
    basis (or the identity) was kept because no decomposition could be trusted."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    failed: torch.Tensor


def _is_finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(-2).all(-1)


def _symmetrise(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * a + 0.5 * a.mT


def _try_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """eigh of a stack, or None when LAPACK fails (a non-finite result is judged per matrix by
    the caller, without reading it on the host)."""
    try:
        return torch.linalg.eigh(a)
    except (torch.linalg.LinAlgError, RuntimeError):
        return None


def _try_eigh_finite(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """eigh of one matrix, or None when LAPACK fails or the result is not finite (the retries
    below run only after LAPACK raised, when the host has waited already)."""
    result = _try_eigh(a)
    if result is None or not (torch.isfinite(result[0]).all() and torch.isfinite(result[1]).all()):
        return None
    return result


def _eigh_one_with_fallbacks(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decompose one matrix: its own dtype, then float64, then float64 with growing jitter."""
    result = _try_eigh_finite(a)
    if result is not None:
        return result
    a64 = a.double()
    result = _try_eigh_finite(a64)
    scale = a64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(a.shape[-1], dtype=torch.float64, device=a.device)
    for jitter in _JITTER_SCALES:
        if result is not None:
            break
        result = _try_eigh_finite(a64 + (jitter * scale) * eye)
    if result is None:
        return None
    vals, vecs = result
    return vals.to(a.dtype), vecs.to(a.dtype)


def safe_eigh(
    a: torch.Tensor,
    previous: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    descending: bool = True,
) -> Eigh:
    """Eigendecompose a stack of symmetric matrices ``a`` of shape ``(B, d, d)``.

    Eigenpairs come in DESCENDING order of eigenvalue, or in ``torch.linalg.eigh``'s ascending
    order with ``descending=False`` (a kept or identity basis is returned as it is). Matrices that are non-finite, or whose
    decomposition fails even in float64 with jitter, get ``previous[i]`` (or the identity when
    ``previous`` is None) as their basis, zero eigenvalues, and ``failed[i] = True``; a warning is
    logged (:func:`~conditioner.linalg.deferred.warn_later`). A matrix whose batched result is not
    finite (LAPACK did not raise) counts as failed without a retry. An all-zero matrix gets the identity basis. The decomposition runs in
    ``compute_dtype`` (default: float64 for float64 input, float32 otherwise) and the result is
    returned in that dtype.
    """
    if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be a stack of square matrices (B, d, d), got shape {tuple(a.shape)}")
    if previous is not None and previous.shape != a.shape:
        raise ValueError(f"previous must have the shape of a {tuple(a.shape)}, got {tuple(previous.shape)}")
    if compute_dtype is None:
        compute_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    work = _symmetrise(a.to(compute_dtype))
    batch, dim = work.shape[0], work.shape[-1]
    eye = torch.eye(dim, dtype=compute_dtype, device=a.device).expand(batch, dim, dim)
    fallback = eye if previous is None else previous.to(compute_dtype)

    finite = _is_finite(work)
    zero = (work == 0).flatten(-2).all(-1)
    usable = finite & ~zero
    clean = torch.where(usable[:, None, None], work, eye)

    result = _try_eigh(clean)
    if result is not None:
        vals, vecs = result
        ok = usable & _is_finite(vecs) & torch.isfinite(vals).all(-1)
    else:
        per_matrix = [_eigh_one_with_fallbacks(m) for m in clean]
        ok = usable & torch.tensor([r is not None for r in per_matrix], device=a.device)
        vals = torch.stack([r[0] if r is not None else eye.new_ones(dim) for r in per_matrix])
        vecs = torch.stack([r[1] if r is not None else eye[0] for r in per_matrix])

    if descending:
        vals = vals.flip(-1)
        vecs = vecs.flip(-1)
    failed = ~finite | (usable & ~ok)
    keep_identity = zero & finite
    vecs = torch.where(ok[:, None, None], vecs, torch.where(keep_identity[:, None, None], eye, fallback))
    vals = torch.where(ok[:, None], vals, torch.zeros_like(vals))
    warn_later(
        logger,
        "eigendecomposition failed for %d matrices of size %d; kept their previous basis",
        failed.sum(),
        dim,
    )
    return Eigh(vals, vecs, failed)
