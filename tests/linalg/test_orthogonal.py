"""Newton–Schulz orthogonalisation (cubic and Muon quintic) and Björck rectification.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from cases import EPS, SETTINGS, random_orthogonal, spectral_norm
from hypothesis import assume, given
from hypothesis import strategies as st

from conditioner.linalg import (
    CUBIC_COEFFICIENTS,
    MUON_COEFFICIENTS,
    bjorck_rectify,
    newton_schulz,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
