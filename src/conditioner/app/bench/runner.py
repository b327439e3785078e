"""The benchmark's plan: which runs, in which order, on which initialisation and data.

Fairness: for each seed the model is built once after ``torch.manual_seed(seed)`` and every
optimizer trains a deep copy of it; the minibatch order comes from a generator seeded with the
seed (:class:`~conditioner.app.training.BatchOrder`), the same for every optimizer; every run
takes the same number of steps under the same learning-rate schedule. The train/validation split
is the data set's split for seed 0 for every seed, so that validation losses are comparable
across seeds; the seeds vary initialisation and data order.

``--lr-sweep``: each optimizer first trains on seed 0 at its preset learning rate times each
factor of the grid; the rate with the lowest final validation loss (diverged runs excluded) is
kept for the requested seeds. When the best rate is the grid's largest or smallest, the grid
grows past that edge by the ratio of its two outermost factors, up to :data:`EDGE_EXTENSIONS`
times, so that the chosen rate is bracketed rather than clipped. When seed 0 is requested too,
the sweep's run at the chosen rate is reused as the seed-0 run (it is the same computation).

Runs finish one at a time; ``on_update`` is called after each one (the command writes
``results.json`` there), and a ``KeyboardInterrupt`` ends the plan with the finished runs kept
and ``interrupted`` set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conditioner.app.bench.presets import Preset
from conditioner.app.bench.run import RunResult, train_run
from conditioner.app.data import Dataset
from conditioner.app.models import build_model
from conditioner.app.training import evaluate, loss_and_correct

DEFAULT_SWEEP = (1 / 3, 1.0, 3.0)
SWEEP_SEED = 0
EDGE_EXTENSIONS = 2
"""Grid points a sweep may add, one at a time, beyond the edge that holds the best rate."""


def _beyond_edge(losses: dict[float, float]) -> float | None:
    """The next factor past the edge of the grid tried so far (``losses`` by factor) when the
    best finite loss sits on that edge (the same ratio as between the edge and its neighbour),
    else ``None``: the best is bracketed."""
    factors = sorted(losses)
    finite = {f: loss for f, loss in losses.items() if math.isfinite(loss)}
    if len(factors) < 2 or not finite:
        return None
    best = min(finite, key=finite.__getitem__)
    if best == factors[-1]:
        return factors[-1] * factors[-1] / factors[-2]
    if best == factors[0]:
        return factors[0] * factors[0] / factors[1]
    return None


@dataclass
class SweepPoint:
    lr: float
    final_val_loss: float
    status: str


@dataclass
class BenchResults:
    """Everything measured so far: finished runs per optimizer, sweeps, the chosen rates."""

    preset: Preset
    optimizers: list[str]
    seeds: list[int]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    sweeps: dict[str, list[SweepPoint]] = field(default_factory=dict)
    lrs: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    saved_models: list[str] = field(default_factory=list)

    def finished_runs(self) -> int:
        return sum(len(v) for v in self.runs.values())


def prepare_data(dataset: Dataset, preset: Preset) -> Dataset:
    """Cut the data set to what the benchmark uses: language windows cropped to the model's
    context, and the validation part to a fixed subset of ``val_limit`` examples."""
    x_train, y_train, x_val, y_val = dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val
    input_shape = dataset.input_shape
    context = preset.model_kwargs.get("context")
    if dataset.task == "language" and context is not None and x_train.shape[1] > context:
        x_train, y_train = x_train[:, :context], y_train[:, :context]
        x_val, y_val = x_val[:, :context], y_val[:, :context]
        input_shape = (context,)
    if preset.val_limit is not None and len(x_val) > preset.val_limit:
        keep = torch.randperm(len(x_val), generator=torch.Generator().manual_seed(0))[: preset.val_limit].sort().values
        x_val, y_val = x_val[keep], y_val[keep]
    return dataclasses.replace(
        dataset, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, input_shape=tuple(input_shape)
    )


def initial_model(preset: Preset, data: Dataset, seed: int) -> nn.Module:
    """The seed's initialisation: the model built right after ``torch.manual_seed(seed)``."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in preset.model_kwargs.items()}
    return build_model(preset.model, data, seed=seed, **kwargs)


def save_model(path: Path, model: nn.Module, preset: Preset, run: RunResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "preset": preset.name,
            "dataset": preset.dataset,
            "model": preset.model,
            "model_kwargs": preset.model_kwargs,
            "optimizer": run.optimizer,
            "seed": run.seed,
            "lr": run.lr,
            "status": run.status,
        },
        path,
    )


class Runner:
    """Carries out a plan on a prepared data set; see the module docstring for the rules."""

    def __init__(
        self,
        preset: Preset,
        data: Dataset,
        optimizers: list[str],
        seeds: list[int],
        *,
        sweep: tuple[float, ...] | None = None,
        progress: bool = True,
        model_dir: Path | None = None,
        optimizer_options: dict[str, Any] | None = None,
        on_update: Callable[[BenchResults], None] | None = None,
    ) -> None:
        self.preset, self.data = preset, data
        self.sweep = sweep
        self.progress = progress
        self.model_dir = model_dir
        self.optimizer_options = optimizer_options or {}
        self.on_update = on_update or (lambda results: None)
        self.results = BenchResults(preset, list(optimizers), list(seeds))
        self._models: dict[int, nn.Module] = {}

    def _initial(self, seed: int) -> nn.Module:
        if seed not in self._models:
            self._models[seed] = initial_model(self.preset, self.data, seed)
        return self._models[seed]

    def _train(self, optimizer: str, seed: int, lr: float, label: str) -> tuple[RunResult, nn.Module]:
        model = copy.deepcopy(self._initial(seed))
        _, hyperparameters = self.preset.setting(optimizer)
        p = self.preset
        run = train_run(
            model,
            self.data,
            optimizer,
            lr,
            hyperparameters,
            seed=seed,
            steps=p.steps,
            batch_size=p.batch_size,
            eval_every=p.eval_every,
            warmup_fraction=p.warmup_fraction,
            final_lr_fraction=p.final_lr_fraction,
            progress=self.progress,
            label=label,
            optimizer_options=self.optimizer_options,
        )
        if run.status != "ok":
            print(f"conditioner bench: {label}: {run.status}: {run.error}", file=sys.stderr, flush=True)
        return run, model

    def _keep(self, run: RunResult, model: nn.Module) -> None:
        self.results.runs.setdefault(run.optimizer, []).append(run)
        if self.model_dir is not None:
            path = self.model_dir / f"{run.optimizer}-seed{run.seed}.pt"
            save_model(path, model, self.preset, run)
            self.results.saved_models.append(str(path))
        self.on_update(self.results)

    def _sweep(self, optimizer: str) -> tuple[float, tuple[RunResult, nn.Module] | None]:
        """Try each rate of the grid on the sweep seed, extending the grid past an edge that
        holds the best rate (see :data:`EDGE_EXTENSIONS`); return the best rate and its run."""
        base, _ = self.preset.setting(optimizer)
        losses: dict[float, float] = {}
        best: tuple[float, float, tuple[RunResult, nn.Module] | None] = (math.inf, base, None)
        points = self.results.sweeps.setdefault(optimizer, [])
        queue = sorted(self.sweep or ())
        extensions = 0
        while queue:
            factor = queue.pop(0)
            lr = base * factor
            run, model = self._train(optimizer, SWEEP_SEED, lr, f"sweep {optimizer} lr={lr:.3g}")
            points.append(SweepPoint(lr, run.final_val_loss, run.status))
            losses[factor] = run.final_val_loss if run.status == "ok" else math.inf
            if losses[factor] < best[0]:
                best = (losses[factor], lr, (run, model))
            self.on_update(self.results)
            if not queue and extensions < EDGE_EXTENSIONS and (beyond := _beyond_edge(losses)) is not None:
                queue.append(beyond)
                extensions += 1
        return best[1], best[2]

    def _warm_up(self) -> None:
        """One untimed forward and backward pass, so that the first run does not pay torch's
        one-time set-up costs in its wall time."""
        model = copy.deepcopy(self._initial(self.results.seeds[0] if self.results.seeds else SWEEP_SEED))
        size = min(self.preset.batch_size, len(self.data.x_train))
        loss, _ = loss_and_correct(model, self.data.x_train[:size], self.data.y_train[:size])
        loss.backward()
        evaluate(model, self.data.x_val[:size], self.data.y_val[:size])

    def run(self) -> BenchResults:
        """Carry out the plan: sweeps first (if asked), then seed by seed, optimizer by optimizer."""
        reuse: dict[str, tuple[RunResult, nn.Module]] = {}
        try:
            self._warm_up()
            for optimizer in self.results.optimizers:
                if self.sweep:
                    lr, best = self._sweep(optimizer)
                    if best is not None and SWEEP_SEED in self.results.seeds:
                        reuse[optimizer] = best
                else:
                    lr, _ = self.preset.setting(optimizer)
                self.results.lrs[optimizer] = lr
            for seed in self.results.seeds:
                for optimizer in self.results.optimizers:
                    lr = self.results.lrs[optimizer]
                    if seed == SWEEP_SEED and optimizer in reuse:
                        self._keep(*reuse.pop(optimizer))
                        continue
                    self._keep(*self._train(optimizer, seed, lr, f"{optimizer} seed {seed}"))
                self._models.pop(seed, None)
        except KeyboardInterrupt:
            self.results.interrupted = True
        return self.results
