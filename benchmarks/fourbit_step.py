"""Step time and state bytes of 4-bit states against float32, for SOAP, ECS and Shampoo.

Models: the MLP 784-512-512-10 of issue 15 (batch 256) and the MLP 784-1024-1024-10 of
``benchmarks/optimizer_step.py`` (batch 256). Every optimizer gets the same 16 gradient sets (of
the initial model on random batches), cycled; the optimizers step round-robin, one step each per
round, so that a slower or busier machine moment is shared by all. Timed: ``optimizer.step()``
only. The first 2 steps (initialisation) are untimed; then ``--steps`` timed steps (default 500:
one whole 4-bit cycle, T2 = 500, with its 5 statistics steps and its refresh). Reported per
optimizer: the median step (an ordinary step), the mean (amortised over the cycle), state bytes,
and the ratios to the float32 run of the same optimizer.

Variants: ``full`` (float32 state, the optimizer's defaults), ``4bit`` (the 4-bit Shampoo
paper's schedule, the 4-bit defaults: statistics every 100 steps, bases or roots every 500) and
``4bit-T1=1`` (4-bit state, statistics on every step as before this change, bases or roots
every 500) and ``4bit-short`` (4-bit state on a schedule for short runs: statistics every 5 steps,
bases or roots every 10, docs/benchmarks.md). Shampoo applies its roots from step 2 in every
variant.

Usage: python benchmarks/fourbit_step.py [--steps 500] [--models mlp512 mlp1024]
                                        [--variants full 4bit 4bit-T1=1 4bit-short] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import conditioner

OPTIMIZERS = {
    "SOAP": (conditioner.SOAP, {}),
    "ECS": (conditioner.EigenvalueCorrectedShampoo, {}),
    # preconditioned from the start in every variant (by default 4-bit Shampoo would apply only
    # its grafted method before its first root at step 500, and be timed doing less)
    "Shampoo": (conditioner.Shampoo, dict(start_preconditioning_step=2)),
}
VARIANTS = {
    "full": dict(state_precision="full"),
    "4bit": dict(state_precision="4bit"),
    "4bit-T1=1": dict(state_precision="4bit", statistics_interval=1),
    "4bit-short": dict(state_precision="4bit", statistics_interval=5, precondition_frequency=10),
}
WIDTHS = {"mlp512": 512, "mlp1024": 1024}
GRADIENT_SETS = 16
UNTIMED = 2


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def gradient_sets(model: nn.Module) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    sets = []
    for _ in range(GRADIENT_SETS):
        x = torch.randn(256, 784, generator=generator)
        y = torch.randint(0, 10, (256,), generator=generator)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sets.append([p.grad.detach().clone() for p in model.parameters()])
    return sets


def measure(width: int, steps: int, variants: list[str]) -> list[dict]:
    base = make_model(width)
    grads = gradient_sets(base)
    runs = {}
    for name, (cls, own) in OPTIMIZERS.items():
        for variant in variants:
            options = VARIANTS[variant]
            model = copy.deepcopy(base)
            runs[name, variant] = (model, cls(model.parameters(), lr=1e-3, **own, **options), [])
    for step in range(UNTIMED + steps):
        for model, optimizer, times in runs.values():
            for p, g in zip(model.parameters(), grads[step % GRADIENT_SETS]):
                p.grad = g
            start = time.perf_counter()
            optimizer.step()
            if step >= UNTIMED:
                times.append(time.perf_counter() - start)
    rows = []
    for (name, variant), (_, optimizer, times) in runs.items():
        rows.append(
            dict(
                optimizer=name,
                variant=variant,
                median_ms=1e3 * statistics.median(times),
                mean_ms=1e3 * statistics.fmean(times),
                state_bytes=optimizer.state_bytes(),
            )
        )
    full = {r["optimizer"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        reference = full[r["optimizer"]]
        r["median_ratio"] = r["median_ms"] / reference["median_ms"]
        r["mean_ratio"] = r["mean_ms"] / reference["mean_ms"]
        r["bytes_ratio"] = r["state_bytes"] / reference["state_bytes"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--models", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for model in args.models:
        rows = measure(WIDTHS[model], args.steps, ["full", *(v for v in args.variants if v != "full")])
        results[model] = rows
        print(f"{model}: {args.steps} timed steps, 1 thread")
        print(
            f"{'optimizer':<9} {'variant':<10} {'median ms':>9} {'×f32':>6} {'mean ms':>8} {'×f32':>6} {'state B':>10} {'×f32':>6}"
        )
        for r in rows:
            print(
                f"{r['optimizer']:<9} {r['variant']:<10} {r['median_ms']:9.2f} {r['median_ratio']:6.2f} "
                f"{r['mean_ms']:8.2f} {r['mean_ratio']:6.2f} {r['state_bytes']:10d} {r['bytes_ratio']:6.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "threads": 1, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
