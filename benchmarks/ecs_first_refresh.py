"""The step at eigenvalue-corrected Shampoo's first basis refresh, with full and sampled statistics.

Trains a preset's model (default fashion-mlp, seed 0) for a few steps past the first refresh and
prints, per step, the training loss and the largest change of any parameter (Adam-like steps move
each parameter by about the learning rate). Under the authors' semantics (``keep``) the corrected
eigenvalues D accumulated in the identity basis are read in the new basis unchanged, so the first
refresh can take a step far above the learning rate; ``rotate`` carries D into the new basis.
Variants: ``statistics_interval`` 1 (every gradient folded into the factors) and 10 (sampled, as
the 4-bit schedule does), each with both transports.

Usage: PYTHONPATH=$PWD/src python benchmarks/ecs_first_refresh.py [--preset fashion-mlp] [--frequency 10] [--steps 13]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from conditioner import EigenvalueCorrectedShampoo
from conditioner.app.bench.presets import PRESETS, Preset
from conditioner.app.bench.runner import initial_model, prepare_data
from conditioner.app.data import Dataset, load_dataset


def largest_changes(
    preset: Preset, data: Dataset, frequency: int, steps: int, interval: int, transport: str
) -> list[tuple[float, float]]:
    """(training loss, largest parameter change) of each step, at the preset's ECS rate."""
    model = initial_model(preset, data, 0)
    opt = EigenvalueCorrectedShampoo(
        model.parameters(),
        lr=preset.settings["ecshampoo"]["lr"],
        statistics_interval=interval,
        precondition_frequency=frequency,
        eigenvalue_transport=transport,
    )
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(steps):
        index = torch.randint(0, len(data.x_train), (preset.batch_size,), generator=generator)
        x, y = data.x_train[index], data.y_train[index]
        before = [p.detach().clone() for p in model.parameters()]
        loss = nn.functional.cross_entropy(model(x.float()).flatten(0, -2), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        change = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
        rows.append((float(loss.detach()), change))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-mlp", choices=sorted(PRESETS))
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--steps", type=int, default=13)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    data = prepare_data(load_dataset(preset.dataset), preset)
    for interval in (1, 10):
        for transport in ("keep", "rotate"):
            rows = largest_changes(preset, data, args.frequency, args.steps, interval, transport)
            print(f"statistics_interval={interval} eigenvalue_transport={transport}")
            for step, (loss, change) in enumerate(rows, start=1):
                print(f"  step {step:3d}  loss {loss:12.4g}  largest change {change:10.3g}")


if __name__ == "__main__":
    main()
