"""Loaders for the offline data sets; each registers itself under its public name."""

from __future__ import annotations

import torch

from conditioner.data.base import Dataset, register


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation cut into disjoint training and validation indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


@register("digits")
def load_digits(seed: int) -> Dataset:
    """scikit-learn's 1797 handwritten 8×8 digits, pixels scaled to [0, 1]; 20% held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, val = _split(len(y), 0.2, seed)
    return Dataset("digits", "classification", x[train], y[train], x[val], y[val], 10, (1, 8, 8))
