"""SOAP, EigenvalueCorrectedShampoo and Shampoo against independent references: identities with
torch's diagonal optimizers, the Shampoo step against a dense computation, and the eigenbasis
refresh. Each runs on every device (the ``device`` fixture), the reference on the same device; the
float64 tolerances hold on CUDA as on the CPU, both devices rounding each float64 operation to
~1e-16."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from cases import (
    assert_params_equal,
    fixed_grads,
    make_model,
    mse,
    params_of,
)
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Shampoo

pytestmark = pytest.mark.usefixtures("one_thread")


# --- identities with torch's diagonal optimizers -----------------------------------------------


def test_soap_with_identity_basis_is_adam_one_step_later(device):
    model = make_model(dtype=torch.float64, device=device)
    ref = copy.deepcopy(model)
    soap = SOAP(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-16, weight_decay=0.0, max_precond_dim=0)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-16)
    mse(model, 0).backward()
    soap.step()  # only initialises
    assert_params_equal(params_of(model), params_of(ref))
    for i in range(1, 16):
        for m, opt in ((model, soap), (ref, adam)):
            opt.zero_grad()
            mse(m, i).backward()
            opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            # SOAP adds ε to sqrt(v) before bias correction, Adam after: per step the updates differ
            # by ≤ lr·ε·(1/sqrt(1−β2ᵗ) − 1)/sqrt(v̂) ≈ 1e-2·1e-16·9/1e-4 ≈ 1e-13 (smallest |g|
            # ≈ 1e-4, and less once v̂ grows), plus float64 round-off (~1e-16)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(model.inp.weight, make_model(dtype=torch.float64, device=device).inp.weight)


def assert_same_trajectory(model, optimizer, ref, ref_optimizer, steps, rtol, atol):
    """Train ``model`` and ``ref`` on the same losses and compare the parameters after every step."""
    for i in range(steps):
        for m, opt in ((model, optimizer), (ref, ref_optimizer)):
            opt.zero_grad()
            mse(m, i).backward()
            opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_soap_with_identity_basis_and_update_first_step_is_adam(device):
    model = make_model(dtype=torch.float64, device=device)
    ref = copy.deepcopy(model)
    soap = SOAP(
        model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-16, weight_decay=0.0, max_precond_dim=0,
        update_first_step=True,
    )
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-16)
    # same ε-placement bound as above
    assert_same_trajectory(model, soap, ref, adam, 15, rtol=0, atol=1e-12)


def _soap_diagonal_loop(params, grads, lr, betas, eps, wd, decay_first=False):
    """Adam with SOAP's ε placement and decoupled decay applied AFTER the update."""
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m[i] / (v[i].sqrt() + eps)
            if decay_first:
                params[i] = params[i] * (1 - lr * wd) - u
            else:
                params[i] = (params[i] - u) * (1 - lr * wd)
    return params


def test_soap_weight_decay_is_applied_after_the_update(device):
    shapes = [(5, 4), (4,)]
    grads = fixed_grads(shapes, 12, device=device)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64).to(device)) for s in shapes]
    start = [p.detach().clone() for p in params]
    settings = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    opt = SOAP(params, max_precond_dim=0, update_first_step=True, **settings)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    expected = _soap_diagonal_loop(start, grads, settings["lr"], settings["betas"], settings["eps"], 0.5)
    wrong_order = _soap_diagonal_loop(start, grads, settings["lr"], settings["betas"], settings["eps"], 0.5, True)
    for p, e, w in zip(params, expected, wrong_order):
        # identical formulas in float64: only the order of a few roundings differs
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)
        # decay-before (AdamW's order) differs by lr·wd·u per step ≈ 0.025·0.05: far above round-off
        assert (p.detach() - w).abs().max() > 1e-5


def test_ecs_before_its_first_refresh_is_adam(device):
    model = make_model(dtype=torch.float64, device=device)
    ref = copy.deepcopy(model)
    ecs = EigenvalueCorrectedShampoo(
        model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, precondition_frequency=1000, merge_dims=False
    )
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    # the same formula (identity bases are exact); only sqrt(v/c2) vs sqrt(v)/sqrt(c2)
    # rounds differently: a few ulps per step
    assert_same_trajectory(model, ecs, ref, adam, 15, rtol=1e-13, atol=1e-14)
    assert ecs.total_refreshes() == 0
    assert any("factor0" in s for s in ecs.state.values())  # factors are accumulated meanwhile


GRAFTING_CASES = {
    "adam": (
        dict(grafting="adam", betas=(0.9, 0.5), grafting_beta2=0.99, grafting_epsilon=1e-8),
        lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.99), eps=1e-8),
    ),
    "adagrad": (
        dict(grafting="adagrad", betas=(0.0, 0.5), grafting_epsilon=1e-10),
        lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-10),
    ),
    "rmsprop": (
        dict(grafting="rmsprop", betas=(0.0, 0.5), grafting_beta2=0.9, grafting_epsilon=1e-8),
        lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-8),
    ),
    "sgd": (dict(grafting="sgd", betas=(0.0, 0.5)), lambda p, lr: torch.optim.SGD(p, lr=lr)),
}


@pytest.mark.parametrize("grafting", list(GRAFTING_CASES))
def test_shampoo_before_start_preconditioning_step_is_its_grafted_method(grafting, device):
    kwargs, torch_optimizer = GRAFTING_CASES[grafting]
    model = make_model(dtype=torch.float64, device=device)
    ref = copy.deepcopy(model)
    shampoo = Shampoo(
        model.parameters(), lr=1e-2, precondition_frequency=100, start_preconditioning_step=100, merge_dims=False,
        **kwargs,
    )
    other = torch_optimizer(ref.parameters(), 1e-2)
    # the same formula in float64; only the order of a few roundings differs
    assert_same_trajectory(model, shampoo, ref, other, 15, rtol=1e-13, atol=1e-14)
    assert shampoo.total_refreshes() == 0


# --- Shampoo against a dense computation -------------------------------------------------------


def _dense_inverse_root(a, p, eps):
    vals, vecs = np.linalg.eigh(a)
    return (vecs * (np.clip(vals, 0.0, None) + eps) ** (-1.0 / p)) @ vecs.T


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_shampoo_first_step_matches_dense_inverse_fourth_roots(root_method, device):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4, dtype=torch.float64).to(device))
    start = w.detach().clone()
    g = torch.randn(5, 4, dtype=torch.float64).to(device)
    lr, eps = 0.1, 1e-3
    opt = Shampoo(
        [w], lr=lr, betas=(0.0, 1.0), epsilon=eps, precondition_frequency=1, start_preconditioning_step=1,
        grafting="none", root_method=root_method, merge_dims=False,
    )
    w.grad = g.clone()
    opt.step()
    gn = g.cpu().numpy()
    left = _dense_inverse_root(gn @ gn.T, 4, eps)
    right = _dense_inverse_root(gn.T @ gn, 4, eps)
    expected = start - lr * torch.from_numpy(left @ gn @ right).to(device)
    # eigh: both sides are float64 eigendecompositions of the same 5×5 / 4×4 matrices (κ ≤ 1e4
    # with ε = 1e-3), agreeing to ~1e-12. Newton stops at max|M − I| < 1e-6, so X carries a
    # relative error of about 1e-6/p.
    tolerance = 1e-10 if root_method == "eigh" else 2e-6
    torch.testing.assert_close(w.detach(), expected, rtol=tolerance, atol=tolerance)
    assert opt.total_refreshes() == 2


def test_shampoo_without_accumulation_is_orthogonalisation(device):
    """β2 = 0, ε = 0: (GGᵀ)^(-1/4) G (GᵀG)^(-1/4) = U Vᵀ for G = U S Vᵀ (docs/algorithms.md §5)."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    grad = (u @ torch.diag(torch.linspace(1.0, 3.0, 6, dtype=torch.float64)) @ v.T).to(device)  # κ = 3
    w = nn.Parameter(torch.zeros(6, 6, dtype=torch.float64, device=device))
    opt = Shampoo(
        [w], lr=1.0, betas=(0.0, 0.0), epsilon=0.0, precondition_frequency=1, start_preconditioning_step=1,
        grafting="none", merge_dims=False,
    )
    for _ in range(2):  # the second step must not remember the first (β2 = 0)
        w.grad = grad.clone()
        before = w.detach().clone()
        opt.step()
        svd_u, _, svd_vh = torch.linalg.svd(grad)
        # float64 eigh of GGᵀ with eigenvalue gaps ≥ 0.9 and κ(GGᵀ) = 9: eigenvectors and the
        # -1/4 powers are accurate to ~1e-14; 1e-11 leaves room for the products.
        torch.testing.assert_close(before - w.detach(), svd_u @ svd_vh, rtol=1e-11, atol=1e-11)


# --- eigenvalue-corrected Shampoo: refresh -----------------------------------------------------


def _single_matrix_run(shape=(5, 4), steps=4, device="cpu", **kwargs):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape, dtype=torch.float64).to(device))
    opt = EigenvalueCorrectedShampoo([w], merge_dims=False, **kwargs)
    return w, opt, fixed_grads([shape], steps, seed=1, device=device)


def test_ecs_eigh_refresh_diagonalises_the_factors(device):
    w, opt, grads = _single_matrix_run(
        refresh="fixed", refresh_method="eigh", precondition_frequency=3, steps=6, device=device
    )
    key = "group0/5x4:PP"
    for step, (g,) in enumerate(grads, start=1):
        w.grad = g
        opt.step()
        if step % 3:
            continue
        for dim in (0, 1):
            q, f = opt.state[key][f"basis{dim}"][0], opt.state[key][f"factor{dim}"][0]
            b = q.T @ f @ q
            off = b - torch.diag(torch.diagonal(b))
            # float64 eigh: residual off-diagonal mass is round-off, ~1e-16 relative
            assert off.norm() / b.norm() < 1e-12
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype, device=device), rtol=0, atol=1e-12)
    assert torch.equal(opt.refresh_counts()[key].cpu(), torch.tensor([[2, 2]]))


def test_ecs_refresh_transports_moments_into_the_new_basis(device):
    """eigenvalue_transport="rotate" (the library's earlier default, passed explicitly since the
    default became the authors' algorithm): at a refresh step (the second, so the old basis is not
    the identity) the update uses the old basis, then m is carried exactly and the corrected
    eigenvalues by (R ⊙ R)ᵀ, R = Q_oldᵀ Q_new."""
    lr, (b1, b2), eps = 1e-2, (0.9, 0.95), 1e-8
    w, opt, grads = _single_matrix_run(
        lr=lr, betas=(b1, b2), eps=eps, precondition_frequency=2, steps=4, eigenvalue_transport="rotate", device=device
    )
    key = "group0/5x4:PP"
    for (g,) in grads[:3]:
        w.grad = g
        opt.step()
    old = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[key].items()}
    before = w.detach().clone()
    (g,) = grads[3]
    w.grad = g
    opt.step()
    new = opt.state[key]
    t = 4
    q0, q1 = old["basis0"][0], old["basis1"][0]
    projected = q0.T @ g @ q1
    m = b1 * old["exp_avg"][0] + (1 - b1) * projected
    v = b2 * old["exp_avg_sq"][0] + (1 - b2) * projected**2
    f0 = b2 * old["factor0"][0] + (1 - b2) * g @ g.T
    f1 = b2 * old["factor1"][0] + (1 - b2) * g.T @ g
    # all float64 on 5×5 / 4×4 matrices: agreement to round-off (1e-12 leaves a wide margin)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["factor0"][0], f0, **tol)
    torch.testing.assert_close(new["factor1"][0], f1, **tol)
    direction = q0 @ (m / ((v / (1 - b2**t)).sqrt() + eps)) @ q1.T
    torch.testing.assert_close(w.detach(), before - lr / (1 - b1**t) * direction, **tol)
    n0, n1 = new["basis0"][0], new["basis1"][0]
    assert not torch.allclose(n0.abs(), q0.abs(), atol=1e-6)  # the basis really moved
    r0, r1 = q0.T @ n0, q1.T @ n1
    torch.testing.assert_close(new["exp_avg"][0], r0.T @ m @ r1, **tol)
    torch.testing.assert_close(new["exp_avg_sq"][0], (r0 * r0).T @ v @ (r1 * r1), **tol)
    for f, q in ((f0, n0), (f1, n1)):
        b = q.T @ f @ q
        assert (b - torch.diag(torch.diagonal(b))).norm() / b.norm() < 1e-12  # float64 eigh round-off


def _ecs_refreshes(grads, shapes, **kwargs):
    device = grads[0][0].device
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64, device=device)) for s in shapes]
    opt = EigenvalueCorrectedShampoo(params, lr=1e-2, merge_dims=False, precondition_frequency=2, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return opt


# The authors' QR refresh ("keep": the QR algorithm on QᵀAQ with no sorting before its steps,
# columns sorted ascending after them) starts each refresh from ascending order, from which the
# unshifted iteration first turns the basis towards descending order: three steps never reach
# ρ ≤ 0.01 on this drift, so τ = 0.01 refreshes as often as τ = 0 (counts 60, 60, 53, 4, 0).
# Its adaptivity at a coarser tolerance is checked in test_ecs_reference.py.
@pytest.mark.parametrize("method, transport", [("eigh", "keep"), ("eigh", "rotate"), ("qr", "rotate")])
def test_ecs_adaptive_refresh_count_falls_as_tolerance_grows(method, transport, device):
    shapes = [(6, 4), (5, 5)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # a slowly drifting gradient: factors keep changing a little, as in training
    def drifted() -> list[torch.Tensor]:
        return [(b + 0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64)).to(device) for b in base]

    grads = [drifted() for _ in range(30)]
    counts = []
    for tolerance in [0.0, 0.01, 0.1, 0.5, 1.0]:
        opt = _ecs_refreshes(grads, shapes, refresh="adaptive", tolerance=tolerance, refresh_method=method,
                             max_qr_iterations=3, eigenvalue_transport=transport)
        counts.append(opt.total_refreshes())
    fixed = _ecs_refreshes(grads, shapes, refresh="fixed", refresh_method=method, max_qr_iterations=3,
                           eigenvalue_transport=transport)
    assert counts == sorted(counts, reverse=True), counts
    assert counts[-1] == 0  # ρ ≤ 1 always
    assert counts[0] == fixed.total_refreshes() == 15 * 4  # 15 refresh steps × 4 factors
    assert counts[1] < counts[0] and counts[3] < counts[1], counts  # the policy actually adapts


def test_ecs_refresh_counts_are_per_factor(device):
    """G = r eᵀ₁: the right factor is diagonal in the identity basis and never goes stale, the
    left factor changes every step."""
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(12):
        grad = torch.zeros(6, 4, dtype=torch.float64)
        grad[:, 0] = torch.randn(6, generator=g, dtype=torch.float64)
        grads.append([grad.to(device), torch.randn(3, 3, generator=g, dtype=torch.float64).to(device)])
    opt = _ecs_refreshes(grads, [(6, 4), (3, 3)], refresh="adaptive", tolerance=0.01)
    counts = opt.refresh_counts()
    assert set(counts) == {"group0/6x4:PP", "group0/3x3:PP"}
    left, right = counts["group0/6x4:PP"][0].tolist()
    assert counts["group0/6x4:PP"].shape == (1, 2) and counts["group0/6x4:PP"].dtype == torch.int64
    assert left > 0 and right == 0
    assert opt.total_refreshes() == sum(int(c.sum()) for c in counts.values())


def test_ecs_qr_refresh_reduces_staleness(device):
    from conditioner.linalg.tracking import dense_staleness

    w, opt, grads = _single_matrix_run(refresh="fixed", refresh_method="qr", max_qr_iterations=5,
                                       precondition_frequency=2, steps=2, device=device)
    key = "group0/5x4:PP"
    w.grad = grads[0][0]
    opt.step()
    old_bases = [opt.state[key][f"basis{d}"].clone() for d in (0, 1)]
    w.grad = grads[1][0]
    opt.step()  # t = 2: refresh by warm-started QR
    for d in (0, 1):
        factor, basis = opt.state[key][f"factor{d}"], opt.state[key][f"basis{d}"]
        before = dense_staleness(factor, old_bases[d]).item()
        after = dense_staleness(factor, basis).item()
        assert before > 0.05 and after < 0.5 * before, (d, before, after)
        q = basis[0]
        # Householder QR in float64: orthogonal to round-off
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype, device=device), rtol=0, atol=1e-12)
    assert torch.equal(opt.refresh_counts()[key].cpu(), torch.tensor([[1, 1]]))
