"""The small cases the tests share: models, data and matrices, in one place.

- Matrices with chosen spectra and float64 numpy references for the eigenbasis engine.
- A tiny MLP whose hidden layers share a stack, regression minibatches and a training loop, and
  the optimizer factories with small refresh frequencies, for the optimizer tests.
- Tanh MLPs and classification data for the optimizer, curvature, solver and influence tests.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Shampoo

# --- matrices with chosen spectra, and float64 references ----------------------------------------


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EPS = {torch.float32: float(np.finfo(np.float32).eps), torch.float64: float(np.finfo(np.float64).eps)}
KINDS = ("indefinite", "spd", "ill_conditioned", "rank_deficient")




def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """Haar-distributed orthogonal matrix."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def sym(a: np.ndarray) -> np.ndarray:
    """Exactly symmetric copy (the float32 rounding of an exactly symmetric matrix stays symmetric)."""
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def with_spectrum(rng: np.random.Generator, eigenvalues: np.ndarray) -> np.ndarray:
    v = random_orthogonal(rng, len(eigenvalues))
    return sym((v * eigenvalues) @ v.T)


def make_matrix(kind: str, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "indefinite":
        g = rng.standard_normal((d, d))
        return sym(g + g.T)
    if kind == "spd":
        g = rng.standard_normal((d, d + 2))
        return sym(g @ g.T)
    if kind == "ill_conditioned":  # condition number 1e8
        return with_spectrum(rng, np.geomspace(1.0, 1e-8, d) if d > 1 else np.ones(1))
    if kind == "rank_deficient":  # rank d // 2 (at least 1)
        lam = rng.uniform(0.5, 2.0, d)
        lam[max(1, d // 2) :] = 0.0
        return with_spectrum(rng, lam)
    if kind == "zero":
        return np.zeros((d, d))
    raise AssertionError(kind)


@st.composite
def stacks(draw, kinds=KINDS, max_batch=4, min_dim=1, max_dim=12, scales=(1e-6, 1.0, 1e6)):
    """A float64 numpy stack (B, d, d) of exactly symmetric matrices of mixed kinds."""
    batch = draw(st.integers(1, max_batch))
    d = draw(st.integers(min_dim, max_dim))
    member_kinds = draw(st.lists(st.sampled_from(kinds), min_size=batch, max_size=batch))
    scale = draw(st.sampled_from(scales))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.stack([scale * make_matrix(k, d, rng) for k in member_kinds])


def as_torch(a: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """The tensor handed to the library, and its exact float64 value (after rounding to dtype)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return t, t.double().numpy()


def spectral_norm(a: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a, 2, axis=(-2, -1))


def mT(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def np_staleness(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """‖B − Diag(B)‖_F / ‖B‖_F with B = Qᵀ A Q, formed explicitly in float64 (0 where B = 0)."""
    b = mT(q) @ a @ q
    off = b - np.einsum("...i,ij->...ij", np.diagonal(b, axis1=-2, axis2=-1), np.eye(b.shape[-1]))
    nb = np.linalg.norm(b, axis=(-2, -1))
    return np.where(nb > 0, np.linalg.norm(off, axis=(-2, -1)) / np.where(nb > 0, nb, 1.0), 0.0)


def np_inverse_root(a: np.ndarray, p: float, epsilon: float) -> np.ndarray:
    """(A + εI)^(-1/p) by numpy eigh in float64 (negative round-off eigenvalues clamp to 0)."""
    w, v = np.linalg.eigh(sym(a))
    scale = (np.maximum(w, 0.0) + epsilon) ** (-1.0 / p)
    return (v * scale[..., None, :]) @ mT(v)


def align_signs(q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Flip each column of q (d, d) to have a non-negative inner product with ref's column."""
    return q * np.where(np.sum(q * ref, axis=0) < 0, -1.0, 1.0)



# --- the optimizer tests' model, data and factories -----------------------------------------------

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


class SharedInput(nn.Module):
    """Two layers ``a`` and ``b`` read the same input; fed rank-one inputs by
    :func:`train_shared_input`, the factors of their input side have rank one, and in float32
    Shampoo's ``F + 1e-12·I`` is singular to working precision (the coupled Newton root diverges)."""

    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) + torch.tanh(self.b(x)))


def shared_input_model(seed=0, d=32):
    torch.manual_seed(seed)
    return SharedInput(d)


def train_shared_input(model, opt, steps, seed=0):
    """``steps`` steps on batches of 4 inputs along one fixed direction, with random targets."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, model.a.in_features, generator=g)
    for _ in range(steps):
        x = torch.randn(4, 1, generator=g) @ direction
        y = torch.randn(4, 3, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def batch(i, dtype=torch.float32, n=16, d_in=4, d_out=3, device="cpu"):
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


def mse(model, i):
    """The loss of batch ``i``, drawn in the dtype and on the device of ``model``'s parameters."""
    p = next(model.parameters())
    x, y = batch(i, p.dtype, device=p.device)
    return ((model(x) - y) ** 2).mean()


def make_model(seed=0, dtype=torch.float32, device="cpu", **kw):
    """An :class:`MLP` initialised on the CPU from ``seed``, then moved: the same weights on every device."""
    torch.manual_seed(seed)
    return MLP(**kw).to(device, dtype)


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        mse(model, i).backward()
        opt.step()


def fixed_grads(shapes, steps, seed=0, dtype=torch.float64, device="cpu"):
    """A gradient sequence that does not depend on the parameters."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes] for _ in range(steps)]


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


def through_file(state_dict: dict) -> dict:
    """``state_dict`` after ``torch.save`` and ``torch.load`` (in memory), as a checkpoint comes back."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def floating_state(opt):
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]



# --- classification -----------------------------------------------------------------------------


def tanh_mlp(
    widths: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> nn.Sequential:
    """``Linear`` layers of ``widths`` with ``Tanh`` between them, built on the CPU after
    ``torch.manual_seed(seed)``, then moved to ``device``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers).to(device, dtype)


def first_features_batches(
    n: int, seed: int = 1, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 32 Gaussian inputs with 80 features, labelled by the largest of the first
    three (a problem ``tanh_mlp((80, 64, 3), ...)`` learns); drawn on the CPU, then moved."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, 80, generator=generator).to(device)
    return [(x[i], (x[i, :, :3] * 2).argmax(1)) for i in range(n)]


def cross_entropy_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """One training step on ``batch`` with the cross-entropy loss; returns the loss before it."""
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return float(loss.detach())


def random_classification(
    n: int,
    features: int,
    classes: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``(n, features)`` and uniformly drawn labels, from the CPU ``generator``, on ``device``."""
    x = torch.randn(n, features, generator=generator, dtype=dtype)
    return x.to(device), torch.randint(0, classes, (n,), generator=generator).to(device)


def teacher_classification(n=256, d=8, classes=4, seed=0, dtype=torch.float32, device="cpu"):
    """Inputs labelled by a random two-layer tanh teacher: a problem a small classifier can learn.
    Labelled on the CPU, then moved: the same labels on every device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 16, generator=g), torch.randn(16, classes, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x.to(device, dtype), y.to(device)


def trained_classifier(
    n: int = 250, steps: int = 500, device: torch.device | str = "cpu"
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A float64 Tanh MLP 8-16-16-4 trained full-batch with Adam to near-zero loss on ``n`` teacher-labelled
    examples: a GGN far from Kronecker-factored and badly conditioned, as after real training. Trained on
    the CPU and then moved to ``device``, with its data, so that every device gets the same problem."""
    x, y = teacher_classification(n=n, d=8, classes=4, seed=0, dtype=torch.float64)
    model = tanh_mlp((8, 16, 16, 4), seed=0, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.to(device), x.to(device), y.to(device)
