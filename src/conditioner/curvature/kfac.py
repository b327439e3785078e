"""K-FAC and EK-FAC: Kronecker-factored curvature of a model, loss and data set.

For each supported layer (see :mod:`conditioner.curvature.layers`) the curvature block of its
matrix view ``W̃`` is approximated by ``R ⊗ C`` (row and column factors). The input-side factor
is the mean of ``ā āᵀ`` over all input vectors; the gradient-side factor is ``c · Σ g gᵀ`` over
output cotangents, with ``c`` the loss's normalisation (:mod:`conditioner.curvature.losses`).
With ``fisher_type="exact"`` (the default) the cotangents are the columns of a square root of the
output Hessian, so the factors are the exact expectation over the model's predictive
distribution: no label sampling. Weight-sharing positions (sequence positions, convolution
locations) are either extra examples (``"expand"``) or summed into each example
(``"reduce"``: mean input, summed gradient).

EK-FAC keeps the Kronecker eigenbasis ``Q_R ⊗ Q_C`` and replaces the eigenvalues ``λ_R λ_Cᵀ`` by
``Λ = c · Σ_n (Q_Rᵀ G_n Q_C)^⊙2`` over per-example gradients ``G_n``: the diagonal of the exact
curvature block in that basis, which needs a second pass over the data. An example is whatever
owns one output row: a whole input when the model emits one row per input (its gradient sums
over the weight-sharing positions), one position when it emits a row per position (a sequence
model with a loss term per position).

The ``"exact"`` cotangents of all rows of a batch are backpropagated together, one column of the
output Hessian's square root at a time. That is exact when each layer position reaches the loss
through its own row only (MLPs, convolutional classifiers, position-wise layers); where layers
mix positions (attention) it adds cross-row terms, as other K-FAC implementations do. Eigendecompositions go
through the engine (:func:`conditioner.linalg.safe_eigh`), one batched call per factor size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from conditioner.checks import check_choice, check_count, check_positive
from conditioner.curvature.layers import Layer, find_layers
from conditioner.curvature.losses import FISHER_TYPES, FisherType, LossSpec
from conditioner.curvature.operator import CurvatureOperator, batches
from conditioner.linalg import safe_eigh
from conditioner.progress import Progress, check_progress, tracked

WeightSharing = Literal["expand", "reduce"]
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class KroneckerBlock:
    """One layer's factors ``(G, rows, rows)`` and ``(G, cols, cols)``, their eigenbases, and the
    eigenvalues of the block in the Kronecker eigenbasis, ``(G, rows, cols)``."""

    layer: Layer
    row_factor: torch.Tensor
    col_factor: torch.Tensor
    row_basis: torch.Tensor
    col_basis: torch.Tensor
    eigenvalues: torch.Tensor

    def rotate(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.row_basis.mT @ matrix @ self.col_basis

    def rotate_back(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.row_basis @ matrix @ self.col_basis.mT


@dataclass
class Captured:
    """One layer's input side and its gradient side per cotangent, each ``(G, N, T, d)``."""

    layer: Layer
    inputs: torch.Tensor
    gradients: list[torch.Tensor]


@contextmanager
def _recording(layers: list[Layer]) -> Iterator[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(layers))}

    def hook(index: int):
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            calls[index].append((args[0].detach(), output))

        return record

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _positions(per_call: list[torch.Tensor]) -> torch.Tensor:
    """The sides of a layer's calls in one forward pass, as extra weight-sharing positions."""
    return per_call[0] if len(per_call) == 1 else torch.cat(per_call, dim=2)


def capture(
    model: nn.Module,
    layers: list[Layer],
    inputs: torch.Tensor,
    cotangents_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[Captured]]:
    """Run one batch forward, then backward once per output cotangent. ``cotangents_of(output)``
    returns the output's rows ``(R, C)`` (still attached to the graph) and cotangents
    ``(K, R, C)``. Returns the rows and every layer's input side and gradient sides."""
    with torch.enable_grad(), _recording(layers) as calls:
        output = model(inputs)
        rows, cotangents = cotangents_of(output)
    outputs = [out for i in range(len(layers)) for _, out in calls[i]]
    gradients: list[list[torch.Tensor]] = [[] for _ in layers]
    for k, cotangent in enumerate(cotangents):
        grads = torch.autograd.grad(
            rows, outputs, grad_outputs=cotangent, retain_graph=k + 1 < len(cotangents), allow_unused=True
        )
        position = 0
        for i, layer in enumerate(layers):
            per_call = [
                layer.output_gradients(torch.zeros_like(out) if grad is None else grad.detach())
                for (_, out), grad in zip(calls[i], grads[position : position + len(calls[i])])
            ]
            position += len(calls[i])
            gradients[i].append(_positions(per_call))
    captured = [Captured(layer, _positions([layer.inputs(x) for x, _ in calls[i]]), gradients[i]) for i, layer in enumerate(layers)]
    return rows.detach(), captured


def _shared(side: torch.Tensor, weight_sharing: WeightSharing, reduce: str) -> torch.Tensor:
    """``(G, N, T, d)`` to vectors ``(G, M, d)`` whose outer products form a factor."""
    if weight_sharing == "expand":
        return side.flatten(1, 2)
    return side.mean(2) if reduce == "mean" else side.sum(2)


def _eigh(factors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigendecompose stacks of factors, batching those of equal size into one engine call;
    eigenvalues of these positive semi-definite matrices are clipped at zero."""
    by_size: dict[int, list[int]] = {}
    for i, factor in enumerate(factors):
        by_size.setdefault(factor.shape[-1], []).append(i)
    results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(factors)  # type: ignore[list-item]
    for indices in by_size.values():
        stacked = torch.cat([factors[i] for i in indices])
        decomposition = safe_eigh(stacked)
        values = decomposition.eigenvalues.clamp_min(0.0).split([factors[i].shape[0] for i in indices])
        vectors = decomposition.eigenvectors.split([factors[i].shape[0] for i in indices])
        for i, value, vector in zip(indices, values, vectors):
            results[i] = (value, vector)
    return results


class KroneckerOperator(CurvatureOperator):
    """A block-diagonal operator with one Kronecker-structured block per layer."""

    blocks: list[KroneckerBlock]

    def _layer_vectors(self, vectors: list[torch.Tensor]) -> Iterator[tuple[KroneckerBlock, torch.Tensor]]:
        position = 0
        for block in self.blocks:
            count = len(block.layer.params)
            yield block, block.layer.to_matrix(vectors[position : position + count])
            position += count

    def _in_eigenbasis(self, vectors: list[torch.Tensor], transform) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for block, matrix in self._layer_vectors(vectors):
            out.extend(block.layer.from_matrix(block.rotate_back(transform(block.eigenvalues) * block.rotate(matrix))))
        return out

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._in_eigenbasis(vectors, lambda eigenvalues: eigenvalues)

    def inverse(self, damping: float, exponent: float = 1.0) -> KroneckerInverse:
        """``(B + damping·I)^(−exponent)`` applied in the eigenbasis, ``B`` this operator
        (``exponent=0.5``: the inverse square root, for symmetric preconditioning)."""
        return KroneckerInverse(self, check_positive("damping", damping), check_positive("exponent", exponent))

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues of the (block-diagonal) operator, unsorted, as one flat vector."""
        return torch.cat([block.eigenvalues.flatten() for block in self.blocks])

    def trace(self) -> torch.Tensor:
        return self.eigenvalues().sum()

    def logdet(self, damping: float = 0.0) -> torch.Tensor:
        """``log det(B + damping·I)``; ``-inf`` when that matrix is singular."""
        if damping != 0.0:
            check_positive("damping", damping)
        return (self.eigenvalues() + damping).log().sum()


class KroneckerInverse(KroneckerOperator):
    """The damped inverse power ``(B + λI)^(−exponent)`` of a :class:`KroneckerOperator`, sharing its bases."""

    def __init__(self, operator: KroneckerOperator, damping: float, exponent: float = 1.0) -> None:
        super().__init__(operator.params)
        self.operator = operator
        self.damping, self.exponent = damping, exponent
        self.blocks = [
            KroneckerBlock(
                b.layer, b.row_factor, b.col_factor, b.row_basis, b.col_basis, (b.eigenvalues + damping).pow(-exponent)
            )
            for b in operator.blocks
        ]


class KFAC(KroneckerOperator):
    """Kronecker-factored curvature ``R ⊗ C`` per layer, from one pass over ``data``.

    ``fisher_type``: ``"exact"`` (GGN, the exact expectation over the model's predictive
    distribution), ``"sample"`` (``samples`` labels drawn per row from it) or ``"empirical"``
    (the data's labels). ``weight_sharing``: ``"expand"`` or ``"reduce"``. Modules with
    trainable parameters that are not Linear, Conv2d or Embedding are an error listing them,
    unless ``skip_unsupported``; ``modules`` restricts the operator to the named modules.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_function: nn.Module,
        data: Iterable[Any],
        fisher_type: FisherType = "exact",
        samples: int = 1,
        weight_sharing: WeightSharing = "expand",
        skip_unsupported: bool = False,
        modules: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> None:
        check_choice("fisher_type", fisher_type, FISHER_TYPES)
        check_choice("weight_sharing", weight_sharing, ("expand", "reduce"))
        check_count("samples", samples, 1)
        self.model = model
        self.spec = LossSpec.from_module(loss_function)
        self.data = data
        self.fisher_type = fisher_type
        self.samples = samples
        self.weight_sharing = weight_sharing
        self.generator = generator
        self.progress = check_progress(progress)
        layers = find_layers(model, skip_unsupported, modules)
        super().__init__([p for layer in layers for p in layer.params])
        self.blocks = self._factor_blocks(layers)

    def _passes(self, layers: list[Layer], description: str) -> Iterator[tuple[int, int, list[Captured]]]:
        for inputs, targets in tracked(batches(self.data), self.progress, description):
            def cotangents_of(output: torch.Tensor, targets: torch.Tensor = targets) -> tuple[torch.Tensor, torch.Tensor]:
                rows, row_targets = self.spec.rows(output, targets)
                return rows, self.spec.cotangents(rows, row_targets, self.fisher_type, self.samples, self.generator)

            rows, captured = capture(self.model, layers, inputs, cotangents_of)
            yield rows.shape[0], rows.shape[1], captured

    def _factor_blocks(self, layers: list[Layer]) -> list[KroneckerBlock]:
        input_sums = [None] * len(layers)
        gradient_sums = [None] * len(layers)
        input_counts = [0] * len(layers)
        total_rows, classes = 0, 1
        for rows, classes, captured in self._passes(layers, "K-FAC factors"):
            total_rows += rows
            for i, item in enumerate(captured):
                a = _shared(item.inputs, self.weight_sharing, "mean")
                input_counts[i] += a.shape[1]
                gram = a.mT @ a
                input_sums[i] = gram if input_sums[i] is None else input_sums[i] + gram
                for gradient in item.gradients:
                    g = _shared(gradient, self.weight_sharing, "sum")
                    gram = g.mT @ g
                    gradient_sums[i] = gram if gradient_sums[i] is None else gradient_sums[i] + gram
        self.scale = self.spec.scale(total_rows, classes)
        factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(layers):
            input_factor = input_sums[i] / input_counts[i]
            gradient_factor = self.scale * gradient_sums[i]
            factors.append(
                (gradient_factor, input_factor) if layer.input_side == "cols" else (input_factor, gradient_factor)
            )
        decompositions = _eigh([f for pair in factors for f in pair])
        blocks = []
        for i, layer in enumerate(layers):
            (row_values, row_basis), (col_values, col_basis) = decompositions[2 * i], decompositions[2 * i + 1]
            eigenvalues = row_values.unsqueeze(-1) * col_values.unsqueeze(-2)
            blocks.append(KroneckerBlock(layer, *factors[i], row_basis, col_basis, eigenvalues))
        return blocks

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for block, matrix in self._layer_vectors(vectors):
            out.extend(block.layer.from_matrix(block.row_factor @ matrix @ block.col_factor))
        return out


class EKFAC(KFAC):
    """K-FAC's eigenbasis with eigenvalues corrected on per-example gradients (a second pass):
    ``Λ = c · Σ_n (Q_Rᵀ G_n Q_C)^⊙2``, the diagonal of the exact block in that basis."""

    def _factor_blocks(self, layers: list[Layer]) -> list[KroneckerBlock]:
        blocks = super()._factor_blocks(layers)
        corrections = [torch.zeros_like(block.eigenvalues) for block in blocks]
        for rows, _, captured in self._passes(layers, "EK-FAC eigenvalues"):
            per_position = rows > captured[0].inputs.shape[1]
            for block, item, correction in zip(blocks, captured, corrections):
                input_basis, gradient_basis = (
                    (block.col_basis, block.row_basis) if block.layer.input_side == "cols" else (block.row_basis, block.col_basis)
                )
                a = item.inputs @ input_basis.unsqueeze(1)
                for gradient in item.gradients:
                    g = gradient @ gradient_basis.unsqueeze(1)
                    squares = _squared_example_gradients(g, a, per_position)
                    correction += squares if block.layer.input_side == "cols" else squares.mT
        for block, correction in zip(blocks, corrections):
            block.eigenvalues = self.scale * correction
        return blocks

    def _matmat(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        return KroneckerOperator._matmat(self, vectors)


def _squared_example_gradients(g: torch.Tensor, a: torch.Tensor, per_position: bool) -> torch.Tensor:
    """``Σ_n (Σ_t g_nt a_ntᵀ)^⊙2`` for rotated sides ``(G, N, T, d)``, shape ``(G, d_g, d_a)``. When
    every position is its own example (or there is one position) the sum collapses to one matrix
    product; otherwise per-example gradients are formed a chunk of examples at a time."""
    if per_position or g.shape[2] == 1:
        g, a = g.flatten(1, 2), a.flatten(1, 2)
        return g.square().mT @ a.square()
    per_example = g.shape[0] * g.shape[-1] * a.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // per_example)
    total = g.new_zeros(g.shape[0], g.shape[-1], a.shape[-1])
    for start in range(0, g.shape[1], chunk):
        example_gradients = g[:, start : start + chunk].mT @ a[:, start : start + chunk]
        total += example_gradients.square().sum(1)
    return total
