"""Solvers against dense float64 answers ``(B + λI)⁻¹ v`` on problems small enough to invert.

Linear regression with MSE: the GGN is ``c·2·X̃ᵀX̃`` (X̃ with a column of ones), and a single Linear
layer is a deep linear network, so K-FAC is exact too. A tiny Tanh MLP gives a GGN that K-FAC only
approximates: there CG must still be exact and ASTRA must move from the EK-FAC answer to the exact one.
"""

from __future__ import annotations

import pytest
import torch
from cases import random_classification, tanh_mlp
from torch import nn

from conditioner.curvature import EKFAC, GGN, KFAC
from conditioner.solvers import METHODS, solve

pytestmark = pytest.mark.usefixtures("one_thread")


def split(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size)))


def linear_regression(batch_size: int = 10):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(40, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    data = split(x, y, batch_size)
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    exact = 2.0 * design.T @ design / 40  # MSE "mean": c = 1/(R·C) = 1/40
    return model, data, exact


def tiny_mlp():
    x, y = random_classification(48, 3, 3, torch.Generator().manual_seed(1))
    return tanh_mlp((3, 5, 3), seed=1, dtype=torch.float64), split(x, y, 12)


def exact_solution(dense: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.linalg.solve(dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype), v)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def right_hand_sides(dim: int, count: int = 3) -> torch.Tensor:
    return torch.randn(dim, count, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_linear_regression_ggn_is_the_closed_form() -> None:
    model, data, exact = linear_regression()
    torch.testing.assert_close(GGN(model, nn.MSELoss(), data).to_dense(), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_direct_and_cg_are_exact_on_linear_regression(method: str) -> None:
    model, data, exact = linear_regression()
    operator = KFAC(model, nn.MSELoss(), data) if method == "direct" else GGN(model, nn.MSELoss(), data)
    v = right_hand_sides(5)
    result = solve(operator, v, 1e-3, method=method, tolerance=1e-12)
    # CG's recurrence reaches 1e-12 in at most P = 5 steps; both then agree with LAPACK's solve to
    # the conditioning (≈ 1e3 with λ = 1e-3) times float64 rounding.
    torch.testing.assert_close(result.solution, exact_solution(exact, v, 1e-3), rtol=1e-9, atol=1e-12)


def test_cg_is_exact_on_a_nonlinear_ggn_with_and_without_a_preconditioner() -> None:
    model, data = tiny_mlp()
    operator = GGN(model, nn.CrossEntropyLoss(), data)
    v = right_hand_sides(operator.dim)
    answer = exact_solution(operator.to_dense(), v, 1e-2)
    for preconditioner in (None, EKFAC(model, nn.CrossEntropyLoss(), data)):
        result = solve(operator, v, 1e-2, method="cg", preconditioner=preconditioner, tolerance=1e-10, max_iterations=200)
        assert float(result.residuals[-1].max()) < 1e-9
        assert relative_error(result.solution, answer) < 1e-8  # cond ≤ λ_max/λ ≈ 1e2 times the residual


def test_cg_preconditioned_by_an_exact_kfac_converges_in_one_step() -> None:
    model, data, exact = linear_regression()
    v = right_hand_sides(5)
    result = solve(GGN(model, nn.MSELoss(), data), v, 1e-3, method="cg", preconditioner=KFAC(model, nn.MSELoss(), data), tolerance=1e-10)
    assert result.iterations == 1
    torch.testing.assert_close(result.solution, exact_solution(exact, v, 1e-3), rtol=1e-9, atol=1e-12)


def test_lissa_is_exact_on_one_batch_and_converges_on_mini_batches() -> None:
    model, full_batch, exact = linear_regression(batch_size=40)
    v = right_hand_sides(5)
    answer = exact_solution(exact, v, 0.1)
    single = solve(GGN(model, nn.MSELoss(), full_batch), v, 0.1, method="lissa", iterations=300)
    # One batch: the iteration is deterministic and contracts by (1 − α(λ_min + λ)) per step.
    assert relative_error(single.solution, answer) < 1e-8
    _, batches, _ = linear_regression(batch_size=10)
    generator = torch.Generator().manual_seed(0)
    noisy = solve(GGN(model, nn.MSELoss(), batches), v, 0.1, method="lissa", iterations=200, step_size=0.05, generator=generator)
    # Four batches of ten: the fixed step leaves a noise floor proportional to α; 0.05 keeps it
    # under 10% of the answer, far from the 100% error of the start x = 0.
    assert relative_error(noisy.solution, answer) < 0.1


def test_astra_starts_at_the_ekfac_answer_and_converges_to_the_exact_one() -> None:
    model, data = tiny_mlp()
    operator = GGN(model, nn.CrossEntropyLoss(), data)
    ekfac = EKFAC(model, nn.CrossEntropyLoss(), data)
    v = right_hand_sides(operator.dim)
    damping = 1e-2
    start = solve(operator, v, damping, method="astra", preconditioner=ekfac, iterations=0)
    torch.testing.assert_close(start.solution, solve(ekfac, v, damping, method="direct").solution, rtol=0, atol=0)
    answer = exact_solution(operator.to_dense(), v, damping)
    generator = torch.Generator().manual_seed(0)
    result = solve(operator, v, damping, method="astra", preconditioner=ekfac, iterations=200, generator=generator)
    assert relative_error(result.solution, answer) < 0.2 * relative_error(start.solution, answer)
    assert relative_error(result.solution, answer) < 0.05


def test_every_method_takes_a_single_vector() -> None:
    model, data, _ = linear_regression()
    v = right_hand_sides(5, 1)[:, 0]
    for method in METHODS:
        operator = KFAC(model, nn.MSELoss(), data) if method == "direct" else GGN(model, nn.MSELoss(), data)
        options = {"preconditioner": EKFAC(model, nn.MSELoss(), data)} if method == "astra" else {}
        assert solve(operator, v, 0.1, method=method, iterations=5, **options).solution.shape == (5, 1)


def test_bad_arguments_are_named() -> None:
    model, data, _ = linear_regression()
    operator = GGN(model, nn.MSELoss(), data)
    v = right_hand_sides(5)
    with pytest.raises(ValueError, match="damping"):
        solve(operator, v, 0.0)
    with pytest.raises(ValueError, match="method"):
        solve(operator, v, 0.1, method="newton")
    with pytest.raises(ValueError, match="v:"):
        solve(operator, v[:3], 0.1)
    with pytest.raises(TypeError, match="direct"):
        solve(operator, v, 0.1, method="direct")
    with pytest.raises(ValueError, match="preconditioner"):
        solve(operator, v, 0.1, method="astra")
    with pytest.raises(ValueError, match="step_size"):
        solve(operator, v, 0.1, method="lissa", step_size=-1.0)
