"""The app's one seeded training loop (:mod:`conditioner.app.training`) and the seeded models it
trains: determinism, learning, argument checks, and LDS retraining with real training."""

from __future__ import annotations

import pytest
import torch

from conditioner.app.models import MLP, seeded
from conditioner.app.training import BatchOrder, fit
from conditioner.influence import draw_subsets, lds, retrain


def mlp(in_features: int, out_features: int, hidden=(128, 128, 128), *, seed=None) -> torch.nn.Sequential:
    """The zoo's MLP as a plain Sequential (flatten, Linear/ReLU..., Linear), seeded."""
    with seeded(seed):
        return MLP(in_features, out_features, tuple(hidden)).net


def test_batch_order_visits_every_example_once_per_epoch_unless_it_drops_the_last_batch():
    kept, dropped = BatchOrder(10, 4, seed=3, drop_last=False), BatchOrder(10, 4, seed=3)
    assert kept.batches_per_epoch == 3 and dropped.batches_per_epoch == 2
    epoch = [kept.next() for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    first = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(epoch), first)
    assert [len(dropped.next()) for _ in range(3)] == [4, 4, 4]


def regression_problem(n: int = 128):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def train(seed: int, init: int = 0, **options) -> torch.nn.Module:
    x, y = regression_problem()
    settings = {"epochs": 30, "batch_size": 32, "lr": 1e-2, "weight_decay": 1e-4, "seed": seed} | options
    return fit(mlp(4, 1, (32, 32), seed=init), x, y, torch.nn.functional.mse_loss, **settings)


def test_mlp_shape_and_seeded_initialisation():
    model = mlp(8, 3, seed=5)
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(8, 128), (128, 128), (128, 128), (128, 3)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model) == 3
    assert model(torch.randn(2, 2, 4)).shape == (2, 3)  # inputs are flattened
    state = torch.random.get_rng_state()
    same = mlp(8, 3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not torch.equal(linear[0].weight, mlp(8, 3, seed=6)[1].weight)
    with pytest.raises(ValueError, match="hidden"):
        mlp(8, 3, (16, 0))


def test_fit_is_deterministic_and_learns():
    x, y = regression_problem()
    state = torch.random.get_rng_state()
    model = train(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not model.training
    again, reordered = train(seed=0), train(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), reordered.parameters()))
    with torch.no_grad():
        untrained = torch.nn.functional.mse_loss(mlp(4, 1, (32, 32), seed=0)(x), y)
        trained = torch.nn.functional.mse_loss(model(x), y)
    assert trained < 0.05 * untrained
    full_batch = train(seed=0, batch_size=1000, epochs=3)  # one step per epoch
    assert not full_batch.training


@pytest.mark.parametrize(
    "options, name",
    [
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_fit_rejects_bad_arguments(options, name):
    with pytest.raises(ValueError, match=name):
        train(seed=0, **options)
    x, y = regression_problem()
    with pytest.raises(ValueError, match="same length"):
        fit(mlp(4, 1), x, y[:-1], torch.nn.functional.mse_loss, epochs=1, batch_size=8, lr=1e-3)


def test_retrain_with_real_training(tmp_path):
    """The pieces together: retrain small models on subsets and measure their query losses."""
    x, y = regression_problem(64)
    queries_x, queries_y = x[:5] + 0.1, y[:5]

    def train_and_measure(mask: torch.Tensor, seed: int) -> torch.Tensor:
        model = fit(
            mlp(4, 1, (16,), seed=seed),
            x[mask],
            y[mask],
            torch.nn.functional.mse_loss,
            epochs=5,
            batch_size=16,
            lr=1e-2,
            seed=seed,
        )
        with torch.no_grad():
            return (model(queries_x) - queries_y).square().squeeze(1)

    subsets = draw_subsets(64, 4, 0.5, seed=0)
    measured = retrain(subsets, 2, train_and_measure, tmp_path, key="mlp16")
    assert measured.shape == (4, 5) and measured.isfinite().all()
    assert torch.equal(measured, retrain(subsets, 2, train_and_measure, tmp_path, key="mlp16"))
    assert lds.subsets_fingerprint(subsets) != lds.subsets_fingerprint(draw_subsets(64, 4, 0.5, seed=1))


def test_fit_many_trains_the_models_fit_trains_one_at_a_time():
    # Three GELU MLPs on different subsets (40 of 50 examples, batches 16, 16, 8) with different
    # seeds: the vmapped training must give each the parameters fit gives it, to float32 round-off.
    from conditioner.app.training import fit_many

    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 6, generator=generator), torch.randint(0, 3, (50,), generator=generator)
    masks = draw_subsets(50, 3, 0.8, seed=0)
    seeds = [0, 1, 5]
    settings = {"epochs": 8, "batch_size": 16, "lr": 1e-2, "weight_decay": 1e-3}

    def build(seed):
        with seeded(seed):
            return MLP(6, 3, (8, 5), activation="gelu")

    stacked = fit_many([build(s) for s in seeds], x, y, masks, seeds, torch.nn.functional.cross_entropy, **settings)
    for t, seed in enumerate(seeds):
        alone = fit(build(seed), x[masks[t]], y[masks[t]], torch.nn.functional.cross_entropy, seed=seed, **settings)
        for name, p in alone.named_parameters():
            assert not torch.equal(p, build(seed).state_dict()[name])  # it trained
            torch.testing.assert_close(stacked[name][t], p.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same, positive number"):
        fit_many([build(0), build(1)], x, y, torch.stack([masks[0], masks[0] & (torch.arange(50) < 20)]), [0, 1],
                 torch.nn.functional.cross_entropy, **settings)
