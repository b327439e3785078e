"""``safe_eigh`` against float64 numpy references: values, vectors, mixed stacks, fallbacks.

Tolerances follow backward-error arguments: a backward-stable routine on a ``d``-dimensional input
commits an error of about ``c · d · eps · ‖A‖``; each tolerance says which bound it uses.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
from cases import (
    EPS,
    KINDS,
    SETTINGS,
    align_signs,
    as_torch,
    make_matrix,
    mT,
    random_orthogonal,
    spectral_norm,
    stacks,
    with_spectrum,
)
from hypothesis import given
from hypothesis import strategies as st

from conditioner.linalg import (
    safe_eigh,
)

eigh_module = importlib.import_module("conditioner.linalg.eigh")

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert "failed for 3 matrices of size" in caplog.text
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
    assert "failed for 1 matrices of size" in caplog.text
    assert torch.equal(vecs[1], previous[1]) and torch.equal(vals[1], torch.zeros(d))
    tol = 20 * d * EPS[torch.float32]  # float32 backward error, as in test_safe_eigh_matches_numpy
    for i in (0, 2):
        q, lam = vecs[i].double().numpy(), vals[i].double().numpy()
        assert spectral_norm((q * lam) @ q.T - exact[i]) <= tol * spectral_norm(exact[i])


def test_safe_eigh_defers_its_warning_and_reads_nothing_on_the_host(monkeypatch, caplog):
    """Inside deferring_warnings the failure count stays a tensor (no Tensor → Python conversion
    happens, counted by wrapping the converting methods) and nothing is logged; the count is the
    number of failed matrices."""
    from conditioner.linalg.deferred import deferring_warnings

    rng = np.random.default_rng(8)
    a = np.stack([make_matrix("spd", 4, rng) for _ in range(3)])
    a[2, 1, 1] = np.inf
    t, _ = as_torch(a, torch.float32)
    reads = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *args, _o=original, _n=name, **kw: reads.append(_n) or _o(self, *args, **kw),
        )
    with caplog.at_level(logging.WARNING, logger="conditioner.linalg.eigh"), deferring_warnings() as collected:
        _, _, failed = safe_eigh(t)
    monkeypatch.undo()
    assert reads == [] and caplog.text == ""
    assert [int(count) for _, count in collected] == [1] and failed.tolist() == [False, False, True]


def test_safe_eigh_a_non_finite_batched_result_fails_that_matrix_only(monkeypatch):
    """LAPACK returns without raising but one matrix's eigenvectors are NaN: that matrix keeps its
    previous basis and is marked failed, judged per matrix on the device (no retry)."""
    rng = np.random.default_rng(9)
    d = 4
    t, _ = as_torch(np.stack([make_matrix("spd", d, rng) for _ in range(3)]), torch.float32)
    previous = torch.from_numpy(np.stack([random_orthogonal(rng, d) for _ in range(3)])).float()
    real_eigh = torch.linalg.eigh

    def poisoned(x, *args, **kwargs):
        vals, vecs = real_eigh(x, *args, **kwargs)
        vecs = vecs.clone()
        vecs[1, 0, 0] = float("nan")
        return vals, vecs

    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", poisoned)
    vals, vecs, failed = safe_eigh(t, previous)
    monkeypatch.undo()
    assert failed.tolist() == [False, True, False]
    assert torch.equal(vecs[1], previous[1]) and torch.equal(vals[1], torch.zeros(d))
    expected = safe_eigh(t[[0, 2]])
    assert torch.equal(vecs[[0, 2]], expected.eigenvectors) and torch.equal(vals[[0, 2]], expected.eigenvalues)
