"""SOAP against a straightforward float64 single-block reimplementation of the reference algorithm.

The reference below is written per parameter with tensordot, exactly in the order of the
published code: the first step only initialises (lerp of the zero factors, full eigh, flipped to
descending order); later steps project, update Adam's moments, step with
``lr·sqrt(1−β2ᵗ)/(1−β1ᵗ)``, decay, then move the first moment back to the original space, fold
the gradient into the factors, refresh with one sorted QR step (permuting the second moment),
and project the first moment forward again. Dimensions above ``max_precond_dim`` and 1-D
parameters have no factor.

The reference's options are written out too: ``normalize_grads`` divides each parameter's
projected-back update by its root mean square (plus 1e-30) before the step size; ``merge_dims``
reshapes a gradient of two or more dimensions by multiplying its dimensions together left to
right while the product stays within ``max_precond_dim`` (a conv kernel [64, 3, 3, 3] becomes one
1728 dimension, a small matrix one vector), after reading a 4-D gradient as [out, in, h, w] from
[out, h, w, in] with ``data_format="channels_last"``; every merged dimension within
``max_precond_dim`` has a factor, even when the merge leaves one dimension.

The comparisons run on every device (the ``device`` fixture): the reference and the library run on
the same one, in float64, so they differ by that device's round-off only.
"""

from __future__ import annotations

import torch
from torch import nn

from conditioner import SOAP


def reference_merge(shape, max_dim):
    """The reference's merge rule, stated as runs: walk the dimensions keeping a run whose product
    stays within max_dim; a dimension that would overflow a run of product > 1 starts the next run,
    one that would overflow a run of size-1 dimensions only is a run of its own. A trailing run of
    product 1 is kept only when it is all there is."""
    runs = [1]
    for d in shape:
        if runs[-1] * d <= max_dim:
            runs[-1] *= d
        elif runs[-1] > 1:
            runs.append(d)
        else:
            runs[-1:] = [d, 1]
    return runs if runs[-1] > 1 or len(runs) == 1 else runs[:-1]


class ReferenceSOAP:
    def __init__(
        self, params, lr, betas, eps, weight_decay, frequency, max_dim,
        normalize_grads=False, merge_dims=False, data_format="channels_first",
    ):  # fmt: skip
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd, self.freq, self.max_dim = lr, betas, eps, weight_decay, frequency, max_dim
        self.normalize, self.merge, self.channels_last = normalize_grads, merge_dims, data_format == "channels_last"
        self.state = [dict() for _ in self.params]

    def _merged(self, g):
        if not self.merge or g.ndim == 1:
            return g
        if self.channels_last and g.ndim == 4:
            g = g.permute(0, 3, 1, 2)
        return g.reshape(reference_merge(g.shape, self.max_dim))

    def _unmerged(self, u, shape):
        if not self.merge or len(shape) == 1:
            return u
        if self.channels_last and len(shape) == 4:
            return u.reshape(shape[0], shape[3], shape[1], shape[2]).permute(0, 2, 3, 1)
        return u.reshape(shape)

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
            g = self._merged(p.grad)
            if not st:
                st["step"] = 0
                st["m"] = torch.zeros_like(g)
                st["v"] = torch.zeros_like(g)
                eligible = p.grad.ndim > 1
                st["GG"] = [
                    torch.zeros(d, d, dtype=g.dtype, device=g.device) if eligible and d <= self.max_dim else None
                    for d in g.shape
                ]
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
            if self.normalize:
                u = u / (1e-30 + torch.mean(u**2) ** 0.5)
            p.data.add_(self._unmerged(u, p.shape), alpha=-step_size)
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


def _run(make_optimizer, steps=33, device="cpu"):
    torch.manual_seed(0)
    net = Net().to(device, torch.float64)
    opt = make_optimizer(net.parameters())
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 2, 6, 6, generator=data, dtype=torch.float64).to(device)
        z = torch.randn(16, 40, generator=data, dtype=torch.float64).to(device)
        y = torch.randn(16, 3, generator=data, dtype=torch.float64).to(device)
        net.zero_grad()
        ((net(x, z) - y) ** 2).mean().backward()
        opt.step()
    return net, opt


def test_soap_matches_float64_reference_over_33_steps_with_three_refreshes(device):
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours, opt = _run(lambda p: SOAP(p, precondition_frequency=10, max_precond_dim=32, **settings), device=device)
    reference, _ = _run(lambda p: ReferenceSOAP(p, frequency=10, max_dim=32, **settings), device=device)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        # Both run in float64; the only differences are summation order (tensordot vs batched
        # matmul, column-sum vs explicit QᵀFQ for the sort), far below 1e-9 over 33 steps. On
        # CUDA, cuBLAS / cuSOLVER round to float64 as LAPACK does (~1e-16 per operation), and the
        # eigenbases' column signs, which may differ between a batched and a single eigh, cancel
        # (SOAP projects the gradient and projects the update back with the same basis).
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


def test_soap_with_normalize_grads_matches_the_reference(device):
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours, _ = _run(
        lambda p: SOAP(p, precondition_frequency=10, max_precond_dim=32, normalize_grads=True, **settings),
        device=device,
    )
    reference, _ = _run(
        lambda p: ReferenceSOAP(p, frequency=10, max_dim=32, normalize_grads=True, **settings), device=device
    )
    plain, _ = _run(lambda p: SOAP(p, precondition_frequency=10, max_precond_dim=32, **settings), device=device)
    for (name, a), b, c in zip(ours.named_parameters(), reference.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"parameter {name} differs")
        assert (a - c).abs().max() > 1e-3, name  # normalising changes every parameter's steps


#: (shape, data_format) with max_precond_dim 8: what the reference's merge makes of them, and
#: what the library's other rule (leading dimension kept, matrices never merged) would make
MERGE_CASES = [
    ((4, 2, 8), "channels_first"),  # [8, 8]; the other rule: [4, 2, 8]
    ((2, 2, 4, 4), "channels_first"),  # [4, 4, 4]; the other rule: [2, 8, 4]
    ((2, 2, 4, 4), "channels_last"),  # read as [2, 4, 2, 4]: [8, 8]
    ((2, 3), "channels_first"),  # one 6-vector with its factor
    ((3, 16), "channels_first"),  # 16 > 8: [3, 16], the 16 unpreconditioned
    ((5,), "channels_first"),  # 1-D: Adam
]


def _run_fixed(make_optimizer, steps=25, device="cpu"):
    """Gradients drawn independently of the parameters (float64), so that only the update rule is
    compared; every factor a merge leaves with two or more dimensions is full rank."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, dtype=torch.float64).to(device)) for shape, _ in MERGE_CASES]
    optimizers = [make_optimizer([p], data_format) for p, (_, data_format) in zip(params, MERGE_CASES)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, opt in zip(params, optimizers):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device)
            opt.step()
    return params


def test_soap_merge_dims_and_data_format_match_the_reference(device):
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, normalize_grads=True, merge_dims=True)
    ours = _run_fixed(
        lambda p, f: SOAP(p, precondition_frequency=4, max_precond_dim=8, data_format=f, **settings), device=device
    )
    reference = _run_fixed(
        lambda p, f: ReferenceSOAP(p, frequency=4, max_dim=8, data_format=f, **settings), device=device
    )
    for (shape, data_format), a, b in zip(MERGE_CASES, ours, reference):
        # float64 on both sides: summation order only (see above); a vector's first factor has
        # rank one, but both sides decompose bit-identical outer products (one exact product per
        # entry) with the same device's eigh, the same way
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{shape} {data_format} differs")
    assert [reference_merge(s, 8) for s, _ in MERGE_CASES[:2]] == [[8, 8], [4, 4, 4]]
