"""Solvers against dense float64 answers ``(B + λI)⁻¹ v`` on problems small enough to invert.

Linear regression with MSE: the GGN is ``c·2·X̃ᵀX̃`` (X̃ with a column of ones), and a single Linear
layer is a deep linear network, so K-FAC is exact too. A tiny Tanh MLP gives a GGN that K-FAC only
approximates: there CG must still be exact and ASTRA must move from the EK-FAC answer to the exact one.

The solvers run on every device (the ``device`` fixture), the dense answers on the same one. Data,
right-hand sides and the stochastic solvers' generators are the CPU's (a CPU generator draws the
mini-batches wherever the operator lives), so each device solves the CPU's problem with the CPU's
draws, and the bounds below differ between devices by float64 round-off only. Argument checks run
on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import random_classification, tanh_mlp, teacher_classification, trained_classifier
from torch import nn

from conditioner.curvature import EKFAC, GGN, KFAC
from conditioner.influence.scores import InfluenceContext, flat_gradients, train_batches
from conditioner.influence.task import Task
from conditioner.solvers import METHODS, minibatch_operators, solve
from conditioner.solvers.iterative import astra

pytestmark = pytest.mark.usefixtures("one_thread")


def split(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size)))


def linear_regression(batch_size: int = 10, device: torch.device | str = "cpu"):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator, dtype=torch.float64).to(device)
    y = torch.randn(40, 1, generator=generator, dtype=torch.float64).to(device)
    model = nn.Linear(4, 1).to(device, torch.float64)
    data = split(x, y, batch_size)
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64, device=device)], dim=1)
    exact = 2.0 * design.T @ design / 40  # MSE "mean": c = 1/(R·C) = 1/40
    return model, data, exact


def tiny_mlp(device: torch.device | str = "cpu"):
    x, y = random_classification(48, 3, 3, torch.Generator().manual_seed(1), device=device)
    return tanh_mlp((3, 5, 3), seed=1, dtype=torch.float64, device=device), split(x, y, 12)


def exact_solution(dense: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    identity = torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)
    return torch.linalg.solve(dense + damping * identity, v)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def right_hand_sides(dim: int, count: int = 3, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(dim, count, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)


def test_linear_regression_ggn_is_the_closed_form(device: torch.device) -> None:
    model, data, exact = linear_regression(device=device)
    torch.testing.assert_close(GGN(model, nn.MSELoss(), data).to_dense(), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_direct_and_cg_are_exact_on_linear_regression(method: str, device: torch.device) -> None:
    model, data, exact = linear_regression(device=device)
    operator = KFAC(model, nn.MSELoss(), data) if method == "direct" else GGN(model, nn.MSELoss(), data)
    v = right_hand_sides(5, device=device)
    result = solve(operator, v, 1e-3, method=method, tolerance=1e-12)
    # CG's recurrence reaches 1e-12 in at most P = 5 steps; both then agree with LAPACK's solve to
    # the conditioning (≈ 1e3 with λ = 1e-3) times float64 rounding.
    torch.testing.assert_close(result.solution, exact_solution(exact, v, 1e-3), rtol=1e-9, atol=1e-12)


def test_cg_is_exact_on_a_nonlinear_ggn_with_and_without_a_preconditioner(device: torch.device) -> None:
    model, data = tiny_mlp(device)
    operator = GGN(model, nn.CrossEntropyLoss(), data)
    v = right_hand_sides(operator.dim, device=device)
    answer = exact_solution(operator.to_dense(), v, 1e-2)
    for preconditioner in (None, EKFAC(model, nn.CrossEntropyLoss(), data)):
        result = solve(operator, v, 1e-2, method="cg", preconditioner=preconditioner, tolerance=1e-10, max_iterations=200)
        assert float(result.residuals[-1].max()) < 1e-9
        assert relative_error(result.solution, answer) < 1e-8  # cond ≤ λ_max/λ ≈ 1e2 times the residual


def test_cg_preconditioned_by_an_exact_kfac_converges_in_one_step(device: torch.device) -> None:
    model, data, exact = linear_regression(device=device)
    v = right_hand_sides(5, device=device)
    result = solve(GGN(model, nn.MSELoss(), data), v, 1e-3, method="cg", preconditioner=KFAC(model, nn.MSELoss(), data), tolerance=1e-10)
    assert result.iterations == 1
    torch.testing.assert_close(result.solution, exact_solution(exact, v, 1e-3), rtol=1e-9, atol=1e-12)


def test_lissa_is_exact_on_one_batch_and_converges_on_mini_batches(device: torch.device) -> None:
    model, full_batch, exact = linear_regression(batch_size=40, device=device)
    v = right_hand_sides(5, device=device)
    answer = exact_solution(exact, v, 0.1)
    single = solve(GGN(model, nn.MSELoss(), full_batch), v, 0.1, method="lissa", iterations=300)
    # One batch: the iteration is deterministic and contracts by (1 − α(λ_min + λ)) per step.
    assert relative_error(single.solution, answer) < 1e-8
    _, batches, _ = linear_regression(batch_size=10, device=device)
    generator = torch.Generator().manual_seed(0)
    noisy = solve(GGN(model, nn.MSELoss(), batches), v, 0.1, method="lissa", iterations=200, step_size=0.05, generator=generator)
    # Four batches of ten: the fixed step leaves a noise floor proportional to α; 0.05 keeps it
    # under 10% of the answer, far from the 100% error of the start x = 0.
    assert relative_error(noisy.solution, answer) < 0.1


def test_astra_starts_at_the_ekfac_answer_and_converges_to_the_exact_one(device: torch.device) -> None:
    model, data = tiny_mlp(device)
    operator = GGN(model, nn.CrossEntropyLoss(), data)
    ekfac = EKFAC(model, nn.CrossEntropyLoss(), data)
    v = right_hand_sides(operator.dim, device=device)
    damping = 1e-2
    start = solve(operator, v, damping, method="astra", preconditioner=ekfac, iterations=0)
    torch.testing.assert_close(start.solution, solve(ekfac, v, damping, method="direct").solution, rtol=0, atol=0)
    answer = exact_solution(operator.to_dense(), v, damping)
    generator = torch.Generator().manual_seed(0)
    result = solve(operator, v, damping, method="astra", preconditioner=ekfac, iterations=200, generator=generator)
    assert relative_error(result.solution, answer) < 0.2 * relative_error(start.solution, answer)
    assert relative_error(result.solution, answer) < 0.05


def test_every_method_takes_a_single_vector(device: torch.device) -> None:
    model, data, _ = linear_regression(device=device)
    v = right_hand_sides(5, 1, device=device)[:, 0]
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


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss(), nn.MSELoss(reduction="sum")])
def test_minibatch_operators_average_to_the_full_operator_with_a_short_last_batch(
    loss: nn.Module, device: torch.device
) -> None:
    # Batches of 16, 16 and 8 rows: each is drawn with probability 1/3, so the average of the three
    # scaled operators is their expectation, and it must be the full operator exactly.
    x, labels = teacher_classification(n=40, d=3, classes=3, seed=2, dtype=torch.float64, device=device)
    y = labels if isinstance(loss, nn.CrossEntropyLoss) else nn.functional.one_hot(labels, 3).double()
    model = tanh_mlp((3, 4, 3), seed=2, dtype=torch.float64, device=device)
    operator = GGN(model, loss, split(x, y, 16))
    estimates = minibatch_operators(operator)
    average = sum(next(estimates).to_dense() for _ in range(3)) / 3
    torch.testing.assert_close(average, operator.to_dense(), rtol=1e-12, atol=1e-14)


def test_lissa_is_unbiased_with_unequal_batch_sizes(device: torch.device) -> None:
    # Batches of 16, 16 and 8 rows, the short one with inputs three times larger: weighting each
    # batch's mean by 1 made the converged answer 15–20% off; unbiased estimates leave only the
    # noise floor of the small fixed step.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    x[32:] *= 3.0
    y = torch.randn(40, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(device, torch.float64)
    operator = GGN(model, nn.MSELoss(), split(x.to(device), y.to(device), 16))
    v = right_hand_sides(5, device=device)
    answer = exact_solution(operator.to_dense(), v, 0.1)
    result = solve(operator, v, 0.1, method="lissa", iterations=2000, step_size=0.02, generator=torch.Generator().manual_seed(0))
    assert relative_error(result.solution, answer) < 0.08


def trained_problem(damping_ratio: float, device: torch.device | str = "cpu"):
    """A trained classifier, its EK-FAC, 12 query and all training gradients, and the damping."""
    model, x, y = trained_classifier(device=device)
    context = InfluenceContext(model, Task.classification(), train_batches(x, y, 64), damping_ratio)
    queries = teacher_classification(n=12, d=8, classes=4, seed=1, dtype=torch.float64, device=device)
    query_gradients = flat_gradients(context, *queries, measurement=True)
    train_gradients = flat_gradients(context, x, y, measurement=False)
    return context, query_gradients, train_gradients


def test_astra_step_comes_from_the_largest_eigenvalue_of_the_preconditioned_operator(device: torch.device) -> None:
    context, v, _ = trained_problem(1.0, device)
    damping, ekfac = context.damping, context.kronecker("ekfac")
    dense = context.ggn.to_dense() + damping * torch.eye(context.ggn.dim, dtype=torch.float64, device=device)
    root = ekfac.inverse(damping, exponent=0.5).to_dense()
    largest = float(torch.linalg.eigvalsh(root @ dense @ root).max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no restart at the default step
        result = solve(context.ggn, v, damping, method="astra", preconditioner=ekfac, iterations=1, generator=torch.Generator().manual_seed(0))
    assert result.step_size == pytest.approx(0.25 / largest, rel=0.01)


@pytest.mark.parametrize(("damping_ratio", "tolerance"), [(1.0, 0.01), (0.1, 0.05)])
def test_astra_converges_to_the_exact_scores_on_a_trained_model(
    damping_ratio: float, tolerance: float, device: torch.device
) -> None:
    # Four batches (64, 64, 64, 58), a GGN badly conditioned after training (the preconditioned
    # operator's condition number is about 800 at the default damping, 0.1 × the mean eigenvalue):
    # EK-FAC's scores are 170–195% off the exact damped GGN's. Measured at the default 300
    # iterations: 3.1% at the default damping (5.3% after 200 iterations; before this solver's
    # rework: 22–34%, the plain mini-batch residual's noise with a step from 20 mini-batch power
    # steps), 0.01–0.03% at 1 × the mean eigenvalue. The bound is 5% at the defaults.
    context, v, train = trained_problem(damping_ratio, device)
    damping, ekfac = context.damping, context.kronecker("ekfac")
    dense = context.ggn.to_dense()
    exact_scores = exact_solution(dense, v, damping).T @ train
    start = solve(ekfac, v, damping, method="direct").solution
    assert relative_error(start.T @ train, exact_scores) > 1.0
    result = solve(context.ggn, v, damping, method="astra", preconditioner=ekfac, generator=torch.Generator().manual_seed(0))
    assert result.warnings == []
    assert relative_error(result.solution.T @ train, exact_scores) < tolerance


def test_astra_warns_and_records_each_restart_and_a_returned_start(device: torch.device) -> None:
    model, data = tiny_mlp(device)
    operator = GGN(model, nn.CrossEntropyLoss(), data)
    inverse = EKFAC(model, nn.CrossEntropyLoss(), data).inverse(1e-2)
    v = right_hand_sides(operator.dim, device=device)
    with pytest.warns(RuntimeWarning) as raised:
        result = astra(minibatch_operators(operator, torch.Generator().manual_seed(0)), v, 1e-2, inverse, 1e6, iterations=4)
    assert [str(w.message) for w in raised] == result.warnings and "restarted" in result.warnings[0]
    # Iterations 1 and 3 restart (each after one step of a too-large size): two restarts, then the start.
    assert len(result.warnings) == 3 and "starting point" in result.warnings[-1]
    torch.testing.assert_close(result.solution, inverse.matmat(v), rtol=0, atol=0)
