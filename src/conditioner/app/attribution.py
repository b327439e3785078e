"""The attribution experiments of ``conditioner influence``: a real data set, an MLP, how it is
trained, the queries, and the LDS evaluation of every scoring method on it.

- ``concrete``: UCI Concrete regression (896 training examples), MLP 8-128-128-128-1, measurement
  the negative absolute error (the literature's setting for LDS on Concrete).
- ``digits``: scikit-learn's 8×8 digits (1438 training examples), MLP 64-128-128-10, measurement
  the correct-class margin.
- ``bhm``: the setting of "Better Hessians Matter" (Hong et al. 2025): the 8×8 digits with 10%
  held out (1617 training examples), MLP 64-64-32-10 with GELU (6.6k parameters), measurement the
  query loss (as its negative), LDS at α ∈ {0.3, 0.5, 0.7, 0.9}; it compares curvatures rather than
  solvers (:func:`curvature_study`), each at the damping its LDS on separate validation queries
  prefers.

Retraining is batched (:func:`~conditioner.app.training.fit_many`: many models per vmapped step),
and cached per model as :func:`~conditioner.influence.lds.retrain` does.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from conditioner import EigenvalueCorrectedShampoo
from conditioner.app.data import Dataset, load_dataset
from conditioner.app.models import build_model
from conditioner.app.training import fit, fit_many
from conditioner.curvature import Hessian
from conditioner.influence.lds import draw_subsets, linear_datamodeling_score, retrain
from conditioner.influence.optimizer_curvature import OptimizerCurvature
from conditioner.influence.scores import InfluenceContext, flat_gradients, influence, train_batches
from conditioner.influence.task import Task
from conditioner.progress import Progress, tracked
from conditioner.solvers import solve

RETRAIN_BATCH = 500  # models trained per vmapped call


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
    activation: str = "relu"
    val_fraction: float | None = None
    fractions: tuple[float, ...] = ()  # a curvature study's LDS fractions α; empty: a solver comparison

    def configuration(self) -> str:
        """A key that changes whenever a retrained model would."""
        key = f"{self.name}:{self.dataset}:{self.hidden}:{self.epochs}:{self.batch_size}:{self.lr}:{self.weight_decay}"
        if self.activation != "relu" or self.val_fraction is not None:
            key += f":{self.activation}:{self.val_fraction}:{self.task.measurement}"
        return key

    def load(self) -> Dataset:
        options = {} if self.val_fraction is None else {"val_fraction": self.val_fraction}
        return load_dataset(self.dataset, seed=0, **options)


EXPERIMENTS: dict[str, Experiment] = {
    "concrete": Experiment("concrete", "concrete", (128, 128, 128), 100, 128, 3e-3, 1e-4, Task.regression()),
    "digits": Experiment("digits", "digits", (128, 128), 60, 64, 1e-3, 1e-4, Task.classification()),
    # Better Hessians Matter trains with lr 0.01 and batch 32 for up to 100 epochs; 10 epochs of
    # batch 64 keep 40,000 retrainings within the 30-minute budget (validation accuracy ≈ 97%).
    "bhm": Experiment("bhm", "digits", (64, 32), 10, 64, 1e-2, 1e-4, Task(nn.CrossEntropyLoss(), "negative_loss"),
                      activation="gelu", val_fraction=0.1, fractions=(0.3, 0.5, 0.7, 0.9)),
}


@dataclass
class Prepared:
    """An experiment's data, its trained model, its queries and its curvature context."""

    experiment: Experiment
    dataset: Dataset
    queries: tuple[torch.Tensor, torch.Tensor]
    model: nn.Module
    train_seconds: float
    #: eigenvalue-corrected Shampoo with lr 0 that saw every gradient of the model's training
    observer: torch.optim.Optimizer | None = None

    @property
    def x_train(self) -> torch.Tensor:
        return self.dataset.x_train

    @property
    def y_train(self) -> torch.Tensor:
        return self.dataset.y_train

    def build(self, seed: int) -> nn.Module:
        """The experiment's untrained model, initialised with ``seed``."""
        return build_model("mlp", self.dataset, seed=seed, hidden=self.experiment.hidden, activation=self.experiment.activation)

    def train(
        self, mask: torch.Tensor | None, seed: int, model: nn.Module | None = None,
        observer: torch.optim.Optimizer | None = None,
    ) -> nn.Module:
        """A model initialised with ``seed`` (or ``model``, built so) and trained on the examples in
        ``mask`` (all: None), ``observer`` stepping beside it (:func:`fit`)."""
        experiment = self.experiment
        x = self.x_train if mask is None else self.x_train[mask]
        y = self.y_train if mask is None else self.y_train[mask]
        return fit(self.build(seed) if model is None else model, x, y, experiment.task.loss_function,
                   epochs=experiment.epochs, batch_size=experiment.batch_size, lr=experiment.lr,
                   weight_decay=experiment.weight_decay, seed=seed, observer=observer)

    def train_and_measure_many(self, masks: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """The queries' measurements ``(T, Q)`` of ``T`` models, model ``t`` trained as
        ``train(masks[t], seeds[t])`` would train it, all at once (:func:`fit_many`)."""
        experiment = self.experiment
        params = fit_many([self.build(seed) for seed in seeds], self.x_train, self.y_train, masks, seeds,
                          experiment.task.loss_function, epochs=experiment.epochs, batch_size=experiment.batch_size,
                          lr=experiment.lr, weight_decay=experiment.weight_decay)
        base = self.build(0).eval()
        inputs, targets = self.queries
        with torch.no_grad():
            outputs = vmap(lambda p: functional_call(base, p, (inputs,)))(params)
        task = experiment.task
        return torch.stack([task.measure_rows(*task.spec.rows(out, targets)).reshape(len(inputs), -1).sum(1) for out in outputs])


def prepare(experiment: Experiment, queries: int, seed: int = 0) -> Prepared:
    """Load the data (fixed split), pick the first ``queries`` validation examples as queries, and
    train the model that the scores explain (seed ``seed``, all training data)."""
    data = experiment.load()
    count = min(queries, data.x_val.shape[0])
    prepared = Prepared(experiment, data, (data.x_val[:count], data.y_val[:count]), nn.Identity(), 0.0)
    start = time.perf_counter()
    model = prepared.build(seed)
    prepared.observer = EigenvalueCorrectedShampoo(model.parameters(), lr=0.0)
    prepared.model = prepared.train(None, seed, model, prepared.observer)
    prepared.train_seconds = time.perf_counter() - start
    return prepared


def lds_measurements(
    prepared: Prepared, subsets: int, fraction: float, repeats: int, cache_dir: Path, seed: int, progress: Progress | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsets ``(M, N)`` and the queries' measurements ``(M, Q)`` averaged over ``repeats``
    retrained models per subset (cached on disk, resumable)."""
    masks = draw_subsets(prepared.x_train.shape[0], subsets, fraction, seed)
    key = prepared.experiment.configuration() + f":queries={prepared.queries[0].shape[0]}"
    measurements = retrain(masks, repeats, prepared.train_and_measure_many, cache_dir, key=key, progress=progress,
                           batch=RETRAIN_BATCH)
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


CURVATURES = ("hessian", "ggn", "block_ggn", "ekfac", "kfac", "ecs_state", "gradient", "cg", "astra")
DAMPING_RATIOS = tuple(10.0 ** (k / 2) for k in range(-8, 5))  # 1e-4 … 1e2 × the GGN's mean eigenvalue
ITERATIVE_RATIOS = (1e-2, 1e-1, 1.0, 10.0)  # CG and ASTRA: one solve per damping, so a coarser grid


@dataclass
class Spectral:
    """A symmetric matrix as ``U diag(λ) Uᵀ`` with the gradients already in its basis: every
    damped inverse is then a rescaling."""

    eigenvalues: torch.Tensor
    queries: torch.Tensor  # Uᵀ ∇f, (P, Q)
    train: torch.Tensor  # Uᵀ ∇ℓ, (P, N)

    def scores(self, damping: float) -> torch.Tensor:
        return -(self.queries / (self.eigenvalues + damping)[:, None]).T @ self.train


def _spectral(matrix: torch.Tensor, queries: torch.Tensor, train: torch.Tensor) -> Spectral:
    eigenvalues, basis = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return Spectral(eigenvalues, basis.T @ queries, basis.T @ train)


def _block_spectral(matrix: torch.Tensor, sizes: list[int], queries: torch.Tensor, train: torch.Tensor) -> Spectral:
    """The block-diagonal part of ``matrix`` (blocks of ``sizes``), one ``eigh`` per block."""
    parts, start = [], 0
    for size in sizes:
        block = slice(start, start + size)
        parts.append(_spectral(matrix[block, block], queries[block], train[block]))
        start += size
    return Spectral(*(torch.cat([getattr(part, name) for part in parts]) for name in ("eigenvalues", "queries", "train")))


def _summary(per_query: torch.Tensor) -> dict[str, float]:
    """Mean and standard error over the queries with a defined LDS."""
    values = per_query[~per_query.isnan()]
    error = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return {"mean": float(values.mean()), "se": error}


def curvature_study(
    prepared: Prepared,
    validation: int,
    subsets: int,
    repeats: int,
    cache_dir: Path,
    seed: int,
    curvatures: tuple[str, ...] = CURVATURES,
    iterative_ratios: tuple[float, ...] | None = ITERATIVE_RATIOS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Better Hessians Matter's comparison: LDS of influence scores under each curvature.

    The first ``validation`` queries choose each curvature's damping (the grid's best mean LDS over
    the fractions α); the rest are the evaluation queries. Every curvature is formed in float64 on
    the trained model: the exact Hessian, the GGN and its per-layer blocks as dense matrices
    (``to_dense()``, one ``eigh`` each, then every damping is a rescaling), K-FAC and EK-FAC, the
    state of the eigenvalue-corrected Shampoo that watched the training (``ecs_state``, its damping
    relative to its own mean eigenvalue), the
    gradient dot product, and CG (EK-FAC preconditioned) and ASTRA on the exact GGN, at each of
    ``iterative_ratios`` (None: only at the damping chosen for the exact GGN). Returns the
    settings, timings, the damping grid's validation LDS, and per curvature the evaluation LDS (mean
    and standard error over queries, per α and averaged over α) and the paired differences."""
    experiment = prepared.experiment
    started = time.perf_counter()
    count = prepared.queries[0].shape[0]
    if not 0 < validation < count:
        raise ValueError(f"validation: must leave evaluation queries among the {count} queries, got {validation}")
    measured = {}
    for index, fraction in enumerate(experiment.fractions):
        masks, values = lds_measurements(prepared, subsets, fraction, repeats, cache_dir, seed + index, progress)
        measured[fraction] = (masks, values)
    retrain_seconds = time.perf_counter() - started

    model = copy.deepcopy(prepared.model).double()
    data = train_batches(prepared.x_train.double(), prepared.y_train, 256)
    context = InfluenceContext(model, experiment.task, data)
    queries = flat_gradients(context, prepared.queries[0].double(), prepared.queries[1], measurement=True)
    train = flat_gradients(context, prepared.x_train.double(), prepared.y_train, measurement=False)
    timings: dict[str, float] = {}
    spectra: dict[str, Spectral] = {}
    clock = time.perf_counter()
    ggn = context.ggn.to_dense()
    mean_eigenvalue = float(ggn.diagonal().mean())
    if "ggn" in curvatures or "block_ggn" in curvatures:
        spectra["ggn"] = _spectral(ggn, queries, train)
        timings["ggn"] = time.perf_counter() - clock
    if "block_ggn" in curvatures:
        clock = time.perf_counter()
        sizes = [sum(p.numel() for p in layer.params) for layer in context.layers]
        spectra["block_ggn"] = _block_spectral(ggn, sizes, queries, train)
        timings["block_ggn"] = time.perf_counter() - clock
    del ggn
    if "hessian" in curvatures:
        clock = time.perf_counter()
        spectra["hessian"] = _spectral(Hessian(model, experiment.task.loss_function, data, context.params).to_dense(), queries, train)
        timings["hessian"] = time.perf_counter() - clock
    negative = int((spectra["hessian"].eigenvalues < 0).sum()) if "hessian" in spectra else None

    if "ecs_state" in curvatures:
        if prepared.observer is None:
            raise ValueError("curvatures: 'ecs_state' needs the optimizer that observed the model's training")
        original = dict(prepared.model.named_parameters())
        names = {id(p): name for name, p in model.named_parameters()}
        optimizer_curvature = OptimizerCurvature(prepared.observer, [original[names[id(p)]] for p in context.params])
        own_mean = optimizer_curvature.mean_eigenvalue

    def evaluate_scores(scores: torch.Tensor) -> dict[float, torch.Tensor]:
        return {fraction: linear_datamodeling_score(scores, masks, values).per_query for fraction, (masks, values) in measured.items()}

    rows: dict[str, dict[str, Any]] = {}
    for name in tracked(curvatures, progress, "curvatures"):
        if name == "gradient":
            ratios: tuple[float | None, ...] = (None,)
        elif name in ("cg", "astra"):
            if iterative_ratios is None and "ggn" in rows:
                ratios = (rows["ggn"]["damping_ratio"],)
            else:
                ratios = iterative_ratios or ITERATIVE_RATIOS
        else:
            ratios = DAMPING_RATIOS
        candidates = []
        clock = time.perf_counter()
        for ratio in ratios:
            damping = 0.0 if ratio is None else ratio * (own_mean if name == "ecs_state" else mean_eigenvalue)
            notes: list[str] = []
            if name == "ecs_state":
                scores = -optimizer_curvature.inverse_matmat(queries, damping).T @ train
            elif name in spectra:
                scores = spectra[name].scores(damping)
            elif name == "gradient":
                scores = -queries.T @ train
            elif name in ("kfac", "ekfac"):
                scores = -context.kronecker(name).inverse(damping).matmat(queries).T @ train
            else:
                result = solve(context.ggn, queries, damping, method=name, preconditioner=context.kronecker("ekfac"),
                               generator=torch.Generator().manual_seed(seed))
                scores, notes = -result.solution.T @ train, result.warnings
            per_query = evaluate_scores(scores)
            stacked = torch.stack(list(per_query.values()))  # (fractions, Q)
            chosen = stacked[:, :validation].nanmean()
            candidates.append((float(chosen), ratio, damping, stacked[:, validation:], notes))
        seconds = time.perf_counter() - clock + timings.get(name, 0.0)
        best = max(candidates, key=lambda c: c[0] if not math.isnan(c[0]) else -math.inf)
        _, ratio, damping, evaluation, notes = best
        rows[name] = {
            "damping": damping,
            "damping_ratio": ratio,
            "validation_lds": {str(c[1]): c[0] for c in candidates},
            "lds": _summary(evaluation.nanmean(0)),
            "lds_per_fraction": {str(f): _summary(evaluation[i]) for i, f in enumerate(measured)},
            "lds_per_query": evaluation.nanmean(0).tolist(),
            "seconds": seconds,
            "solver_warnings": notes,
        }
    paired = {}
    for a in rows:
        for b in rows:
            if a != b:
                difference = torch.tensor(rows[a]["lds_per_query"]) - torch.tensor(rows[b]["lds_per_query"])
                paired[f"{a}-{b}"] = _summary(difference)
    return {
        "train_examples": prepared.x_train.shape[0],
        "parameters": context.ggn.dim,
        "validation_queries": validation,
        "evaluation_queries": count - validation,
        "fractions": list(experiment.fractions),
        "subsets": subsets,
        "repeats": repeats,
        "mean_ggn_eigenvalue": mean_eigenvalue,
        "hessian_negative_eigenvalues": negative,
        "retrain_seconds": retrain_seconds,
        "seconds": time.perf_counter() - started,
        "curvatures": rows,
        "paired": paired,
    }
