"""Inverse matrix roots (eigh and coupled Newton) against float64 numpy / scipy references.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from cases import (
    EPS,
    SETTINGS,
    as_torch,
    make_matrix,
    np_inverse_root,
    random_orthogonal,
    spectral_norm,
    stacks,
    with_spectrum,
)
from hypothesis import given
from hypothesis import strategies as st

from conditioner.linalg import (
    inverse_root_eigh,
    inverse_root_from_eigh,
    inverse_root_newton,
    newton_root,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
        assert not newton_root(t, p, epsilon, tolerance=newton_tol).fell_back.any()  # Newton's own root
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
        assert not newton_root(t, 4, epsilon, tolerance=newton_tol).fell_back.any()  # Newton's own roots
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
    assert not newton_root(t, p, epsilon, tolerance=1e-12).fell_back.any()
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
# Newton with the eigh fallback
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_root_replaces_exactly_the_non_converged_matrices_by_eigh_roots(dtype):
    """Member 1 has a negative eigenvalue (-0.3, below -ε): the eigenvalue of M that starts
    negative moves away from 1 at every step, the iteration overflows, and the non-finite residual
    marks it. It gets the eigh root, (λ⁺ + ε)^(-1/p) with λ⁺ = max(λ, 0), as inverse_root_eigh
    gives it; members 0 and 2 converge and keep the Newton result."""
    rng = np.random.default_rng(21)
    d, p, epsilon = 8, 4, 1e-2
    spectra = [np.geomspace(1.0, 0.1, d), np.r_[np.linspace(1.0, 0.2, d - 1), -0.3], np.geomspace(2.0, 0.5, d)]
    t, exact = as_torch(np.stack([with_spectrum(rng, s) for s in spectra]), dtype)
    newton_tol = 1e-12 if dtype == torch.float64 else 1e-6  # float32 cannot reach 1e-12
    result = newton_root(t, p, epsilon, tolerance=newton_tol)
    assert result.fell_back.tolist() == [False, True, False] and result.fallbacks == 1
    assert result.root.dtype == dtype and bool(torch.isfinite(result.root).all())
    converged = newton_root(t[[0, 2]], p, epsilon, tolerance=newton_tol)
    assert not converged.fell_back.any() and converged.fallbacks == 0
    assert torch.equal(result.root[[0, 2]], converged.root)
    assert torch.equal(inverse_root_newton(t, p, epsilon, tolerance=newton_tol), result.root)
    assert torch.equal(result.root[1], inverse_root_eigh(t[1:2], p, epsilon)[0])
    # against float64 numpy; κ = (1 + ε)/ε ≈ 100 for the clamped spectrum of member 1, whose
    # root is eigh's and carries no Newton residual
    ref = np_inverse_root(exact, p, epsilon)
    err = relative_error(result.root.double().numpy(), ref)
    for b, residual in enumerate((newton_tol, 0.0, newton_tol)):
        assert err[b] <= root_tolerance(exact[b], p, epsilon, dtype, residual), (b, err[b])


def test_newton_root_falls_back_when_the_residual_stays_above_the_tolerance():
    """Stopped after 2 iterations, no matrix meets the tolerance (finite residuals): all take eigh."""
    rng = np.random.default_rng(22)
    t = torch.from_numpy(np.stack([with_spectrum(rng, np.geomspace(1.0, 0.01, 6)) for _ in range(3)]))
    result = newton_root(t, 2, 1e-3, max_iterations=2)
    assert result.fell_back.all() and result.fallbacks == 3
    assert torch.equal(result.root, inverse_root_eigh(t, 2, 1e-3))
    assert not newton_root(t, 2, 1e-3).fell_back.any()


def test_newton_root_of_a_rank_deficient_float32_factor_stays_bounded():
    """Shampoo's case: a rank-one float32 factor with ε = 1e-12 is singular to working precision.
    Without the fallback the iteration ran 100 times and returned entries of ~1e28; the eigh root
    is bounded by the largest eigenvalue's root of the clamped float32 spectrum, (0 + ε)^(-1/4) = 1e3."""
    g = torch.Generator().manual_seed(23)
    u = torch.randn(2, 32, 1, generator=g)
    factor = u @ u.mT  # rank one
    result = newton_root(factor, 4, 1e-12)
    assert result.fell_back.all()
    assert bool(torch.isfinite(result.root).all()) and float(result.root.abs().max()) <= 1e3 * 1.001
    assert torch.equal(result.root, inverse_root_eigh(factor, 4, 1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_root_without_synchronisation_gives_the_synchronising_roots_bit_for_bit(dtype):
    """The mixed stack of the test above (one member diverges) plus a rank-one float32 factor: run
    to max_iterations with the stopped matrices masked, the roots are exactly those of the early
    stopping loop, and the eigh fallback of the whole stack is taken exactly where it did not
    converge. The count stays on the device."""
    rng = np.random.default_rng(21)
    d, p, epsilon = 8, 4, 1e-2
    spectra = [np.geomspace(1.0, 0.1, d), np.r_[np.linspace(1.0, 0.2, d - 1), -0.3], np.geomspace(2.0, 0.5, d)]
    t, _ = as_torch(np.stack([with_spectrum(rng, s) for s in spectra]), dtype)
    synchronising = newton_root(t, p, epsilon)
    masked = newton_root(t, p, epsilon, synchronise=False)
    assert torch.equal(masked.root, synchronising.root)
    assert torch.equal(masked.fell_back, synchronising.fell_back)
    assert isinstance(masked.fallbacks, torch.Tensor) and int(masked.fallbacks) == synchronising.fallbacks == 1
