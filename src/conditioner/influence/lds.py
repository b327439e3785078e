"""The linear datamodeling score (LDS): how well attribution scores predict retraining.

Draw ``M`` random subsets ``S_j`` of the training set, each a fraction ``α`` of it
(:func:`draw_subsets`); train ``R`` models on each and average a measurement of every query
(:func:`retrain`); then, for each query ``q``, rank-correlate the predicted group effects
``Σ_{i ∈ S_j} scores[q, i]`` with the measurements across ``j``
(:func:`linear_datamodeling_score`). See docs/algorithms.md §8.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from conditioner.progress import Progress, check_progress, tracked

TrainAndMeasure = Callable[[torch.Tensor, int], torch.Tensor]
TrainAndMeasureMany = Callable[[torch.Tensor, list[int]], torch.Tensor]


def draw_subsets(num_train: int, count: int, fraction: float, seed: int) -> torch.Tensor:
    """``count`` random subsets of ``num_train`` examples as a bool mask ``(count, num_train)``;
    each holds exactly ``round(fraction * num_train)`` examples (Python's rounding, half to even),
    drawn without replacement from a generator seeded by ``seed``."""
    if num_train < 2:
        raise ValueError(f"num_train must be at least 2, got {num_train}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    size = round(fraction * num_train)
    if not 0 < size < num_train:
        raise ValueError(
            f"fraction {fraction} of num_train {num_train} rounds to {size} examples; it must keep some and leave some"
        )
    generator = torch.Generator().manual_seed(seed)
    subsets = torch.zeros(count, num_train, dtype=torch.bool)
    for row in subsets:
        row[torch.randperm(num_train, generator=generator)[:size]] = True
    return subsets


def subsets_fingerprint(subsets: torch.Tensor) -> str:
    """A hex digest that changes whenever the shape or any entry of the mask ``subsets`` does."""
    digest = hashlib.sha256(repr(tuple(subsets.shape)).encode())
    digest.update(bytes(subsets.to(torch.uint8).flatten().tolist()))
    return digest.hexdigest()


def _cache_folder(cache_dir: str | os.PathLike[str], subsets: torch.Tensor, key: str) -> Path:
    """The folder of this configuration's results, named by a digest of the subsets and ``key``."""
    digest = hashlib.sha256(f"{subsets_fingerprint(subsets)}\n{key}".encode()).hexdigest()[:24]
    folder = Path(cache_dir) / f"lds-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    about = folder / "config.json"
    if not about.exists():  # for people browsing the cache; never read back
        _atomic_write(about, json.dumps({"key": key, "subsets": list(subsets.shape)}).encode())
    return folder


def _result_path(folder: Path, subset: int, repeat: int) -> Path:
    return folder / f"subset{subset:05d}-repeat{repeat:04d}.pt"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it: readers never see half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _load(path: Path) -> torch.Tensor | None:
    """The cached measurement at ``path``, or None when absent or unreadable (then recomputed)."""
    if not path.exists():
        return None
    try:
        value = torch.load(path, weights_only=True)
    except Exception as error:  # a damaged cache file is recomputed, never trusted
        warnings.warn(f"ignoring unreadable cached LDS result {path} ({error})", stacklevel=3)
        return None
    if not isinstance(value, torch.Tensor) or value.ndim != 1:
        warnings.warn(f"ignoring unreadable cached LDS result {path} (not a 1-D tensor)", stacklevel=3)
        return None
    return value


def _check_lengths(lengths: set[int]) -> None:
    if len(lengths) > 1:
        raise ValueError(f"train_and_measure returned measurements of different lengths {sorted(lengths)}")


def retrain(
    subsets: torch.Tensor,
    repeats: int,
    train_and_measure: TrainAndMeasure | TrainAndMeasureMany,
    cache_dir: str | os.PathLike[str],
    *,
    key: str,
    progress: Progress | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Measurements ``(M, Q)`` of the queries after training on each subset, averaged over repeats.

    ``train_and_measure(mask, seed)`` trains a fresh model on the examples where the bool ``mask``
    ``(N,)`` is true and returns the ``Q`` query measurements ``(Q,)``. Repeat ``r`` passes
    ``seed = r`` for every subset, so subsets differ by their data and not by their random seeds.

    Every (subset, repeat) result is saved in ``cache_dir`` as soon as it is computed, under a
    folder named by a fingerprint of ``subsets`` and ``key``: describe in ``key`` everything else
    that changes the result (model, training settings, queries, measurement) so that a changed
    configuration never reuses old results. An interrupted run resumes where it stopped, and more
    repeats reuse the ones already computed.

    ``batch``: train up to that many models per call instead: ``train_and_measure(masks, seeds)``
    takes the masks ``(T, N)`` and seeds (``T`` ints) of ``T`` missing (subset, repeat) pairs and
    returns their measurements ``(T, Q)`` (vmapped training, say); each is cached as above.
    """
    if subsets.dtype != torch.bool or subsets.ndim != 2:
        raise ValueError(f"subsets must be a bool mask (M, N), got {subsets.dtype} of shape {tuple(subsets.shape)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    progress = check_progress(progress)
    subsets = subsets.cpu()
    folder = _cache_folder(cache_dir, subsets, key)
    tasks = [(j, r) for j in range(len(subsets)) for r in range(repeats)]
    results = {task: _load(_result_path(folder, *task)) for task in tasks}
    missing = [task for task in tasks if results[task] is None]
    lengths = {len(result) for result in results.values() if result is not None}
    _check_lengths(lengths)
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    size = 1 if batch is None else batch
    groups = [missing[i : i + size] for i in range(0, len(missing), size)]
    for group in tracked(groups, progress, "LDS retraining"):
        if batch is None:
            (j, r), = group
            outputs = [torch.as_tensor(train_and_measure(subsets[j].clone(), r)).detach().cpu()]  # type: ignore[call-arg]
        else:
            masks = torch.stack([subsets[j] for j, _ in group]).clone()
            many = torch.as_tensor(train_and_measure(masks, [r for _, r in group])).detach().cpu()  # type: ignore[arg-type]
            if many.ndim != 2 or many.shape[0] != len(group):
                raise ValueError(f"train_and_measure must return a tensor ({len(group)}, Q), got shape {tuple(many.shape)}")
            outputs = list(many)
        for task, measured in zip(group, outputs):
            if measured.ndim != 1:
                raise ValueError(f"train_and_measure must return a 1-D tensor (Q,), got shape {tuple(measured.shape)}")
            lengths.add(len(measured))
            _check_lengths(lengths)  # before saving: a wrong length must not enter the cache
            buffer = io.BytesIO()
            torch.save(measured.clone(), buffer)  # clone: save the values, not a larger storage
            _atomic_write(_result_path(folder, *task), buffer.getvalue())
            results[task] = measured
    stacked = torch.stack([results[task].double() for task in tasks])
    return stacked.reshape(len(subsets), repeats, -1).mean(1)


@dataclass(frozen=True)
class LDSResult:
    """``mean``: the LDS averaged over the queries with a defined correlation; ``per_query``:
    each query's Spearman correlation ``(Q,)``, NaN where predictions or measurements are constant."""

    mean: float
    per_query: torch.Tensor


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 of ``values`` (M, Q), float64; tied values share their average rank."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    for q in range(values.shape[1]):
        _, inverse, counts = torch.unique(values[:, q], return_inverse=True, return_counts=True)
        last = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
        ranks[:, q] = (last - (counts.double() - 1) / 2)[inverse]
    return ranks


def linear_datamodeling_score(scores: torch.Tensor, subsets: torch.Tensor, measurements: torch.Tensor) -> LDSResult:
    """The LDS of attribution ``scores`` ``(Q, N)`` (query ``q``, training example ``i``) against the
    ``measurements`` ``(M, Q)`` of models trained on the bool ``subsets`` ``(M, N)``.

    The predicted group effect of subset ``j`` on query ``q`` is ``Σ_{i ∈ S_j} scores[q, i]``; the
    LDS of a query is the Spearman rank correlation of predictions and measurements across the
    subsets (ties get average ranks). Queries whose predictions or measurements are constant have
    no correlation: NaN, left out of the mean with a warning.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (Q, N), got shape {tuple(scores.shape)}")
    if subsets.ndim != 2 or subsets.shape[1] != scores.shape[1]:
        raise ValueError(f"subsets must be (M, N) with N = {scores.shape[1]} as in scores, got {tuple(subsets.shape)}")
    if subsets.shape[0] < 2:
        raise ValueError(f"subsets must hold at least 2 subsets to correlate over, got {subsets.shape[0]}")
    if measurements.shape != (subsets.shape[0], scores.shape[0]):
        raise ValueError(
            f"measurements must be (M, Q) = {(subsets.shape[0], scores.shape[0])}, got {tuple(measurements.shape)}"
        )
    predicted = subsets.double() @ scores.detach().double().T  # (M, Q)
    a = _average_ranks(predicted.cpu())
    b = _average_ranks(measurements.detach().double().cpu())
    a = a - a.mean(0)
    b = b - b.mean(0)
    denominator = (a.square().sum(0) * b.square().sum(0)).sqrt()
    per_query = torch.where(denominator > 0, (a * b).sum(0) / denominator, torch.nan)
    defined = ~per_query.isnan()
    if not defined.all():
        warnings.warn(
            f"{int((~defined).sum())} of {len(per_query)} queries have constant predictions or measurements "
            f"across the subsets; their LDS is NaN and left out of the mean",
            stacklevel=2,
        )
    mean = per_query[defined].mean().item() if defined.any() else math.nan
    return LDSResult(mean, per_query)
