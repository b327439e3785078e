"""Eigendecompositions and final validation loss of the adaptive refresh against a fixed frequency.

Trains a bench preset with eigenvalue-corrected Shampoo, once with the fixed refresh (every
``precondition_frequency`` steps, every factor) and once per staleness tolerance τ with the
adaptive refresh (at the same steps, only the factors whose ρ exceeds τ), on the same seeds,
initialisations and data order as ``conditioner bench``. Prints one JSON line per run: seed,
tolerance (0 for the fixed refresh), learning rate, final validation loss, eigendecompositions
and the validation curve; then a summary per tolerance (mean over seeds).

Usage: python benchmarks/adaptive_refresh.py [--preset fashion-mlp] [--lr 0.003]
           [--tolerances 0 0.1 0.2 0.3 0.5] [--seeds 0] [--steps N] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from conditioner.bench.presets import PRESETS
from conditioner.bench.runner import Runner, prepare_data
from conditioner.data import load_dataset


def _runs(preset_name: str, lr: float, tolerance: float, seeds: list[int], steps: int | None) -> list[dict]:
    base = PRESETS[preset_name]
    name = "ecshampoo-adaptive" if tolerance > 0 else "ecshampoo"
    setting = {"lr": lr, "tolerance": tolerance} if tolerance > 0 else {"lr": lr}
    preset = base.replace(settings={**base.settings, name: setting}, seeds=tuple(seeds), steps=steps or base.steps)
    data = prepare_data(load_dataset(preset.dataset, seed=0), preset)
    results = Runner(preset, data, [name], seeds, progress=False).run()
    return [
        {
            "seed": run.seed,
            "tolerance": tolerance,
            "lr": lr,
            "final_val_loss": run.final_val_loss,
            "refreshes": run.refreshes,
            "train_seconds": run.wall_time,
            "val_loss": [round(v, 4) for v in run.curve.val_loss],
        }
        for run in results.runs[name]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-mlp", choices=sorted(PRESETS))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write all runs to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for tolerance in args.tolerances:
        for run in _runs(args.preset, args.lr, tolerance, args.seeds, args.steps):
            print(json.dumps(run), flush=True)
            runs.append(run)
    for tolerance in args.tolerances:
        mine = [r for r in runs if r["tolerance"] == tolerance]
        loss = statistics.fmean(r["final_val_loss"] for r in mine)
        refreshes = statistics.fmean(r["refreshes"] for r in mine)
        print(f"tolerance {tolerance:g}: final val loss {loss:.4f}, eigendecompositions {refreshes:.0f} (mean of {len(mine)})")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"preset": args.preset, "lr": args.lr, "runs": runs}, file, indent=1)


if __name__ == "__main__":
    main()
