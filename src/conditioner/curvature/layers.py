"""Which layers K-FAC understands, and how each one's weight becomes Kronecker matrices.

Every supported layer is seen as ``G`` independent matrices ``W̃ (rows × cols)`` whose
per-example gradient is a sum of outer products ``Σ_t r_t c_tᵀ`` over weight-sharing positions
``t``. One side of that product is the layer's input (with a trailing 1 when there is a bias),
the other the gradient of the loss with respect to the layer's output:

- ``nn.Linear``: ``W̃ = [W | b]`` (out × in+1); rows are output gradients, columns inputs; every
  leading dimension beyond the first (sequence positions) is a weight-sharing position.
- ``nn.Conv2d``: one ``W̃`` per group (out/G × in/G·kh·kw + 1); columns are the unfolded input
  patches (stride, padding, dilation and groups exactly as the convolution uses them), the
  output locations are weight-sharing positions.
- ``nn.Embedding``: ``W̃ = W`` (num × dim); rows are one-hot inputs (the padding index gets no
  gradient, so it contributes nothing), columns output gradients. Factors are dense, which suits
  vocabularies up to a few thousand symbols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why K-FAC cannot handle ``module`` (it has trainable parameters of its own), or ``None``."""
    if not isinstance(module, SUPPORTED_LAYERS):
        return f"{type(module).__name__} is not one of Linear, Conv2d, Embedding"
    if not module.weight.requires_grad:
        return "its weight is frozen while another of its parameters is trainable"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"Conv2d padding_mode {module.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return "Embedding with max_norm or scale_grad_by_freq"
    return None


@dataclass
class Layer:
    """A supported module, its trainable parameters, and its matrix view ``(G, rows, cols)``."""

    name: str
    module: nn.Module
    params: list[torch.Tensor]
    groups: int
    rows: int
    cols: int
    input_side: Literal["rows", "cols"]

    @classmethod
    def of(cls, name: str, module: nn.Module) -> Layer:
        params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None and p.requires_grad]
        bias = 1 if len(params) == 2 else 0
        if isinstance(module, nn.Linear):
            return cls(name, module, params, 1, module.out_features, module.in_features + bias, "cols")
        if isinstance(module, nn.Conv2d):
            groups = module.groups
            patch = module.weight[0].numel()
            return cls(name, module, params, groups, module.out_channels // groups, patch + bias, "cols")
        return cls(name, module, params, 1, module.num_embeddings, module.embedding_dim, "rows")

    @property
    def has_bias(self) -> bool:
        return len(self.params) == 2

    def to_matrix(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped tensors with a leading ``K`` to ``(K, G, rows, cols)``."""
        weight = vectors[0]
        k = weight.shape[0]
        matrix = weight.reshape(k, self.groups, self.rows, -1)
        if self.has_bias:
            matrix = torch.cat([matrix, vectors[1].reshape(k, self.groups, self.rows, 1)], dim=-1)
        return matrix

    def from_matrix(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`to_matrix`."""
        k = matrix.shape[0]
        if not self.has_bias:
            return [matrix.reshape(k, *self.params[0].shape)]
        return [matrix[..., :-1].reshape(k, *self.params[0].shape), matrix[..., -1].reshape(k, *self.params[1].shape)]

    def inputs(self, layer_input: torch.Tensor) -> torch.Tensor:
        """The input side as ``(G, N, T, d)``: ``N`` examples, ``T`` weight-sharing positions."""
        module = self.module
        n = layer_input.shape[0]
        if isinstance(module, nn.Embedding):
            onehot = functional.one_hot(layer_input.reshape(n, -1), module.num_embeddings).to(module.weight.dtype)
            if module.padding_idx is not None:
                onehot[..., module.padding_idx] = 0.0
            return onehot.unsqueeze(0)
        if isinstance(module, nn.Conv2d):
            patches = functional.unfold(
                layer_input, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
            )
            columns = patches.reshape(n, self.groups, -1, patches.shape[-1]).permute(1, 0, 3, 2)
        else:
            columns = layer_input.reshape(n, -1, layer_input.shape[-1]).unsqueeze(0)
        if self.has_bias:
            columns = torch.cat([columns, columns.new_ones(*columns.shape[:-1], 1)], dim=-1)
        return columns

    def output_gradients(self, gradient: torch.Tensor) -> torch.Tensor:
        """The gradient side as ``(G, N, T, d)``, positions ordered as in :meth:`inputs`."""
        n = gradient.shape[0]
        if isinstance(self.module, nn.Conv2d):
            return gradient.reshape(n, self.groups, self.rows, -1).permute(1, 0, 3, 2)
        return gradient.reshape(n, -1, gradient.shape[-1]).unsqueeze(0)


def find_layers(model: nn.Module, skip_unsupported: bool, modules: Sequence[str] | None = None) -> list[Layer]:
    """The model's supported layers with trainable parameters (only those named in ``modules``
    when given). Modules with trainable parameters K-FAC cannot handle are an error that lists
    them by name, unless ``skip_unsupported``."""
    named = dict(model.named_modules())
    if modules is not None:
        unknown = [m for m in modules if m not in named]
        if unknown or not modules:
            raise ValueError(f"modules: {unknown or 'an empty list'} not among the model's modules {list(named)[1:]}")
    layers: list[Layer] = []
    unsupported: list[str] = []
    for name, module in named.items():
        if modules is not None and name not in modules:
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        reason = unsupported_reason(module)
        if reason is None:
            layers.append(Layer.of(name, module))
        else:
            unsupported.append(f"{name or '(root)'} ({reason})")
    if unsupported and not skip_unsupported:
        raise ValueError(
            "model: layers with trainable parameters that K-FAC does not support: "
            + "; ".join(unsupported)
            + ". Pass skip_unsupported=True to leave them out of the curvature."
        )
    if not layers:
        raise ValueError("model: no trainable Linear, Conv2d or Embedding layer to build K-FAC factors for")
    return layers
