"""Optimizer-step time of conditioner's optimizers against AdamW, peer SOAPs, and a floor kernel.

Two models: an MLP 784-1024-1024-10 (batch 256) and a 4-layer transformer encoder (width 128,
feed-forward 512, vocabulary 96, sequence 64, batch 32). Every optimizer starts from the same
initialisation and sees the same sequence of real gradients; only ``optimizer.step()`` is timed.
The first 11 steps are untimed warm-up (SOAP's initialisation, a first refresh, one-time kernel
set-up and, for peers that use it, torch.compile); 40 timed steps follow, with 4 refreshes
among them at the reference frequency 10: the median is the ordinary step, the mean includes
the refreshes.

The FLOOR kernel is what a SOAP step cannot avoid on an ordinary step: for every 2-D block the
four projection products (Q_Lᵀ G, ·Q_R, Q_L·, ·Q_Rᵀ) and the two factor products G Gᵀ, Gᵀ G,
run back to back as bare matmuls on preallocated tensors of the same shapes and dtype.

``--nonfinite raise skip_on_device`` runs each conditioner optimizer under each listed NaN/Inf
policy (named ``optimizer [policy]``): the on-device policy takes no host synchronisation, which
costs or saves little on a CPU, where reading a value waits for nothing.

With ``--compile``, each of conditioner's optimizers also runs with ``compile_kernels=True``
(its ordinary-step kernels compiled by inductor) as a row "NAME (compiled)"; a table then sets
every compiled row against its eager row: median and mean step, their ratios, and the
compilation time, taken as the compiled run's warm-up steps minus the eager run's (runs that
share a kernel shape share its graph: the first to meet it pays), and torch's own count of the
seconds spent compiling for the model, all compiled runs together.

Usage: python benchmarks/optimizer_step.py [--steps 40] [--models mlp transformer]
                                           [--schedule round-robin|sequential] [--json FILE]
                                           [--nonfinite raise skip_on_device]
                                           [--optimizers NAME ...] [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import conditioner
from conditioner.optim.base import NONFINITE_POLICIES

WARMUP = 11
SOAP_SETTINGS = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10)


class Encoder(nn.Module):
    def __init__(self, vocab: int = 96, width: int = 128, layers: int = 4, ff: int = 512, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def make_mlp() -> tuple[nn.Module, Callable[[nn.Module, torch.Generator], torch.Tensor]]:
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def loss(m: nn.Module, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(256, 784, generator=g)
        y = torch.randint(0, 10, (256,), generator=g)
        return nn.functional.cross_entropy(m(x), y)

    return model, loss


def make_transformer() -> tuple[nn.Module, Callable[[nn.Module, torch.Generator], torch.Tensor]]:
    model = Encoder()

    def loss(m: nn.Module, g: torch.Generator) -> torch.Tensor:
        tokens = torch.randint(0, 96, (32, 65), generator=g)
        logits = m(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 96), tokens[:, 1:].reshape(-1))

    return model, loss


MODELS = {"mlp": make_mlp, "transformer": make_transformer}


def optimizers() -> dict[str, Callable]:
    table: dict[str, Callable] = {
        "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01),
        "conditioner.SOAP": lambda p, **kw: conditioner.SOAP(p, **SOAP_SETTINGS, **kw),
        "conditioner.ECShampoo": lambda p, **kw: conditioner.EigenvalueCorrectedShampoo(
            p, lr=3e-3, precondition_frequency=10, max_precond_dim=10000, **kw
        ),
        "conditioner.ECShampoo-adaptive": lambda p, **kw: conditioner.EigenvalueCorrectedShampoo(
            p, lr=3e-3, precondition_frequency=10, refresh="adaptive", tolerance=0.1, max_precond_dim=10000, **kw
        ),
        "conditioner.Shampoo": lambda p, **kw: conditioner.Shampoo(
            p, lr=3e-3, precondition_frequency=10, max_preconditioner_dim=10000, **kw
        ),
        "conditioner.Muon": lambda p, **kw: conditioner.Muon(p, lr=0.02, **kw),
    }
    try:
        import heavyball

        table["heavyball.SOAP"] = lambda p: heavyball.SOAP(
            p, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10
        )
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        table["pytorch_optimizer.SOAP"] = lambda p: pytorch_optimizer.SOAP(p, **SOAP_SETTINGS)
    except ImportError:
        pass
    return table


def with_policies(table: dict[str, Callable], policies: list[str]) -> dict[str, Callable]:
    """The conditioner optimizers once per NaN/Inf policy (named ``name [policy]`` unless there
    is one policy); the others as they are."""
    if policies == ["raise"]:
        return table
    result: dict[str, Callable] = {}
    for name, factory in table.items():
        if not name.startswith("conditioner."):
            result[name] = factory
            continue
        for policy in policies:
            label = name if len(policies) == 1 else f"{name} [{policy}]"
            result[label] = lambda p, factory=factory, policy=policy, **kw: factory(p, nonfinite=policy, **kw)
    return result


def gradients(model_name: str, steps: int) -> tuple[dict, list[list[torch.Tensor]]]:
    """Initial weights and a list of real gradients, one per step, computed at the initial point."""
    torch.manual_seed(0)
    model, loss = MODELS[model_name]()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        model.zero_grad()
        loss(model, g).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return init, grads


class OptimizerRun:
    """One optimizer on its own copy of the model, stepping through the shared gradients."""

    def __init__(self, model_name: str, factory: Callable, init: dict):
        model, _ = MODELS[model_name]()
        model.load_state_dict(init)
        self.params = list(model.parameters())
        self.optimizer = factory(self.params)

    def __call__(self, step_grads: list[torch.Tensor]) -> float:
        for p, g in zip(self.params, step_grads):
            p.grad = g.clone()
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


class FloorRun:
    """The floor kernel: for every 2-D block, 4 projection products and 2 factor products."""

    def __init__(self, model_name: str):
        model, _ = MODELS[model_name]()
        g = torch.Generator().manual_seed(2)
        self.blocks = []
        for p in model.parameters():
            if p.ndim == 2:
                m, n = p.shape
                grad = torch.randn(m, n, generator=g)
                ql = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
                qr = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
                self.blocks.append((grad, ql, qr))

    def __call__(self, step_grads: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        for grad, ql, qr in self.blocks:
            projected = (ql.T @ grad) @ qr
            (ql @ projected) @ qr.T
            grad @ grad.T
            grad.T @ grad
        return time.perf_counter() - start


def compiled_variants(table: dict[str, Callable], names: list[str]) -> dict[str, Callable]:
    """``NAME (compiled)``: each of conditioner's optimizers among ``names`` with ``compile_kernels=True``."""
    return {
        f"{name} (compiled)": functools.partial(table[name], compile_kernels=True)
        for name in names
        if name.startswith("conditioner.")
    }


def time_runs(runs: dict[str, Callable], grads: list[list[torch.Tensor]], schedule: str) -> dict[str, list[float]]:
    """Time every run on every gradient (the first ``WARMUP`` steps included).

    ``round-robin`` steps every run once per gradient, rotating the order each step, so that
    drifts in machine speed fall on all runs alike and every step starts with caches holding
    other runs' data, as after a forward and backward pass. ``sequential`` runs each optimizer
    through all its steps before the next, with warm caches.
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    if schedule == "sequential":
        for name in names:
            times[name] = [runs[name](step_grads) for step_grads in grads]
    else:
        for i, step_grads in enumerate(grads):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(runs[name](step_grads))
    return times


def summarise(times: list[float]) -> dict[str, float]:
    """Median and mean of the timed steps (after the warm-up), and the warm-up's total."""
    timed = times[WARMUP:]
    return {
        "median_ms": 1e3 * statistics.median(timed),
        "mean_ms": 1e3 * statistics.fmean(timed),
        "warmup_s": sum(times[:WARMUP]),
    }


def compile_seconds() -> float:
    """Seconds this process has spent in dynamo and inductor compiling (torch's own account)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return float(dict(zip(names, values)).get("_compile.compile_inner", 0.0))


def print_compiled(rows: dict[str, dict[str, float]]) -> None:
    """Each compiled row against its eager row; compilation time = warm-up time minus eager's."""
    header = f"{'median ms':>16s} {'ratio':>6s} {'mean ms':>16s} {'ratio':>6s} {'compile s':>9s}"
    print(f"{'compiled vs eager':50s} {header}")
    for name, row in rows.items():
        if not name.endswith(" (compiled)"):
            continue
        eager = rows[name.removesuffix(" (compiled)")]
        row["compile_s"] = row["warmup_s"] - eager["warmup_s"]
        medians = f"{row['median_ms']:.2f} / {eager['median_ms']:.2f}"
        means = f"{row['mean_ms']:.2f} / {eager['mean_ms']:.2f}"
        print(
            f"{name:50s} {medians:>16s} {row['median_ms'] / eager['median_ms']:6.2f} "
            f"{means:>16s} {row['mean_ms'] / eager['mean_ms']:6.2f} {row['compile_s']:9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=None)
    parser.add_argument("--schedule", choices=["round-robin", "sequential"], default="round-robin")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument(
        "--nonfinite",
        nargs="+",
        default=["raise"],
        choices=list(NONFINITE_POLICIES),
        help="run each conditioner optimizer under each of these policies",
    )
    parser.add_argument("--compile", action="store_true", help="add conditioner's optimizers with compile_kernels=True")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    table = with_policies(optimizers(), args.nonfinite)
    chosen = args.optimizers or list(table)
    if args.compile:
        variants = compiled_variants(table, chosen)
        table.update(variants)
        chosen = chosen + list(variants)
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "schedule": args.schedule,
        "nonfinite": args.nonfinite,
        "models": {},
    }
    for model_name in args.models:
        init, grads = gradients(model_name, args.steps + WARMUP)
        compiling = compile_seconds()
        runs: dict[str, Callable] = {"floor kernel": FloorRun(model_name)}
        runs.update({name: OptimizerRun(model_name, table[name], init) for name in chosen})
        rows = {name: summarise(t) for name, t in time_runs(runs, grads, args.schedule).items()}
        floor = rows["floor kernel"]
        results["models"][model_name] = rows
        print(f"\n{model_name}: {args.steps} timed steps, {torch.get_num_threads()} threads, {args.schedule}")
        print(f"{'optimizer':50s} {'median ms':>10s} {'× floor':>8s} {'mean ms':>10s}")
        for name, row in rows.items():
            print(
                f"{name:50s} {row['median_ms']:10.2f} {row['median_ms'] / floor['median_ms']:8.2f} {row['mean_ms']:10.2f}"
            )
        if args.compile:
            print_compiled(rows)
            seconds = compile_seconds() - compiling
            results.setdefault("compile_seconds", {})[model_name] = seconds
            print(f"compiling, all compiled runs together: {seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
