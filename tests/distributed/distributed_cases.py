"""The runs of test_distributed: one model, the optimizers, and the worker every spawned rank runs.

Imported by the spawned processes (multiprocessing passes the parent's ``sys.path`` on, so this
module and ``conditioner`` are found the same way as in the test process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo

STEPS = 8
ROWS = 12  # divisible by 1, 2 and 3 ranks

OPTIMIZERS = {
    "SOAP": lambda p: SOAP(
        p, lr=1e-2, betas=(0.9, 0.95), precondition_frequency=2, max_precond_dim=8, split_large_dims=True
    ),
    "ECS": lambda p: EigenvalueCorrectedShampoo(
        p, lr=1e-2, precondition_frequency=2, max_precond_dim=8, merge_dims=False
    ),
    "ECS-adaptive-qr": lambda p: EigenvalueCorrectedShampoo(
        p,
        lr=1e-2,
        precondition_frequency=1,
        max_precond_dim=8,
        merge_dims=False,
        refresh="adaptive",
        tolerance=0.05,
        refresh_method="qr",
        max_qr_iterations=2,
        # the earlier semantics: under the default ("keep"), D keeps its coordinates while
        # adaptive decisions move some bases and not others, and a 1e-6 change of the loss moves
        # this float32 run's parameters by O(0.1), so no summation order can agree to 1e-5
        eigenvalue_transport="rotate",
    ),
    "Shampoo": lambda p: Shampoo(
        p, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2, max_preconditioner_dim=8, merge_dims=False
    ),
}
#: with the optimizers that refresh, Muon (no refresh: sharded state only)
SHARDED = {**OPTIMIZERS, "Muon": lambda p: Muon(p, lr=1e-2, weight_decay=0.1)}
#: the timeout of the exchange in the "stall" job, and how long the stalled ranks wait
STALL_TIMEOUT_S = 1.0


class Toy(nn.Module):
    """Square blocks only, no larger than the batch: every factor has full rank from the first step.

    A rectangular block's factor is singular, and rounding alone picks the eigenvectors of its
    null space; the next gradient's component there is then scaled in an arbitrary basis, and the
    run on 1 rank and on 2 ranks (gradients summed in another order) part by O(lr), DDP or not.
    With max dim 8, ``d`` splits into four 8×8 blocks: 7 blocks in 3 stacks of 8×8, 4×4 and 6×6.
    """

    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Linear(16, 16)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(4, 4, bias=False)
        self.e = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.d(x))
        h = torch.tanh(self.a(h[:, :8])) + torch.tanh(self.b(h[:, 8:]))
        return torch.cat([h, self.c(x[:, :4]), self.e(h[:, :6])], dim=1)


def make_model(tiny: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if tiny:  # one block, two factors: with 3 ranks one rank has nothing to refresh
        return nn.Linear(5, 5, bias=False)
    return Toy()


def batch(step: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    size = (5, 5) if isinstance(model, nn.Linear) else (16, 18)
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(ROWS, size[0], generator=g), torch.randn(ROWS, size[1], generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    """Each rank takes its equal share of the rows; DDP and FSDP2 average the gradients."""
    for step in steps:
        x, y = batch(step, getattr(model, "module", model))
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        optimizer.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def reference(name: str, tiny: bool = False, steps: int = STEPS) -> list[torch.Tensor]:
    """The single-process run on the full batch."""
    model = make_model(tiny)
    train(model, SHARDED[name](model.parameters()), range(steps))
    return full_parameters(model)


def _setup(mode: str, name: str, world: int, tiny: bool = False, **options):
    """``mode``: ``"ddp"`` or ``"fsdp"``, with ``"-sharded"``: under :func:`shard_state` (else
    :func:`spread_refresh`); ``options`` go to ``shard_state``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from conditioner.distributed import shard_state, spread_refresh

    model = make_model(tiny)
    if mode.startswith("fsdp"):
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.children():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained = model
    else:
        trained = DistributedDataParallel(model)
    optimizer = SHARDED[name](model.parameters())
    helper = shard_state(optimizer, **options) if mode.endswith("-sharded") else spread_refresh(optimizer)
    return model, trained, optimizer, helper


def _outcome(model: nn.Module, optimizer: torch.optim.Optimizer, helper, saved_world=None) -> dict:
    sharded = hasattr(helper, "updated")
    return {
        "params": full_parameters(model),
        "computed": helper.updated if sharded else helper.computed,
        "exchanges": helper.exchanges,
        "gradient_bytes": helper.gradient_bytes if sharded else None,
        "refreshes": optimizer.total_refreshes() if hasattr(optimizer, "total_refreshes") else 0,
        "saved_world": saved_world,
        "state_bytes": optimizer.state_bytes(),
        "blocks": sum(len(s.blocks) for g in range(len(optimizer.param_groups)) for s in optimizer.layout(g)),
    }


def _stall(mode: str, name: str, rank: int, world: int) -> dict:
    """Every rank takes a step; then rank 0 calls ``optimizer.step()`` again alone (DDP mode): its
    exchange must fail within the timeout with a clear error, while the others wait past it."""
    from datetime import timedelta

    model, trained, optimizer, _ = _setup(mode, name, world, timeout=timedelta(seconds=STALL_TIMEOUT_S))
    train(trained, optimizer, range(1), rank, world)
    if rank != 0:
        time.sleep(3 * STALL_TIMEOUT_S)
        return {}
    for p in model.parameters():  # no backward: DDP's all-reduce would wait for the others first
        p.grad = torch.ones_like(p)
    start = time.perf_counter()
    try:
        optimizer.step()
    except RuntimeError as error:
        return {"error": str(error), "waited_s": time.perf_counter() - start}
    return {"error": None}


def _run(job: tuple, rank: int, world: int) -> dict:
    from conditioner.distributed import checkpoint

    kind, mode, name = job[:3]
    saved_world = None
    if kind == "stall":
        return _stall(mode, name, rank, world)
    if kind == "train":
        tiny, directory = job[3], job[4]
        model, trained, optimizer, executor = _setup(mode, name, world, tiny)
        train(trained, optimizer, range(STEPS // 2), rank, world)
        if directory is not None:
            checkpoint.save(directory, optimizer, model)
        train(trained, optimizer, range(STEPS // 2, STEPS), rank, world)
    else:
        model, trained, optimizer, executor = _setup(mode, name, world)
        saved_world = checkpoint.load(job[3], optimizer, model)
        train(trained, optimizer, range(STEPS // 2, STEPS), rank, world)
    return _outcome(model, optimizer, executor, saved_world)


def worker(rank: int, world: int, tmp: str, phases: list[list[tuple]]) -> None:
    """Run each phase's jobs in a process group of its own and save what each job produced to
    ``tmp/rank{rank}.pt``.

    A job is ``("train", mode, name, tiny, checkpoint_dir or None)``: train STEPS steps, saving a
    checkpoint after STEPS // 2; ``("resume", mode, name, checkpoint_dir)``: build a new model
    and optimizer, load the checkpoint and train the remaining steps; or ``("stall", mode, name)``
    (see :func:`_stall`; run it in a phase of its own, last).
    """
    torch.set_num_threads(1)
    results = {}
    for number, jobs in enumerate(phases):
        store = os.path.join(tmp, f"store{number}")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            results.update({job: _run(job, rank, world) for job in jobs})
        finally:
            dist.destroy_process_group()
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))


def spawn(world: int, tmp: Path, phases: list[list[tuple]]) -> list[dict]:
    """Run the phases on ``world`` fresh gloo ranks (one process group per phase); each rank's
    results."""
    import torch.multiprocessing as mp

    tmp.mkdir(parents=True, exist_ok=True)
    mp.start_processes(worker, args=(world, str(tmp), phases), nprocs=world, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
