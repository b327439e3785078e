"""K-FAC and EK-FAC against dense float64 references built independently with explicit Jacobians.

The exactness cases are the known identities: on deep LINEAR networks with MSE loss every
per-example output Jacobian of a layer is the same matrix, so ``Σ_n S_n ⊗ A_n = S ⊗ A`` and K-FAC
IS the block-diagonal GGN (for "expand" when each weight-sharing position has its own loss term,
for "reduce" when positions are averaged before the output). Those comparisons are asserted at
1e-10 relative: the float64 computations differ only in summation order.

The comparisons run on every device (the ``device`` fixture), operator and reference on the same
one; the data are drawn on the CPU and moved, and float64 rounds alike on both devices (~1e-16).
Argument checks, which compute nothing, run on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from conditioner.curvature import EKFAC, KFAC

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = dict(rtol=1e-10, atol=1e-12)


class ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class MeanOverPositions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def dense_ggn(model: nn.Module, loss_function: nn.Module, data, params: list[torch.Tensor]) -> torch.Tensor:
    """``c · Jᵀ H J`` over all data, from the explicit Jacobian of the stacked outputs."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    inputs = torch.cat([x for x, _ in data])
    targets = torch.cat([y for _, y in data])

    def outputs(*values):
        return functional_call(model, dict(zip(keys, values)), (inputs,))

    out = outputs(*params)
    classes = out.shape[-1]
    rows = out.reshape(-1, classes).detach()
    jacobians = jacrev(outputs, argnums=tuple(range(len(params))))(*params)
    jacobian = torch.cat([j.reshape(rows.numel(), -1) for j in jacobians], dim=1)
    if isinstance(loss_function, nn.MSELoss):
        hessian = 2.0 * torch.eye(rows.numel(), dtype=rows.dtype, device=rows.device)
        scale = 1.0 / rows.numel() if loss_function.reduction == "mean" else 1.0
    else:
        p = rows.softmax(-1)
        hessian = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
        scale = 1.0 / rows.shape[0] if loss_function.reduction == "mean" else 1.0
    del targets
    return scale * jacobian.T @ hessian @ jacobian


def block_diagonal(matrix: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.bool, device=matrix.device) for s in sizes])
    return torch.where(mask, matrix, torch.zeros_like(matrix))


def layer_sizes(operator: KFAC) -> list[int]:
    return [sum(p.numel() for p in block.layer.params) for block in operator.blocks]


def batches_of(inputs: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(inputs.split(sizes), targets.split(sizes)))


def regression_data(shape: tuple[int, ...], outputs: tuple[int, ...], sizes=(5, 3, 4), seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    y = torch.randn(n, *outputs, generator=generator, dtype=torch.float64)
    return batches_of(x.to(device), y.to(device), list(sizes))


def assert_kfac_exact(model: nn.Module, loss_function: nn.Module, data, **options) -> None:
    for operator_type in (KFAC, EKFAC):
        operator = operator_type(model, loss_function, data, **options)
        exact = block_diagonal(dense_ggn(model, loss_function, data, operator.params), layer_sizes(operator))
        torch.testing.assert_close(operator.to_dense(), exact, **EXACT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_is_the_block_ggn_of_a_deep_linear_network(reduction: str, device: torch.device) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 2)).to(device, torch.float64)
    assert_kfac_exact(model, nn.MSELoss(reduction=reduction), regression_data((4,), (2,), device=device))


def test_expand_is_exact_when_every_position_has_its_own_loss(device: torch.device) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(device, torch.float64)
    data = regression_data((6, 3), (6, 2), device=device)
    assert_kfac_exact(model, nn.MSELoss(), data, weight_sharing="expand")


def test_reduce_is_exact_when_positions_are_averaged_before_the_output(device: torch.device) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), MeanOverPositions(), nn.Linear(4, 2)).to(device, torch.float64)
    data = regression_data((5, 3), (2,), device=device)
    assert_kfac_exact(model, nn.MSELoss(reduction="sum"), data, weight_sharing="reduce")


def test_conv2d_patches_with_stride_padding_and_dilation_are_exact(device: torch.device) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=2, dilation=2),
        nn.Conv2d(3, 2, kernel_size=1),
        ChannelsLast(),
    ).to(device, torch.float64)
    assert_kfac_exact(model, nn.MSELoss(), regression_data((2, 7, 6), (4, 3, 2), device=device))


def test_grouped_conv2d_is_exact_within_each_group(device: torch.device) -> None:
    torch.manual_seed(4)
    grouped = nn.Conv2d(4, 6, kernel_size=(2, 3), padding=1, groups=2)
    model = nn.Sequential(grouped, nn.Conv2d(6, 2, kernel_size=1), ChannelsLast()).to(device, torch.float64)
    data = regression_data((4, 5, 5), (6, 5, 2), device=device)
    operator = KFAC(model, nn.MSELoss(), data)
    exact = dense_ggn(model, nn.MSELoss(), data, operator.params)
    # Group of every entry of [weight, bias] of the grouped layer; other layers are their own group.
    per_group_weight = grouped.weight.numel() // 2
    groups = torch.cat(
        [
            torch.arange(grouped.weight.numel()) // per_group_weight,
            torch.arange(6) // 3,
            torch.full((sum(p.numel() for p in model[1].parameters()),), 2),
        ]
    )
    within = (groups[:, None] == groups[None, :]).to(device)
    torch.testing.assert_close(operator.to_dense(), torch.where(within, exact, torch.zeros_like(exact)), **EXACT)


def test_embedding_followed_by_linear_is_exact(device: torch.device) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, 2)).to(device, torch.float64)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (9, 4), generator=generator)
    targets = torch.randn(9, 4, 2, generator=generator, dtype=torch.float64)
    assert_kfac_exact(model, nn.MSELoss(), batches_of(tokens.to(device), targets.to(device), [4, 5]))


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def nonlinear_classifier(device: torch.device | str = "cpu") -> tuple[nn.Module, Batches]:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(device, torch.float64)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=generator)
    return model, batches_of(x.to(device), y.to(device), [10, 12, 8])


def conv_classifier(device: torch.device | str = "cpu") -> tuple[nn.Module, Batches]:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1, groups=2), nn.Tanh(), nn.Conv2d(4, 3, 2, stride=2), nn.Flatten(), nn.Linear(12, 3)
    ).to(device, torch.float64)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(14, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=generator)
    return model, batches_of(x.to(device), y.to(device), [6, 8])


def in_kronecker_basis(operator: KFAC, dense: torch.Tensor) -> list[torch.Tensor]:
    """The diagonal of each block of ``dense`` in ``operator``'s Kronecker eigenbasis, ``(G, rows, cols)``."""
    diagonals, start = [], 0
    for block in operator.blocks:
        layer = block.layer
        size = sum(p.numel() for p in layer.params)
        units = torch.eye(layer.groups * layer.rows * layer.cols, dtype=dense.dtype, device=dense.device)
        directions = block.rotate_back(units.reshape(-1, layer.groups, layer.rows, layer.cols))
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in layer.from_matrix(directions)], dim=1)
        exact_block = dense[start : start + size, start : start + size]
        diagonals.append(((flat @ exact_block) * flat).sum(1).reshape(layer.groups, layer.rows, layer.cols))
        start += size
    return diagonals


@pytest.mark.parametrize("make", [nonlinear_classifier, conv_classifier])
def test_ekfac_eigenvalues_are_the_diagonal_of_the_exact_block_and_beat_kfac(make, device: torch.device) -> None:
    model, data = make(device)
    kfac = KFAC(model, nn.CrossEntropyLoss(), data)
    ekfac = EKFAC(model, nn.CrossEntropyLoss(), data)
    exact = dense_ggn(model, nn.CrossEntropyLoss(), data, kfac.params)
    for block, diagonal in zip(ekfac.blocks, in_kronecker_basis(ekfac, exact)):
        torch.testing.assert_close(block.eigenvalues, diagonal, **EXACT)
    # Cross-group blocks of the grouped convolution are zero in both approximations, so they add
    # the same amount to both errors.
    exact_blocks = block_diagonal(exact, layer_sizes(kfac))
    assert torch.linalg.norm(ekfac.to_dense() - exact_blocks) < torch.linalg.norm(kfac.to_dense() - exact_blocks)


def test_sampled_fisher_approaches_the_exact_factors(device: torch.device) -> None:
    """The labels are drawn from a CPU generator wherever the model lives (the library draws on the
    generator's device), so the Monte-Carlo error below is the CPU run's on every device."""
    model, data = nonlinear_classifier(device)
    exact = KFAC(model, nn.CrossEntropyLoss(), data)
    sampled = KFAC(
        model, nn.CrossEntropyLoss(), data, fisher_type="sample", samples=4000, generator=torch.Generator().manual_seed(0)
    )
    for e, s in zip(exact.blocks, sampled.blocks):
        torch.testing.assert_close(s.col_factor, e.col_factor, rtol=0, atol=0)
        # Monte-Carlo error of a mean of 4000 × 30 terms: a few percent of the factor's scale.
        assert torch.linalg.norm(s.row_factor - e.row_factor) < 0.05 * torch.linalg.norm(e.row_factor)


def test_empirical_fisher_ekfac_eigenvalues_match_per_example_gradients(device: torch.device) -> None:
    model, data = nonlinear_classifier(device)
    ekfac = EKFAC(model, nn.CrossEntropyLoss(reduction="sum"), data, fisher_type="empirical")
    layer = model[2]
    gradients = []
    for x, y in data:
        for xi, yi in zip(x, y):
            model.zero_grad()
            nn.functional.cross_entropy(model(xi[None]), yi[None], reduction="sum").backward()
            gradients.append(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1))
    block = ekfac.blocks[1]
    rotated = block.row_basis[0].T @ torch.stack(gradients) @ block.col_basis[0]
    torch.testing.assert_close(block.eigenvalues[0], rotated.square().sum(0), **EXACT)


def test_inverse_trace_and_logdet_agree_with_the_dense_matrix(device: torch.device) -> None:
    model, data = nonlinear_classifier(device)
    for operator in (KFAC(model, nn.CrossEntropyLoss(), data), EKFAC(model, nn.CrossEntropyLoss(), data)):
        dense = operator.to_dense()
        damping = 1e-2
        identity = torch.eye(operator.dim, dtype=dense.dtype, device=device)
        damped = dense + damping * identity
        # (B + λI)⁻¹ has entries up to 1/λ = 100: relative 1e-10 leaves room for the rounding of both.
        torch.testing.assert_close(operator.inverse(damping).to_dense() @ damped, identity, rtol=0, atol=1e-9)
        torch.testing.assert_close(operator.trace(), torch.trace(dense), **EXACT)
        torch.testing.assert_close(operator.logdet(damping), torch.linalg.slogdet(damped)[1], **EXACT)


def test_vector_forms_agree(device: torch.device) -> None:
    model, data = nonlinear_classifier(device)
    operator = EKFAC(model, nn.CrossEntropyLoss(), data)
    generator = torch.Generator().manual_seed(2)
    flat = torch.randn(operator.dim, 3, generator=generator, dtype=torch.float64).to(device)
    as_matrix = operator @ flat
    as_vector = operator @ flat[:, 0]
    as_list = operator @ [t.squeeze(0) for t in operator.unflatten(flat[:, :1])]
    torch.testing.assert_close(as_vector, as_matrix[:, 0], **EXACT)
    torch.testing.assert_close(operator.flatten([t.unsqueeze(0) for t in as_list])[:, 0], as_vector, **EXACT)


def test_unsupported_layers_are_listed_by_name_and_skipped_on_request() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    data = regression_data((3,), (2,))
    with pytest.raises(ValueError, match=r"1 \(LayerNorm"):
        KFAC(model, nn.MSELoss(), data)
    operator = KFAC(model, nn.MSELoss(), data, skip_unsupported=True)
    assert [block.layer.name for block in operator.blocks] == ["0", "2"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fisher_type": "true"}, "fisher_type"),
        ({"weight_sharing": "tile"}, "weight_sharing"),
        ({"samples": 0}, "samples"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match=message):
        KFAC(model, nn.MSELoss(), regression_data((3,), (2,)), **options)


def test_bad_inputs_get_clear_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double()
    data = regression_data((3,), (2,))
    with pytest.raises(ValueError, match="yielded no batches"):
        KFAC(model, nn.MSELoss(), [])
    with pytest.raises(TypeError, match="loss_function"):
        KFAC(model, nn.L1Loss(), data)
    frozen = nn.Sequential(nn.Linear(3, 2)).double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        KFAC(frozen, nn.MSELoss(), data)
    operator = KFAC(model, nn.MSELoss(), data)
    for damping in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="damping"):
            operator.inverse(damping)


def test_one_dimensional_regression_outputs_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64))]
    with pytest.raises(ValueError, match="unsqueeze"):
        KFAC(model, nn.MSELoss(), data)
