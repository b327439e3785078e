"""SOAP against a straightforward float64 single-block reimplementation of the reference algorithm.

The reference below is written per parameter with tensordot, exactly in the order of the
published code: the first step only initialises (lerp of the zero factors, full eigh, flipped to
descending order); later steps project, update Adam's moments, step with
``lr·sqrt(1−β2ᵗ)/(1−β1ᵗ)``, decay, then move the first moment back to the original space, fold
the gradient into the factors, refresh with one sorted QR step (permuting the second moment),
and project the first moment forward again. Dimensions above ``max_precond_dim`` and 1-D
parameters have no factor.
"""

from __future__ import annotations

import torch
from torch import nn

from conditioner import SOAP


class ReferenceSOAP:
    def __init__(self, params, lr, betas, eps, weight_decay, frequency, max_dim):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd, self.freq, self.max_dim = lr, betas, eps, weight_decay, frequency, max_dim
        self.state = [dict() for _ in self.params]

    def _project(self, x, qs, back=False):
        for q in qs:
            if q is None:
                x = x.permute(*range(1, x.ndim), 0)
            else:
                x = torch.tensordot(x, q, dims=([0], [1] if back else [0]))
        return x

    def _eigh_desc(self, m):
        return torch.flip(torch.linalg.eigh(m)[1], [1])

    def _update_factors(self, g, st):
        for i, f in enumerate(st["GG"]):
            if f is None:
                continue
            other = [j for j in range(g.ndim) if j != i]
            st["GG"][i] = torch.lerp(f, torch.tensordot(g, g, dims=(other, other)), 1 - self.betas[1])

    def step(self):
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            g = p.grad
            if not st:
                st["step"] = 0
                st["m"] = torch.zeros_like(g)
                st["v"] = torch.zeros_like(g)
                eligible = g.ndim > 1
                st["GG"] = [torch.zeros(d, d, dtype=g.dtype) if eligible and d <= self.max_dim else None for d in g.shape]
                self._update_factors(g, st)
                st["Q"] = [None if f is None else self._eigh_desc(f) for f in st["GG"]]
                continue
            gp = self._project(g, st["Q"])
            st["step"] += 1
            t = st["step"]
            st["m"] = b1 * st["m"] + (1 - b1) * gp
            st["v"] = b2 * st["v"] + (1 - b2) * gp * gp
            step_size = self.lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
            u = self._project(st["m"] / (st["v"].sqrt() + self.eps), st["Q"], back=True)
            p.data.add_(u, alpha=-step_size)
            p.data.add_(p.data, alpha=-self.lr * self.wd)
            st["m"] = self._project(st["m"], st["Q"], back=True)
            self._update_factors(g, st)
            if t % self.freq == 0:
                new_q = []
                for i, (f, q) in enumerate(zip(st["GG"], st["Q"])):
                    if f is None:
                        new_q.append(None)
                        continue
                    order = torch.argsort(torch.diag(q.T @ f @ q), descending=True)
                    st["v"] = st["v"].index_select(i, order)
                    new_q.append(torch.linalg.qr(f @ q[:, order])[0])
                st["Q"] = new_q
            st["m"] = self._project(st["m"], st["Q"])


class Net(nn.Module):
    """Conv2d (4-D weight, a factor on every dim), a Linear whose 40-dim input exceeds
    max_precond_dim=32 (one-sided), square Linears, biases and a free 1-D scale.

    Every factor is full rank from the first gradient on (square weights, batch 16 ≥ every dim):
    the eigenbasis of a rank-deficient factor is arbitrary in its null space, and two correct
    implementations may pick different ones, after which Adam in those bases differs.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(3, 3)
        self.wide = nn.Linear(40, 5)
        self.fc2 = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x, z):
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return self.fc2(torch.tanh(self.fc1(h))) * self.scale + self.wide(z)[:, :3]


def _run(make_optimizer, steps=33):
    torch.manual_seed(0)
    net = Net().double()
    opt = make_optimizer(net.parameters())
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 2, 6, 6, generator=data, dtype=torch.float64)
        z = torch.randn(16, 40, generator=data, dtype=torch.float64)
        y = torch.randn(16, 3, generator=data, dtype=torch.float64)
        net.zero_grad()
        ((net(x, z) - y) ** 2).mean().backward()
        opt.step()
    return net, opt


def test_soap_matches_float64_reference_over_33_steps_with_three_refreshes():
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours, opt = _run(lambda p: SOAP(p, precondition_frequency=10, max_precond_dim=32, **settings))
    reference, _ = _run(
        lambda p: ReferenceSOAP(p, frequency=10, max_dim=32, **settings)
    )
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        # Both run in float64; the only differences are summation order (tensordot vs batched
        # matmul, column-sum vs explicit QᵀFQ for the sort), far below 1e-9 over 33 steps.
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"parameter {name} differs")
    counts = opt.refresh_counts()
    # 32 updating steps after the initial one, frequency 10: refreshes at t = 10, 20, 30.
    assert all(bool((c == 3).all()) for c in counts.values() if c.numel())
    assert sum(c.numel() for c in counts.values()) == 4 + 2 + 2 + 1  # conv 4 factors, fc1, fc2, wide one-sided


def test_reference_detects_a_port_that_forgets_to_permute_the_second_moment(monkeypatch):
    """The comparison above is sharp enough to catch the classic porting bug."""
    from conditioner.optim import eigen_adam

    monkeypatch.setattr(eigen_adam, "_permute_along", lambda x, order, dim: x)
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours, _ = _run(lambda p: SOAP(p, precondition_frequency=10, max_precond_dim=32, **settings))
    reference, _ = _run(lambda p: ReferenceSOAP(p, frequency=10, max_dim=32, **settings))
    worst = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), reference.parameters()))
    assert worst > 1e-6
