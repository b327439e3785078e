"""Validation loss against steps and against wall time: one line per optimizer, the mean over
seeds, shaded between the seeds' minimum and maximum (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from conditioner.app.bench.optimizers import OPTIMIZERS, PEERS
from conditioner.app.bench.runner import BenchResults

PLOTS = {"steps": "val_loss_vs_steps.png", "time": "val_loss_vs_time.png"}


def _band(runs: list, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean / min / max validation loss at each evaluation index, over the runs that got there."""
    length = max(len(r.curve.step) for r in runs)
    xs, ys = np.full((len(runs), length), np.nan), np.full((len(runs), length), np.nan)
    for i, run in enumerate(runs):
        n = len(run.curve.step)
        xs[i, :n] = run.curve.step if axis == "steps" else run.curve.wall_time
        ys[i, :n] = run.curve.val_loss
    ys[~np.isfinite(ys)] = np.nan
    with warnings.catch_warnings():  # an index no finite run reached: all-NaN column, NaN result
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(xs, 0), np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def _style(name: str, index: int) -> tuple[str, str]:
    """A colour fixed per optimizer name (the same in every plot), dashed for peers."""
    names = list(OPTIMIZERS)
    position = names.index(name) if name in names else len(names) + index
    color = f"C{position}" if position < 10 else ("black", "olive", "navy", "maroon")[(position - 10) % 4]
    return color, "--" if name in PEERS else "-"


def plot_curves(results: BenchResults, out: Path) -> dict[str, str]:
    """Write the two PNGs into ``out``; return their file names by axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = {}
    title = f"{results.preset.name}: {results.preset.dataset}, {results.preset.model}"
    for axis, filename in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for index, name in enumerate(results.optimizers):
            runs = [r for r in results.runs.get(name, []) if r.curve.step]
            if not runs:
                continue
            x, mean, low, high = _band(runs, axis)
            color, style = _style(name, index)
            diverged = sum(r.status != "ok" for r in runs)
            label = name + (f" ({diverged}/{len(runs)} diverged)" if diverged else "")
            ax.plot(x, mean, color=color, ls=style, label=label, lw=1.6)
            if len(runs) > 1:
                ax.fill_between(x, low, high, color=color, alpha=0.18, lw=0)
        ax.set_xlabel("step" if axis == "steps" else "wall time, s (training only)")
        ax.set_ylabel("validation loss" + (" per character" if results.preset.model == "gpt" else ""))
        ax.set_yscale("log")
        seeds = len(results.seeds)
        ax.set_title(f"{title}; mean over {seeds} seed{'s' * (seeds > 1)}" + (", band min–max" if seeds > 1 else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename)
        plt.close(fig)
        written[axis] = filename
    return written
