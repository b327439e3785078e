"""Tests of the eigenbasis engine ``conditioner.linalg`` against independent float64 references.

Every reference is computed in float64 with numpy / scipy from the (rounded) input the library saw.
Tolerances follow backward-error arguments: a backward-stable routine on a ``d``-dimensional input
commits an error of about ``c · d · eps · ‖A‖``; each tolerance says which bound it uses.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conditioner.linalg import (
    CUBIC_COEFFICIENTS,
    MUON_COEFFICIENTS,
    bjorck_rectify,
    dense_staleness,
    descending_order,
    inverse_root_eigh,
    inverse_root_from_eigh,
    inverse_root_newton,
    newton_schulz,
    orthogonal_iteration_step,
    permute_columns,
    qr_refresh,
    safe_eigh,
    staleness,
)

eigh_module = importlib.import_module("conditioner.linalg.eigh")


pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EPS = {torch.float32: float(np.finfo(np.float32).eps), torch.float64: float(np.finfo(np.float64).eps)}
KINDS = ("indefinite", "spd", "ill_conditioned", "rank_deficient")


# ----------------------------------------------------------------------------------------------
# float64 reference helpers (numpy / scipy only)
# ----------------------------------------------------------------------------------------------


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """Haar-distributed orthogonal matrix."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def sym(a: np.ndarray) -> np.ndarray:
    """Exactly symmetric copy (the float32 rounding of an exactly symmetric matrix stays symmetric)."""
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def with_spectrum(rng: np.random.Generator, eigenvalues: np.ndarray) -> np.ndarray:
    v = random_orthogonal(rng, len(eigenvalues))
    return sym((v * eigenvalues) @ v.T)


def make_matrix(kind: str, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "indefinite":
        g = rng.standard_normal((d, d))
        return sym(g + g.T)
    if kind == "spd":
        g = rng.standard_normal((d, d + 2))
        return sym(g @ g.T)
    if kind == "ill_conditioned":  # condition number 1e8
        return with_spectrum(rng, np.geomspace(1.0, 1e-8, d) if d > 1 else np.ones(1))
    if kind == "rank_deficient":  # rank d // 2 (at least 1)
        lam = rng.uniform(0.5, 2.0, d)
        lam[max(1, d // 2) :] = 0.0
        return with_spectrum(rng, lam)
    if kind == "zero":
        return np.zeros((d, d))
    raise AssertionError(kind)


@st.composite
def stacks(draw, kinds=KINDS, max_batch=4, min_dim=1, max_dim=12, scales=(1e-6, 1.0, 1e6)):
    """A float64 numpy stack (B, d, d) of exactly symmetric matrices of mixed kinds."""
    batch = draw(st.integers(1, max_batch))
    d = draw(st.integers(min_dim, max_dim))
    member_kinds = draw(st.lists(st.sampled_from(kinds), min_size=batch, max_size=batch))
    scale = draw(st.sampled_from(scales))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.stack([scale * make_matrix(k, d, rng) for k in member_kinds])


def as_torch(a: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """The tensor handed to the library, and its exact float64 value (after rounding to dtype)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return t, t.double().numpy()


def spectral_norm(a: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a, 2, axis=(-2, -1))


def mT(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def np_staleness(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """‖B − Diag(B)‖_F / ‖B‖_F with B = Qᵀ A Q, formed explicitly in float64 (0 where B = 0)."""
    b = mT(q) @ a @ q
    off = b - np.einsum("...i,ij->...ij", np.diagonal(b, axis1=-2, axis2=-1), np.eye(b.shape[-1]))
    nb = np.linalg.norm(b, axis=(-2, -1))
    return np.where(nb > 0, np.linalg.norm(off, axis=(-2, -1)) / np.where(nb > 0, nb, 1.0), 0.0)


def np_inverse_root(a: np.ndarray, p: float, epsilon: float) -> np.ndarray:
    """(A + εI)^(-1/p) by numpy eigh in float64 (negative round-off eigenvalues clamp to 0)."""
    w, v = np.linalg.eigh(sym(a))
    scale = (np.maximum(w, 0.0) + epsilon) ** (-1.0 / p)
    return (v * scale[..., None, :]) @ mT(v)


def align_signs(q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Flip each column of q (d, d) to have a non-negative inner product with ref's column."""
    return q * np.where(np.sum(q * ref, axis=0) < 0, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# safe_eigh
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(a=stacks(kinds=KINDS + ("zero",)), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_safe_eigh_matches_numpy(a, dtype):
    t, exact = as_torch(a, dtype)
    d = t.shape[-1]
    vals, vecs, failed = safe_eigh(t)
    assert vals.dtype == dtype and vecs.dtype == dtype
    assert vals.shape == t.shape[:2] and vecs.shape == t.shape
    assert not failed.any()
    lam, q = vals.double().numpy(), vecs.double().numpy()
    norm = spectral_norm(exact)
    # syevd is backward stable: ‖δA‖ ≤ c·d·eps·‖A‖ with a modest c; 20·d·eps leaves margin.
    tol = 20 * d * EPS[dtype]
    recon = (q * lam[:, None, :]) @ mT(q)
    assert np.all(spectral_norm(recon - exact) <= tol * norm)
    # Orthogonality of computed eigenvectors: same c·d·eps bound, independent of ‖A‖.
    assert np.all(spectral_norm(mT(q) @ q - np.eye(d)) <= tol)
    # Descending order is produced by a flip of LAPACK's sorted output: exact, no tolerance.
    assert np.all(np.diff(lam, axis=-1) <= 0)
    # Weyl: eigenvalues of A + δA differ from those of A by at most ‖δA‖ ≤ tol·‖A‖.
    reference = np.linalg.eigvalsh(exact)[:, ::-1]
    assert np.all(np.abs(lam - reference) <= tol * norm[:, None])
    zero = ~exact.any(axis=(-2, -1))
    assert np.array_equal(q[zero], np.broadcast_to(np.eye(d), q[zero].shape))
    assert np.array_equal(lam[zero], np.zeros_like(lam[zero]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_eigh_eigenvectors_match_numpy(dtype):
    rng = np.random.default_rng(0)
    d = 10
    lam = np.geomspace(1.0, 1e-3, d)  # well separated: relative gap ≥ 1 − 10^(-1/3)
    a = np.stack([with_spectrum(rng, lam) for _ in range(3)])
    t, exact = as_torch(a, dtype)
    vals, vecs, failed = safe_eigh(t)
    assert not failed.any()
    w, v = np.linalg.eigh(exact)
    w, v = w[:, ::-1], v[:, :, ::-1]
    for i in range(3):
        gaps = np.abs(w[i][:, None] - w[i][None, :]) + np.diag(np.full(d, np.inf))
        # Davis–Kahan: sin∠(q_j, v_j) ≤ ‖δA‖ / gap_j with ‖δA‖ ≤ 20·d·eps·‖A‖ (see above);
        # ×2 for the chord length of sign-aligned unit vectors.
        bound = 2 * 20 * d * EPS[dtype] * w[i, 0] / gaps.min(axis=1)
        q = align_signs(vecs[i].double().numpy(), v[i])
        assert np.all(np.linalg.norm(q - v[i], axis=0) <= bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_previous", [False, True])
def test_safe_eigh_mixed_stack(dtype, with_previous, caplog):
    rng = np.random.default_rng(1)
    d = 6
    good = [make_matrix("spd", d, rng), make_matrix("rank_deficient", d, rng), make_matrix("ill_conditioned", d, rng)]
    nan = make_matrix("spd", d, rng)
    nan[2, 3] = np.nan
    pinf = make_matrix("spd", d, rng)
    pinf[4, 4] = np.inf
    ninf = make_matrix("spd", d, rng)
    ninf[0, 5] = ninf[5, 0] = -np.inf
    a = np.stack([good[0], nan, good[1], pinf, np.zeros((d, d)), ninf, good[2]])
    bad = np.array([False, True, False, True, False, True, False])
    t, exact = as_torch(a, dtype)
    previous = torch.from_numpy(np.stack([random_orthogonal(rng, d) for _ in range(len(a))])).to(dtype)
    with caplog.at_level(logging.WARNING, logger="conditioner.linalg.eigh"):
        vals, vecs, failed = safe_eigh(t, previous if with_previous else None)
    assert failed.tolist() == bad.tolist()
    assert "failed for 3 of 7" in caplog.text
    kept = previous if with_previous else torch.eye(d, dtype=dtype).expand_as(previous)
    for i in np.flatnonzero(bad):
        assert torch.equal(vecs[i], kept[i])  # exactly, not approximately
        assert torch.equal(vals[i], torch.zeros(d, dtype=dtype))
    # The all-zero member gets the identity (never `previous`) and does not count as failed.
    assert torch.equal(vecs[4], torch.eye(d, dtype=dtype)) and torch.equal(vals[4], torch.zeros(d, dtype=dtype))
    # The finite members are decomposed as if alone: same 20·d·eps·‖A‖ backward-error bound.
    tol = 20 * d * EPS[dtype]
    for i in (0, 2, 6):
        q, lam = vecs[i].double().numpy(), vals[i].double().numpy()
        norm = spectral_norm(exact[i])
        assert spectral_norm((q * lam) @ q.T - exact[i]) <= tol * norm
        assert spectral_norm(q.T @ q - np.eye(d)) <= tol
        assert np.all(np.abs(lam - np.linalg.eigvalsh(exact[i])[::-1]) <= tol * norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_eigh_all_zero_stack(dtype, caplog):
    previous = torch.from_numpy(random_orthogonal(np.random.default_rng(2), 4)).to(dtype).expand(3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="conditioner.linalg.eigh"):
        vals, vecs, failed = safe_eigh(torch.zeros(3, 4, 4, dtype=dtype), previous)
    assert not failed.any()
    assert torch.equal(vecs, torch.eye(4, dtype=dtype).expand(3, 4, 4))
    assert torch.equal(vals, torch.zeros(3, 4, dtype=dtype))
    assert caplog.text == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_eigh_rank_deficient(dtype):
    rng = np.random.default_rng(3)
    d, rank = 9, 4
    lam = np.zeros(d)
    lam[:rank] = [3.0, 2.0, 1.5, 1.0]
    a = np.stack([with_spectrum(rng, lam) for _ in range(2)])
    t, exact = as_torch(a, dtype)
    vals, vecs, failed = safe_eigh(t)
    assert not failed.any()
    # Backward error 20·d·eps·‖A‖ (see test_safe_eigh_matches_numpy) bounds every statement below.
    tol = 20 * d * EPS[dtype] * 3.0
    v = vals.double().numpy()
    q = vecs.double().numpy()
    assert np.all(np.abs(v[:, :rank] - lam[:rank]) <= tol)
    assert np.all(np.abs(v[:, rank:]) <= tol)
    # The trailing eigenvectors span the null space: ‖A Q_null‖ ≤ ‖δA‖.
    assert np.all(spectral_norm(exact @ q[:, :, rank:]) <= tol)
    assert np.all(spectral_norm(mT(q) @ q - np.eye(d)) <= tol)


def test_safe_eigh_bad_shapes():
    with pytest.raises(ValueError):
        safe_eigh(torch.eye(3))
    with pytest.raises(ValueError):
        safe_eigh(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        safe_eigh(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError):
        safe_eigh(torch.zeros(2, 3, 3), previous=torch.zeros(1, 3, 3))


@pytest.mark.parametrize("failing", ["first_call", "every_float32_call"])
def test_safe_eigh_per_matrix_fallback(monkeypatch, failing):
    rng = np.random.default_rng(4)
    d = 5
    a = np.stack([make_matrix("spd", d, rng), make_matrix("ill_conditioned", d, rng), make_matrix("spd", d, rng)])
    a[1, 0, 0] = np.nan
    t, exact = as_torch(a, torch.float32)
    previous = torch.from_numpy(np.stack([random_orthogonal(rng, d) for _ in range(3)])).float()
    real_eigh = torch.linalg.eigh
    calls, inputs = [], []

    def flaky(x, *args, **kwargs):
        calls.append((x.dtype, x.ndim))
        inputs.append(x.clone())
        if (failing == "first_call" and len(calls) == 1) or (failing != "first_call" and x.dtype == torch.float32):
            raise torch.linalg.LinAlgError("simulated syevd failure")
        return real_eigh(x, *args, **kwargs)

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", flaky)
    vals, vecs, failed = safe_eigh(t, previous)
    monkeypatch.undo()

    per_matrix = [(torch.float32, 2)] if failing == "first_call" else [(torch.float32, 2), (torch.float64, 2)]
    assert calls == [(torch.float32, 3)] + per_matrix * 3
    # Each retry sees its own matrix unchanged (the NaN member replaced by I), float64 without jitter.
    clean = t.clone()
    clean[1] = torch.eye(d)
    for k, x in enumerate(inputs[1:]):
        assert torch.equal(x, clean[k // len(per_matrix)].to(x.dtype))
    assert vals.dtype == torch.float32 and vecs.dtype == torch.float32
    assert failed.tolist() == [False, True, False]
    assert torch.equal(vecs[1], previous[1])
    # Same float32 backward-error bound as test_safe_eigh_matches_numpy (the float64 detour only helps).
    tol = 20 * d * EPS[torch.float32]
    for i in (0, 2):
        q, lam = vecs[i].double().numpy(), vals[i].double().numpy()
        norm = spectral_norm(exact[i])
        assert np.all(np.diff(lam) <= 0)
        assert spectral_norm((q * lam) @ q.T - exact[i]) <= tol * norm
        assert spectral_norm(q.T @ q - np.eye(d)) <= tol
        assert np.all(np.abs(lam - np.linalg.eigvalsh(exact[i])[::-1]) <= tol * norm)


def test_safe_eigh_jitter_fallback(monkeypatch):
    """eigh fails on every unjittered matrix: the first (smallest) jitter is the one applied."""
    rng = np.random.default_rng(5)
    d = 6
    a = np.stack([make_matrix("spd", d, rng), make_matrix("rank_deficient", d, rng)])
    t, exact = as_torch(a, torch.float64)
    real_eigh = torch.linalg.eigh

    def flaky(x, *args, **kwargs):
        if x.ndim == 3 or any(torch.equal(x, m) for m in t):
            raise torch.linalg.LinAlgError("simulated syevd failure")
        return real_eigh(x, *args, **kwargs)

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", flaky)
    vals, vecs, failed = safe_eigh(t)
    monkeypatch.undo()
    assert not failed.any()
    jitter = eigh_module._JITTER_SCALES[0] * np.abs(exact).max(axis=(-2, -1))
    # float64 backward error 20·d·eps·‖A‖ ≈ 3e-14·‖A‖, far below the 1e-10·max|A| jitter it detects.
    tol = 20 * d * EPS[torch.float64] * spectral_norm(exact)
    lam = vals.numpy()
    assert np.all(np.abs(lam - (np.linalg.eigvalsh(exact)[:, ::-1] + jitter[:, None])) <= tol[:, None])
    q = vecs.numpy()
    recon = (q * lam[:, None, :]) @ mT(q) - jitter[:, None, None] * np.eye(d)
    assert np.all(spectral_norm(recon - exact) <= tol)


def test_safe_eigh_total_failure_keeps_previous(monkeypatch, caplog):
    """A matrix on which eigh always fails (every dtype, every jitter) keeps its previous basis."""
    rng = np.random.default_rng(6)
    d = 4
    a = np.stack([make_matrix("spd", d, rng) for _ in range(3)])
    a[1, 0, 1] = a[1, 1, 0] = 0.375  # exactly representable marker; jitter only touches the diagonal
    t, exact = as_torch(a, torch.float32)
    previous = torch.from_numpy(np.stack([random_orthogonal(rng, d) for _ in range(3)])).float()
    real_eigh = torch.linalg.eigh

    def flaky(x, *args, **kwargs):
        if bool((x[..., 0, 1] == 0.375).any()):
            raise torch.linalg.LinAlgError("simulated syevd failure")
        return real_eigh(x, *args, **kwargs)

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", flaky)
    with caplog.at_level(logging.WARNING, logger="conditioner.linalg.eigh"):
        vals, vecs, failed = safe_eigh(t, previous)
    monkeypatch.undo()
    assert failed.tolist() == [False, True, False]
    assert "failed for 1 of 3" in caplog.text
    assert torch.equal(vecs[1], previous[1]) and torch.equal(vals[1], torch.zeros(d))
    tol = 20 * d * EPS[torch.float32]  # float32 backward error, as in test_safe_eigh_matches_numpy
    for i in (0, 2):
        q, lam = vecs[i].double().numpy(), vals[i].double().numpy()
        assert spectral_norm((q * lam) @ q.T - exact[i]) <= tol * spectral_norm(exact[i])


# ----------------------------------------------------------------------------------------------
# staleness
# ----------------------------------------------------------------------------------------------


def staleness_tolerance(dtype: torch.dtype, d: int, reference: np.ndarray | float = 0.0) -> np.ndarray:
    """ρ is computed as sqrt(‖A‖² − Σ diag²)/‖A‖: an absolute error δ = c·d·eps in ρ² (c = 8 covers
    the summations) moves ρ by at most min(sqrt(δ), δ/ρ_ref) (cancellation bites only near ρ = 0)."""
    delta = 8 * d * EPS[dtype]
    with np.errstate(divide="ignore"):
        return np.minimum(np.sqrt(delta), delta / np.asarray(reference, dtype=np.float64))


@SETTINGS
@given(
    a=stacks(kinds=KINDS + ("zero",)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_staleness_matches_dense_and_numpy(a, dtype, seed):
    rng = np.random.default_rng(seed)
    d = a.shape[-1]
    t, exact = as_torch(a, dtype)
    qt, q = as_torch(np.stack([random_orthogonal(rng, d) for _ in range(len(a))]), dtype)
    result = staleness(t, qt)
    rho = result.rho.double().numpy()
    reference = np_staleness(exact, q)
    assert np.all((rho >= 0) & (rho <= 1))
    assert np.all(np.abs(rho - reference) <= staleness_tolerance(dtype, d, reference))
    # dense_staleness forms B and its off-diagonal norm directly: plain c·d·eps error, no cancellation.
    dense = dense_staleness(t, qt).double().numpy()
    assert np.all(np.abs(dense - reference) <= 8 * d * EPS[dtype])
    # By-products: diag(QᵀAQ) and AQ, each with a c·d·eps·‖A‖ product error.
    norm = spectral_norm(exact)[:, None]
    b = mT(q) @ exact @ q
    estimated = result.estimated_eigenvalues.double().numpy()
    assert np.all(np.abs(estimated - np.diagonal(b, axis1=-2, axis2=-1)) <= 8 * d * EPS[dtype] * norm)
    assert np.all(np.abs(result.aq.double().numpy() - exact @ q) <= 8 * d * EPS[dtype] * norm[..., None])
    zero = ~exact.any(axis=(-2, -1))
    assert np.all(rho[zero] == 0) and np.all(dense[zero] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_staleness_of_eigenbasis_is_small(dtype):
    rng = np.random.default_rng(7)
    d = 12
    a = np.stack([make_matrix(kind, d, rng) for kind in KINDS])
    t, exact = as_torch(a, dtype)
    _, v = np.linalg.eigh(exact)
    qt = torch.from_numpy(v).to(dtype)
    rho = staleness(t, qt).rho.double().numpy()
    assert np.all(rho <= staleness_tolerance(dtype, d))  # cancellation floor, see staleness_tolerance
    assert np.all(dense_staleness(t, qt).double().numpy() <= 8 * d * EPS[dtype])  # no cancellation
    # ... while a random basis is far from diagonalising: the check above can fail.
    random_q = torch.from_numpy(np.stack([random_orthogonal(rng, d) for _ in KINDS])).to(dtype)
    assert np.all(staleness(t, random_q).rho.double().numpy() > 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_staleness_zero_matrix(dtype):
    q = torch.from_numpy(random_orthogonal(np.random.default_rng(8), 5)).to(dtype).expand(2, 5, 5)
    result = staleness(torch.zeros(2, 5, 5, dtype=dtype), q)
    assert torch.equal(result.rho, torch.zeros(2, dtype=dtype))
    assert torch.equal(result.estimated_eigenvalues, torch.zeros(2, 5, dtype=dtype))
    assert torch.equal(dense_staleness(torch.zeros(2, 5, 5, dtype=dtype), q), torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e18, 1e30])
def test_staleness_is_scale_invariant_for_tiny_and_huge_float32_factors(scale):
    rng = np.random.default_rng(9)
    a = torch.from_numpy(np.stack([make_matrix("spd", 8, rng) for _ in range(3)])).float()
    q = torch.from_numpy(np.stack([random_orthogonal(rng, 8) for _ in range(3)])).float()
    tiny = a * scale  # entries stay normal float32 numbers, but their squares would not
    # dense_staleness (normalised the same way) handles this scale too.
    assert torch.allclose(dense_staleness(tiny, q), dense_staleness(a, q), atol=1e-3)
    # ρ is scale invariant; float32 cancellation floor sqrt(8·d·eps) ≈ 3e-3.
    floor = float(staleness_tolerance(torch.float32, 8))
    assert torch.allclose(staleness(tiny, q).rho, staleness(a, q).rho, atol=floor)


# ----------------------------------------------------------------------------------------------
# descending_order / permute_columns / orthogonal_iteration_step
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(
    values=st.integers(1, 4).flatmap(
        lambda b: st.integers(1, 9).flatmap(
            lambda d: st.lists(
                st.lists(
                    st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]) | st.floats(-1e6, 1e6),  # many ties
                    min_size=d,
                    max_size=d,
                ),
                min_size=b,
                max_size=b,
            )
        )
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_descending_order_and_permute_columns(values, dtype):
    x = torch.tensor(values, dtype=dtype)
    order = descending_order(x)
    assert order.dtype == torch.int64 and order.shape == x.shape
    # Stable descending sort, with ties keeping their original order.
    rounded = x.double().numpy()  # the values as the library saw them (float32-rounded)
    expected = np.argsort(-rounded, axis=-1, kind="stable")
    assert np.array_equal(order.numpy(), expected)
    d = x.shape[-1]
    m = torch.from_numpy(np.random.default_rng(0).standard_normal((x.shape[0], d, d))).to(dtype)
    permuted = permute_columns(m, order)
    for b in range(x.shape[0]):
        assert np.array_equal(permuted[b].numpy(), m[b].numpy()[:, order[b].numpy()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonal_iteration_step(dtype):
    rng = np.random.default_rng(10)
    batch, d = 3, 7
    a = np.stack([make_matrix("spd", d, rng) for _ in range(batch)])
    q = np.stack([random_orthogonal(rng, d) for _ in range(batch)])
    t, exact = as_torch(a, dtype)
    qt, q = as_torch(q, dtype)
    aq = t @ qt
    order = torch.from_numpy(np.stack([rng.permutation(d) for _ in range(batch)]))
    stepped = orthogonal_iteration_step(aq, order).double().numpy()
    # Householder QR is backward stable: orthogonality and factorisation errors c·d·eps (relative).
    tol = 20 * d * EPS[dtype]
    target = np.stack([(exact[b] @ q[b])[:, order[b].numpy()] for b in range(batch)])
    for b in range(batch):
        ref_q, ref_r = np.linalg.qr(target[b])
        # QR is unique up to column signs for a full-rank input; column j's error grows with
        # 1/σ_min of the leading j columns, bounded here by κ(target) (spd: κ ≤ ~1e3).
        kappa = np.linalg.cond(target[b])
        assert np.linalg.norm(align_signs(stepped[b], ref_q) - ref_q, 2) <= tol * kappa
        assert np.linalg.norm(stepped[b].T @ stepped[b] - np.eye(d), 2) <= tol
        r = stepped[b].T @ target[b]
        assert np.all(np.abs(np.tril(r, -1)) <= tol * np.linalg.norm(target[b], 2))


# ----------------------------------------------------------------------------------------------
# qr_refresh
# ----------------------------------------------------------------------------------------------


def separated_problem(rng: np.random.Generator, d: int = 8):
    """SPD A with eigenvalues geometric 1 … 1e-3 (ratio 10^(-3/7) ≈ 0.37) on a random basis."""
    lam = np.geomspace(1.0, 1e-3, d)
    return with_spectrum(rng, lam), lam


def numpy_descending_eigh(a: np.ndarray):
    w, v = np.linalg.eigh(a)
    return w[::-1], v[:, ::-1]


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), start=st.sampled_from(["random", "perturbed_ascending"]))
def test_qr_refresh_converges_float64(seed, start):
    rng = np.random.default_rng(seed)
    d, batch = 8, 2
    problems = [separated_problem(rng, d) for _ in range(batch)]
    a = np.stack([p[0] for p in problems])
    if start == "random":
        q0 = np.stack([random_orthogonal(rng, d) for _ in range(batch)])
    else:  # eigenbasis in ASCENDING order, slightly perturbed, re-orthogonalised
        q0 = np.stack(
            [np.linalg.qr(numpy_descending_eigh(m)[1][:, ::-1] + 1e-2 * rng.standard_normal((d, d)))[0] for m in a]
        )
    tolerance = 1e-6  # above the float64 ρ noise floor sqrt(8·d·eps64) ≈ 1.2e-7
    result = qr_refresh(torch.from_numpy(a), torch.from_numpy(q0), tolerance, 40)
    basis = result.basis.numpy()
    assert np.all(result.rho.numpy() <= tolerance)
    assert np.all(result.iterations.numpy() >= 1)
    # Returned rho is that of the returned basis (up to the sqrt(8·d·eps) cancellation floor).
    true_rho = np_staleness(a, basis)
    assert np.all(np.abs(result.rho.numpy() - true_rho) <= staleness_tolerance(torch.float64, d, true_rho))
    assert np.all(spectral_norm(mT(basis) @ basis - np.eye(d)) <= 20 * d * EPS[torch.float64])
    for b in range(batch):
        w, v = numpy_descending_eigh(a[b])
        est = result.estimated_eigenvalues[b].numpy()
        assert np.all(np.diff(est) <= 0)
        # Weyl on B = Diag(B) + E: |sorted diag(B) − λ| ≤ ‖E‖₂ ≤ ρ‖A‖_F (+ float64 product error).
        assert np.all(np.abs(est - w) <= true_rho[b] * np.linalg.norm(a[b]) + 20 * d * EPS[torch.float64])
        # Davis–Kahan with ‖E‖ = ρ‖A‖_F: sin∠ ≤ ‖E‖/gap_j; ×2 for chord length and gap shrinkage.
        gaps = np.abs(w[:, None] - w[None, :]) + np.diag(np.full(d, np.inf))
        bound = 2 * (true_rho[b] * np.linalg.norm(a[b]) + 20 * d * EPS[torch.float64]) / gaps.min(axis=1)
        assert np.all(np.linalg.norm(align_signs(basis[b], v) - v, axis=0) <= bound)


def test_qr_refresh_converges_float32():
    rng = np.random.default_rng(11)
    d = 8
    a = np.stack([separated_problem(rng, d)[0] for _ in range(3)])
    q0 = np.stack([random_orthogonal(rng, d) for _ in range(3)])
    t, exact = as_torch(a, torch.float32)
    tolerance = 3 * float(staleness_tolerance(torch.float32, d))  # 3× the float32 ρ noise floor (≈ 2.8e-3)
    result = qr_refresh(t, torch.from_numpy(q0).float(), tolerance, 100)
    assert np.all(result.rho.numpy() <= tolerance)
    basis = result.basis.double().numpy()
    true_rho = np_staleness(exact, basis)
    assert np.all(true_rho <= tolerance + staleness_tolerance(torch.float32, d))  # + the noise floor
    for b in range(3):
        est = result.estimated_eigenvalues[b].double().numpy()
        assert np.all(np.diff(est) <= 0)
        w = np.linalg.eigvalsh(exact[b])[::-1]
        # Weyl (see float64 test) plus float32 product error 20·d·eps32·‖A‖.
        assert np.all(np.abs(est - w) <= true_rho[b] * np.linalg.norm(exact[b]) + 20 * d * EPS[torch.float32])


def test_qr_refresh_from_exact_ascending_eigenbasis():
    """ρ ≈ 0 already: no QR step; only the final sort reorders the columns into descending order."""
    rng = np.random.default_rng(12)
    d = 8
    a, lam = separated_problem(rng, d)
    w, v = numpy_descending_eigh(a)
    ascending = torch.from_numpy(np.ascontiguousarray(v[:, ::-1]))[None]
    result = qr_refresh(torch.from_numpy(a)[None], ascending, 1e-6, 10)
    assert result.iterations.tolist() == [0]
    assert torch.equal(result.basis, ascending.flip(-1))  # a pure column permutation: exact
    assert np.array_equal(result.basis[0].numpy(), np.ascontiguousarray(v))
    assert result.rho.item() <= 1e-6
    # Rayleigh quotients of exact eigenvectors: c·d·eps64·‖A‖ product error.
    assert np.all(np.abs(result.estimated_eigenvalues[0].numpy() - lam) <= 20 * d * EPS[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_refresh_leaves_fresh_members_untouched(dtype):
    rng = np.random.default_rng(13)
    d = 8
    a0, _ = separated_problem(rng, d)
    a1, _ = separated_problem(rng, d)
    a = np.stack([a0, a1, np.zeros((d, d))])
    _, v0 = numpy_descending_eigh(a0)
    q = np.stack([v0, random_orthogonal(rng, d), random_orthogonal(rng, d)])
    t, _ = as_torch(a, dtype)
    qt, _ = as_torch(q, dtype)
    tolerance = 3 * float(staleness_tolerance(dtype, d))  # above the ρ noise floor of the exact eigenbasis
    result = qr_refresh(t, qt, tolerance, 30)
    assert result.iterations[0].item() == 0 and result.iterations[2].item() == 0
    assert result.iterations[1].item() > 0
    assert torch.equal(result.basis[0], qt[0])  # fresh and already descending: bit-identical
    assert torch.equal(result.basis[2], qt[2])  # all-zero A: ρ = 0, ties keep the order
    assert result.rho[2].item() == 0
    assert result.rho[1].item() <= tolerance


def test_qr_refresh_initial_argument_and_validation():
    rng = np.random.default_rng(14)
    a = torch.from_numpy(np.stack([separated_problem(rng)[0] for _ in range(2)]))
    q = torch.from_numpy(np.stack([random_orthogonal(rng, 8) for _ in range(2)]))
    plain = qr_refresh(a, q, 1e-6, 5)
    warm = qr_refresh(a, q, 1e-6, 5, initial=staleness(a, q))
    for x, y in zip(plain, warm):
        assert torch.equal(x, y)
    with pytest.raises(ValueError):
        qr_refresh(a, q, 1e-6, 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_descending_sort_beats_plain_orthogonal_iteration(seed):
    """From a (perturbed) ASCENDING eigenbasis, the unsorted iteration Q ← qr(AQ).Q first moves
    away (ascending order is an unstable fixed point), the sorted one converges at once."""
    rng = np.random.default_rng(seed)
    d = 8
    a, _ = separated_problem(rng, d)
    _, v = numpy_descending_eigh(a)
    q0 = np.linalg.qr(v[:, ::-1] + 1e-2 * rng.standard_normal((d, d)))[0]
    at, qt = torch.from_numpy(a)[None], torch.from_numpy(q0)[None]
    start = np_staleness(a, q0)
    plain = qt
    for steps in range(1, 11):
        plain = torch.linalg.qr(at @ plain).Q
        plain_rho = np_staleness(a, plain[0].numpy())
        sorted_rho = np_staleness(a, qr_refresh(at, qt, 0.0, steps).basis[0].numpy())
        assert sorted_rho <= plain_rho
        # Measured margin is ≥ 500× over seeds 0–3; 10× keeps the test robust.
        assert sorted_rho <= 0.1 * plain_rho
        if steps == 1:
            assert plain_rho > start  # the unsorted step increases the off-diagonal mass
            assert sorted_rho < start


# ----------------------------------------------------------------------------------------------
# inverse roots
# ----------------------------------------------------------------------------------------------


ROOT_CASES = {
    # kind: (spectrum builder, epsilon, dtypes)
    "well_conditioned": (lambda d: np.geomspace(1.0, 0.1, d), 0.0, (torch.float32, torch.float64)),
    "ill_conditioned": (lambda d: np.geomspace(1.0, 1e-8, d), 0.0, (torch.float64,)),
    "ill_conditioned_eps": (lambda d: np.geomspace(1.0, 1e-8, d), 1e-4, (torch.float32, torch.float64)),
    "rank_deficient_eps": (
        lambda d: np.r_[np.linspace(1.0, 0.5, d // 2), np.zeros(d - d // 2)],
        1e-4,
        (torch.float32, torch.float64),
    ),
}


def root_tolerance(a: np.ndarray, p: float, epsilon: float, dtype: torch.dtype, newton_tol: float = 0.0) -> float:
    """Relative Frobenius error bound: the p-th root's relative condition number is κ/p with
    κ = (λ_max + ε)/(λ_min + ε); times a backward error 2·sqrt(d)·eps; plus, for Newton, the
    residual ‖M − I‖ ≤ d·tolerance at stop, which moves X by about d·tolerance/p (relative)."""
    w = np.maximum(np.linalg.eigvalsh(a), 0.0)
    kappa = (w.max() + epsilon) / (w.min() + epsilon)
    d = a.shape[-1]
    return 2 * np.sqrt(d) * EPS[dtype] * kappa / p + d * newton_tol / p


def relative_error(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize(
    "kind,dtype",
    [(kind, dtype) for kind, (_, _, dtypes) in ROOT_CASES.items() for dtype in dtypes],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_inverse_root_matches_numpy(kind, dtype, p, method):
    rng = np.random.default_rng(15)
    d = 12
    spectrum, epsilon, _ = ROOT_CASES[kind]
    a = np.stack([with_spectrum(rng, spectrum(d)) for _ in range(2)])
    t, exact = as_torch(a, dtype)
    if method == "eigh":
        x, newton_tol = inverse_root_eigh(t, p, epsilon), 0.0
    else:
        newton_tol = 1e-12 if dtype == torch.float64 else 1e-6  # float32 cannot reach 1e-12
        x = inverse_root_newton(t, p, epsilon, tolerance=newton_tol)
    assert x.dtype == dtype and x.shape == t.shape
    ref = np_inverse_root(exact, p, epsilon)
    err = relative_error(x.double().numpy(), ref)
    for b in range(2):
        assert err[b] <= root_tolerance(exact[b], p, epsilon, dtype, newton_tol), (err[b], kind)


def test_inverse_root_reference_agrees_with_scipy():
    """Cross-check of the numpy reference (and the library) with scipy's fractional_matrix_power."""
    rng = np.random.default_rng(16)
    a = with_spectrum(rng, np.geomspace(2.0, 0.05, 7))
    for p, eps in [(1, 0.0), (2, 1e-3), (4, 0.1), (3, 0.0)]:
        ref = np.real(scipy.linalg.fractional_matrix_power(a + eps * np.eye(7), -1.0 / p))
        # Schur-based fractional power vs eigh: both ≈ eps64·κ(40)·d ≈ 6e-14 accurate; Newton adds its
        # stop residual d·1e-13/p ≤ 7e-13: 1e-11 covers both with margin.
        assert relative_error(np_inverse_root(a, p, eps), ref) <= 1e-11
        assert relative_error(inverse_root_eigh(torch.from_numpy(a)[None], p, eps)[0].numpy(), ref) <= 1e-11
        x = inverse_root_newton(torch.from_numpy(a)[None], p, eps, tolerance=1e-13)[0].numpy()
        assert relative_error(x, ref) <= 1e-11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_fourth_root_on_a_mixed_stack(dtype, method):
    """p = 4 on a 3-D stack: members of different kinds (incl. all-zero) do not interfere."""
    rng = np.random.default_rng(17)
    d, epsilon = 10, 1e-4
    a = np.stack(
        [
            make_matrix("spd", d, rng) / 10,
            make_matrix("ill_conditioned", d, rng),
            make_matrix("rank_deficient", d, rng),
            np.zeros((d, d)),
            make_matrix("spd", d, rng) * 1e3,
        ]
    )
    t, exact = as_torch(a, dtype)
    newton_tol = 1e-12 if dtype == torch.float64 else 1e-6  # float32 cannot reach 1e-12
    if method == "eigh":
        x = inverse_root_eigh(t, 4, epsilon)
    else:
        x = inverse_root_newton(t, 4, epsilon, tolerance=newton_tol)
    ref = np_inverse_root(exact, 4, epsilon)
    err = relative_error(x.double().numpy(), ref)
    for b in range(len(a)):
        tol = root_tolerance(exact[b], 4, epsilon, dtype, newton_tol if method == "newton" else 0.0)
        assert err[b] <= tol, (b, err[b], tol)
    # All-zero member: (0 + ε)^(-1/4) I. κ = 1, so the bound is the Newton stop residual
    # d·1e-6/p = 2.5e-6 (float32) rounded up to 1e-5.
    assert np.allclose(x[3].double().numpy(), epsilon**-0.25 * np.eye(d), rtol=0, atol=1e-5 * epsilon**-0.25)


@SETTINGS
@given(
    a=stacks(kinds=("spd", "ill_conditioned", "rank_deficient"), max_dim=8, scales=(1e-3, 1.0, 1e3)),
    p=st.integers(1, 5),
    relative_epsilon=st.sampled_from([1e-6, 1e-3, 1e-1]),
)
def test_inverse_root_property_float64(a, p, relative_epsilon):
    """Random PSD stacks: both routes agree with numpy and satisfy X^p (A + εI) ≈ I."""
    t = torch.from_numpy(a)
    epsilon = relative_epsilon * float(np.abs(a).max())
    ref = np_inverse_root(a, p, epsilon)
    xe = inverse_root_eigh(t, p, epsilon).numpy()
    xn = inverse_root_newton(t, p, epsilon, tolerance=1e-12).numpy()
    for b in range(len(a)):
        tol = root_tolerance(a[b], p, epsilon, torch.float64, 1e-12)
        assert relative_error(xe[b], ref[b]) <= tol
        assert relative_error(xn[b], ref[b]) <= tol
    d = a.shape[-1]
    residual = np.linalg.matrix_power(xe, p) @ (a + epsilon * np.eye(d)) - np.eye(d)
    kappa = max((np.abs(a).max() * d + epsilon) / epsilon, 1.0)
    # X^p (A+εI) − I: backward error of the eigendecomposition amplified by κ(A + εI) ≤ κ.
    assert np.all(spectral_norm(residual) <= 40 * d * EPS[torch.float64] * kappa)


def test_inverse_root_from_eigh_clamps_negative_eigenvalues():
    vecs = torch.from_numpy(random_orthogonal(np.random.default_rng(18), 3))[None]
    vals = torch.tensor([[2.0, 0.5, -1e-12]], dtype=torch.float64)
    x = inverse_root_from_eigh(vals, vecs, 2, 1e-2).numpy()[0]
    v = vecs[0].numpy()
    expected = (v * np.array([2.01, 0.51, 0.01]) ** -0.5) @ v.T
    assert np.allclose(x, expected, rtol=1e-13, atol=0)  # float64 products of O(10) numbers


def test_inverse_root_eigh_singular_without_epsilon_is_not_finite():
    # Documented contract: zero eigenvalues with ε = 0 map to inf; the caller must choose ε > 0.
    assert not torch.isfinite(inverse_root_eigh(torch.zeros(1, 3, 3), 2)).all()


@pytest.mark.parametrize("root", [inverse_root_eigh, inverse_root_newton])
def test_inverse_root_rejects_bad_arguments(root):
    a = torch.eye(3)[None]
    for p in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            root(a, p)
    for epsilon in (-1e-3, float("nan")):
        with pytest.raises(ValueError):
            root(a, 2, epsilon)
    with pytest.raises(ValueError):
        root(torch.eye(3), 2)
    with pytest.raises(ValueError):
        root(torch.zeros(1, 2, 3), 2)


def test_newton_root_requires_integer_p_but_eigh_does_not():
    a = torch.from_numpy(with_spectrum(np.random.default_rng(19), np.geomspace(1.0, 0.1, 5)))[None]
    with pytest.raises(ValueError):
        inverse_root_newton(a, 2.5)
    ref = np_inverse_root(a.numpy(), 2.5, 0.0)
    # κ = 10 float64 root: 2·sqrt(d)·eps·κ/p ≈ 4e-15.
    tol = root_tolerance(a[0].numpy(), 2.5, 0.0, torch.float64)
    assert relative_error(inverse_root_eigh(a, 2.5).numpy(), ref).max() <= tol
    # An integral float p is accepted by Newton (same κ = 10 bound plus the 1e-12 stop residual).
    x = inverse_root_newton(a, 2.0, tolerance=1e-12).numpy()
    tol = root_tolerance(a[0].numpy(), 2, 0.0, torch.float64, 1e-12)
    assert relative_error(x, np_inverse_root(a.numpy(), 2, 0.0)).max() <= tol


# ----------------------------------------------------------------------------------------------
# Newton–Schulz and Björck
# ----------------------------------------------------------------------------------------------


def muon_map(x: np.ndarray, steps: int = 5) -> np.ndarray:
    """The scalar map the quintic iteration applies to each normalised singular value."""
    a, b, c = MUON_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def test_muon_scalar_band():
    """Measured band of 5 quintic steps: singular values normalised to [0.002, 1] end in
    [0.6818, 1.2024]; this is where the band asserted below comes from."""
    x = np.geomspace(2e-3, 1.0, 200_001)
    y = muon_map(x)
    assert 0.68 <= y.min() <= 0.69 and 1.20 <= y.max() <= 1.21
    assert muon_map(np.array([1e-3]))[0] < 0.6  # below ~1.5e-3 the band is not reached in 5 steps


@SETTINGS
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_newton_schulz_cubic_is_polar_factor(m, n, seed, scale):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    s = rng.uniform(0.05, 1.0, k) * scale  # κ(G) ≤ 20
    g = (u * s) @ v.T
    x = newton_schulz(torch.from_numpy(g), steps=40, coefficients=CUBIC_COEFFICIENTS).numpy()
    polar = scipy.linalg.polar(g)[0]
    # The polar factor is κ-conditioned: eps64 · κ (20) · steps (40) · 5 (growth per step) ≈ 1e-12.
    assert np.abs(x - polar).max() <= 1e-12


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12), (3, 2, 9, 6)])
def test_newton_schulz_cubic_gaussian_shapes(shape):
    g = np.random.default_rng(20).standard_normal(shape)
    x = newton_schulz(torch.from_numpy(g), steps=60, coefficients=CUBIC_COEFFICIENTS).numpy()
    flat_g, flat_x = g.reshape(-1, *shape[-2:]), x.reshape(-1, *shape[-2:])
    for gi, xi in zip(flat_g, flat_x):
        kappa = np.linalg.cond(gi)
        # Precondition: κ < 1e3 ⇒ σ_min/‖G‖_F > 1e-3/sqrt(12) ≈ 3e-4, which the cubic's 1.5× growth
        # lifts to O(1) in ≤ 20 steps, leaving 40 quadratically convergent ones.
        assert kappa < 1e3
        # Polar factor is κ-conditioned; 600·eps64·κ ≈ 1e-13·κ allows eps64 per step for 60 steps
        # with a 10× margin (measured ≈ 1e-15).
        assert np.abs(xi - scipy.linalg.polar(gi)[0]).max() <= 600 * EPS[torch.float64] * kappa


@SETTINGS
@given(
    n=st.integers(1, 24),
    ratio=st.integers(2, 4),
    tall=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_newton_schulz_muon_band_and_singular_vectors(n, ratio, tall, seed):
    shape = (ratio * n, n) if tall else (n, ratio * n)
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).float()
    x = newton_schulz(g).double().numpy()
    gd = g.double().numpy()
    u, s, vt = np.linalg.svd(gd, full_matrices=False)
    normalised = s / (np.linalg.norm(gd) + 1e-7)
    assume(normalised.min() >= 2e-3)  # aspect ratio ≥ 2 makes this hold essentially always
    sv = np.linalg.svd(x, compute_uv=False)
    # Band of test_muon_scalar_band ([0.6818, 1.2024]) widened to [0.6, 1.25] for float32 round-off.
    assert np.all((sv >= 0.6) & (sv <= 1.25))
    # Singular vectors of G are kept: Uᵀ X V is diagonal with the scalar map on its diagonal.
    # float32: 5 steps × k ≤ 96 accumulations × eps32 × per-step gain ≈ 3.4 → 2e-4 bound.
    core = u.T @ x @ vt.T
    assert np.abs(core - np.diag(np.diagonal(core))).max() <= 2e-4
    assert np.abs(np.diagonal(core) - muon_map(normalised)).max() <= 2e-4


def test_newton_schulz_muon_square_upper_bound():
    # Square gaussians can have σ_min ≈ 0 (no lower bound), but the upper bound 1.2024 always holds.
    g = torch.from_numpy(np.random.default_rng(21).standard_normal((6, 32, 32))).float()
    sv = torch.linalg.svdvals(newton_schulz(g).double())
    assert sv.max().item() <= 1.21  # 1.2024 + float32 slack
    assert sv.median().item() >= 0.68  # most singular values are inside the band


def test_newton_schulz_bfloat16():
    g = torch.from_numpy(np.random.default_rng(22).standard_normal((4, 32, 96))).float()
    x16 = newton_schulz(g.bfloat16())
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all()
    sv = torch.linalg.svdvals(x16.double())
    # bfloat16 (unit round-off 3.9e-3) blurs the [0.68, 1.14] band measured for this aspect ratio.
    assert sv.min().item() >= 0.5 and sv.max().item() <= 1.35
    x32 = newton_schulz(g).double()
    rel = torch.linalg.matrix_norm(x16.double() - x32) / torch.linalg.matrix_norm(x32)
    # Measured ≈ 3.5e-2: bfloat16 unit round-off 3.9e-3 × 5 steps × per-step gain ≈ 3.4 gives ≈ 0.07 → 0.1.
    assert rel.max().item() <= 0.1


def test_newton_schulz_zero_and_steps_zero():
    assert torch.equal(newton_schulz(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4))
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # steps = 0 is just the normalisation G / (‖G‖_F + 1e-7), the norm in float64 for float64 input.
    expected = g / (torch.linalg.matrix_norm(g) + 1e-7)
    assert torch.allclose(newton_schulz(g, steps=0), expected, rtol=1e-15, atol=0)


@SETTINGS
@given(
    d=st.integers(2, 16),
    extra_rows=st.integers(0, 4),
    delta=st.floats(1e-4, 5e-2),
    seed=st.integers(0, 2**32 - 1),
)
def test_bjorck_rectify_is_quadratic(d, extra_rows, delta, seed):
    """V = U S Wᵀ ⇒ each eigenvalue e of VᵀV − I maps to −¾e² + ¼e³ under one Björck step."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((d + extra_rows, d)))[0]  # orthonormal columns
    e_mat = rng.standard_normal(q.shape)
    v = q + delta * e_mat / np.linalg.norm(e_mat, 2)
    before = np.linalg.eigvalsh(v.T @ v - np.eye(d))
    out = bjorck_rectify(torch.from_numpy(v)).numpy()
    after = spectral_norm(out.T @ out - np.eye(d))
    predicted = np.abs(-0.75 * before**2 + 0.25 * before**3).max()
    # float64: forming VᵀV and two products adds ≈ c·d·eps64 (c = 20).
    assert abs(after - predicted) <= 20 * d * EPS[torch.float64]
    # Hence quadratic convergence: ¾e²(1 + |e|/3) ≤ 0.8e² for |e| ≤ 0.2 (here |e| ≤ ~0.1).
    assert after <= 0.8 * np.abs(before).max() ** 2 + 20 * d * EPS[torch.float64]


def test_bjorck_rectify_example_and_arguments():
    rng = np.random.default_rng(23)
    q = random_orthogonal(rng, 8)
    e = rng.standard_normal((8, 8))
    v = q + 0.5e-2 * e / np.linalg.norm(e, 2)  # ‖VᵀV − I‖₂ ≈ 1e-2
    err0 = spectral_norm(v.T @ v - np.eye(8))
    v1 = bjorck_rectify(torch.from_numpy(v)).numpy()
    v2 = bjorck_rectify(torch.from_numpy(v), steps=2).numpy()
    err1, err2 = spectral_norm(v1.T @ v1 - np.eye(8)), spectral_norm(v2.T @ v2 - np.eye(8))
    assert 5e-3 <= err0 <= 1.5e-2
    assert err1 <= 0.8 * err0**2  # ≈ 1e-4: quadratic, coefficient ¾(1 + e/3) ≤ 0.8 (property test)
    assert err2 <= 0.8 * err1**2 + 20 * 8 * EPS[torch.float64]  # + float64 floor c·d·eps64 (c = 20)
    assert torch.equal(bjorck_rectify(torch.from_numpy(v), steps=0), torch.from_numpy(v))
    with pytest.raises(ValueError):
        bjorck_rectify(torch.from_numpy(v), steps=-1)
    with pytest.raises(ValueError):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError):
        newton_schulz(torch.ones(3, 3), steps=-1)
