"""Curvature from a trained optimizer's state against its dense float64 definition."""

from __future__ import annotations

import pytest
import torch
from cases import tanh_mlp
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Shampoo
from conditioner.influence.optimizer_curvature import OptimizerCurvature

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(optimizer_type, steps: int = 7, **options):
    model = tanh_mlp((3, 5, 4), seed=0, dtype=torch.float64)
    optimizer = optimizer_type(model.parameters(), lr=1e-2, precondition_frequency=3, **options)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 3, generator=generator, dtype=torch.float64)
        y = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def _dense(optimizer, params) -> torch.Tensor:
    """The definition, built independently: per parameter a block (Q0 ⊗ Q1) diag(vec D̂) (Q0 ⊗ Q1)ᵀ
    for a matrix (row-major vec), diag(D̂) for a vector, from the optimizer's raw state."""
    group = optimizer.param_groups[0]
    beta2, first = group["betas"][1], group["update_first_step"]
    blocks = []
    for p in params:
        for key, state in optimizer.state.items():
            stack = next(s for s in optimizer.layout(0) if optimizer.stack_key(0, s) == key)
            rows = [r for r, b in enumerate(stack.blocks) if group["params"][b.param_index] is p]
            if not rows:
                continue
            row = rows[0]
            updates = state["step"][row] - (0 if first else 1)
            d = state["exp_avg_sq"][row] / (1 - beta2**updates)
            if "basis0" in state:
                kron = torch.kron(state["basis0"][row], state["basis1"][row])
                blocks.append(kron @ torch.diag(d.flatten()) @ kron.T)
            else:
                blocks.append(torch.diag(d.flatten()))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("optimizer_type, options", [
    (EigenvalueCorrectedShampoo, {"merge_dims": False}),
    (EigenvalueCorrectedShampoo, {"merge_dims": False, "eigenvalue_transport": "rotate"}),
    (SOAP, {}),
])
def test_the_inverse_is_the_damped_inverse_of_the_dense_definition(optimizer_type, options):
    model, optimizer = _trained(optimizer_type, **options)
    params = list(model.parameters())
    curvature = OptimizerCurvature(optimizer, params)
    dense = _dense(optimizer, params)
    assert curvature.dim == dense.shape[0] == sum(p.numel() for p in params)
    assert curvature.mean_eigenvalue == pytest.approx(float(dense.trace()) / dense.shape[0], rel=1e-12)
    v = torch.randn(curvature.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    damping = 0.1 * curvature.mean_eigenvalue
    expected = torch.linalg.solve(dense + damping * torch.eye(dense.shape[0], dtype=torch.float64), v)
    torch.testing.assert_close(curvature.inverse_matmat(v, damping), expected, rtol=1e-10, atol=1e-12)
    # a subset of the parameters, in another order: the operator follows the order given
    subset = [params[2], params[0]]
    dense_subset = _dense(optimizer, subset)
    w = v[: dense_subset.shape[0]]
    expected = torch.linalg.solve(dense_subset + damping * torch.eye(dense_subset.shape[0], dtype=torch.float64), w)
    torch.testing.assert_close(OptimizerCurvature(optimizer, subset).inverse_matmat(w, damping), expected,
                               rtol=1e-10, atol=1e-12)


def test_unsupported_optimizers_and_parameters_are_refused_by_name():
    model, shampoo = _trained(Shampoo)
    with pytest.raises(TypeError, match="optimizer: must be SOAP or EigenvalueCorrectedShampoo"):
        OptimizerCurvature(shampoo, list(model.parameters()))
    model, ecs = _trained(EigenvalueCorrectedShampoo)
    with pytest.raises(ValueError, match=r"params: entries \[1\] have no state"):
        OptimizerCurvature(ecs, [next(model.parameters()), nn.Parameter(torch.zeros(2))])
    model, low = _trained(EigenvalueCorrectedShampoo, state_precision="bfloat16")
    with pytest.raises(ValueError, match="state_precision='full'"):
        OptimizerCurvature(low, list(model.parameters()))
    curvature = OptimizerCurvature(ecs, list(ecs.param_groups[0]["params"]))
    with pytest.raises(ValueError, match="vectors: expected shape"):
        curvature.inverse_matmat(torch.zeros(3, 1, dtype=torch.float64), 1.0)
