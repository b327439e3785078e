"""Muon: the orthogonalised update against the SVD polar factor, its scale, the AdamW part, conv
blocks, state handling and argument checks. Every check that computes runs on every device (the
``device`` fixture), its reference (SVD, torch's AdamW, the library's own Newton–Schulz) on the
same device, so the float32 bounds below compare two computations that round alike on either
device (TF32 off, see conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conditioner import Muon, NonFiniteGradientError
from conditioner.linalg import CUBIC_COEFFICIENTS, newton_schulz

pytestmark = pytest.mark.usefixtures("one_thread")


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u @ vh).to(x.dtype)


def _conditioned(rows: int, cols: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """A matrix with singular values spread over [0.2, 1]: the iteration's slowest direction is known."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64)).Q[:, : min(rows, cols)]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64)).Q[:, : min(rows, cols)]
    return ((u * torch.linspace(0.2, 1.0, min(rows, cols), dtype=torch.float64)) @ v.T).float().to(device)


def _draw(*shape: int, seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal entries from a CPU generator seeded ``seed``, on ``device``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("shape", [(32, 32), (48, 20), (20, 48)])
def test_cubic_newton_schulz_converges_to_the_svd_polar_factor(shape, device):
    # After normalising by the Frobenius norm the smallest singular value is about 0.2/3.5; the cubic
    # multiplies small ones by 1.5 per step (≈ 7 steps to reach 1), then converges quadratically.
    g = _conditioned(*shape, device=device)
    result = newton_schulz(g, steps=30, coefficients=CUBIC_COEFFICIENTS)
    assert torch.allclose(result, _polar(g), atol=1e-5)


def test_quintic_newton_schulz_gives_the_polar_directions_with_singular_values_near_one(device):
    # Muon's quintic trades exactness for speed: 5 steps leave singular values in about [0.7, 1.2]
    # (not 1), with the singular vectors of G; that is what it guarantees.
    g = _conditioned(64, 40, device=device)
    result = newton_schulz(g, steps=5).double()
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.6 and singular.max() < 1.25
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    inside = u.T @ result @ vh.T  # diagonal when result shares G's singular vectors
    off = inside - torch.diag(torch.diagonal(inside))
    assert off.abs().max() < 1e-4
    assert torch.linalg.matrix_norm(result - _polar(g).double()) / torch.linalg.matrix_norm(_polar(g).double()) < 0.3


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_first_update_is_lr_times_scale_times_the_polar_factor(shape, device):
    weight = nn.Parameter(torch.zeros(shape, device=device))
    lr, beta = 0.1, 0.9
    opt = Muon([weight], lr=lr, momentum=beta, nesterov=True, ns_steps=40, ns_coefficients=CUBIC_COEFFICIENTS)
    g = _conditioned(*shape, seed=1, device=device)
    weight.grad = g.clone()
    opt.step()
    # momentum (1 − β)·G, Nesterov direction β·m + (1 − β)·G: a multiple of G, same polar factor
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    assert torch.allclose(weight.detach(), -lr * scale * _polar(g), atol=1e-5)


def test_momentum_and_nesterov_follow_their_definitions(device):
    weight = nn.Parameter(torch.zeros(8, 6, device=device))
    grads = [_draw(8, 6, seed=i, device=device) for i in range(3)]
    for nesterov in (False, True):
        opt = Muon([weight], lr=0.01, momentum=0.8, nesterov=nesterov)
        momentum = torch.zeros(8, 6, device=device)
        with torch.no_grad():
            weight.zero_()
        expected = torch.zeros(8, 6, device=device)
        for g in grads:
            weight.grad = g.clone()
            opt.step()
            momentum = 0.8 * momentum + 0.2 * g
            direction = 0.8 * momentum + 0.2 * g if nesterov else momentum
            expected -= 0.01 * (8 / 6) ** 0.5 * newton_schulz(direction.unsqueeze(0))[0]
        assert torch.allclose(weight.detach(), expected, atol=1e-6)


def test_vectors_get_adamw_like_torch(device):
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(10).to(device))
    twin = nn.Parameter(bias.detach().clone())
    ours = Muon([bias], lr=0.01, adam_betas=(0.9, 0.99), eps=1e-8)
    reference = torch.optim.AdamW([twin], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    for i in range(5):
        g = _draw(10, seed=i, device=device)
        bias.grad, twin.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    assert torch.allclose(bias, twin, atol=1e-6)


def test_a_group_with_orthogonalize_off_uses_adamw_for_matrices(device):
    embedding = nn.Parameter(torch.randn(12, 4).to(device))
    twin = nn.Parameter(embedding.detach().clone())
    ours = Muon([{"params": [embedding], "orthogonalize": False}], lr=0.01)
    reference = torch.optim.AdamW([twin], lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    for i in range(3):
        g = _draw(12, 4, seed=i, device=device)
        embedding.grad, twin.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    assert torch.allclose(embedding, twin, atol=1e-6)
    assert set(ours.state["group0/12x4:PP"]) == {"exp_avg", "exp_avg_sq", "step"}


def test_conv_kernels_are_orthogonalised_as_out_by_in_times_kernel_matrices(device):
    conv = nn.Conv2d(3, 8, 3).to(device)
    opt = Muon(conv.parameters(), lr=0.1, nesterov=False, momentum=0.5, ns_steps=40, ns_coefficients=CUBIC_COEFFICIENTS)
    before = conv.weight.detach().clone()
    g = _conditioned(8, 27, seed=2, device=device)
    conv.weight.grad = g.reshape(8, 3, 3, 3).clone()
    conv.bias.grad = torch.ones(8, device=device)
    opt.step()
    assert "group0/8x27:PP" in opt.state and "group0/8:I" in opt.state
    assert torch.allclose((before - conv.weight.detach()).reshape(8, 27), 0.1 * _polar(g), atol=1e-5)


def test_equal_shapes_share_one_stack_and_weight_decay_is_decoupled(device):
    layers = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)).to(device)
    opt = Muon(layers.parameters(), lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in layers.parameters()]
    for p in layers.parameters():
        p.grad = torch.randn(6, 6).to(device)
    opt.step()
    assert list(opt.state) == ["group0/6x6:PP"]
    for p, old, g in zip(layers.parameters(), before, [p.grad for p in layers.parameters()]):
        direction = newton_schulz((0.95 * 0.05 * g + 0.05 * g).unsqueeze(0))[0]
        assert torch.allclose(p.detach(), (old - 0.1 * direction) * (1 - 0.1 * 0.5), atol=1e-6)


def test_state_dict_round_trip_and_bfloat16_momentum(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).to(device)
    opt = Muon(model.parameters(), lr=0.02, state_precision="bfloat16")
    x, y = torch.randn(16, 5).to(device), torch.randn(16, 2).to(device)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()

    train(model, opt, 3)
    assert opt.state["group0/7x5:PP"]["momentum"].dtype == torch.bfloat16
    twin = copy.deepcopy(model)
    twin_opt = Muon(twin.parameters(), lr=0.02, state_precision="bfloat16")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 3)
    train(twin, twin_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_non_finite_gradient_changes_nothing(device):
    weight = nn.Parameter(torch.randn(4, 4).to(device))
    opt = Muon([weight])
    weight.grad = torch.randn(4, 4).to(device)
    opt.step()
    before, state = weight.detach().clone(), opt.state["group0/4x4:PP"]["momentum"].clone()
    weight.grad = torch.full((4, 4), float("inf"), device=device)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert torch.equal(weight.detach(), before) and torch.equal(opt.state["group0/4x4:PP"]["momentum"], state)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"ns_steps": -1}, "ns_steps"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"nesterov": 1}, "nesterov"),
        ({"lr": -0.1}, "lr"),
        ({"state_precision": "4bit"}, "state_precision"),
        ({"adam_betas": (0.9,)}, "adam_betas"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Muon([nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_a_small_classifier_learns(device):
    torch.manual_seed(0)
    x = torch.randn(256, 10).to(device)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2)).to(device)
    opt = Muon(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
