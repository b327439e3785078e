"""``progress``: the library reports progress through a callable the user hands over, or not at all."""

from __future__ import annotations

import pytest
import torch
from cases import random_classification, tanh_mlp

from conditioner.curvature import EKFAC
from conditioner.influence import InfluenceContext, Task, draw_subsets, influence, retrain
from conditioner.influence.scores import train_batches


class Recorder:
    """A progress callable in tqdm's form: wraps the iterable, remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, iterable, desc=None, total=None):
        call = {"desc": desc, "total": total, "items": 0}
        self.calls.append(call)
        for item in iterable:
            call["items"] += 1
            yield item


def _problem():
    x, y = random_classification(24, 4, 3, torch.Generator().manual_seed(0))
    return tanh_mlp((4, 5, 3), seed=0, dtype=torch.float64), train_batches(x, y, 8)


def test_curvature_and_influence_report_each_pass_over_the_data():
    model, data = _problem()
    recorder = Recorder()
    EKFAC(model, torch.nn.CrossEntropyLoss(), data, progress=recorder)
    assert len(recorder.calls) == 2 and all(call["items"] == len(data) for call in recorder.calls)
    silent = EKFAC(model, torch.nn.CrossEntropyLoss(), data)
    assert silent.progress is None
    recorder = Recorder()
    context = InfluenceContext(model, Task.classification(), data)
    influence(context, (data[0][0][:2], data[0][1][:2]), method="gradient", progress=recorder)
    assert [(call["desc"], call["items"]) for call in recorder.calls] == [("gradient scores", len(data))]


def test_retraining_reports_each_model_it_trains(tmp_path):
    subsets = draw_subsets(6, 2, 0.5, seed=0)
    recorder = Recorder()
    retrain(subsets, 2, lambda mask, seed: mask.double()[:3] + seed, tmp_path, key="k", progress=recorder)
    assert recorder.calls == [{"desc": "LDS retraining", "total": 4, "items": 4}]
    recorder = Recorder()
    retrain(subsets, 2, lambda mask, seed: mask.double()[:3] + seed, tmp_path, key="k", progress=recorder)
    assert recorder.calls == [{"desc": "LDS retraining", "total": 0, "items": 0}]  # all cached


@pytest.mark.parametrize("bad", [True, "tqdm", 1])
def test_a_progress_that_is_not_callable_is_refused_by_name(bad, tmp_path):
    model, data = _problem()
    with pytest.raises(TypeError, match="progress: must be None or a callable"):
        EKFAC(model, torch.nn.CrossEntropyLoss(), data, progress=bad)
    with pytest.raises(TypeError, match="progress"):
        retrain(draw_subsets(6, 2, 0.5, seed=0), 1, lambda mask, seed: mask.double(), tmp_path, key="k", progress=bad)
