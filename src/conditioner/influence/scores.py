"""Influence scores: how much each training example helps each query.

``score(q, m) = −∇f(z_q)ᵀ (B + λI)⁻¹ ∇ℓ(z_m)`` with ``f`` the task's measurement (higher is
better), ``ℓ`` the per-example training loss and ``B`` the GGN of the training loss over the
tracked layers (normalised as the loss is: a mean loss gives ``B`` of the mean). To first order,
training WITH ``z_m`` changes ``f(z_q)`` by ``score / N`` for a mean loss over ``N`` examples:
positive means ``z_m`` helps the query and removing it would hurt. Every method uses this sign
and normalisation; they differ only in how ``(B + λI)⁻¹`` is applied:

``"gradient"`` (``B + λI`` replaced by the identity: the gradient dot product), ``"kfac"`` /
``"ekfac"`` (the Kronecker inverse), ``"cg"`` (conjugate gradient on exact GGN products,
preconditioned by EK-FAC), ``"lissa"``, ``"astra"`` (see :mod:`conditioner.solvers`).

The curvature is the exact expectation over the model's predictive distribution (no sampled
labels). The default damping is ``damping_ratio`` times the mean eigenvalue of the GGN (its trace,
exact from EK-FAC, over its dimension), so it follows the curvature's own scale. Training gradients
are formed per layer a chunk of examples at a time from captured inputs and output gradients,
never all at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from conditioner.checks import check_choice
from conditioner.curvature.exact import GGN
from conditioner.curvature.kfac import EKFAC, KFAC, Captured, capture
from conditioner.curvature.layers import Layer, find_layers
from conditioner.curvature.operator import CurvatureOperator, batches
from conditioner.influence.task import Task
from conditioner.progress import Progress, check_progress, tracked
from conditioner.solvers import solve

logger = logging.getLogger(__name__)

METHODS = ("gradient", "kfac", "ekfac", "cg", "lissa", "astra")
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Influence:
    """Scores ``(Q, N)``, the same split per tracked layer, the damping used and the time taken;
    ``solver_warnings``: the iterative solver's warnings (an ASTRA restart, say)."""

    method: str
    scores: torch.Tensor
    per_layer: dict[str, torch.Tensor]
    damping: float
    seconds: float
    solver_residual: float | None = None
    solver_warnings: list[str] = field(default_factory=list)


@dataclass
class InfluenceContext:
    """What several methods can share for one model and training set: the tracked layers, the
    exact GGN, EK-FAC, and the default damping (computed once, on first use)."""

    model: nn.Module
    task: Task
    train_data: list[tuple[torch.Tensor, torch.Tensor]]
    damping_ratio: float = 0.1
    layers: list[Layer] = field(init=False)
    _kronecker: dict[str, KFAC] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = find_layers(self.model, skip_unsupported=True, modules=self.task.modules)
        self.params = [p for layer in self.layers for p in layer.params]

    @cached_property
    def ggn(self) -> GGN:
        return GGN(self.model, self.task.loss_function, self.train_data, self.params)

    def kronecker(self, kind: str) -> KFAC:
        """The K-FAC (``"kfac"``) or EK-FAC (``"ekfac"``) of the tracked layers, built once."""
        if kind not in self._kronecker:
            operator_type = EKFAC if kind == "ekfac" else KFAC
            names = [layer.name for layer in self.layers]
            self._kronecker[kind] = operator_type(self.model, self.task.loss_function, self.train_data, modules=names)
        return self._kronecker[kind]

    @cached_property
    def damping(self) -> float:
        ekfac = self.kronecker("ekfac")
        value = self.damping_ratio * float(ekfac.trace()) / ekfac.dim
        logger.info("damping %.3g = %g × mean GGN eigenvalue", value, self.damping_ratio)
        return value


def _example_gradients(item: Captured, start: int, stop: int) -> torch.Tensor:
    """Per-example gradients ``(n, G, rows, cols)`` of examples ``start:stop`` of a captured layer."""
    a = item.inputs[:, start:stop]
    g = item.gradients[0][:, start:stop]
    rows_side, cols_side = (g, a) if item.layer.input_side == "cols" else (a, g)
    return (rows_side.mT @ cols_side).transpose(0, 1)


def _chunk(item: Captured) -> int:
    layer = item.layer
    return max(1, _CHUNK_ELEMENTS // (layer.groups * layer.rows * layer.cols))


def _gradient_sides(model: nn.Module, task: Task, layers: list[Layer], inputs, targets, measurement: bool) -> list[Captured]:
    spec = task.spec

    def cotangents_of(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, row_targets = spec.rows(output, targets)
        if not measurement:
            return rows, spec.cotangents(rows, row_targets, "empirical")
        detached = rows.detach().requires_grad_(True)
        with torch.enable_grad():
            (cotangent,) = torch.autograd.grad(task.measure_rows(detached, row_targets).sum(), detached)
        return rows, cotangent.unsqueeze(0)

    return capture(model, layers, inputs, cotangents_of)[1]


def flat_gradients(
    context: InfluenceContext, inputs: torch.Tensor, targets: torch.Tensor, measurement: bool
) -> torch.Tensor:
    """Per-example gradients of the measurement (``measurement=True``) or of the training loss,
    over the tracked parameters, as the columns of a ``(P, N)`` matrix."""
    captured = _gradient_sides(context.model, context.task, context.layers, inputs, targets, measurement)
    columns = []
    for item in captured:
        matrices = _example_gradients(item, 0, inputs.shape[0])
        columns.extend(t.reshape(t.shape[0], -1) for t in item.layer.from_matrix(matrices))
    return torch.cat(columns, dim=1).mT


def precondition(
    context: InfluenceContext, gradients: torch.Tensor, method: str, damping: float | None, generator: torch.Generator | None, **options: Any
) -> tuple[torch.Tensor, float, float | None, list[str]]:
    """``(B + λI)⁻¹`` applied to the columns of ``gradients``; returns it, λ, the last residual and
    the solver's warnings."""
    if method == "gradient":
        return gradients, 0.0, None, []
    damping = context.damping if damping is None else damping
    if method in ("kfac", "ekfac"):
        result = solve(context.kronecker(method), gradients, damping, method="direct")
    else:
        result = solve(
            context.ggn, gradients, damping, method=method, preconditioner=context.kronecker("ekfac"), generator=generator, **options
        )
    residual = float(result.residuals[-1].max()) if result.residuals else None
    return result.solution, damping, residual, result.warnings


def influence(
    context: InfluenceContext,
    queries: tuple[torch.Tensor, torch.Tensor],
    method: str = "ekfac",
    damping: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    **solver_options: Any,
) -> Influence:
    """Scores of every query against every training example of ``context.train_data``."""
    check_choice("method", method, METHODS)
    progress = check_progress(progress)
    start = time.perf_counter()
    gradients = flat_gradients(context, *queries, measurement=True)
    solution, damping, residual, notes = precondition(context, gradients, method, damping, generator, **solver_options)
    layers = context.layers
    pieces = iter(CurvatureOperator(context.params).unflatten(solution))
    preconditioned = [layer.to_matrix([next(pieces) for _ in layer.params]) for layer in layers]
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    for inputs, targets in tracked(batches(context.train_data), progress, f"{method} scores"):
        captured = _gradient_sides(context.model, context.task, layers, inputs, targets, measurement=False)
        for index, (item, queries_matrix) in enumerate(zip(captured, preconditioned)):
            chunk = _chunk(item)
            for first in range(0, inputs.shape[0], chunk):
                examples = _example_gradients(item, first, first + chunk)
                per_layer[index].append(-torch.einsum("qgrc,ngrc->qn", queries_matrix, examples))
    scores_per_layer = {layer.name: torch.cat(parts, dim=1) for layer, parts in zip(layers, per_layer)}
    scores = torch.stack(list(scores_per_layer.values())).sum(0)
    return Influence(method, scores, scores_per_layer, damping, time.perf_counter() - start, residual, notes)


def self_influence(
    context: InfluenceContext, method: str = "ekfac", damping: float | None = None, generator: torch.Generator | None = None, chunk: int = 256, **solver_options: Any
) -> torch.Tensor:
    """``∇ℓ(z_m)ᵀ (B + λI)⁻¹ ∇ℓ(z_m)`` for every training example (the score of an example on its
    own negative loss), solving for ``chunk`` examples at a time."""
    check_choice("method", method, METHODS)
    values = []
    for inputs, targets in batches(context.train_data):
        for first in range(0, inputs.shape[0], chunk):
            part = (inputs[first : first + chunk], targets[first : first + chunk])
            gradients = flat_gradients(context, *part, measurement=False)
            solution, _, _, _ = precondition(context, gradients, method, damping, generator, **solver_options)
            values.append((gradients * solution).sum(0))
    return torch.cat(values)


def train_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A training set as a list of ``(inputs, targets)`` batches in their original order."""
    return list(zip(inputs.split(batch_size), targets.split(batch_size)))
