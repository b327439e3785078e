"""``conditioner bench``: optimizers compared on real data, fairly.

- :mod:`~conditioner.app.models`: MLP, small CNN, character transformer.
- :mod:`~conditioner.app.bench.optimizers`: the registry of optimizers by name (ours and peers).
- :mod:`~conditioner.app.bench.presets`: named configurations and the learning-rate schedule.
- :mod:`~conditioner.app.bench.run`: one run (one optimizer, one seed) and what it measures.
- :mod:`~conditioner.app.bench.runner`: the plan: seeds, learning-rate sweep, shared initialisation.
- :mod:`~conditioner.app.bench.summary`: aggregates over seeds, steps to the reference's loss.
- :mod:`~conditioner.app.bench.report`, :mod:`~conditioner.app.bench.plots`: table, results.json,
  report.md, PNG plots.
- :mod:`~conditioner.app.commands.bench`: the command line.
"""

from conditioner.app.bench.optimizers import OPTIMIZERS, build_optimizer
from conditioner.app.bench.presets import PRESETS, Preset
from conditioner.app.bench.run import RunResult, train_run
from conditioner.app.bench.runner import BenchResults, Runner
from conditioner.app.bench.summary import steps_to_target, summarize
from conditioner.app.models import MLP, CharGPT, SmallCNN, build_model, parameter_count

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
