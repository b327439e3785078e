"""Exact curvature operators (GGN, Hessian, empirical Fisher) against dense matrices built
independently with ``torch.autograd`` on the loss of the whole data set, in float64.

References: the Hessian of the full loss in the flattened parameters; the GGN as ``Jᵀ (∂²L/∂f²) J``
from the network's Jacobian and the loss's Hessian in the outputs (no LossSpec involved); the
empirical Fisher from per-row gradients computed one by one. All comparisons are float64 with
tolerance 1e-10 relative to the matrix's largest entry: the operators and the references sum the
same few dozen terms in different orders, so they differ by a few ulps (~1e-15), and 1e-10 still
catches any wrong factor, transpose or missing term. The comparisons run on every device (the
``device`` fixture), operator and reference on the same one, which rounds float64 as the CPU does;
argument checks, which compute nothing, run on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from conditioner.app.models import CharGPT
from conditioner.curvature.exact import GGN, EmpiricalFisher, Hessian

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch's own warning, once per process, when forward-mode AD first loads its decompositions
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

OPERATORS = {"hessian": Hessian, "ggn": GGN, "ef": EmpiricalFisher}
LOSSES = [("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean"), ("mse", "sum")]
SIZES = (4, 2, 1)  # unequal batches: the mean must weight each by its share of rows
CLASSES = 3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, CLASSES))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, CLASSES))


def batch_norm_mlp() -> nn.Module:
    """Buffers in use: batch norm in eval mode reads (non-trivial) running statistics."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, CLASSES))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


MODELS = {
    "mlp": (mlp, (3,)),
    "conv": (conv, (1, 5, 5)),
    "batch_norm": (batch_norm_mlp, (3,)),
    "sequence": (mlp, (2, 3)),
}


def problem(model_name: str, kind: str, reduction: str, seed: int = 0, device: torch.device | str = "cpu"):
    """A float64 model, its loss function, and data in batches of unequal sizes, drawn on the CPU
    from ``seed`` and moved to ``device``."""
    torch.manual_seed(seed)
    build, input_shape = MODELS[model_name]
    model = build().double()
    n = sum(SIZES)
    inputs = torch.randn(n, *input_shape, dtype=torch.float64)
    with torch.no_grad():
        output_shape = model(inputs).shape
    if kind == "cross_entropy":
        targets = torch.randint(0, CLASSES, output_shape[:-1])
        loss_function: nn.Module = nn.CrossEntropyLoss(reduction=reduction)
    else:
        targets = torch.randn(output_shape, dtype=torch.float64)
        loss_function = nn.MSELoss(reduction=reduction)
    model, inputs, targets = model.to(device), inputs.to(device), targets.to(device)
    data = list(zip(inputs.split(SIZES), targets.split(SIZES)))
    return model, loss_function, data, inputs, targets


def full_loss(loss_function: nn.Module, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The data set's loss as torch defines it, outputs ``(..., C)`` flattened to rows for cross-entropy."""
    if isinstance(loss_function, nn.CrossEntropyLoss):
        return loss_function(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
    return loss_function(output, targets)


def flat_function(model: nn.Module, inputs: torch.Tensor):
    """The network as a function of its flattened trainable parameters, and their current value."""
    named = [(name, p) for name, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def network(vector: torch.Tensor) -> torch.Tensor:
        pieces = vector.split([p.numel() for _, p in named])
        params = {name: piece.reshape(p.shape) for (name, p), piece in zip(named, pieces)}
        return functional_call(model, params, (inputs,))

    return network, flat


def dense_hessian(model, loss_function, inputs, targets) -> torch.Tensor:
    network, flat = flat_function(model, inputs)
    return torch.autograd.functional.hessian(lambda v: full_loss(loss_function, network(v), targets), flat)


def dense_ggn(model, loss_function, inputs, targets) -> torch.Tensor:
    network, flat = flat_function(model, inputs)
    output = network(flat).detach()
    jacobian = torch.autograd.functional.jacobian(network, flat).reshape(output.numel(), -1)
    output_hessian = torch.autograd.functional.hessian(lambda f: full_loss(loss_function, f, targets), output)
    output_hessian = output_hessian.reshape(output.numel(), output.numel())
    return jacobian.mT @ output_hessian @ jacobian


def dense_empirical_fisher(model, loss_function, inputs, targets) -> torch.Tensor:
    """``c Σ_r g_r g_rᵀ`` from explicit per-row gradients of the per-row loss (reduction "sum")."""
    network, flat = flat_function(model, inputs)
    output = network(flat)
    classes = output.shape[-1]
    rows_out = output.reshape(-1, classes)
    cross_entropy = isinstance(loss_function, nn.CrossEntropyLoss)
    rows_target = targets.reshape(-1) if cross_entropy else targets.reshape(-1, classes)
    rows = rows_out.shape[0]
    if loss_function.reduction == "sum":
        scale = 1.0
    else:
        scale = 1.0 / rows if cross_entropy else 1.0 / (rows * classes)
    gradients = []
    for r in range(rows):
        vector = flat.clone().requires_grad_(True)
        out_r = network(vector).reshape(-1, classes)[r]
        if cross_entropy:
            loss_r = nn.functional.cross_entropy(out_r, rows_target[r], reduction="sum")
        else:
            loss_r = (out_r - rows_target[r]).square().sum()
        gradients.append(torch.autograd.grad(loss_r, vector)[0])
    g = torch.stack(gradients)
    return scale * g.mT @ g


REFERENCES = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_empirical_fisher}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    assert (actual - expected).abs().max() <= 1e-10 * scale, float((actual - expected).abs().max() / scale)


# --- against dense references ---------------------------------------------------------------------


@pytest.mark.parametrize("kind,reduction", LOSSES)
@pytest.mark.parametrize("model_name", ["mlp", "conv", "batch_norm"])
@pytest.mark.parametrize("name", OPERATORS)
def test_operator_matches_dense_reference(name, model_name, kind, reduction, device):
    model, loss_function, data, inputs, targets = problem(model_name, kind, reduction, device=device)
    operator = OPERATORS[name](model, loss_function, data)
    assert_close(operator.to_dense(), REFERENCES[name](model, loss_function, inputs, targets))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", OPERATORS)
def test_sequence_outputs_cross_entropy(name, reduction, device):
    """Outputs ``(N, T, C)``: every position is a row, the mean runs over ``N·T`` rows."""
    model, loss_function, data, inputs, targets = problem("sequence", "cross_entropy", reduction, device=device)
    operator = OPERATORS[name](model, loss_function, data)
    assert operator.rows == sum(SIZES) * 2
    assert_close(operator.to_dense(), REFERENCES[name](model, loss_function, inputs, targets))


@pytest.mark.parametrize("name", OPERATORS)
def test_attention_model(name, device):
    """A transformer (fused scaled-dot-product attention, which has no forward-mode derivative):
    the operators use the math kernel, the same function; so do the references."""
    torch.manual_seed(0)
    model = CharGPT(5, context=4, width=4, layers=1, heads=2).to(device, torch.float64).eval()
    inputs, targets = torch.randint(0, 5, (3, 4)).to(device), torch.randint(0, 5, (3, 4)).to(device)
    data = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
    operator = OPERATORS[name](model, nn.CrossEntropyLoss(), data)
    with sdpa_kernel(SDPBackend.MATH):
        expected = REFERENCES[name](model, nn.CrossEntropyLoss(), inputs, targets)
    assert_close(operator.to_dense(), expected)


def test_ggn_equals_hessian_for_a_linear_model_with_mse(device):
    """A model linear in its parameters has no second-order network term: GGN = Hessian."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(device, torch.float64)
    data = [(torch.randn(5, 3, dtype=torch.float64).to(device), torch.randn(5, 2, dtype=torch.float64).to(device))]
    loss_function = nn.MSELoss()
    assert_close(GGN(model, loss_function, data).to_dense(), Hessian(model, loss_function, data).to_dense())


# --- the operator interface ------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPERATORS)
def test_flat_matrix_and_list_products_agree_with_dense(name, device):
    model, loss_function, data, _, _ = problem("mlp", "cross_entropy", "mean", device=device)
    operator = OPERATORS[name](model, loss_function, data)
    dense = operator.to_dense()
    generator = torch.Generator().manual_seed(1)
    columns = torch.randn(operator.dim, 5, dtype=torch.float64, generator=generator).to(device)
    assert_close(operator @ columns, dense @ columns)
    assert_close(operator @ columns[:, 0], dense @ columns[:, 0])
    as_list = operator.unflatten(columns[:, :1])
    product = operator @ [v[0] for v in as_list]
    assert [tuple(t.shape) for t in product] == [tuple(p.shape) for p in model.parameters()]
    assert_close(torch.cat([t.reshape(-1) for t in product]), dense @ columns[:, 0])
    assert not (operator @ columns).requires_grad  # nothing recorded on the real parameters


@pytest.mark.parametrize("name", OPERATORS)
def test_parameter_subset_is_the_matching_block(name, device):
    """Parameters left out are held fixed: the operator is the sub-block of the full matrix."""
    model, loss_function, data, _, _ = problem("mlp", "mse", "mean", device=device)
    full = OPERATORS[name](model, loss_function, data).to_dense()
    subset = [model[2].weight, model[0].bias]
    block = OPERATORS[name](model, loss_function, data, params=subset).to_dense()
    offsets = {}
    start = 0
    for p in model.parameters():
        offsets[id(p)] = torch.arange(start, start + p.numel(), device=device)
        start += p.numel()
    index = torch.cat([offsets[id(p)] for p in subset])
    assert_close(block, full[index][:, index])


def test_model_mode_and_buffers_are_left_alone(device):
    model, loss_function, data, _, _ = problem("batch_norm", "cross_entropy", "mean", device=device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Hessian(model, loss_function, data).to_dense()
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_scale_counts_rows_of_all_batches_once():
    model, _, data, _, _ = problem("mlp", "mse", "mean")
    operator = GGN(model, nn.MSELoss(), data)
    assert (operator.rows, operator.classes) == (sum(SIZES), CLASSES)
    assert math.isclose(operator.scale, 1.0 / (sum(SIZES) * CLASSES))


# --- errors ------------------------------------------------------------------------------------------


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="data: the data loader yielded no batches"):
        GGN(mlp().double(), nn.CrossEntropyLoss(), [])


def test_model_without_trainable_parameters_is_an_error():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="model: has no trainable parameters"):
        Hessian(model, nn.CrossEntropyLoss(), [(torch.randn(2, 3), torch.tensor([0, 1]))])


def test_foreign_or_repeated_parameters_are_errors():
    model, loss_function, data, _, _ = problem("mlp", "cross_entropy", "mean")
    with pytest.raises(ValueError, match="params: every tensor must be a parameter of model"):
        GGN(model, loss_function, data, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="params: parameter '0.weight' is given twice"):
        GGN(model, loss_function, data, params=[model[0].weight, model[0].weight])


def test_unsupported_loss_and_bad_batches_are_errors():
    model, _, data, _, _ = problem("mlp", "cross_entropy", "mean")
    with pytest.raises(TypeError, match="loss_function"):
        GGN(model, nn.NLLLoss(), data)
    with pytest.raises(TypeError, match="data: each batch must be a pair"):
        GGN(model, nn.CrossEntropyLoss(), [torch.zeros(3)])
    with pytest.raises(TypeError, match="data: must be iterable more than once"):
        GGN(model, nn.CrossEntropyLoss(), iter(data))
    with pytest.raises(ValueError, match=r"targets: MSE needs outputs and targets of shape \(\.\.\., C\)"):
        GGN(nn.Linear(3, 1).double(), nn.MSELoss(), [(data[0][0], torch.zeros(4, dtype=torch.float64))])
    with pytest.raises(ValueError, match="targets: cross-entropy expects class indices"):
        GGN(model, nn.CrossEntropyLoss(), [(data[0][0], data[0][1][:1])]).to_dense()
