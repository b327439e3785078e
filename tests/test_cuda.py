"""What only a CUDA device can show, when one is present (marked ``cuda``: skipped otherwise).

The suite's references, identities, NaN policy, state-dict round trips, precisions, Muon,
curvature and solvers run on CUDA through the ``device`` fixture (conftest.py), each against its
reference on the same device. The checks here compare the two devices with each other, or count
GPU synchronisations. The comparisons run the same case on the GPU and on the CPU. Cases are
float64 and well conditioned: square 8×8 layers and a regression loss, so
every factor, from the first gradient on, has full rank (a rectangular or cross-entropy gradient
leaves a null space whose eigenvectors are arbitrary: a 1e-12 change of the input then moved
SOAP's weights by 2e-2 on one device; here it moves them by 2e-12). The two devices' kernels
(cuBLAS / cuSOLVER against MKL / LAPACK) then agree to round-off: the tolerance is 1e-8 relative,
far above float64 round-off grown over a dozen steps and far below a real difference.
"""

from __future__ import annotations

import pytest
import torch
from cases import random_classification, tanh_mlp
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo
from conditioner.curvature import KFAC
from conditioner.influence.scores import train_batches

pytestmark = pytest.mark.cuda

OPTIMIZERS = {
    "SOAP": lambda p, **kw: SOAP(p, lr=1e-2, precondition_frequency=3, **kw),
    "ECS": lambda p, **kw: EigenvalueCorrectedShampoo(p, lr=1e-2, precondition_frequency=3, merge_dims=False, **kw),
    "ECS-adaptive-qr": lambda p, **kw: EigenvalueCorrectedShampoo(
        p, lr=1e-2, precondition_frequency=3, merge_dims=False, refresh="adaptive", tolerance=0.2,
        refresh_method="qr", max_qr_iterations=3, **kw
    ),
    "Shampoo": lambda p, **kw: Shampoo(p, lr=1e-2, precondition_frequency=3, start_preconditioning_step=3, **kw),
    "Muon": lambda p, **kw: Muon(p, lr=1e-2, **kw),
}
CLOSE = {"rtol": 1e-8, "atol": 1e-10}


def _model(device: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Three square 8×8 layers: with regression batches of 32, every factor has full rank."""
    return tanh_mlp((8, 8, 8, 8), seed=0, dtype=dtype, device=device)


def _batch(i: int, device: str, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(i)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    return x.to(device, dtype), y.to(device, dtype)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range | list[int], device: str) -> list[float]:
    """One step per batch index in ``steps``; the loss of each step's batch before the step."""
    losses = []
    for i in steps:
        x, y = _batch(i, device, next(model.parameters()).dtype)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _assert_same_parameters(gpu: nn.Module, cpu: nn.Module, **tolerance) -> None:
    for a, b in zip(gpu.parameters(), cpu.parameters(), strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), **tolerance)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_on_the_gpu_is_the_step_on_the_cpu(name):
    gpu, cpu = _model("cuda"), _model("cpu")
    gpu_opt, cpu_opt = OPTIMIZERS[name](gpu.parameters()), OPTIMIZERS[name](cpu.parameters())
    _train(gpu, gpu_opt, range(12), "cuda")
    _train(cpu, cpu_opt, range(12), "cpu")
    _assert_same_parameters(gpu, cpu, **CLOSE)
    assert all(v.device.type == "cuda" for s in gpu_opt.state.values() for v in s.values() if torch.is_tensor(v))


def _curvature_problem(device: str):
    x, y = random_classification(48, 3, 3, torch.Generator().manual_seed(1), device=device)
    return tanh_mlp((3, 5, 3), seed=1, dtype=torch.float64, device=device), train_batches(x, y, 12)


def test_sampled_fisher_on_the_gpu_draws_the_cpu_generator_s_labels():
    """A CPU generator drives the sampled labels wherever the model lives, so the same seed gives
    the same K-FAC on both devices."""
    factors = []
    for device in ("cuda", "cpu"):
        model, data = _curvature_problem(device)
        generator = torch.Generator().manual_seed(3)
        kfac = KFAC(model, nn.CrossEntropyLoss(), data, fisher_type="sample", samples=2, generator=generator)
        factors.append(kfac.to_dense().cpu())
    torch.testing.assert_close(factors[0], factors[1], **CLOSE)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_ordinary_step_on_the_gpu_synchronises_at_most_once(name):
    """torch's own count: with the sync debug mode on "warn", every synchronising CUDA call warns."""
    import warnings

    model = _model("cuda", torch.float32)
    optimizer = OPTIMIZERS[name](model.parameters())
    _train(model, optimizer, range(4), "cuda")  # the first four steps hold a refresh; the fifth is ordinary
    x, y = _batch(4, "cuda", torch.float32)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronising = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(synchronising) <= 1, [str(w.message) for w in synchronising]


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_on_device_policy_step_never_synchronises(name, poisoned):
    """With the sync debug mode on "error" every synchronising CUDA call raises: an ordinary step
    under nonfinite="skip_on_device" takes none, whether it is applied or skipped (then the
    parameters stay bit for bit, and the device counter says so when read afterwards)."""
    model = _model("cuda", torch.float32)
    optimizer = OPTIMIZERS[name](model.parameters(), nonfinite="skip_on_device", weight_decay=0.1)
    _train(model, optimizer, range(4), "cuda")  # the first four steps hold a refresh; the fifth is ordinary
    x, y = _batch(4, "cuda", torch.float32)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if poisoned:
        next(model.parameters()).grad[1, 2] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(optimizer.skipped_steps()) == int(poisoned)
    unchanged = [torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)]
    assert all(unchanged) if poisoned else not any(unchanged)
