"""``compile_kernels``: the ordinary-step kernels under ``torch.compile``.

What is checked: every kernel is captured as one graph (``fullgraph=True``, no graph break);
after the warm-up (first step, the start of preconditioning, a refresh) no step compiles
anything new, even while schedulers change the learning rate and β1 (or Muon's momentum) at every
step; the compiled trajectory is the eager one to round-off, over 20 steps with refreshes, for
SOAP, both eigenvalue-corrected Shampoo semantics, Shampoo and Muon, also under the on-device
non-finite policy (whose per-block bias corrections reach the kernel as tensors, here made to
differ between blocks by a skipped gradient) and with 4-bit state; and a training step compiled
whole, ``optimizer.step()`` included, gives the eager results. The fast tests use the ``eager``
and ``aot_eager`` backends (dynamo's capture without code generation); inductor's generated code
is compared in the slow tests.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from cases import EPS
from torch._dynamo.utils import counters

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo
from conditioner.optim.compiled import pack_scalars
from conditioner.optim.kernels import muon_direction

pytestmark = pytest.mark.usefixtures("one_thread")

FREQUENCY = 4
LR = 1e-2
OPTIMIZERS = {
    "SOAP": lambda p, **kw: SOAP(p, lr=LR, precondition_frequency=FREQUENCY, **kw),
    "ECS": lambda p, **kw: EigenvalueCorrectedShampoo(p, lr=LR, precondition_frequency=FREQUENCY, **kw),
    "ECS-rotate": lambda p, **kw: EigenvalueCorrectedShampoo(
        p, lr=LR, precondition_frequency=FREQUENCY, eigenvalue_transport="rotate", **kw
    ),
    "Shampoo": lambda p, **kw: Shampoo(p, lr=LR, precondition_frequency=FREQUENCY, **kw),
    "Muon": lambda p, **kw: Muon(p, lr=LR, **kw),
}
#: two matrices (one stack), a vector (Adam in every optimizer) and a 3-D tensor
SHAPES = [(12, 8), (12, 8), (8,), (3, 4, 5)]
#: the first step, the start of Shampoo's preconditioning and the first refresh (both at step 4)
WARMUP = FREQUENCY + 2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing, so that it counts its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def gradient_sequence(steps: int, dtype: torch.dtype, shapes=SHAPES) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [[torch.randn(s, generator=generator, dtype=dtype) for s in shapes] for _ in range(steps)]


def with_a_skipped_gradient(grads: list[list[torch.Tensor | None]]) -> list[list[torch.Tensor | None]]:
    """The sequence where, at step 3, the first matrix has no gradient and the second a NaN one
    (a skipped step: attempted, not taken), and at step 4 the second matrix has none: from step 5
    on the two blocks have attempted as many steps and step together, but under the on-device
    policy the second has taken one fewer, so their bias corrections differ."""
    grads = [list(step) for step in grads]
    grads[2][0] = None
    grads[2][1] = torch.full_like(grads[2][1], float("nan"))
    grads[3][1] = None
    return grads


def trajectory(name: str, grads: list[list[torch.Tensor]], **options) -> list[list[torch.Tensor]]:
    """The parameters after every step, fed a fixed gradient sequence (independent of the
    parameters, so that two runs differ only by what their kernels compute)."""
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(g.shape, generator=generator, dtype=g.dtype, requires_grad=True) for g in grads[0]]
    optimizer = OPTIMIZERS[name](params, **options)
    history = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history


def assert_same_trajectory(
    name: str, dtype: torch.dtype, backend: str | bool, grads: list[list[torch.Tensor]] | None = None, **options
) -> None:
    grads = gradient_sequence(20, dtype) if grads is None else grads
    eager = trajectory(name, grads, **options)
    compiled = trajectory(name, grads, compile_kernels=backend, **options)
    assert counters["stats"]["unique_graphs"] > 0, "no kernel was compiled"
    # A compiler may fuse and reassociate a kernel's arithmetic, so an update may differ in its
    # last bits; each such difference can flip the rounding of p − lr·u by one unit in the last
    # place of p. Allow 4 such units (of the largest parameter) per step, summed over the steps:
    # observed at most 0.6 per step with inductor (Shampoo, float64), 0 with aot_eager; a wrong
    # scalar (a bias correction or β one step off) moves a parameter by ~lr/10 = 1e-3 per step.
    for step, (a, b) in enumerate(zip(eager, compiled)):
        tolerance = 4 * EPS[dtype] * max(float(x.abs().max()) for x in a) * (step + 1)
        for i, (x, y) in enumerate(zip(a, b)):
            assert (x - y).abs().max() <= tolerance, f"step {step + 1}, params[{i}]"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_trajectory_equals_eager(name):
    assert_same_trajectory(name, torch.float32, "aot_eager")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_trajectory_equals_eager_with_per_block_bias_corrections(name):
    """``nonfinite="skip_on_device"``: the bias corrections are per-block tensors, which differ
    between the two blocks of the matrix stack after the skipped step. Packing one block's value
    for both fails Shampoo's case (its kernel divides momentum and grafting moment by them); in
    the others the kernel sees only ε·sqrt(c2) per block (the step size is applied outside it),
    a change below the tolerance, so those cases check the packed shapes compile and run."""
    grads = with_a_skipped_gradient(gradient_sequence(20, torch.float32))
    assert_same_trajectory(name, torch.float32, "aot_eager", grads, nonfinite="skip_on_device")


@pytest.mark.parametrize("name", ["SOAP", "ECS", "Shampoo"])
def test_compiled_trajectory_equals_eager_with_4bit_state(name):
    """A 64×64 weight keeps its factors as 4-bit eigenpairs (and SOAP/ECS a 4-bit basis, Shampoo a
    4-bit root basis with scales): the kernels get the decoded bases, so the trajectories agree as
    in full precision. T1 = 2, T2 = FREQUENCY = 4 put statistics and refreshes inside the 12 steps."""
    grads = gradient_sequence(12, torch.float32, [(64, 64), (8,)])
    assert_same_trajectory(name, torch.float32, "aot_eager", grads, state_precision="4bit", statistics_interval=2)


def test_pack_scalars_puts_scalar_i_at_index_i_broadcast_to_the_per_block_shape():
    like = torch.zeros(3, 2, 2, dtype=torch.float64)
    numbers = pack_scalars((0.5, 2.0), like)
    assert numbers.shape == (2,) and numbers.dtype == torch.float64 and numbers.tolist() == [0.5, 2.0]
    per_block = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(3, 1, 1)
    packed = pack_scalars((0.5, per_block), like)
    assert packed.shape == (2, 3, 1, 1)
    assert torch.equal(packed[0], torch.full((3, 1, 1), 0.5, dtype=torch.float64))
    assert torch.equal(packed[1], per_block)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inductor_trajectory_equals_eager(name, dtype):
    assert_same_trajectory(name, dtype, True)


@pytest.mark.parametrize("nonfinite", ["raise", "skip_on_device"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_no_graph_break_and_no_recompile_while_schedulers_change_lr_and_momentum(name, nonfinite):
    """Under both policies: the on-device one's per-block bias corrections are tensor inputs
    whose values, not shapes, change from step to step."""
    steps = WARMUP + 15
    grads = gradient_sequence(steps, torch.float32)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    optimizer = OPTIMIZERS[name](params, compile_kernels="eager", nonfinite=nonfinite)
    # OneCycleLR: a new learning rate, and a new β1 (Muon: momentum), at every step
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps + 1, base_momentum=0.8)
    momentum_key = "momentum" if name == "Muon" else "betas"
    seen = set()

    def step(step_grads):
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()
        scheduler.step()
        seen.add((optimizer.param_groups[0]["lr"], str(optimizer.param_groups[0][momentum_key])))

    for step_grads in grads[:WARMUP]:
        step(step_grads)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step_grads in grads[WARMUP:]:
            step(step_grads)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    assert len(seen) == steps  # the scheduler did change the scalars at every step


def test_a_graph_break_in_a_kernel_is_an_error(monkeypatch):
    """fullgraph=True: a kernel that cannot be captured whole raises instead of running in pieces
    (the guarantee the test above relies on). One stack: under the chunked step, stacks committed
    before the failing one in the same step keep their new values (conditioner.optim.compiled)."""

    def breaking(grad, momentum, scalars, **options):
        torch._dynamo.graph_break()
        return muon_direction(grad, momentum, scalars, **options)

    monkeypatch.setattr("conditioner.optim.muon.muon_direction", breaking)
    params = [torch.randn(6, 4, requires_grad=True)]
    params[0].grad = torch.randn(6, 4)
    optimizer = Muon(params, compile_kernels="eager")
    before = params[0].detach().clone()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        optimizer.step()
    assert torch.equal(params[0], before) and not optimizer.state


def train_whole_step(compiled: bool, compile_kernels: bool | str) -> tuple[list[float], list[torch.Tensor], list[int]]:
    """A small MLP trained for a few steps by a function doing forward, backward,
    ``optimizer.step()`` and ``zero_grad``, run as it is or under ``torch.compile``; also the
    number of graphs compiled so far after each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    optimizer = SOAP(model.parameters(), lr=LR, precondition_frequency=2, compile_kernels=compile_kernels)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)

    def train_step() -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    run = torch.compile(train_step, backend="aot_eager") if compiled else train_step
    losses, graphs = [], []
    for _ in range(7):  # the first step initialises; refreshes at steps 3, 5 and 7
        losses.append(float(run()))
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, [p.detach().clone() for p in model.parameters()], graphs


@pytest.mark.parametrize("compile_kernels", [False, "aot_eager"])
def test_a_compiled_training_step_gives_the_eager_results_without_recompiling(compile_kernels):
    eager_losses, eager_params, _ = train_whole_step(False, False)
    losses, params, graphs = train_whole_step(True, compile_kernels)
    # float64: the compiled forward and backward may round differently, and the parameters feed
    # back into the gradients; 1e-12 of the loss and of a step (lr) is a few hundred round-offs.
    torch.testing.assert_close(losses, eager_losses, rtol=1e-12, atol=0)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12 * LR)
    # The optimizer step is not traced (its host step counts would recompile it at every step):
    # once the first refresh is behind, no step compiles anything new.
    assert graphs[2] == graphs[-1]


@pytest.mark.parametrize("value", [1, "no-such-backend", None])
def test_compile_kernels_refuses_what_is_not_a_backend(value):
    with pytest.raises(ValueError, match="compile_kernels: must be False, True or"):
        SOAP([torch.zeros(2, 2, requires_grad=True)], compile_kernels=value)


def test_a_checkpoint_resumes_with_the_loading_optimizers_compile_setting():
    """``compile_kernels`` says how this process runs the step, not what it computes: like
    ``state_precision``, the loading optimizer's own setting wins over the checkpoint's."""
    params = [torch.randn(4, 3, requires_grad=True)]
    params[0].grad = torch.randn(4, 3)
    compiled = SOAP(params, compile_kernels="eager")
    compiled.step()
    plain = SOAP(params)
    plain.load_state_dict(compiled.state_dict())
    assert plain.param_groups[0]["compile_kernels"] is False
    compiled.load_state_dict(plain.state_dict())
    assert compiled.param_groups[0]["compile_kernels"] == "eager"


def test_eager_adagrad_grafting_sums_the_rounded_squares_exactly():
    """AdaGrad grafting's second moment is the running sum ``s + G²`` with ``G²`` rounded first,
    as Shampoo computed it before the kernels; a fused ``addcmul`` (one rounding) differs in
    the last bits, so ``compile_kernels=False`` would no longer reproduce earlier results."""
    generator = torch.Generator().manual_seed(0)
    param = torch.zeros(12, 8, requires_grad=True)
    optimizer = Shampoo([param], grafting="adagrad", precondition_frequency=100)
    expected = torch.zeros(12, 8)
    for _ in range(5):
        param.grad = torch.randn(12, 8, generator=generator)
        expected = expected + param.grad * param.grad
        optimizer.step()
    [state] = optimizer.state.values()
    assert torch.equal(state["graft_sq"][0], expected)
