"""The library on a CUDA device, when one is present (skipped otherwise).

Each check runs the same case on the GPU and on the CPU, whose results the rest of the suite ties
to independent references, and compares them; or it checks a device-independent identity on the
GPU itself. Cases are float64 and well conditioned: square 8×8 layers and a regression loss, so
every factor, from the first gradient on, has full rank (a rectangular or cross-entropy gradient
leaves a null space whose eigenvectors are arbitrary: a 1e-12 change of the input then moved
SOAP's weights by 2e-2 on one device; here it moves them by 2e-12). The two devices' kernels
(cuBLAS / cuSOLVER against MKL / LAPACK) then agree to round-off: the tolerance is 1e-8 relative,
far above float64 round-off grown over a dozen steps and far below a real difference. Where the case is
float32 or lower (bfloat16 parameters, 4-bit states), the bound is stated at the test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import random_classification, tanh_mlp
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, NonFiniteGradientError, Shampoo, state_memory
from conditioner.curvature import EKFAC, GGN, KFAC
from conditioner.influence.scores import train_batches
from conditioner.solvers import solve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

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
    return tanh_mlp((8, 8, 8, 8), seed=0, dtype=dtype).to(device)


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


def test_ecs_before_its_first_refresh_is_adam_on_the_gpu():
    model = _model("cuda")
    reference = copy.deepcopy(model)
    ecs = EigenvalueCorrectedShampoo(model.parameters(), lr=1e-2, precondition_frequency=1000, merge_dims=False)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    _train(model, ecs, range(10), "cuda")
    _train(reference, adam, range(10), "cuda")
    _assert_same_parameters(model, reference.cpu(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_non_finite_gradient_on_the_gpu_changes_nothing(name):
    model = _model("cuda")
    optimizer = OPTIMIZERS[name](model.parameters())
    _train(model, optimizer, range(4), "cuda")
    before, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteGradientError):
        optimizer.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    after = optimizer.state_dict()["state"]
    for key, entries in state["state"].items():
        for entry, value in entries.items():
            assert torch.equal(after[key][entry], value) if torch.is_tensor(value) else after[key][entry] == value


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_state_dict_resumes_the_same_trajectory_on_the_gpu(name):
    model = _model("cuda")
    optimizer = OPTIMIZERS[name](model.parameters())
    _train(model, optimizer, range(5), "cuda")
    resumed_model = copy.deepcopy(model)
    resumed = OPTIMIZERS[name](resumed_model.parameters())
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(model, optimizer, range(5, 10), "cuda")
    _train(resumed_model, resumed, range(5, 10), "cuda")
    _assert_same_parameters(resumed_model, model.cpu(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["SOAP", "ECS", "Shampoo"])
def test_bfloat16_parameters_keep_float32_statistics_on_the_gpu(name):
    """bfloat16 weights on the GPU keep float32 statistics and train as on the CPU. The two runs
    are compared by their losses, not weights: bfloat16 forward passes round differently on the
    two devices (2^-8 relative), which changes the gradients the runs see; over 12 steps on one
    batch the losses stay within 5% of each other (both fall by ~30%)."""
    gpu, cpu = _model("cuda", torch.bfloat16), _model("cpu", torch.bfloat16)
    gpu_opt, cpu_opt = OPTIMIZERS[name](gpu.parameters()), OPTIMIZERS[name](cpu.parameters())
    losses = _train(gpu, gpu_opt, [0] * 12, "cuda")  # one batch, so the loss must fall
    cpu_losses = _train(cpu, cpu_opt, [0] * 12, "cpu")
    stats = [v for s in gpu_opt.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert stats and all(v.dtype == torch.float32 for v in stats)
    assert losses[-1] < 0.9 * losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(cpu_losses), rtol=0.05, atol=0)


@pytest.mark.parametrize("name", ["SOAP", "ECS"])
def test_4bit_states_on_the_gpu_store_what_they_store_on_the_cpu(name):
    """4-bit bases (Linear 80 → 64: factors of 64² and 80², above the 4096-element threshold):
    the same entries and bytes as on the CPU, and training that follows the CPU's to the
    quantisation error (one 4-bit code step is ~1/8 of a block's largest entry)."""

    def run(device: str) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
        model = tanh_mlp((80, 64, 3), seed=0).to(device)
        optimizer = OPTIMIZERS[name](model.parameters(), state_precision="4bit")
        generator = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(8):
            x = torch.randn(32, 80, generator=generator).to(device)
            y = (x[:, :3] * 2).argmax(1)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return model, optimizer, losses

    gpu, gpu_opt, gpu_losses = run("cuda")
    cpu, cpu_opt, cpu_losses = run("cpu")
    assert state_memory(gpu_opt).total == state_memory(cpu_opt).total
    stored = {(k, e): v.dtype for k, s in gpu_opt.state.items() for e, v in s.items() if torch.is_tensor(v)}
    assert stored == {(k, e): v.dtype for k, s in cpu_opt.state.items() for e, v in s.items() if torch.is_tensor(v)}
    assert torch.uint8 in stored.values()  # some entries really are 4-bit codes
    torch.testing.assert_close(torch.tensor(gpu_losses), torch.tensor(cpu_losses), rtol=0.05, atol=0.05)


def _curvature_problem(device: str):
    x, y = random_classification(48, 3, 3, torch.Generator().manual_seed(1))
    return tanh_mlp((3, 5, 3), seed=1, dtype=torch.float64).to(device), train_batches(x.to(device), y.to(device), 12)


@pytest.mark.parametrize("operator", [KFAC, EKFAC, GGN])
def test_curvature_on_the_gpu_is_the_curvature_on_the_cpu(operator):
    (gpu_model, gpu_data), (cpu_model, cpu_data) = _curvature_problem("cuda"), _curvature_problem("cpu")
    gpu = operator(gpu_model, nn.CrossEntropyLoss(), gpu_data).to_dense()
    cpu = operator(cpu_model, nn.CrossEntropyLoss(), cpu_data).to_dense()
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, **CLOSE)


@pytest.mark.parametrize("method", ["direct", "cg", "lissa", "astra"])
def test_solvers_on_the_gpu_give_the_cpu_answer(method):
    answers = []
    for device in ("cuda", "cpu"):
        model, data = _curvature_problem(device)
        ggn, ekfac = GGN(model, nn.CrossEntropyLoss(), data), EKFAC(model, nn.CrossEntropyLoss(), data)
        v = torch.linspace(-1.0, 1.0, ggn.dim, dtype=torch.float64, device=device)
        operator = ekfac if method == "direct" else ggn
        options = {"preconditioner": ekfac} if method in ("cg", "astra") else {}
        if method in ("lissa", "astra"):
            options["generator"] = torch.Generator().manual_seed(0)
        answers.append(solve(operator, v, 0.1, method=method, **options).solution.cpu())
    torch.testing.assert_close(answers[0], answers[1], rtol=1e-6, atol=1e-8)


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
