"""One seeded training loop for every model the app trains: the bench runs, the spectrum
command's built-in model, and the influence experiments' models and their LDS retrainings.

Minibatches come from :class:`BatchOrder`, which draws from its own seeded generator, so the same
call trains the same model bit for bit at a fixed thread count whatever ran before.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BatchOrder:
    """Minibatch indices from a generator seeded with ``seed``: a fresh permutation every epoch.

    ``drop_last``: the incomplete last batch of an epoch is dropped (the bench: every step sees
    ``batch_size`` examples) or kept (every example is visited once per epoch). ``digest``
    fingerprints the order handed out, so runs can show they saw the same data.
    """

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool = True) -> None:
        self.size, self.batch_size, self.drop_last = size, min(batch_size, size), drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.int64)
        self.position = 0
        self.digest = hashlib.sha256()

    @property
    def batches_per_epoch(self) -> int:
        whole, rest = divmod(self.size, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def next(self) -> torch.Tensor:
        end = self.position + (self.batch_size if self.drop_last else 1)
        if end > len(self.order):
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += len(batch)
        self.digest.update(batch.numpy().tobytes())
        return batch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every prediction (per character for language models)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def loss_and_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over all predictions (per character for language) and the correct count."""
    logits = model(x)
    return cross_entropy(logits, y), (logits.argmax(-1) == y).sum()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
    """Validation loss and accuracy (next-character accuracy for language) over ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(x), chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        loss, right = loss_and_correct(model, xb, yb)
        n = yb.numel()
        total_loss += float(loss) * n
        correct += int(right)
        count += n
    model.train(was_training)
    return total_loss / count, correct / count


@dataclass(frozen=True)
class StepReport:
    """One finished training step: its index, minibatch loss, and the seconds the whole step and
    ``optimizer.step()`` alone took."""

    step: int
    loss: torch.Tensor
    seconds: float
    optimizer_seconds: float


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_function: LossFunction,
    order: BatchOrder,
    steps: int,
    *,
    learning_rate: Callable[[int], float] | None = None,
    before_update: Callable[[int, torch.Tensor], bool] | None = None,
    after_step: Callable[[StepReport], bool] | None = None,
) -> StepReport | None:
    """Train ``model`` in place for ``steps`` minibatch steps; return the last step's report.

    ``learning_rate(step)`` sets every group's rate before the step; ``before_update(step, loss)``
    sees the minibatch loss before the gradient is taken and ``after_step(report)`` the finished
    step; either stops training by returning False (the step it was called for is then not taken,
    or the last one taken).
    """
    model.train()
    last = None
    for step in range(steps):
        started = time.perf_counter()
        if learning_rate is not None:
            rate = learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = rate
        index = order.next()
        loss = loss_function(model(inputs[index]), targets[index])
        if before_update is not None and not before_update(step, loss):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        update_started = time.perf_counter()
        optimizer.step()
        finished = time.perf_counter()
        last = StepReport(step, loss.detach(), finished - started, finished - update_started)
        if after_step is not None and not after_step(last):
            break
    return last


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
    observer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Train ``model`` in place with AdamW for ``epochs`` passes over the data and return it, in
    eval mode: every example once per epoch in an order seeded by ``seed``, the last batch of an
    epoch possibly smaller; ``batch_size >= len(inputs)`` is full-batch training.
    ``loss_function(outputs, targets)`` must return the mean loss of a batch. ``observer``, an
    optimizer over the same parameters built with lr 0, steps after every AdamW step on the same
    gradients: it gathers its statistics (its Kronecker factors, say) without changing the model."""
    _check_fit_arguments(inputs, targets, epochs, batch_size, lr, weight_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = BatchOrder(len(inputs), batch_size, seed, drop_last=False)

    def observe(_: StepReport) -> bool:
        observer.step()
        return True

    train(model, optimizer, inputs, targets, loss_function, order, epochs * order.batches_per_epoch,
          after_step=None if observer is None else observe)
    return model.eval()


def _check_fit_arguments(inputs: torch.Tensor, targets: torch.Tensor, epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets must have the same length, got {len(inputs)} and {len(targets)}")
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one example")
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")


def fit_many(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    loss_function: LossFunction,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
) -> dict[str, torch.Tensor]:
    """:func:`fit` for many models at once: model ``t`` (same architecture for all, no buffers)
    trains on the examples where ``masks[t]`` is true with the batch order of ``seeds[t]``, as
    ``fit(models[t], inputs[masks[t]], targets[masks[t]], ..., seed=seeds[t])`` would, but every
    step is one vmapped forward and backward over all models and one AdamW update of the stacked
    parameters (the same formula as ``torch.optim.AdamW``). Every mask must hold the same number of
    examples. Returns the trained parameters stacked along a new first dimension, by name; the
    models themselves are left as they were."""
    _check_fit_arguments(inputs, targets, epochs, batch_size, lr, weight_decay)
    if masks.dtype != torch.bool or masks.ndim != 2 or masks.shape != (len(models), len(inputs)):
        raise ValueError(f"masks must be a bool tensor ({len(models)}, {len(inputs)}), got {masks.dtype} {tuple(masks.shape)}")
    if len(seeds) != len(models) or not models:
        raise ValueError(f"seeds must give one seed per model ({len(models)}), got {len(seeds)}")
    sizes = masks.sum(1)
    if not bool((sizes == sizes[0]).all()) or int(sizes[0]) == 0:
        raise ValueError(f"every mask must select the same, positive number of examples, got {sorted(set(sizes.tolist()))}")
    size = int(sizes[0])
    chosen = torch.stack([mask.nonzero().squeeze(1) for mask in masks])  # (T, n) example indices
    base = copy.deepcopy(models[0]).train()
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).clone() for name, _ in base.named_parameters()}
    first, second = {k: torch.zeros_like(v) for k, v in params.items()}, {k: torch.zeros_like(v) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_function(functional_call(base, p, (x,)), y)

    gradient = vmap(grad(loss_of))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    step = 0
    for _ in range(epochs):
        # BatchOrder(drop_last=False): a fresh permutation per epoch, cut into batches, the last shorter.
        order = torch.stack([torch.randperm(size, generator=g) for g in generators])
        rows = chosen.gather(1, order)
        for start in range(0, size, min(batch_size, size)):
            index = rows[:, start : start + batch_size]
            grads = gradient(params, inputs[index], targets[index])
            step += 1
            correction1, correction2 = 1 - beta1**step, 1 - beta2**step
            for name, p in params.items():
                g = grads[name]
                p.mul_(1 - lr * weight_decay)
                first[name].lerp_(g, 1 - beta1)
                second[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denominator = (second[name].sqrt() / correction2**0.5).add_(eps)
                p.addcdiv_(first[name], denominator, value=-lr / correction1)
    return params
