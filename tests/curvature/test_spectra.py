"""Lanczos, stochastic Lanczos quadrature and trace estimators against dense eigendecompositions,
on random symmetric matrices and on the exact curvature of a tiny network (float64). The checks
that compute run on every device (the ``device`` fixture): matrices and probes are drawn from CPU
generators (the library draws on the generator's device and moves the draw), so each device sees
the CPU's numbers and float64 round-off of its own; argument checks run on the CPU."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from conditioner.curvature.exact import GGN, Hessian
from conditioner.curvature.spectra import (
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    slq,
    spectral_density,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def symmetric(dim: int, seed: int = 0, indefinite: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random symmetric matrix with distinct, spread eigenvalues (well separated at the top)."""
    g = generator(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    values = torch.linspace(-1.0 if indefinite else 0.0, 1.0, dim, dtype=torch.float64) ** 3 * 10
    return ((q * values) @ q.mT).to(device)


@functools.cache
def _curvature_on(device: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    model, x, y = model.to(device), x.to(device), y.to(device)
    data = list(zip(x.split(8), y.split(8)))
    operators = {"hessian": Hessian(model, nn.CrossEntropyLoss(), data), "ggn": GGN(model, nn.CrossEntropyLoss(), data)}
    return {name: (op, op.to_dense()) for name, op in operators.items()}


@pytest.fixture
def curvature(device):
    """The Hessian and GGN of a tiny Tanh MLP with cross-entropy, and their dense matrices, built
    once per device."""
    return _curvature_on(str(device))


def assert_top_eigenpairs(result, dense: torch.Tensor, k: int, tol: float) -> None:
    values, vectors = torch.linalg.eigh(dense)
    expected_values, expected_vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    scale = values.abs().max()
    assert torch.allclose(result.eigenvalues, expected_values, rtol=0, atol=tol * scale)
    # up to sign: |cos| of each Ritz vector with its eigenvector is 1
    cosines = (result.eigenvectors * expected_vectors).sum(0).abs()
    assert torch.allclose(cosines, torch.ones_like(cosines), rtol=0, atol=math.sqrt(tol))


# --- Lanczos ---------------------------------------------------------------------------------------


def test_lanczos_top_k_of_a_random_matrix(device):
    """Distinct eigenvalues, 40 steps on a 60×60 matrix: converged to the default tolerance √eps,
    so eigenvalues are accurate to ~eps·‖A‖ (1e-10 leaves room) and vectors to ~√eps (gap ≈ 1)."""
    matrix = symmetric(60, device=device)
    result = lanczos(matrix, 4, steps=40, generator=generator(1))
    assert result.converged and result.steps <= 40
    assert bool((result.eigenvalues[:-1] >= result.eigenvalues[1:]).all())
    assert_top_eigenpairs(result, matrix, 4, tol=1e-10)
    residuals = (matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues).norm(dim=0)
    assert torch.allclose(residuals, result.residuals, rtol=0, atol=1e-10)  # the bounds are the true residuals


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_lanczos_on_curvature_operators(curvature, name):
    operator, dense = curvature[name]
    result = lanczos(operator, 3, generator=generator(2))
    assert result.converged
    assert_top_eigenpairs(result, dense, 3, tol=1e-10)


@pytest.mark.parametrize("steps", [12, 30])
def test_lanczos_with_steps_at_or_beyond_the_dimension(steps, device):
    """Small P, steps ≥ P: the Krylov space is exhausted (breakdown) and every pair is exact."""
    matrix = symmetric(12, seed=3, device=device)
    result = lanczos(matrix, 12, steps=steps, generator=generator(4))
    assert result.steps == 12
    assert_top_eigenpairs(result, matrix, 12, tol=1e-12)


def test_lanczos_restarts_when_an_invariant_space_is_too_small(device):
    """For the identity the Krylov space is one-dimensional: k = 3 needs restarts."""
    result = lanczos(torch.eye(5, dtype=torch.float64, device=device), 3, generator=generator(5))
    assert result.converged
    assert torch.allclose(result.eigenvalues, torch.ones(3, dtype=torch.float64, device=device))
    gram = result.eigenvectors.mT @ result.eigenvectors
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64, device=device))


def test_lanczos_stops_at_an_invariant_subspace(device):
    """A rank-2 operator: the Krylov space is invariant after 3 steps, with every residual zero."""
    u = torch.randn(40, 2, dtype=torch.float64, generator=generator(6))
    matrix = (u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ u.mT).to(device)
    result = lanczos(matrix, 2, steps=40, generator=generator(7))
    assert result.converged and result.steps <= 3
    assert_top_eigenpairs(result, matrix, 2, tol=1e-12)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"k": 0}, "k: must be an integer >= 1"),
        ({"k": 11}, "k: must be at most the operator's dimension 10"),
        ({"k": 3, "steps": 2}, r"steps: must be at least k \(3\)"),
        ({"k": 1, "steps": 0}, "steps: must be an integer >= 1"),
        ({"k": 1, "tol": 0.0}, "tol: must be > 0"),
    ],
)
def test_lanczos_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lanczos(symmetric(10), **kwargs)


def test_bad_operators_are_errors():
    with pytest.raises(ValueError, match="operator: a tensor must be a square matrix"):
        lanczos(torch.zeros(3, 4), 1)
    with pytest.raises(TypeError, match="operator: expected a CurvatureOperator"):
        hutchinson_trace(object(), 3)


# --- SLQ -------------------------------------------------------------------------------------------


def test_slq_quadrature_is_exact_for_low_degree_polynomials(device):
    """Gauss quadrature with m nodes integrates polynomials of degree ≤ 2m−1 exactly:
    Σ_j w_j θ_j^p = vᵀ A^p v / ‖v‖² for p ≤ 2m−1, up to rounding (1e-10 relative)."""
    matrix = symmetric(30, seed=8, device=device)
    probes = torch.randn(30, 3, dtype=torch.float64, generator=generator(9)).to(device)
    steps = 4
    result = slq(matrix, probes, steps)
    unit = probes / probes.norm(dim=0)
    power = torch.eye(30, dtype=torch.float64, device=device)
    for p in range(2 * steps):
        expected = (unit * (power @ unit)).sum(0)
        assert torch.allclose(result.moments(p), expected, rtol=1e-10, atol=1e-10 * 10.0**p), p
        power = power @ matrix


def test_slq_with_steps_equal_to_the_dimension_reproduces_every_moment(device):
    """With steps = dim the quadrature is the probe's whole spectral measure: moments of any
    order (here 12 > 2·steps − 1 would not hold otherwise... and exp) match exactly."""
    matrix = symmetric(8, seed=10, device=device) / 10
    probes = torch.randn(8, 2, dtype=torch.float64, generator=generator(11)).to(device)
    result = slq(matrix, probes, 8)
    unit = probes / probes.norm(dim=0)
    values, vectors = torch.linalg.eigh(matrix)
    exp_matrix = (vectors * values.exp()) @ vectors.mT
    expected = (unit * (exp_matrix @ unit)).sum(0)
    assert torch.allclose((result.weights * result.nodes.exp()).sum(-1), expected, rtol=1e-12)
    assert torch.allclose(result.moments(0), torch.ones(2, dtype=torch.float64, device=device), rtol=1e-12)
    p20 = torch.linalg.matrix_power(matrix, 20)
    assert torch.allclose(result.moments(20), (unit * (p20 @ unit)).sum(0), rtol=1e-8, atol=1e-15)


def test_slq_stops_a_probe_at_its_invariant_subspace(device):
    """A probe in a 2-dimensional invariant subspace gives 2 nodes and zero-weight padding."""
    matrix = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0, 3.0], dtype=torch.float64, device=device))
    probe = torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0]], dtype=torch.float64, device=device)
    result = slq(matrix, probe, steps=5)
    kept = result.weights[0] > 0
    assert int(kept.sum()) == 2
    nodes = result.nodes[0][kept].sort().values
    assert torch.allclose(nodes, torch.tensor([2.0, 4.0], dtype=torch.float64, device=device))
    assert torch.allclose(result.weights[0][kept], torch.full((2,), 0.5, dtype=torch.float64, device=device))


def test_slq_first_moment_estimates_the_trace(curvature):
    """Rademacher probes: dim × first moment is Hutchinson's unbiased estimate, so the mean over
    200 probes lies within 4 standard errors of the trace (a 1-in-15,000 failure for a normal
    mean; the seed is fixed, so the test is deterministic)."""
    operator, dense = curvature["hessian"]
    result = slq(operator, 200, steps=5, generator=generator(12))
    estimate = result.trace()
    assert estimate.probes == 200
    assert abs(estimate.estimate - float(dense.trace())) <= 4 * estimate.standard_error


def test_spectral_density_integrates_to_one_and_peaks_at_eigenvalues(device):
    """Three eigenvalues far apart relative to σ: the density integrates to 1 (trapezoid on a fine
    grid, error ≪ 1e-6) and each peak has height weight/(σ√2π)."""
    matrix = torch.diag(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64, device=device))
    result = slq(matrix, torch.ones(3, 1, dtype=torch.float64, device=device), steps=3)
    grid = torch.linspace(-3.0, 4.0, 7001, dtype=torch.float64, device=device)
    sigma = 0.05
    density = result.density(grid, sigma)
    assert math.isclose(float(torch.trapezoid(density, grid)), 1.0, rel_tol=1e-6)
    peak = 1 / 3 / (sigma * math.sqrt(2 * math.pi))
    for value in (-1.0, 0.0, 2.0):
        index = int(torch.argmin((grid - value).abs()))
        assert math.isclose(float(density[index]), peak, rel_tol=1e-6)
    with pytest.raises(ValueError, match="sigma: must be > 0"):
        spectral_density(result.nodes, result.weights, grid, 0.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"probes": 0, "steps": 3}, "probes: must be an integer >= 1"),
        ({"probes": 2, "steps": 0}, "steps: must be an integer >= 1"),
        ({"probes": torch.zeros(5, 2), "steps": 2}, r"probes: a tensor must have shape \(10, n\)"),
        ({"probes": torch.zeros(10, 1), "steps": 2}, "probes: every start vector must be nonzero"),
    ],
)
def test_slq_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slq(symmetric(10), **kwargs)


# --- trace estimators ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_hutchinson_is_unbiased(curvature, name):
    """Mean of 500 Rademacher quadratic forms within 4 standard errors of the exact trace (see SLQ)."""
    operator, dense = curvature[name]
    estimate = hutchinson_trace(operator, 500, generator(13), chunk=128)
    assert estimate.probes == 500 and estimate.standard_error > 0
    assert abs(estimate.estimate - float(dense.trace())) <= 4 * estimate.standard_error


def test_hutchinson_is_exact_for_a_diagonal_matrix(device):
    """(±1)² = 1: every Rademacher sample equals the trace of a diagonal matrix, with zero spread."""
    matrix = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64, device=device))
    estimate = hutchinson_trace(matrix, 5, generator(14))
    assert math.isclose(estimate.estimate, 21.0) and estimate.standard_error == 0.0


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum(device):
    """Eigenvalues 2^-i: the sketch captures the top directions, leaving a small remainder; both
    estimates within 4 standard errors, and Hutch++'s error bar far smaller for the same budget."""
    dim = 50
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator(15)))
    matrix = ((q * 0.5 ** torch.arange(dim, dtype=torch.float64)) @ q.mT).to(device)
    exact = float(matrix.trace())
    plain = hutchinson_trace(matrix, 30, generator(16))
    sketched = hutchpp_trace(matrix, 30, generator(16))
    for estimate in (plain, sketched):
        assert abs(estimate.estimate - exact) <= 4 * estimate.standard_error
    assert sketched.standard_error < plain.standard_error / 100


def test_hutchpp_is_exact_when_the_sketch_spans_the_space(curvature):
    operator, dense = curvature["ggn"]
    estimate = hutchpp_trace(operator, 3 * operator.dim + 3, generator(17))
    assert math.isclose(estimate.estimate, float(dense.trace()), rel_tol=1e-10)


def test_trace_estimator_bad_arguments():
    with pytest.raises(ValueError, match="probes: must be an integer >= 1"):
        hutchinson_trace(symmetric(4), 0)
    with pytest.raises(ValueError, match="probes: Hutch\\+\\+ needs at least 3"):
        hutchpp_trace(symmetric(4), 2)
    with pytest.raises(ValueError, match="chunk: must be an integer >= 1"):
        hutchinson_trace(symmetric(4), 2, chunk=0)
