"""One benchmark run: one optimizer, one seed, a fixed number of steps, evaluated on a schedule.

What is timed: ``wall_time`` accumulates every training step (batch gathering, forward,
backward, ``optimizer.step()``), never evaluation; ``step_times`` holds ``optimizer.step()`` alone.
A run stops early as ``diverged`` when a training or validation loss is not finite, when a
minibatch loss exceeds ``DIVERGENCE_FACTOR`` times the initial validation loss (cross-entropy
that has blown up that far is not coming back usefully), or when the optimizer refuses a
non-finite gradient, and as ``failed`` (with the error) when anything else
raises; neither stops the benchmark. ``KeyboardInterrupt`` passes through.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from conditioner.app.bench.optimizers import build_optimizer, refreshes
from conditioner.app.bench.presets import lr_factor
from conditioner.app.data import Dataset
from conditioner.app.training import BatchOrder, StepReport, cross_entropy, evaluate, train
from conditioner.optim.memory import state_bytes

DIVERGENCE_FACTOR = 10.0


@dataclass
class Curve:
    """Metrics at each evaluation; ``train_loss`` is the mean minibatch loss since the previous one."""

    step: list[int] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    optimizer: str
    seed: int
    lr: float
    hyperparameters: dict[str, Any]
    status: str = "ok"  # ok | diverged | failed
    error: str | None = None
    steps_done: int = 0
    curve: Curve = field(default_factory=Curve)
    wall_time: float = 0.0
    median_step_time: float | None = None
    state_bytes: int | None = None
    refreshes: int | None = None
    parameters: int = 0
    init_fingerprint: str = ""
    data_fingerprint: str = ""

    @property
    def final_val_loss(self) -> float:
        return self.curve.val_loss[-1] if self.curve.val_loss and self.status == "ok" else math.nan

    @property
    def final_train_loss(self) -> float:
        last = self.curve.train_loss[-1] if self.curve.train_loss else None
        return last if last is not None and self.status == "ok" else math.nan

    @property
    def final_val_accuracy(self) -> float:
        return self.curve.val_accuracy[-1] if self.curve.val_accuracy and self.status == "ok" else math.nan

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            final_train_loss=self.final_train_loss,
            final_val_loss=self.final_val_loss,
            final_val_accuracy=self.final_val_accuracy,
        )
        return data


def fingerprint(tensors: list[torch.Tensor]) -> str:
    """A short hash of the tensors' values: equal for bit-identical initialisations."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _progress(total: int, label: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=label, unit="step", file=sys.stderr, disable=not enabled, leave=True, dynamic_ncols=True, mininterval=0.5
    )


def train_run(
    model: nn.Module,
    data: Dataset,
    optimizer_name: str,
    lr: float,
    hyperparameters: dict[str, Any],
    *,
    seed: int,
    steps: int,
    batch_size: int,
    eval_every: int,
    warmup_fraction: float = 0.05,
    final_lr_fraction: float = 0.1,
    progress: bool = True,
    label: str | None = None,
    optimizer_options: dict[str, Any] | None = None,
) -> RunResult:
    """Train ``model`` in place with optimizer ``optimizer_name`` and return what was measured.

    ``data`` is the prepared data set (validation part already cut to the evaluated subset).
    """
    result = RunResult(optimizer_name, seed, lr, dict(hyperparameters))
    params = [p for p in model.parameters() if p.requires_grad]
    result.parameters = sum(p.numel() for p in params)
    result.init_fingerprint = fingerprint(list(model.state_dict().values()))
    batches = BatchOrder(len(data.x_train), batch_size, seed)
    curve = result.curve
    step_times: list[float] = []
    losses_since_eval: list[float] = []
    bar: Any = None

    def record(step: int) -> bool:
        val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
        curve.step.append(step)
        curve.wall_time.append(result.wall_time)
        curve.train_loss.append(statistics.fmean(losses_since_eval) if losses_since_eval else None)
        curve.val_loss.append(val_loss)
        curve.val_accuracy.append(val_acc)
        losses_since_eval.clear()
        if not math.isfinite(val_loss):
            result.status, result.error = "diverged", f"validation loss {val_loss} at step {step}"
            return False
        return True

    def check_loss(step: int, loss: torch.Tensor) -> bool:
        value = loss.item()
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * curve.val_loss[0]:
            result.status, result.error = "diverged", f"training loss {value:.4g} at step {step}"
            return False
        losses_since_eval.append(value)
        return True

    def after_step(report: StepReport) -> bool:
        step, value = report.step, losses_since_eval[-1]
        step_times.append(report.optimizer_seconds)
        result.wall_time += report.seconds
        result.steps_done = step + 1
        bar.update(1)
        if step % 10 == 0 or step + 1 == steps:
            rate = result.steps_done * batch_size / max(result.wall_time, 1e-9)
            bar.set_postfix({"loss": f"{value:.4f}", "val": f"{curve.val_loss[-1]:.4f}", "ex/s": f"{rate:.0f}"}, refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            return record(step + 1)
        return True

    optimizer = None
    try:
        optimizer = build_optimizer(optimizer_name, params, lr, hyperparameters, **(optimizer_options or {}))
        model.train()
        record(0)
        bar = _progress(steps, label or f"{optimizer_name} seed {seed}", progress)
        bar.set_postfix(val=f"{curve.val_loss[-1]:.4f}", refresh=False)
        train(
            model,
            optimizer,
            data.x_train,
            data.y_train,
            cross_entropy,
            batches,
            steps,
            learning_rate=lambda step: lr * lr_factor(step, steps, warmup_fraction, final_lr_fraction),
            before_update=check_loss,
            after_step=after_step,
        )
    except FloatingPointError as error:  # conditioner.NonFiniteGradientError and the like
        result.status, result.error = "diverged", f"{type(error).__name__}: {error}"
    except Exception as error:  # a peer's failure must not end the benchmark
        result.status, result.error = "failed", f"{type(error).__name__}: {error}"
    finally:
        if bar is not None:
            bar.close()
    result.data_fingerprint = batches.digest.hexdigest()[:16]
    result.median_step_time = statistics.median(step_times) if step_times else None
    if optimizer is not None:
        result.state_bytes = state_bytes(optimizer)
        result.refreshes = refreshes(optimizer)
    return result
