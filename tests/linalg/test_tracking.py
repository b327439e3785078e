"""Eigenbasis tracking: the staleness ρ, column ordering, one orthogonal-iteration step and the
warm-started QR refresh, against float64 numpy references.
"""

from __future__ import annotations

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
    np_staleness,
    random_orthogonal,
    spectral_norm,
    stacks,
    with_spectrum,
)
from hypothesis import given
from hypothesis import strategies as st

from conditioner.linalg import (
    dense_staleness,
    descending_order,
    orthogonal_iteration_step,
    permute_columns,
    qr_refresh,
    staleness,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
