"""Aggregates over seeds, and the steps (and wall time) each run needs to reach the reference's
final validation loss.

The reference is ``adamw`` when it ran, else the first optimizer of the plan. For each seed the
target is the reference's final validation loss on that seed; a run reaches it at its first
evaluation whose validation loss is at or below the target (the reference itself reaches it at
its last evaluation at the latest). Diverged and failed runs have no final losses and never
reach the target. Aggregates are over the runs that have the value: mean, sample standard
deviation (0 for one run), min, max and their number ``n``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from conditioner.app.bench.run import RunResult
from conditioner.app.bench.runner import BenchResults

REFERENCE = "adamw"


def steps_to_target(
    steps: Sequence[int], times: Sequence[float], losses: Sequence[float], target: float | None
) -> tuple[int | None, float | None]:
    """``(step, wall time)`` of the first evaluation with ``loss <= target``, or ``(None, None)``."""
    if target is None or not math.isfinite(target):
        return None, None
    for step, time, loss in zip(steps, times, losses):
        if loss is not None and math.isfinite(loss) and loss <= target:
            return step, time
    return None, None


def describe(values: Sequence[float | int | None]) -> dict[str, float] | None:
    """Mean, spread (sample std), min, max and count of the finite values; None if there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def reference_optimizer(results: BenchResults) -> str | None:
    if results.runs.get(REFERENCE):
        return REFERENCE
    return next((name for name in results.optimizers if results.runs.get(name)), None)


def run_targets(results: BenchResults) -> tuple[str | None, dict[int, float]]:
    """The reference optimizer and its final validation loss per seed (finished, finite runs only)."""
    reference = reference_optimizer(results)
    targets = {}
    for run in results.runs.get(reference, []) if reference else []:
        if math.isfinite(run.final_val_loss):
            targets[run.seed] = run.final_val_loss
    return reference, targets


def run_to_target(run: RunResult, targets: dict[int, float]) -> tuple[int | None, float | None]:
    if run.status != "ok":
        return None, None
    c = run.curve
    return steps_to_target(c.step, c.wall_time, c.val_loss, targets.get(run.seed))


def summarize(results: BenchResults) -> dict[str, Any]:
    """Per optimizer: status counts and aggregates of every reported metric over its seeds."""
    reference, targets = run_targets(results)
    optimizers = {}
    for name in results.optimizers:
        runs = results.runs.get(name, [])
        if not runs:
            continue
        reached = [run_to_target(run, targets) for run in runs]
        refreshes = [r.refreshes for r in runs]
        optimizers[name] = {
            "lr": results.lrs.get(name, runs[0].lr),
            "runs": len(runs),
            "ok": sum(r.status == "ok" for r in runs),
            "diverged": sum(r.status == "diverged" for r in runs),
            "failed": sum(r.status == "failed" for r in runs),
            "errors": sorted({r.error for r in runs if r.error}),
            "final_train_loss": describe([r.final_train_loss for r in runs]),
            "final_val_loss": describe([r.final_val_loss for r in runs]),
            "final_val_accuracy": describe([r.final_val_accuracy for r in runs]),
            "steps_to_target": describe([s for s, _ in reached]),
            "time_to_target": describe([t for _, t in reached]),
            "reached_target": sum(s is not None for s, _ in reached),
            "median_step_time": describe([r.median_step_time for r in runs]),
            "state_bytes": describe([r.state_bytes for r in runs]),
            "refreshes": None if all(v is None for v in refreshes) else describe(refreshes),
            "wall_time": describe([r.wall_time for r in runs]),
            "parameters": runs[0].parameters,
        }
    return {"reference": reference, "targets": {str(k): v for k, v in sorted(targets.items())}, "optimizers": optimizers}
