"""Small, deterministic training: the models influence is computed on, and their LDS retrainings.

Everything random is seeded explicitly (initialisation by :func:`mlp`'s ``seed``, data order by
:func:`fit`'s ``seed``) and the global random state is left untouched, so the same call gives the
same model bit for bit at a fixed thread count, whatever ran before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mlp(
    in_features: int, out_features: int, hidden: Sequence[int] = (128, 128, 128), *, seed: int | None = None
) -> nn.Sequential:
    """A multilayer perceptron: ``Linear`` layers of widths ``hidden`` with ``ReLU`` between them.

    Inputs of any shape ``(N, ...)`` are flattened first. With ``seed``, the initial weights are
    drawn from a generator seeded by it (the global random state is restored afterwards).
    """
    if in_features < 1 or out_features < 1 or any(width < 1 for width in hidden):
        raise ValueError(
            f"in_features, out_features and hidden must be positive, got {in_features}, {out_features}, {tuple(hidden)}"
        )
    widths = [in_features, *hidden, out_features]
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_function: LossFunction,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with AdamW on mini-batches and return it, in eval mode.

    Each epoch visits every example once, in an order drawn from a generator seeded by ``seed``;
    the last batch of an epoch may be smaller. ``loss_function(outputs, targets)`` must return the
    mean loss of a batch. ``batch_size >= len(inputs)`` is full-batch training.
    """
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets must have the same length, got {len(inputs)} and {len(targets)}")
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one example")
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_function(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return model.eval()
