"""conditioner.influence: deterministic training, LDS subsets, the resumable retraining cache and the score."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

from conditioner.influence import LDSResult, draw_subsets, linear_datamodeling_score, retrain

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ subsets


@pytest.mark.parametrize("num_train, fraction, size", [(100, 0.5, 50), (101, 0.3, 30), (7, 0.5, 4), (10, 0.05, 0)])
def test_subsets_have_the_right_size_and_are_seeded(num_train, fraction, size):
    if size == 0:
        with pytest.raises(ValueError, match="fraction"):
            draw_subsets(num_train, 5, fraction, seed=0)
        return
    subsets = draw_subsets(num_train, 40, fraction, seed=0)
    assert subsets.dtype == torch.bool and subsets.shape == (40, num_train)
    assert subsets.sum(1).tolist() == [size] * 40
    assert len({tuple(row.tolist()) for row in subsets}) > 1
    assert torch.equal(subsets, draw_subsets(num_train, 40, fraction, seed=0))
    assert not torch.equal(subsets, draw_subsets(num_train, 40, fraction, seed=1))


def test_subsets_cover_examples_evenly():
    subsets = draw_subsets(50, 2000, 0.5, seed=3)
    # Each example is in a subset with probability 1/2: 2000 draws give 1000 ± 22.4 (1 sd).
    assert (subsets.sum(0) - 1000).abs().max() < 6 * 22.4


@pytest.mark.parametrize(
    "arguments, name",
    [
        ((100, 10, 0.0), "fraction"),
        ((100, 10, 1.0), "fraction"),
        ((100, 10, -0.2), "fraction"),
        ((100, 10, 1.5), "fraction"),
        ((100, 0, 0.5), "count"),
        ((100, -3, 0.5), "count"),
        ((1, 10, 0.5), "num_train"),
    ],
)
def test_subsets_reject_bad_arguments(arguments, name):
    with pytest.raises(ValueError, match=name):
        draw_subsets(*arguments, seed=0)


# -------------------------------------------------------------------------------------- score


def linear_world(num_queries: int = 20, num_train: int = 60, count: int = 100, seed: int = 0):
    """Measurements exactly linear in known per-example effects: ``f_q(S) = c_q + Σ_{i∈S} β[q, i]``."""
    generator = torch.Generator().manual_seed(seed)
    effects = torch.randn(num_queries, num_train, generator=generator, dtype=torch.float64)
    offsets = torch.randn(num_queries, generator=generator, dtype=torch.float64)
    subsets = draw_subsets(num_train, count, 0.5, seed=seed)
    measurements = subsets.double() @ effects.T + offsets
    return effects, subsets, measurements


def test_true_effects_score_one_and_reversed_minus_one():
    effects, subsets, measurements = linear_world()
    result = linear_datamodeling_score(effects, subsets, measurements)
    assert isinstance(result, LDSResult) and result.per_query.shape == (20,)
    torch.testing.assert_close(result.per_query, torch.ones(20, dtype=torch.float64))
    assert math.isclose(result.mean, 1.0, abs_tol=1e-12)
    assert math.isclose(linear_datamodeling_score(-effects, subsets, measurements).mean, -1.0, abs_tol=1e-12)
    # A rank correlation: positive scaling of the scores and monotone maps of the measurements do
    # not change it.
    assert math.isclose(linear_datamodeling_score(3 * effects.float(), subsets, measurements.exp()).mean, 1.0)


def test_random_scores_score_about_zero():
    effects, subsets, measurements = linear_world(num_queries=100, count=100)
    noise = torch.randn(effects.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    result = linear_datamodeling_score(noise, subsets, measurements)
    # With scores r_q independent of the effects, a query's correlation is about the cosine of the
    # centred predictions C r_q and measurements C β_q (C: the centred subset masks). Over r_q it has
    # mean 0 and variance tr(A²) / tr(A)² with A = CᵀC, about (1 + N/M) / N = 0.027 here (more than
    # 1/(M-1), as the predictions of different subsets share examples). The queries' scores are
    # independent, so the mean over Q = 100 queries has a standard deviation of 0.016; allow 5.
    centred = subsets.double() - subsets.double().mean(0)
    gram = centred.T @ centred
    sd_of_mean = math.sqrt((gram @ gram).trace() / gram.trace() ** 2 / 100)
    assert 0.01 < sd_of_mean < 0.02
    assert abs(result.mean) < 5 * sd_of_mean
    # Noisy but informative scores land in between.
    partial = linear_datamodeling_score(effects + 2 * noise, subsets, measurements).mean
    assert 0.1 < partial < 0.9


def test_ties_get_average_ranks_as_in_scipy():
    effects, subsets, measurements = linear_world(num_queries=6, num_train=30, count=40)
    rounded = measurements.round()  # many ties
    coarse_scores = effects.round()  # ties in the predictions too
    result = linear_datamodeling_score(coarse_scores, subsets, rounded)
    predicted = subsets.double() @ coarse_scores.T
    for q in range(6):
        expected = stats.spearmanr(predicted[:, q].numpy(), rounded[:, q].numpy()).statistic
        assert math.isclose(result.per_query[q].item(), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_constant_queries_are_nan_and_left_out():
    effects, subsets, measurements = linear_world(num_queries=4)
    measurements[:, 1] = 2.5  # a query no retraining moves
    with pytest.warns(UserWarning, match="1 of 4 queries"):
        result = linear_datamodeling_score(effects, subsets, measurements)
    assert result.per_query[1].isnan() and not result.per_query[[0, 2, 3]].isnan().any()
    assert math.isclose(result.mean, 1.0, abs_tol=1e-12)
    zero_scores = effects.clone()
    zero_scores[2] = 0  # constant predictions
    with pytest.warns(UserWarning, match="2 of 4 queries"):
        assert linear_datamodeling_score(zero_scores, subsets, measurements).per_query[2].isnan()
    with pytest.warns(UserWarning, match="4 of 4"):
        assert math.isnan(linear_datamodeling_score(effects * 0, subsets, measurements).mean)


@pytest.mark.parametrize(
    "shapes, name",
    [
        (((5, 10), (8, 10), (8, 5)), None),
        (((10,), (8, 10), (8, 5)), "scores"),
        (((5, 10), (8, 9), (8, 5)), "subsets"),
        (((5, 10), (1, 10), (1, 5)), "subsets"),
        (((5, 10), (8, 10), (5, 8)), "measurements"),
    ],
)
def test_score_rejects_bad_shapes(shapes, name):
    scores, subsets, measurements = torch.randn(shapes[0]), torch.rand(shapes[1]) > 0.5, torch.randn(shapes[2])
    if name is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a random 8-subset mask may give a constant column
            assert linear_datamodeling_score(scores, subsets, measurements).per_query.shape == (5,)
        return
    with pytest.raises(ValueError, match=name):
        linear_datamodeling_score(scores, subsets, measurements)


# ------------------------------------------------------------------------------------- retrain


class Counting:
    """A stand-in for training: measurements linear in the mask, shifted by the seed; counts calls
    and raises on call number ``fail_at`` (1-based) to simulate an interruption."""

    def __init__(self, weights: torch.Tensor, fail_at: int | None = None) -> None:
        self.weights, self.fail_at, self.calls = weights, fail_at, []

    def __call__(self, mask: torch.Tensor, seed: int) -> torch.Tensor:
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.calls.append((tuple(mask.tolist()), seed))
        return self.weights @ mask.double() + 0.1 * seed


@pytest.fixture
def setting():
    subsets = draw_subsets(12, 5, 0.5, seed=0)
    weights = torch.randn(3, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = subsets.double() @ weights.T + 0.1 * (0 + 1 + 2) / 3  # seeds 0, 1, 2 averaged
    return subsets, weights, expected


def test_retrain_averages_repeats_and_caches(tmp_path, setting):
    subsets, weights, expected = setting
    first = Counting(weights)
    measured = retrain(subsets, 3, first, tmp_path, key="linear")
    assert measured.shape == (5, 3) and measured.dtype == torch.float64
    torch.testing.assert_close(measured, expected)
    assert sorted(first.calls) == sorted((tuple(s.tolist()), r) for s in subsets for r in range(3))
    again = Counting(weights)
    torch.testing.assert_close(retrain(subsets, 3, again, tmp_path, key="linear"), expected)
    assert again.calls == []
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file is left behind
    # More repeats compute only the new ones.
    more = Counting(weights)
    retrain(subsets, 4, more, tmp_path, key="linear")
    assert sorted(seed for _, seed in more.calls) == [3] * 5


def test_retrain_resumes_after_an_interruption(tmp_path, setting):
    subsets, weights, expected = setting
    interrupted = Counting(weights, fail_at=8)
    with pytest.raises(KeyboardInterrupt):
        retrain(subsets, 3, interrupted, tmp_path, key="linear")
    assert len(interrupted.calls) == 7
    resumed = Counting(weights)
    torch.testing.assert_close(retrain(subsets, 3, resumed, tmp_path, key="linear"), expected)
    assert len(resumed.calls) == 15 - 7 and not set(resumed.calls) & set(interrupted.calls)


def test_retrain_never_reuses_another_configuration(tmp_path, setting):
    subsets, weights, _ = setting
    retrain(subsets, 2, Counting(weights), tmp_path, key="linear")
    changed_key = Counting(2 * weights)
    torch.testing.assert_close(
        retrain(subsets, 2, changed_key, tmp_path, key="linear, doubled"),
        subsets.double() @ (2 * weights).T + 0.05,
    )
    assert len(changed_key.calls) == 10
    other_subsets = draw_subsets(12, 5, 0.5, seed=1)
    changed_subsets = Counting(weights)
    retrain(other_subsets, 2, changed_subsets, tmp_path, key="linear")
    assert len(changed_subsets.calls) == 10


def test_retrain_recomputes_a_damaged_result(tmp_path, setting):
    subsets, weights, expected = setting
    retrain(subsets, 3, Counting(weights), tmp_path, key="linear")
    (damaged,) = tmp_path.rglob("subset00002-repeat0001.pt")
    damaged.write_bytes(b"not a tensor")
    repair = Counting(weights)
    with pytest.warns(UserWarning, match="unreadable"):
        torch.testing.assert_close(retrain(subsets, 3, repair, tmp_path, key="linear"), expected)
    assert repair.calls == [(tuple(subsets[2].tolist()), 1)]


def test_retrain_rejects_bad_arguments(tmp_path, setting):
    subsets, weights, _ = setting
    with pytest.raises(ValueError, match="repeats"):
        retrain(subsets, 0, Counting(weights), tmp_path, key="k")
    with pytest.raises(ValueError, match="subsets"):
        retrain(subsets.float(), 1, Counting(weights), tmp_path, key="k")
    with pytest.raises(ValueError, match="train_and_measure"):
        retrain(subsets, 1, lambda mask, seed: torch.zeros(2, 2), tmp_path, key="k")
    lengths = iter(range(1, 100))
    with pytest.raises(ValueError, match=r"different lengths \[1, 2\]"):
        retrain(subsets, 1, lambda mask, seed: torch.zeros(next(lengths)), tmp_path, key="k2")
    with pytest.raises(ValueError, match=r"different lengths \[1, 3\]"):  # the cache holds length 1
        retrain(subsets, 1, lambda mask, seed: torch.zeros(3), tmp_path, key="k2")


def test_retrain_in_batches_shares_the_cache_with_one_at_a_time(tmp_path, setting):
    subsets, weights, expected = setting
    one = Counting(weights, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        retrain(subsets, 3, one, tmp_path, key="linear")
    calls = []

    def many(masks: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        calls.append(len(seeds))
        return torch.stack([Counting(weights)(mask, seed) for mask, seed in zip(masks, seeds)])

    torch.testing.assert_close(retrain(subsets, 3, many, tmp_path, key="linear", batch=4), expected)
    assert calls == [4, 4, 3]  # the 11 results the interrupted run left
    assert retrain(subsets, 3, Counting(weights), tmp_path, key="linear").shape == (5, 3)
    with pytest.raises(ValueError, match=r"\(4, Q\)"):
        retrain(subsets, 4, lambda masks, seeds: torch.zeros(2), tmp_path, key="linear", batch=4)
