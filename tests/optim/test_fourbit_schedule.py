"""The 4-bit Shampoo paper's schedule (docs/algorithms.md §4): statistics every T1 steps from the
sampled gradient only, bases or roots every T2 steps, ordinary steps that dequantise what they
apply and nothing else; 4-bit Shampoo; its round trips, conversions, bytes and NaN policy."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import cross_entropy_step, first_features_batches, tanh_mlp, through_file
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, NonFiniteGradientError, Shampoo
from conditioner.linalg.quantize import MAX_RELATIVE_ERROR
from conditioner.optim import eigenpairs, precision
from conditioner.optim.precision import decode

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "group0/64x64:PP"  # a 64×64 weight: two factors of 4096 elements, kept as eigenpairs


def _exact(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Keep the 4-bit layout (eigenpairs) but store every basis and root exactly: quantisation off."""
    opt.state_roles = {k: ("exact" if role in ("basis", "root") else role) for k, role in opt.state_roles.items()}
    return opt


def _gradients(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=generator, dtype=torch.float64) / 8
    # full rank: a rank-deficient factor's null space has no defined eigenvectors to compare
    return [mix @ torch.randn(64, 64, generator=generator, dtype=torch.float64) for _ in range(n)]


def _reference_factors(grads: list[torch.Tensor], fold_at: list[bool], beta: float, dim: int) -> list[torch.Tensor]:
    """Float64 reference of the eigenpair statistics, written out here: the first sampled
    gradient by eigh, later ones by rebuilding Q diag(λ) Qᵀ, an EMA fold, columns sorted by
    diag(QᵀFQ) descending, one QR of F·Q, λ = sorted diag(QᵀFQ). Returns the rebuilt factor
    after every step (None before the first statistic)."""
    q = lam = None
    out = []
    for g, fold in zip(grads, fold_at):
        if fold:
            u = g if dim == 0 else g.T
            if q is None:
                lam, q = torch.linalg.eigh((1 - beta) * u @ u.T)
            else:
                f = beta * (q * lam) @ q.T + (1 - beta) * u @ u.T
                q = q[:, torch.argsort(torch.diagonal(q.T @ f @ q), descending=True)]
                q = torch.linalg.qr(f @ q).Q
                lam = torch.diagonal(q.T @ f @ q)
        out.append(None if q is None else (q * lam) @ q.T)
    return out


def _stored(opt, key: str = KEY) -> dict[str, torch.Tensor]:
    return decode({k: v for k, v in opt.state[key].items() if k != "step"}, torch.float64)[0]


@pytest.mark.parametrize("name", ["SOAP", "ECS", "Shampoo"])
def test_the_statistics_take_every_t1_th_gradient_as_the_float64_reference_does(name):
    """T1 = 3, T2 = 6: the factors change only on every third step, from that step's gradient
    alone; a refresh adopts the tracked eigenbasis, and Shampoo's root is Q diag((λ̂ + ε)^(-1/4)) Qᵀ
    (Q exactly orthogonal here, so the four Björck steps before it change it by round-off only).
    Quantisation off, float64: agreement to 1e-9 relative (round-off of ~20 products of 64×64
    matrices, ~1e-14, amplified by the eigengaps of rank-deficient factors; measured 1e-13)."""
    steps, t1, t2, beta = 14, 3, 6, 0.9
    weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.float64))
    options = dict(lr=1e-3, state_precision="4bit", statistics_interval=t1, precondition_frequency=t2)
    if name == "SOAP":
        opt = SOAP([weight], shampoo_beta=beta, **options)
        offsets = list(range(steps))  # t = step; the first gradient initialises the factors
        fold_at = [t == 0 or t % t1 == 0 for t in offsets]
    elif name == "ECS":
        opt = EigenvalueCorrectedShampoo([weight], betas=(0.9, beta), **options)
        offsets = [s + 1 for s in range(steps)]
        fold_at = [s == 0 or t % t1 == 0 for s, t in enumerate(offsets)]
    else:
        opt = Shampoo([weight], betas=(0.9, beta), epsilon=1e-6, start_preconditioning_step=t2, **options)
        offsets = [s + 1 for s in range(steps)]
        fold_at = [t % t1 == 0 for t in offsets]
    _exact(opt)
    grads = _gradients(steps)
    references = [_reference_factors(grads, fold_at, beta, d) for d in (0, 1)]
    applied = "root" if name == "Shampoo" else "basis"
    previous = None
    for step, (g, t) in enumerate(zip(grads, offsets)):
        weight.grad = g.clone()
        opt.step()
        state = _stored(opt)
        refreshed = t > 0 and t % t2 == 0 and (name != "Shampoo" or t >= t2)
        for d in (0, 1):
            expected = references[d][step]
            if expected is None:
                assert float(state[f"eigenvalues{d}"].abs().max()) == 0.0
                continue
            rebuilt = eigenpairs.rebuild(state[f"eigenbasis{d}"], state[f"eigenvalues{d}"])[0]
            assert float((rebuilt - expected).norm() / expected.norm()) < 1e-9, (step, d)
            if refreshed:  # SOAP's and ECS's basis applied from now on is the tracked eigenbasis
                assert name == "Shampoo" or torch.equal(state[f"{applied}{d}"], state[f"eigenbasis{d}"])
            elif previous is not None:  # and it stays as it is until the next refresh
                assert torch.equal(state[f"{applied}{d}"], previous[f"{applied}{d}"])
            if refreshed and name == "Shampoo":
                lam, q = torch.linalg.eigh(expected / (1 - beta ** (t // t1)))
                root = (q * (lam.clamp_min(0) + 1e-6) ** -0.25) @ q.T
                got = state[f"root{d}"][0]
                assert float((got - root).norm() / root.norm()) < 1e-9, (step, d)
        previous = state
    refreshes = sum(1 for t in offsets if t > 0 and t % t2 == 0 and (name != "Shampoo" or t >= t2))
    assert refreshes == 2 and opt.total_refreshes() == 2 * refreshes


FACTORIES = {
    "SOAP": lambda params, **kw: SOAP(params, **{"lr": 1e-2, **kw}),
    "ECS": lambda params, **kw: EigenvalueCorrectedShampoo(params, **{"lr": 1e-2, "merge_dims": False, **kw}),
    "Shampoo": lambda params, **kw: Shampoo(params, **{"lr": 1e-2, "start_preconditioning_step": 2, **kw}),
}


def _model() -> nn.Module:
    """Linear(80 → 64) and Linear(64 → 3): factors of 64², 80² (large) and 3² (small)."""
    return tanh_mlp((80, 64, 3), 0)


def _entries(opt) -> dict[str, torch.Tensor]:
    return {
        f"{stack}/{k}": v for stack, state in opt.state.items() for k, v in state.items() if isinstance(v, torch.Tensor)
    }


@pytest.mark.parametrize("name", FACTORIES)
def test_an_ordinary_4bit_step_dequantises_what_it_applies_and_does_no_qr_bjorck_or_quantisation(name, monkeypatch):
    """Counted by wrapping the library's QR (``torch.geqrf``), Björck, dequantisation and
    quantisation. T1 = 4, T2 = 8: steps 5–7 are ordinary. The model applies three large 4-bit
    matrices (64², 80² of the first weight, 64² of the second); each is dequantised once."""
    calls = {"qr": 0, "bjorck": 0, "dequantize": 0, "quantize": 0}

    def counting(kind, function):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(torch, "geqrf", counting("qr", torch.geqrf))
    monkeypatch.setattr(eigenpairs, "bjorck_rectify", counting("bjorck", eigenpairs.bjorck_rectify))
    monkeypatch.setattr(precision, "dequantize", counting("dequantize", precision.dequantize))
    monkeypatch.setattr(precision, "quantize", counting("quantize", precision.quantize))
    model = _model()
    opt = FACTORIES[name](model.parameters(), state_precision="4bit", statistics_interval=4, precondition_frequency=8)
    first = 0 if name == "SOAP" else 1  # SOAP counts its initialising step as t = 0
    batches = first_features_batches(9 - first)
    for batch in batches[: 5 - first]:  # up to t = 4, a statistics step
        cross_entropy_step(model, opt, batch)
    for batch in batches[5 - first : 8 - first]:  # t = 5, 6, 7
        calls.update(qr=0, bjorck=0, dequantize=0, quantize=0)
        cross_entropy_step(model, opt, batch)
        assert calls == {"qr": 0, "bjorck": 0, "dequantize": 3, "quantize": 0}
    calls.update(qr=0, bjorck=0, dequantize=0, quantize=0)
    cross_entropy_step(model, opt, batches[-1])  # t = 8: statistics and a refresh
    assert calls["qr"] >= 3 and calls["bjorck"] == 3 and calls["quantize"] >= 3


@pytest.mark.parametrize("name", FACTORIES)
def test_4bit_state_dict_round_trip_is_bit_identical_across_statistics_and_refreshes(name):
    batches = first_features_batches(12)
    model = _model()
    make = lambda params: FACTORIES[name](
        params, state_precision="4bit", statistics_interval=2, precondition_frequency=4
    )
    opt = make(model.parameters())
    for batch in batches[:5]:
        cross_entropy_step(model, opt, batch)
    saved = through_file(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = make(twin.parameters())
    twin_opt.load_state_dict(saved)
    for batch in batches[5:]:
        cross_entropy_step(model, opt, batch)
        cross_entropy_step(twin, twin_opt, batch)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert _entries(opt).keys() == _entries(twin_opt).keys()
    assert all(torch.equal(v, _entries(twin_opt)[k]) for k, v in _entries(opt).items())


def test_shampoo_converts_between_full_and_4bit_state():
    """full → 4-bit: each large factor becomes eigenpairs and each large root is stored as 4-bit
    off-diagonal entries and an exact diagonal, as an optimizer that ran in 4-bit stores them; the
    decoded root has the original diagonal and every other entry within the code book's error,
    0.124 times its block's largest off-diagonal entry (bounded here by the largest of all).
    4-bit → full keeps the decoded root and rebuilds the factors."""
    batches = first_features_batches(10)
    model = _model()
    options = dict(statistics_interval=1, precondition_frequency=2)
    opt = FACTORIES["Shampoo"](model.parameters(), **options)
    for batch in batches[:4]:
        cross_entropy_step(model, opt, batch)
    root = opt.state[KEY_MLP]["root0"].clone()
    converted = FACTORIES["Shampoo"](copy.deepcopy(model).parameters(), state_precision="4bit", **options)
    converted.load_state_dict(copy.deepcopy(opt.state_dict()))
    native_model = _model()
    native = FACTORIES["Shampoo"](native_model.parameters(), state_precision="4bit", **options)
    for batch in batches[:4]:
        cross_entropy_step(native_model, native, batch)
    layout = lambda o: {
        s: {k: (v.dtype, tuple(v.shape)) for k, v in st.items() if torch.is_tensor(v)} for s, st in o.state.items()
    }
    assert layout(converted) == layout(native)
    assert {"root0#codes", "root0#scales", "root0#diagonal"} <= converted.state[KEY_MLP].keys()
    stored = decode({k: v for k, v in converted.state[KEY_MLP].items() if k != "step"}, torch.float32)[0]
    decoded = stored["root0"]
    assert torch.equal(torch.diagonal(decoded, dim1=-2, dim2=-1), torch.diagonal(root, dim1=-2, dim2=-1))
    off_diagonal = root - torch.diag_embed(torch.diagonal(root, dim1=-2, dim2=-1))
    assert float((decoded - root).abs().max()) <= MAX_RELATIVE_ERROR * float(off_diagonal.abs().max()) * 1.001
    back = FACTORIES["Shampoo"](copy.deepcopy(model).parameters(), **options)
    back.load_state_dict(copy.deepcopy(converted.state_dict()))
    assert layout(back) == layout(opt)
    assert torch.equal(back.state[KEY_MLP]["root0"], decoded)
    for batch in batches[4:]:
        assert torch.isfinite(torch.tensor(cross_entropy_step(model, back, batch)))


KEY_MLP = "group0/64x80:PP"


def _aligned(exact: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``exact``'s columns in the order and signs of ``q``'s closest ones (eigh's order and signs
    are arbitrary)."""
    overlap = exact.mT @ q
    index = overlap.abs().argmax(-2)
    picked = torch.gather(exact, -1, index.unsqueeze(-2).expand_as(exact))
    signs = torch.gather(overlap, -2, index.unsqueeze(-2)).sign()
    return picked * signs


@pytest.mark.parametrize("name", FACTORIES)
def test_4bit_state_is_at_most_40_percent_of_float32(name):
    sizes = {}
    for p in ("full", "4bit"):
        model = _model()
        opt = FACTORIES[name](model.parameters(), state_precision=p, statistics_interval=1, precondition_frequency=2)
        for batch in first_features_batches(3):
            cross_entropy_step(model, opt, batch)
        sizes[p] = opt.state_bytes()
    assert sizes["4bit"] <= 0.4 * sizes["full"]


@pytest.mark.parametrize("name", FACTORIES)
def test_a_non_finite_gradient_leaves_4bit_state_and_parameters_unchanged(name):
    model = _model()
    opt = FACTORIES[name](model.parameters(), state_precision="4bit", statistics_interval=2, precondition_frequency=2)
    for batch in first_features_batches(4):
        cross_entropy_step(model, opt, batch)
    before = {k: v.clone() for k, v in _entries(opt).items()}
    params = [p.detach().clone() for p in model.parameters()]
    x, y = first_features_batches(1, seed=5)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert _entries(opt).keys() == before.keys()
    assert all(torch.equal(v, _entries(opt)[k]) for k, v in before.items())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
