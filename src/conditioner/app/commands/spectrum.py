"""``conditioner spectrum``: top eigenvalues, traces and spectral densities of a model's Hessian and GGN.

The model is a checkpoint saved by ``conditioner bench --save-model`` (rebuilt from its preset, on
that preset's data set), or with no ``--checkpoint`` a small built-in MLP trained for a moment with
AdamW on the digits. The curvature is that of the mean cross-entropy over ``--examples`` training
examples drawn with ``--seed``; for each operator: the top ``--top-k`` eigenvalues (Lanczos), the
trace (Hutchinson, ``--probes`` Rademacher probes) and the spectral density (SLQ with the same
number of probes and ``--lanczos-steps`` steps). Written to ``--out``: ``spectrum.json`` and
``spectrum.png``.

Exit status: 0 on success; 2 with one line ``conditioner spectrum: error: ...`` for bad arguments,
an unreadable checkpoint, a missing data set or an output folder that cannot be written; 130
after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conditioner.app.cli import (
    CommandError,
    add_run_options,
    non_negative_int,
    positive_int,
    run_command,
    writable_folder,
)
from conditioner.app.data import Dataset

OPERATORS = ("hessian", "ggn")
BUILTIN_HIDDEN = (32,)
BUILTIN_STEPS = 300
BUILTIN_LR = 0.01
BUILTIN_BATCH = 64


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "spectrum",
        help="Hessian and GGN spectra of a model: top eigenvalues, traces, SLQ densities",
        description=(
            "Top-k eigenvalues (Lanczos), traces (Hutchinson) and spectral densities (stochastic Lanczos "
            "quadrature) of the Hessian and the GGN of the mean cross-entropy over training examples. "
            "With no --checkpoint: a small MLP trained briefly on the 8x8 digits, well under a minute on 2 CPU cores."
        ),
    )
    parser.add_argument("--checkpoint", type=Path, help="a model saved by 'conditioner bench --save-model'")
    parser.add_argument("--top-k", type=positive_int, default=5, help="eigenvalues to find (default: 5)")
    parser.add_argument(
        "--probes", type=positive_int, default=16, help="random probes for trace and density (default: 16)"
    )
    parser.add_argument("--lanczos-steps", type=positive_int, default=40, help="Lanczos steps, at most (default: 40)")
    parser.add_argument("--examples", type=positive_int, default=512, help="training examples used (default: 512)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="examples per forward pass (default: 256)")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of examples, probes, built-in model (default: 0)"
    )
    parser.add_argument("--out", type=Path, default=Path("spectrum-out"), help="output folder (default: spectrum-out)")
    add_run_options(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``conditioner spectrum`` with parsed ``args``; return the exit status."""
    return run_command("spectrum", _run, args, "interrupted")


# --- the model and its data ------------------------------------------------------------------------


def builtin_model(dataset: Dataset, seed: int) -> tuple[nn.Module, float]:
    """An MLP with one hidden layer of 32 units, initialised from ``torch.manual_seed(seed)`` and
    trained for 300 AdamW steps on ``dataset``; returns it and its last minibatch loss."""
    from conditioner.app.models import build_model
    from conditioner.app.training import BatchOrder, cross_entropy, train

    model = build_model("mlp", dataset, seed=seed, hidden=BUILTIN_HIDDEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BUILTIN_LR)
    order = BatchOrder(len(dataset.x_train), BUILTIN_BATCH, seed)
    last = train(model, optimizer, dataset.x_train, dataset.y_train, cross_entropy, order, BUILTIN_STEPS)
    return model, math.nan if last is None else last.loss.item()


def checkpoint_model(path: Path) -> tuple[nn.Module, Dataset, dict[str, Any]]:
    """The model saved by ``conditioner bench --save-model`` at ``path``, its preset's prepared data
    set, and what the checkpoint says about itself."""
    from conditioner.app.bench.presets import PRESETS
    from conditioner.app.bench.runner import prepare_data
    from conditioner.app.data import DataUnavailableError, load_dataset
    from conditioner.app.models import build_model

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise CommandError(f"cannot read checkpoint {str(path)!r}: {error}") from None
    keys = ("state_dict", "preset", "model", "model_kwargs")
    if not isinstance(saved, dict) or any(key not in saved for key in keys):
        raise CommandError(f"checkpoint {str(path)!r} is not a model saved by 'conditioner bench --save-model'")
    if saved["preset"] not in PRESETS:
        raise CommandError(f"checkpoint {str(path)!r}: unknown preset {saved['preset']!r}")
    preset = PRESETS[saved["preset"]]
    try:
        dataset = prepare_data(load_dataset(preset.dataset, seed=0), preset)
    except DataUnavailableError as error:
        raise CommandError(f"data set {preset.dataset!r} is not available: {error}") from None
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["model_kwargs"].items()}
    model = build_model(saved["model"], dataset, **kwargs)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise CommandError(f"checkpoint {str(path)!r} does not fit its preset's model: {error}") from None
    info = {
        k: saved.get(k) for k in ("preset", "dataset", "model", "model_kwargs", "optimizer", "seed", "lr", "status")
    }
    return model, dataset, info


def curvature_batches(
    dataset: Dataset, examples: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``examples`` training examples (all, if there are fewer) drawn with ``seed``, in batches."""
    chosen = torch.randperm(len(dataset.x_train), generator=torch.Generator().manual_seed(seed))[:examples]
    x, y = dataset.x_train[chosen], dataset.y_train[chosen]
    return list(zip(x.split(batch_size), y.split(batch_size)))


class _Counted:
    """The curvature data, advancing a progress bar by one per batch read."""

    def __init__(self, data: list[tuple[torch.Tensor, torch.Tensor]], bar: Any) -> None:
        self.data, self.bar = data, bar

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.data:
            yield batch
            self.bar.update(1)


# --- the measurement -------------------------------------------------------------------------------


def measure(operator: Any, top_k: int, probes: int, steps: int, seed: int) -> dict[str, Any]:
    """Top eigenvalues, trace and SLQ quadratures of one operator, as JSON-ready numbers."""
    from conditioner.curvature.spectra import hutchinson_trace, lanczos, slq

    started = time.perf_counter()
    top = lanczos(operator, top_k, steps=steps, generator=torch.Generator().manual_seed(seed))
    trace = hutchinson_trace(operator, probes, torch.Generator().manual_seed(seed + 1))
    quadrature = slq(operator, probes, steps, torch.Generator().manual_seed(seed + 2))
    return {
        "top_eigenvalues": top.eigenvalues.tolist(),
        "residuals": top.residuals.tolist(),
        "lanczos_steps": top.steps,
        "converged": top.converged,
        "trace": {
            "estimate": trace.estimate,
            "standard_error": trace.standard_error if math.isfinite(trace.standard_error) else None,
            "probes": trace.probes,
        },
        "slq": {"nodes": quadrature.nodes.tolist(), "weights": quadrature.weights.tolist()},
        "seconds": time.perf_counter() - started,
    }


def plot_densities(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """The SLQ densities of both operators on one linear eigenvalue axis, log density axis (the
    bulk near zero is orders of magnitude denser than the outliers), top eigenvalues marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from conditioner.curvature.spectra import spectral_density

    nodes = {name: torch.tensor(r["slq"]["nodes"], dtype=torch.float64) for name, r in results.items()}
    weights = {name: torch.tensor(r["slq"]["weights"], dtype=torch.float64) for name, r in results.items()}
    low = min(float(n.min()) for n in nodes.values())
    high = max(float(n.max()) for n in nodes.values())
    sigma = max(high - low, 1e-12) / 200  # resolves the outliers while smoothing the bulk
    grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, 2000, dtype=torch.float64)
    densities = {name: spectral_density(nodes[name], weights[name], grid, sigma) for name in results}
    floor = max(float(d.max()) for d in densities.values()) * 1e-7  # seven decades below the highest peak
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for index, (name, density) in enumerate(densities.items()):
        ax.plot(grid, density.clamp_min(floor), color=f"C{index}", lw=1.4, label=f"{name} (SLQ)")
        for value in results[name]["top_eigenvalues"]:
            ax.axvline(value, color=f"C{index}", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density (integrates to 1)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="dotted: top-k by Lanczos", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(results: dict[str, dict[str, Any]], top_k: int) -> str:
    lines = [f"{'':12s}" + "".join(f"{name:>24s}" for name in results)]
    for i in range(top_k):
        lines.append(f"{f'λ{i + 1}':12s}" + "".join(f"{r['top_eigenvalues'][i]:>24.6g}" for r in results.values()))
    traces = []
    for r in results.values():
        error = r["trace"]["standard_error"]
        traces.append(
            f"{r['trace']['estimate']:.5g} ± {error:.2g}" if error is not None else f"{r['trace']['estimate']:.5g}"
        )
    lines.append(f"{'trace':12s}" + "".join(f"{t:>24s}" for t in traces))
    return "\n".join(lines)


def _model(args: argparse.Namespace) -> tuple[nn.Module, Dataset, dict[str, Any]]:
    """The model to measure, its data set and a description of where it came from."""
    from conditioner.app.data import load_dataset

    if args.checkpoint is not None:
        model, dataset, source = checkpoint_model(args.checkpoint)
        source["checkpoint"] = str(args.checkpoint)
        if source.get("status") not in (None, "ok"):
            print(f"conditioner spectrum: note: the checkpoint's run ended as {source['status']!r}", file=sys.stderr)
        return model, dataset, source
    dataset = load_dataset("digits", seed=args.seed)
    model, last_loss = builtin_model(dataset, args.seed)
    source = {
        "builtin": "mlp",
        "dataset": "digits",
        "hidden": list(BUILTIN_HIDDEN),
        "adamw_steps": BUILTIN_STEPS,
        "lr": BUILTIN_LR,
        "batch_size": BUILTIN_BATCH,
        "final_minibatch_loss": last_loss,
    }
    return model, dataset, source


def _mean_loss(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy over every row (example, or sequence position) of ``data``."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for x, y in data:
            logits = model(x)
            total += float(
                nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            )
            rows += y.numel()
    return total / rows


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from conditioner import __version__
    from conditioner.curvature.exact import GGN, Hessian

    if args.top_k > args.lanczos_steps:
        raise CommandError(f"--top-k ({args.top_k}) must be at most --lanczos-steps ({args.lanczos_steps})")
    out = writable_folder(args.out)
    model, dataset, source = _model(args)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.top_k > parameters:
        raise CommandError(f"--top-k ({args.top_k}) exceeds the model's {parameters} parameters")
    data = curvature_batches(dataset, args.examples, args.batch_size, args.seed)
    examples = sum(len(y) for _, y in data)
    steps = min(args.lanczos_steps, parameters)
    # passes per operator: rows count, Lanczos, Hutchinson (64 probes a pass), SLQ
    passes = 1 + steps + math.ceil(args.probes / 64) + steps
    bar = tqdm(
        total=len(OPERATORS) * passes * len(data),
        desc="curvature",
        unit="batch",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    counted = _Counted(data, bar)
    loss_function = nn.CrossEntropyLoss()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, kind in zip(OPERATORS, (Hessian, GGN)):
            bar.set_postfix_str(name)
            results[name] = measure(kind(model, loss_function, counted), args.top_k, args.probes, steps, args.seed)
        bar.total = bar.n  # Lanczos may have stopped early
    finally:
        bar.close()
    loss = _mean_loss(model, data)

    label = source.get("preset") or "built-in MLP"
    title = f"{label} on {source['dataset']}: {parameters} parameters, {examples} examples, {args.probes} probes"
    plot_densities(results, out / "spectrum.png", title)
    payload = {
        "command": shlex.join(["conditioner", *getattr(args, "argv", [])]),
        "versions": {"conditioner": __version__, "torch": torch.__version__},
        "model": source,
        "parameters": parameters,
        "examples": examples,
        "loss": {"function": "cross_entropy", "reduction": "mean", "value": loss},
        "settings": {
            "top_k": args.top_k,
            "probes": args.probes,
            "lanczos_steps": steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },
        "operators": results,
        "plot": "spectrum.png",
    }
    (out / "spectrum.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    print(_table(results, args.top_k))
    print(f"\n{parameters} parameters, {examples} examples; spectrum.json and spectrum.png in {out}/", file=sys.stderr)
    return 0
