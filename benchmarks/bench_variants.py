"""Bench runs of optimizer variants that the registry does not name, side by side.

Each VARIANT is ``NAME:LR`` or ``NAME:LR:JSON``: a registry optimizer (``conditioner bench
--list``) at learning rate LR with the JSON object's hyperparameters laid over the preset's
(for example ``ecshampoo-adaptive:0.003:{"tolerance": 0.3}`` or
``ecshampoo:0.003:{"one_sided_above": 512}``). Every variant trains the preset's model from the
same initialisation on the same data order as ``conditioner bench`` does, one variant after the
other in one process. Prints one JSON line per run (final validation loss, eigendecompositions,
training seconds, and the steps and seconds to reach AdamW's final validation loss when
``adamw`` is among the variants), then the mean over seeds per variant.

Usage: python benchmarks/bench_variants.py VARIANT [VARIANT ...] [--preset fashion-mlp] [--seeds 0 1 2]
           [--steps N] [--threads 1] [--json FILE]   (the variants first: --seeds takes several values)
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from conditioner.app.bench.presets import PRESETS, Preset
from conditioner.app.bench.runner import Runner, prepare_data
from conditioner.app.bench.summary import steps_to_target
from conditioner.app.data import load_dataset


def parse_variant(text: str) -> tuple[str, float, dict[str, Any]]:
    name, lr, *rest = text.split(":", 2)
    return name, float(lr), json.loads(rest[0]) if rest else {}


def run_variant(preset: Preset, data: Any, variant: str, seeds: list[int]) -> list[dict[str, Any]]:
    name, lr, extra = parse_variant(variant)
    settings = {**preset.settings, name: {**preset.settings.get(name, {}), "lr": lr, **extra}}
    results = Runner(preset.replace(settings=settings), data, [name], seeds, progress=False).run()
    return [
        {
            "variant": variant,
            "seed": run.seed,
            "final_val_loss": run.final_val_loss,
            "refreshes": run.refreshes,
            "train_seconds": run.wall_time,
            "median_step_ms": 1e3 * run.median_step_time if run.median_step_time is not None else None,
            "curve": {"step": run.curve.step, "wall_time": run.curve.wall_time, "val_loss": run.curve.val_loss},
        }
        for run in results.runs[name]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", metavar="VARIANT")
    parser.add_argument("--preset", default="fashion-mlp", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write all runs, with their curves, to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = PRESETS[args.preset]
    preset = base.replace(seeds=tuple(args.seeds), steps=args.steps or base.steps)
    data = prepare_data(load_dataset(preset.dataset, seed=0), preset)
    runs = [run for variant in args.variants for run in run_variant(preset, data, variant, args.seeds)]
    targets = {r["seed"]: r["final_val_loss"] for r in runs if r["variant"].split(":")[0] == "adamw"}
    for run in runs:
        c = run["curve"]
        run["steps_to_ref"], run["secs_to_ref"] = steps_to_target(c["step"], c["wall_time"], c["val_loss"], targets.get(run["seed"]))
        print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        loss = statistics.fmean(r["final_val_loss"] for r in mine)
        refreshes = [r["refreshes"] for r in mine if r["refreshes"] is not None]
        reached = [(r["steps_to_ref"], r["secs_to_ref"]) for r in mine if r["steps_to_ref"] is not None]
        to_ref = ""
        if targets:
            to_ref = ", never reaches adamw's final loss"
            if reached:
                steps, secs = (statistics.fmean(x) for x in zip(*reached))
                to_ref = f", adamw's final loss in {steps:.0f} steps / {secs:.1f} s ({len(reached)}/{len(mine)} runs)"
        eigh = f", eigendecompositions {statistics.fmean(refreshes):.0f}" if refreshes else ""
        print(f"{variant}: final val loss {loss:.4f}{eigh}{to_ref} (mean of {len(mine)})")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"preset": args.preset, "runs": runs}, file, indent=1)


if __name__ == "__main__":
    main()
