"""SOAP, EigenvalueCorrectedShampoo and Shampoo: identities with torch's diagonal optimizers, the
Shampoo step against a dense computation, eigenbasis refresh, and the torch.optim contract
(param groups, schedulers, closures, missing gradients, state dicts, dtypes, NaN/Inf policy,
argument checking)."""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, NonFiniteGradientError, Shampoo

# --- helpers -----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def _merged(defaults, kwargs):
    return {**defaults, **kwargs}


# Small frequencies so that refreshes happen within a few steps; merge_dims=False because the
# layers are tiny (merging would flatten them into vectors, see test_blocks).
FACTORIES = {
    "SOAP": lambda params, **kw: SOAP(
        params, **_merged(dict(lr=1e-2, betas=(0.9, 0.95), precondition_frequency=3), kw)
    ),
    "ECS": lambda params, **kw: EigenvalueCorrectedShampoo(
        params, **_merged(dict(lr=1e-2, precondition_frequency=3, merge_dims=False), kw)
    ),
    "Shampoo": lambda params, **kw: Shampoo(
        params, **_merged(dict(lr=1e-2, precondition_frequency=3, start_preconditioning_step=2, merge_dims=False), kw)
    ),
}
NAMES = list(FACTORIES)

# Number of successful steps after which the next step recomputes bases / inverse roots:
# SOAP: t = steps taken (the first only initialises), refresh at t % 3 == 0 -> the 4th call;
# ECS: t = steps + 1, refresh at t = 3; Shampoo: roots at t = 2, 5, ... -> the 5th call (t = 5).
REFRESH_AFTER = {"SOAP": 3, "ECS": 2, "Shampoo": 4}


class MLP(nn.Module):
    """Two equal-shape hidden layers ``a`` and ``b`` (their weights share a stack)."""

    def __init__(self, d_in=4, hidden=6, d_out=3):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.a = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.a(h)) + torch.tanh(self.b(h))
        return self.out(h)


def batch(i, dtype=torch.float32, n=16, d_in=4, d_out=3):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, d_in, generator=g).to(dtype), torch.randn(n, d_out, generator=g).to(dtype)


def mse(model, i):
    x, y = batch(i, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def make_model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return MLP(**kw).to(dtype)


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        mse(model, i).backward()
        opt.step()


def fixed_grads(shapes, steps, seed=0, dtype=torch.float64):
    """A gradient sequence that does not depend on the parameters."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def assert_same_state_dict(a, b):
    """Exact equality of two optimizer state dicts: same keys, tensors torch.equal, same dtypes."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        sa, sb = a["state"][key], b["state"][key]
        assert sa.keys() == sb.keys(), key
        for name in sa:
            if isinstance(sa[name], torch.Tensor):
                assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), (key, name)
            else:
                assert sa[name] == sb[name], (key, name)


def floating_state(opt):
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


# --- identities with torch's diagonal optimizers -----------------------------------------------


def test_soap_with_identity_basis_is_adam_one_step_later():
    model = make_model(dtype=torch.float64)
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
    assert not torch.equal(model.inp.weight, make_model(dtype=torch.float64).inp.weight)


def assert_same_trajectory(model, optimizer, ref, ref_optimizer, steps, rtol, atol):
    """Train ``model`` and ``ref`` on the same losses and compare the parameters after every step."""
    for i in range(steps):
        for m, opt in ((model, optimizer), (ref, ref_optimizer)):
            opt.zero_grad()
            mse(m, i).backward()
            opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_soap_with_identity_basis_and_update_first_step_is_adam():
    model = make_model(dtype=torch.float64)
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


def test_soap_weight_decay_is_applied_after_the_update():
    shapes = [(5, 4), (4,)]
    grads = fixed_grads(shapes, 12)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
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


def test_ecs_before_its_first_refresh_is_adam():
    model = make_model(dtype=torch.float64)
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
def test_shampoo_before_start_preconditioning_step_is_its_grafted_method(grafting):
    kwargs, torch_optimizer = GRAFTING_CASES[grafting]
    model = make_model(dtype=torch.float64)
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
def test_shampoo_first_step_matches_dense_inverse_fourth_roots(root_method):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    start = w.detach().clone()
    g = torch.randn(5, 4, dtype=torch.float64)
    lr, eps = 0.1, 1e-3
    opt = Shampoo(
        [w], lr=lr, betas=(0.0, 1.0), epsilon=eps, precondition_frequency=1, start_preconditioning_step=1,
        grafting="none", root_method=root_method, merge_dims=False,
    )
    w.grad = g.clone()
    opt.step()
    gn = g.numpy()
    left = _dense_inverse_root(gn @ gn.T, 4, eps)
    right = _dense_inverse_root(gn.T @ gn, 4, eps)
    expected = start - lr * torch.from_numpy(left @ gn @ right)
    # eigh: both sides are float64 eigendecompositions of the same 5×5 / 4×4 matrices (κ ≤ 1e4
    # with ε = 1e-3), agreeing to ~1e-12. Newton stops at max|M − I| < 1e-6, so X carries a
    # relative error of about 1e-6/p.
    tolerance = 1e-10 if root_method == "eigh" else 2e-6
    torch.testing.assert_close(w.detach(), expected, rtol=tolerance, atol=tolerance)
    assert opt.total_refreshes() == 2


def test_shampoo_without_accumulation_is_orthogonalisation():
    """β2 = 0, ε = 0: (GGᵀ)^(-1/4) G (GᵀG)^(-1/4) = U Vᵀ for G = U S Vᵀ (ALGORITHMS.md §5)."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    grad = u @ torch.diag(torch.linspace(1.0, 3.0, 6, dtype=torch.float64)) @ v.T  # κ = 3
    w = nn.Parameter(torch.zeros(6, 6, dtype=torch.float64))
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


def _single_matrix_run(shape=(5, 4), steps=4, **kwargs):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = EigenvalueCorrectedShampoo([w], merge_dims=False, **kwargs)
    return w, opt, fixed_grads([shape], steps, seed=1)


def test_ecs_eigh_refresh_diagonalises_the_factors():
    w, opt, grads = _single_matrix_run(refresh="fixed", refresh_method="eigh", precondition_frequency=3, steps=6)
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
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), rtol=0, atol=1e-12)
    assert torch.equal(opt.refresh_counts()[key], torch.tensor([[2, 2]]))


def test_ecs_refresh_transports_moments_into_the_new_basis():
    """At a refresh step (the second, so the old basis is not the identity): the update uses the
    old basis, then m is carried exactly and the corrected eigenvalues by (R ⊙ R)ᵀ, R = Q_oldᵀ Q_new."""
    lr, (b1, b2), eps = 1e-2, (0.9, 0.95), 1e-8
    w, opt, grads = _single_matrix_run(lr=lr, betas=(b1, b2), eps=eps, precondition_frequency=2, steps=4)
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
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    opt = EigenvalueCorrectedShampoo(params, lr=1e-2, merge_dims=False, precondition_frequency=2, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_ecs_adaptive_refresh_count_falls_as_tolerance_grows(method):
    shapes = [(6, 4), (5, 5)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # a slowly drifting gradient: factors keep changing a little, as in training
    grads = [[b + 0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64) for b in base] for _ in range(30)]
    counts = []
    for tolerance in [0.0, 0.01, 0.1, 0.5, 1.0]:
        opt = _ecs_refreshes(grads, shapes, refresh="adaptive", tolerance=tolerance, refresh_method=method,
                             max_qr_iterations=3)
        counts.append(opt.total_refreshes())
    fixed = _ecs_refreshes(grads, shapes, refresh="fixed", refresh_method=method, max_qr_iterations=3)
    assert counts == sorted(counts, reverse=True), counts
    assert counts[-1] == 0  # ρ ≤ 1 always
    assert counts[0] == fixed.total_refreshes() == 15 * 4  # 15 refresh steps × 4 factors
    assert counts[1] < counts[0] and counts[3] < counts[1], counts  # the policy actually adapts


def test_ecs_refresh_counts_are_per_factor():
    """G = r eᵀ₁: the right factor is diagonal in the identity basis and never goes stale, the
    left factor changes every step."""
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(12):
        grad = torch.zeros(6, 4, dtype=torch.float64)
        grad[:, 0] = torch.randn(6, generator=g, dtype=torch.float64)
        grads.append([grad, torch.randn(3, 3, generator=g, dtype=torch.float64)])
    opt = _ecs_refreshes(grads, [(6, 4), (3, 3)], refresh="adaptive", tolerance=0.01)
    counts = opt.refresh_counts()
    assert set(counts) == {"group0/6x4:PP", "group0/3x3:PP"}
    left, right = counts["group0/6x4:PP"][0].tolist()
    assert counts["group0/6x4:PP"].shape == (1, 2) and counts["group0/6x4:PP"].dtype == torch.int64
    assert left > 0 and right == 0
    assert opt.total_refreshes() == sum(int(c.sum()) for c in counts.values())


def test_ecs_qr_refresh_reduces_staleness():
    from conditioner.linalg.refresh import dense_staleness

    w, opt, grads = _single_matrix_run(refresh="fixed", refresh_method="qr", max_qr_iterations=5,
                                       precondition_frequency=2, steps=2)
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
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), rtol=0, atol=1e-12)
    assert torch.equal(opt.refresh_counts()[key], torch.tensor([[1, 1]]))


# --- the torch.optim contract, for all three ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_their_own_lr(name):
    model = make_model()
    frozen = params_of(model.inp)
    opt = FACTORIES[name](
        [
            {"params": model.inp.parameters(), "lr": 0.0},
            {"params": list(model.a.parameters()) + list(model.b.parameters()) + list(model.out.parameters())},
        ],
        weight_decay=0.1,
    )
    before = params_of(model)
    train(model, opt, 6)
    assert_params_equal(params_of(model.inp), frozen)  # lr = 0: no update and no decay
    changed = [not torch.equal(a, b) for a, b in zip(before[2:], params_of(model)[2:])]
    assert all(changed)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 1e-2]


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_scales_the_step(name):
    shapes = [(5, 4), (4,)]
    grads = fixed_grads(shapes, 8)
    deltas = []
    for use_scheduler in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        opt = FACTORIES[name](params, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1) if use_scheduler else None
        run = []
        for gs in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            run.append([p.detach() - b for p, b in zip(params, before)])
            if scheduler is not None:
                scheduler.step()
        deltas.append(run)
        if scheduler is not None:
            assert scheduler.get_last_lr() == [pytest.approx(1e-4)]
    plain, scheduled = deltas
    for step, (a, b) in enumerate(zip(plain, scheduled)):
        factor = 1.0 if step < 4 else 0.1
        for x, y in zip(a, b):
            # the gradients do not depend on the parameters, so the state is the same and the
            # update is exactly proportional to lr; differences of ~1 parameters lose ~1e-13 relative
            torch.testing.assert_close(y, factor * x, rtol=1e-9, atol=1e-15)
    assert any(float(x.abs().max()) > 0 for x in plain[-1])


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_then_step_changes_nothing(name):
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 4)
    mse(model, 99).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    opt.step()
    assert_params_equal(params_of(model), before)
    assert_same_state_dict(opt.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_and_its_loss_returned(name):
    model = make_model()
    twin = copy.deepcopy(model)
    opt, twin_opt = FACTORIES[name](model.parameters()), FACTORIES[name](twin.parameters())
    for i in range(5):
        calls = []

        def closure():
            calls.append(i)
            opt.zero_grad()
            loss = mse(model, i)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert calls == [i]
        assert isinstance(loss, torch.Tensor) and loss.requires_grad is True
        twin_opt.zero_grad()
        twin_loss = mse(twin, i)
        twin_loss.backward()
        assert twin_opt.step() is None
        assert torch.equal(loss.detach(), twin_loss.detach())
        assert_params_equal(params_of(model), params_of(twin))


@pytest.mark.parametrize("name", NAMES)
def test_missing_gradients_in_a_shared_stack(name):
    """``a`` and ``b`` share stacks; ``b`` gets no gradient for a while, later ``a`` none. The
    shared optimizer must move each exactly as optimizers that hold one layer each."""
    model = make_model(dtype=torch.float64)
    twin = copy.deepcopy(model)
    opt = FACTORIES[name](model.parameters(), lr=3e-2)
    solo = [FACTORIES[name](m.parameters(), lr=3e-2) for m in (twin.inp, twin.a, twin.b, twin.out)]
    assert len(opt.state) == 0
    schedule = ["a"] * 4 + ["ab"] * 6 + ["b"] * 3
    steps_a = steps_b = 0
    for i, who in enumerate(schedule):
        for m in (model, twin):
            m.zero_grad()
            mse(m, i).backward()
            for layer in "ab":
                if layer not in who:
                    for p in getattr(m, layer).parameters():
                        p.grad = None
        before_b, before_a = params_of(model.b), params_of(model.a)
        opt.step()
        for o in solo:
            o.step()
        steps_a += "a" in who
        steps_b += "b" in who
        if "b" not in who:
            assert_params_equal(params_of(model.b), before_b)
        if "a" not in who:
            assert_params_equal(params_of(model.a), before_a)
        assert opt.state["group0/6x6:PP"]["step"] == [steps_a, steps_b]
        assert opt.state["group0/6:I"]["step"] == [i + 1, steps_a, steps_b]  # biases of inp, a, b
        for x, y in zip(model.parameters(), twin.parameters()):
            # float64; batched vs single-block products round differently (~1e-16 per step)
            torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)
    assert not torch.equal(model.b.weight, make_model(dtype=torch.float64).b.weight)


def _save(opt, how):
    if how == "deepcopy":
        return copy.deepcopy(opt.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_bit_identical(name, how):
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 4)
    saved_params = copy.deepcopy(model.state_dict())
    saved = _save(opt, how)
    train(model, opt, 6, start=4)  # uninterrupted, crosses two more refreshes

    resumed = make_model(seed=123)
    resumed.load_state_dict(saved_params)
    resumed_opt = FACTORIES[name](resumed.parameters())
    resumed_opt.load_state_dict(saved)
    train(resumed, resumed_opt, 6, start=4)
    assert_params_equal(params_of(resumed), params_of(model))
    assert_same_state_dict(resumed_opt.state_dict(), opt.state_dict())
    assert opt.total_refreshes() > 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_with_a_parameter_that_never_gets_a_gradient(name):
    """A parameter that never gets a gradient (an unused head, a conditional branch; here a
    Linear(7, 2) whose stacks no other parameter shares) must not make the state dict unloadable."""
    model = make_model(d_in=4, hidden=6)
    unused = nn.Linear(7, 2)
    params = list(model.parameters()) + list(unused.parameters())
    opt = FACTORIES[name](params)
    train(model, opt, 4)
    assert all(p.grad is None for p in unused.parameters())
    saved = _save(opt, "torch.save")
    fresh = FACTORIES[name](params)
    fresh.load_state_dict(saved)
    assert_same_state_dict(fresh.state_dict(), opt.state_dict())


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copied_optimizer_continues_like_the_original(name, copier):
    """copy.deepcopy / pickle of a whole optimizer (done by checkpointing and averaging tools)
    must keep everything the optimizer needs to step, not only defaults, state and param_groups."""
    model = make_model()
    opt = FACTORIES[name](model.parameters(), nonfinite="skip")
    train(model, opt, 4)
    if copier == "deepcopy":
        twin_model, twin_opt = copy.deepcopy((model, opt))
    else:
        twin_model, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, 4, start=4)
    train(twin_model, twin_opt, 4, start=4)
    assert_params_equal(params_of(twin_model), params_of(model))
    assert twin_opt.nonfinite == "skip"


def test_a_copied_soap_keeps_update_first_step():
    param = nn.Parameter(torch.ones(3, 3))
    opt = SOAP([param], update_first_step=True)
    twin_param, twin = copy.deepcopy((param, opt))
    twin_param.grad = torch.ones(3, 3)
    twin.step()
    assert not torch.equal(twin_param, param)  # the first step updated, as configured


@pytest.mark.parametrize("name", NAMES)
def test_loading_a_state_dict_of_another_shape_raises(name):
    model = make_model(hidden=6)
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 2)
    other = make_model(hidden=5)  # same number of parameters, other shapes
    other_opt = FACTORIES[name](other.parameters())
    with pytest.raises(ValueError):
        other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _classification(n=256, d=8, classes=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 16, generator=g), torch.randn(16, classes, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x.to(dtype), y


def _classifier(dtype, seed=0, d=8, hidden=32, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_parameters_train_with_float32_state(name):
    x, y = _classification(dtype=torch.bfloat16)
    model = _classifier(torch.bfloat16)
    opt = FACTORIES[name](model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses
    state = floating_state(opt)
    assert state and all(v.dtype == torch.float32 for v in state)


@pytest.mark.parametrize("name", NAMES)
def test_float64_parameters_get_float64_state(name):
    model = make_model(dtype=torch.float64)
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 5)
    state = floating_state(opt)
    assert state and all(v.dtype == torch.float64 for v in state)
    assert any(any(k.startswith("basis") or k.startswith("root") for k in s) for s in opt.state.values())


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FACTORIES[name](emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError, TypeError), match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


# --- NaN / Inf -----------------------------------------------------------------------------------


def _poisoned_step(model, i, value):
    model.zero_grad()
    mse(model, i).backward()
    model.a.weight.grad[1, 2] = value  # one element of one parameter


@pytest.mark.parametrize("when", ["first", "later", "refresh"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_raises_and_changes_nothing(name, value, when):
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    done = {"first": 0, "later": 2, "refresh": REFRESH_AFTER[name]}[when]
    train(model, opt, done)
    if when == "refresh":  # check that the next step really is a refresh
        probe_model = make_model()
        probe = FACTORIES[name](probe_model.parameters())
        train(probe_model, probe, done)
        before_count = probe.total_refreshes()
        train(probe_model, probe, 1, start=done)
        assert probe.total_refreshes() > before_count
    params, state = params_of(model), copy.deepcopy(opt.state_dict())
    _poisoned_step(model, done, value)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_params_equal(params_of(model), params)
    assert_same_state_dict(opt.state_dict(), state)


@pytest.mark.parametrize("when", ["first", "refresh"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_with_skip_policy_is_a_skipped_step(name, when):
    """With nonfinite='skip' a bad step is skipped without a trace: the run that saw it and went
    on is bit-identical to one that never saw it."""
    done = {"first": 0, "refresh": REFRESH_AFTER[name]}[when]
    model = make_model()
    clean = copy.deepcopy(model)
    opt = FACTORIES[name](model.parameters(), nonfinite="skip")
    clean_opt = FACTORIES[name](clean.parameters(), nonfinite="skip")
    train(model, opt, done)
    train(clean, clean_opt, done)
    params, state = params_of(model), copy.deepcopy(opt.state_dict())
    _poisoned_step(model, done, float("nan"))
    assert opt.step() is None  # no exception
    assert_params_equal(params_of(model), params)
    assert_same_state_dict(opt.state_dict(), state)
    train(model, opt, 6, start=done)
    train(clean, clean_opt, 6, start=done)
    assert_params_equal(params_of(model), params_of(clean))
    assert_same_state_dict(opt.state_dict(), clean_opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_saved_after_a_refused_first_step_loads(name):
    model = make_model()
    opt = FACTORIES[name](model.parameters())
    _poisoned_step(model, 0, float("nan"))
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    fresh = FACTORIES[name](model.parameters())
    fresh.load_state_dict(_save(opt, "torch.save"))
    train(model, fresh, 2)


# --- bad arguments -------------------------------------------------------------------------------

COMMON_BAD = [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(betas=(0.9, 0.99, 0.999)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(precondition_frequency=1.5), "precondition_frequency"),
    (dict(nonfinite="ignore"), "nonfinite"),
]
BAD_ARGUMENTS = (
    [("SOAP", kw, m) for kw, m in COMMON_BAD]
    + [("ECS", kw, m) for kw, m in COMMON_BAD]
    + [("Shampoo", kw, m) for kw, m in COMMON_BAD]
    + [
        ("SOAP", dict(eps=-1e-8), "eps"),
        ("SOAP", dict(max_precond_dim=-1), "max_precond_dim"),
        ("SOAP", dict(max_precond_dim=2.5), "max_precond_dim"),
        ("ECS", dict(eps=-1e-8), "eps"),
        ("ECS", dict(max_precond_dim=-1), "max_precond_dim"),
        ("ECS", dict(max_precond_dim=2.5), "max_precond_dim"),
        ("ECS", dict(refresh="sometimes"), "refresh"),
        ("ECS", dict(refresh_method="svd"), "refresh_method"),
        ("ECS", dict(tolerance=2), "tolerance"),
        ("ECS", dict(tolerance=-0.1), "tolerance"),
        ("ECS", dict(max_qr_iterations=0), "max_qr_iterations"),
        ("Shampoo", dict(epsilon=-1e-12), "epsilon"),
        ("Shampoo", dict(max_preconditioner_dim=-1), "max_preconditioner_dim"),
        ("Shampoo", dict(max_preconditioner_dim=2.5), "max_preconditioner_dim"),
        ("Shampoo", dict(grafting="lion"), "grafting"),
        ("Shampoo", dict(root_method="cholesky"), "root_method"),
        ("Shampoo", dict(exponent_override=0), "exponent_override"),
        ("Shampoo", dict(start_preconditioning_step=0), "start_preconditioning_step"),
        ("Shampoo", dict(grafting_beta2=1.5), "grafting_beta2"),
    ]
)


@pytest.mark.parametrize(
    "name, kwargs, argument",
    BAD_ARGUMENTS,
    ids=[f"{n}-{next(iter(k))}={next(iter(k.values()))!r}" for n, k, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_raise_value_error_naming_the_argument(name, kwargs, argument):
    param = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=argument):
        FACTORIES[name]([param], **kwargs)


# --- they optimise -------------------------------------------------------------------------------

TRAINING = {
    "SOAP": dict(lr=1e-2, precondition_frequency=10),
    "ECS": dict(lr=1e-2, precondition_frequency=10),
    "Shampoo": dict(lr=1e-2, precondition_frequency=10, start_preconditioning_step=10),
}


@pytest.mark.parametrize("name", NAMES)
def test_a_small_classifier_learns(name):
    x, y = _classification(n=512)
    model = _classifier(torch.float32)
    opt = FACTORIES[name](model.parameters(), **TRAINING[name])
    losses = []
    for step in range(150):
        idx = torch.arange(step * 64, step * 64 + 64) % x.shape[0]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert final < 0.35 * losses[0], (losses[0], final)
    assert accuracy > 0.85
    assert opt.total_refreshes() > 0  # the Kronecker machinery was in use
