"""``conditioner bench``: optimizers compared on real data, fairly.

- :mod:`~conditioner.bench.models`: MLP, small CNN, character transformer.
- :mod:`~conditioner.bench.optimizers`: the registry of optimizers by name (ours and peers).
- :mod:`~conditioner.bench.presets`: named configurations and the learning-rate schedule.
- :mod:`~conditioner.bench.training`: one run (one optimizer, one seed) and what it measures.
- :mod:`~conditioner.bench.runner`: the plan: seeds, learning-rate sweep, shared initialisation.
- :mod:`~conditioner.bench.summary`: aggregates over seeds, steps to the reference's loss.
- :mod:`~conditioner.bench.report`, :mod:`~conditioner.bench.plots`: table, results.json,
  report.md, PNG plots.
- :mod:`~conditioner.bench.command`: the command line.
"""

from conditioner.bench.models import CharGPT, MLP, SmallCNN, build_model, parameter_count
from conditioner.bench.optimizers import OPTIMIZERS, build_optimizer
from conditioner.bench.presets import PRESETS, Preset
from conditioner.bench.runner import BenchResults, Runner
from conditioner.bench.summary import steps_to_target, summarize
from conditioner.bench.training import RunResult, train_run

__all__ = [
    "BenchResults",
    "CharGPT",
    "MLP",
    "OPTIMIZERS",
    "PRESETS",
    "Preset",
    "RunResult",
    "Runner",
    "SmallCNN",
    "build_model",
    "build_optimizer",
    "parameter_count",
    "steps_to_target",
    "summarize",
    "train_run",
]
