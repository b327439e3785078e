"""The app's one model zoo (bench, spectrum, influence experiments): an MLP, a small CNN and a
small decoder-only character transformer.

Plain ``torch.nn`` (no torchvision). Every model is built from a :class:`~conditioner.app.data.Dataset`
(input shape, number of classes or vocabulary size) and a few keyword arguments that a preset
names, so a saved ``state_dict`` plus ``(kind, kwargs)`` rebuilds it. Sizes are chosen so that a
preset finishes on 2 CPU cores in minutes:

- ``mlp``: flatten → Linear/ReLU … → Linear (``activation="gelu"`` for GELU); ``hidden=(128, 128)``
  on 8×8 digits is 26k parameters, ``(256, 256)`` on 28×28 images 269k, ``(64, 32)`` 6.6k.
- ``cnn``: three 3×3 conv/ReLU/2×2-max-pool stages (1→16→32→64 channels) and one linear
  layer: 29k parameters on 28×28 images. The last feature map stays small (3×3×64 = 576 inputs
  to the classifier), so no Kronecker factor is larger than 576×576.
- ``gpt``: pre-LayerNorm decoder-only transformer, learned positions, causal
  ``scaled_dot_product_attention``, GELU MLP of width 4·d, untied output head, no dropout,
  GPT-2 initialisation. ``layers=4, width=128, heads=4, context=128`` with a 96-symbol
  vocabulary is 0.83M parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from conditioner.app.data import Dataset

MODEL_KINDS = ("mlp", "cnn", "gpt")


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Module):
    """Flatten, then ``Linear → activation`` per hidden width (``"relu"`` or ``"gelu"``), then a
    linear classifier."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128, 128), activation: str = "relu"
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(width < 1 for width in hidden):
            raise ValueError(
                f"in_features, num_classes and hidden must be positive, got {in_features}, {num_classes}, {tuple(hidden)}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """``(conv 3×3 → ReLU → max-pool 2×2)`` per channel count, then one linear classifier."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (16, 32, 64)
    ) -> None:
        super().__init__()
        if len(input_shape) == 2:
            input_shape = (1, *input_shape)
        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        for c in channels:
            if height < 2 or width < 2:
                raise ValueError(f"input {tuple(input_shape)} is too small for {len(channels)} pooling stages")
            layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = c
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x).flatten(1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """A small decoder-only transformer over characters: ``(B, T)`` ids → ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int, context: int = 128, width: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.context = context
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self._init(layers)

    def _init(self, layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * layers))
            nn.init.normal_(block.out.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of length {t} exceeds the model's context {self.context}")
        x = self.token(tokens) + self.position(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside: torch's global random state starts from ``torch.manual_seed(seed)``; after: it is as it
    was before. ``None``: no effect."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def build_model(kind: str, dataset: Dataset, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """The model ``kind`` (one of :data:`MODEL_KINDS`) sized for ``dataset`` (its outputs: the
    classes, the regression targets or the vocabulary). With ``seed``, the initial weights are
    drawn right after ``torch.manual_seed(seed)`` and the global random state is restored after."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    if kind == "gpt" and dataset.task != "language":
        raise ValueError(f"model 'gpt' needs a language data set, {dataset.name!r} is {dataset.task!r}")
    with seeded(seed):
        if kind == "mlp":
            return MLP(math.prod(dataset.input_shape), dataset.num_classes, tuple(kwargs.get("hidden", (128, 128))),
                       kwargs.get("activation", "relu"))
        if kind == "cnn":
            return SmallCNN(dataset.input_shape, dataset.num_classes, tuple(kwargs.get("channels", (16, 32, 64))))
        return CharGPT(dataset.num_classes, **kwargs)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (a shared tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
