"""The attribution experiments of ``conditioner influence``: a real data set, an MLP, how it is
trained, the queries, and the LDS evaluation of every scoring method on it.

- ``concrete``: UCI Concrete regression (896 training examples), MLP 8-128-128-128-1, measurement
  the negative absolute error (the literature's setting for LDS on Concrete).
- ``digits``: scikit-learn's 8×8 digits (1438 training examples), MLP 64-128-128-10, measurement
  the correct-class margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conditioner.app.data import Dataset, load_dataset
from conditioner.app.models import build_model
from conditioner.app.training import fit
from conditioner.influence.lds import draw_subsets, linear_datamodeling_score, retrain
from conditioner.influence.scores import InfluenceContext, influence, train_batches
from conditioner.influence.task import Task
from conditioner.progress import Progress


@dataclass(frozen=True)
class Experiment:
    """A data set, the model trained on it and how: everything retraining must reproduce."""

    name: str
    dataset: str
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    task: Task

    def configuration(self) -> str:
        """A key that changes whenever a retrained model would."""
        return f"{self.name}:{self.dataset}:{self.hidden}:{self.epochs}:{self.batch_size}:{self.lr}:{self.weight_decay}"


EXPERIMENTS: dict[str, Experiment] = {
    "concrete": Experiment("concrete", "concrete", (128, 128, 128), 100, 128, 3e-3, 1e-4, Task.regression()),
    "digits": Experiment("digits", "digits", (128, 128), 60, 64, 1e-3, 1e-4, Task.classification()),
}


@dataclass
class Prepared:
    """An experiment's data, its trained model, its queries and its curvature context."""

    experiment: Experiment
    dataset: Dataset
    queries: tuple[torch.Tensor, torch.Tensor]
    model: nn.Module
    train_seconds: float

    @property
    def x_train(self) -> torch.Tensor:
        return self.dataset.x_train

    @property
    def y_train(self) -> torch.Tensor:
        return self.dataset.y_train

    def train(self, mask: torch.Tensor | None, seed: int) -> nn.Module:
        """A model initialised with ``seed`` and trained on the examples in ``mask`` (all: None)."""
        experiment = self.experiment
        x = self.x_train if mask is None else self.x_train[mask]
        y = self.y_train if mask is None else self.y_train[mask]
        model = build_model("mlp", self.dataset, seed=seed, hidden=experiment.hidden)
        return fit(model, x, y, experiment.task.loss_function, epochs=experiment.epochs,
                   batch_size=experiment.batch_size, lr=experiment.lr, weight_decay=experiment.weight_decay, seed=seed)


def prepare(experiment: Experiment, queries: int, seed: int = 0) -> Prepared:
    """Load the data (fixed split), pick the first ``queries`` validation examples as queries, and
    train the model that the scores explain (seed ``seed``, all training data)."""
    data = load_dataset(experiment.dataset, seed=0)
    count = min(queries, data.x_val.shape[0])
    prepared = Prepared(experiment, data, (data.x_val[:count], data.y_val[:count]), nn.Identity(), 0.0)
    start = time.perf_counter()
    prepared.model = prepared.train(None, seed)
    prepared.train_seconds = time.perf_counter() - start
    return prepared


def lds_measurements(
    prepared: Prepared, subsets: int, fraction: float, repeats: int, cache_dir: Path, seed: int, progress: Progress | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsets ``(M, N)`` and the queries' measurements ``(M, Q)`` averaged over ``repeats``
    retrained models per subset (cached on disk, resumable)."""
    masks = draw_subsets(prepared.x_train.shape[0], subsets, fraction, seed)
    task = prepared.experiment.task

    def train_and_measure(mask: torch.Tensor, repeat_seed: int) -> torch.Tensor:
        return task.measure(prepared.train(mask, repeat_seed), *prepared.queries)

    key = prepared.experiment.configuration() + f":queries={prepared.queries[0].shape[0]}"
    measurements = retrain(masks, repeats, train_and_measure, cache_dir, key=key, progress=progress)
    return masks, measurements


def score_methods(
    prepared: Prepared,
    methods: list[str],
    damping_ratio: float,
    batch_size: int,
    seed: int,
    progress: Progress | None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Scores of each method; the damping is chosen once (``damping_ratio`` × the mean GGN
    eigenvalue) and shared, and each method builds what it needs itself, inside its own timing."""
    data = train_batches(prepared.x_train, prepared.y_train, batch_size)
    task = prepared.experiment.task
    damping = InfluenceContext(prepared.model, task, data, damping_ratio).damping
    results: dict[str, Any] = {}
    for method in methods:
        context = InfluenceContext(prepared.model, task, data, damping_ratio)
        generator = torch.Generator().manual_seed(seed)
        result = influence(context, prepared.queries, method=method, damping=damping, generator=generator, progress=progress)
        results[method] = result
        if on_result is not None:
            on_result({"method": method, "seconds": result.seconds})
    return damping, results


def evaluate(scores: dict[str, Any], masks: torch.Tensor, measurements: torch.Tensor) -> dict[str, dict[str, Any]]:
    """LDS of every method's scores."""
    table = {}
    for method, result in scores.items():
        lds = linear_datamodeling_score(result.scores, masks, measurements)
        table[method] = {"lds": lds.mean, "lds_per_query": lds.per_query.tolist(), "seconds": result.seconds,
                         "solver_residual": result.solver_residual}
    return table
