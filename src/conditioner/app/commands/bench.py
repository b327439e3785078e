"""``conditioner bench``: arguments, checks, and the run from data to report.

Exit status: 0 when the benchmark ran (diverged runs are results, not errors); 2 with a one-line
``conditioner bench: error: ...`` for bad arguments (unknown preset or optimizer, a count ≤ 0,
an output folder that cannot be written), for a missing data set (the message is the command
that installs it), or when none of the asked optimizers can run here; 130 after Ctrl-C, with
``results.json`` and ``report.md`` written for the runs that had finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from conditioner.app.bench.optimizers import MEMORY, OPTIMIZERS, OURS, PEERS, unavailable_reason
from conditioner.app.bench.presets import PRESETS
from conditioner.app.bench.runner import DEFAULT_SWEEP, EDGE_EXTENSIONS, BenchResults, Runner, prepare_data
from conditioner.app.cli import (
    CommandError,
    add_run_options,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
    writable_folder,
)

GROUPS = {"all": tuple(OPTIMIZERS), "ours": OURS, "peers": PEERS, "memory": MEMORY}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="compare optimizers on a real data set: table, results.json, plots, report.md",
        description=(
            "Train the same model from the same initialisation on the same data order with each optimizer, "
            "then report losses, accuracy, steps and time to reach AdamW's final validation loss, optimizer "
            "step time, state memory and eigenbasis refreshes (mean±std over seeds). With no arguments: "
            "the 'default' preset (8x8 digits, MLP), a few minutes at most on 2 CPU cores."
        ),
    )
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="what to train (default: default)")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help=f"optimizers to compare (default: the preset's); names: {', '.join(OPTIMIZERS)}; or all, ours, peers, memory",
    )
    parser.add_argument("--steps", type=positive_int, help="training steps per run (default: the preset's)")
    parser.add_argument("--eval-every", type=positive_int, help="steps between evaluations (default: the preset's)")
    parser.add_argument("--batch-size", type=positive_int, help="minibatch size (default: the preset's)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=non_negative_int, help="one seed")
    seeds.add_argument("--seeds", type=non_negative_int, nargs="+", metavar="K", help="several seeds (default: the preset's)")
    parser.add_argument("--out", type=Path, help="output folder (default: bench-out/<preset>)")
    parser.add_argument(
        "--lr-sweep",
        type=positive_float,
        nargs="*",
        metavar="FACTOR",
        help="first tune each optimizer's learning rate on seed 0 over the preset's rate times each FACTOR "
        f"(default factors: {' '.join(f'{f:.3g}' for f in DEFAULT_SWEEP)}), keeping the best final validation loss; "
        f"a best rate on the grid's edge extends the grid past it (at most {EDGE_EXTENSIONS} more points)",
    )
    parser.add_argument("--save-model", action="store_true", help="save each run's final model to OUT/models/")
    parser.add_argument("--heavyball-compile", action="store_true", help="let heavyball use torch.compile (slow start)")
    add_run_options(parser)
    parser.add_argument("--list", action="store_true", help="list presets and optimizers, then exit")
    parser.set_defaults(func=main)
    return parser


def _listing() -> str:
    lines = ["presets:"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:12s} {p.description}; {p.steps} steps, batch {p.batch_size}, seeds {list(p.seeds)}")
    lines.append("optimizers:")
    for spec in OPTIMIZERS.values():
        reason = unavailable_reason(spec.name)
        lines.append(f"  {spec.name:19s} {spec.description}" + ("  [not installed]" if reason else ""))
    return "\n".join(lines)


def _optimizers(requested: list[str] | None, default: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    names: list[str] = []
    for name in requested or default:
        expanded = GROUPS.get(name, (name,))
        for n in expanded:
            if n not in OPTIMIZERS:
                raise CommandError(f"unknown optimizer {n!r} (choose from {', '.join(OPTIMIZERS)}, all, ours, peers, memory)")
            if n not in names:
                names.append(n)
    skipped = {n: reason for n in names if (reason := unavailable_reason(n))}
    runnable = [n for n in names if n not in skipped]
    if not runnable:
        raise CommandError("none of the optimizers can run here: " + "; ".join(skipped.values()))
    return runnable, skipped


def main(args: argparse.Namespace) -> int:
    """Run ``conditioner bench`` with parsed ``args``; return the exit status."""
    # Ctrl-C after the first run is caught by the runner, which writes what had finished.
    return run_command("bench", _run, args, "interrupted before any run finished")


def _run(args: argparse.Namespace) -> int:
    from conditioner.app.data import DataUnavailableError, load_dataset

    if args.list:
        print(_listing())
        return 0
    preset = PRESETS[args.preset]
    optimizers, skipped = _optimizers(args.optimizers, preset.optimizers)
    changes: dict[str, Any] = {}
    for key in ("steps", "eval_every", "batch_size"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.lr_sweep is not None:
        changes["lr_source"] = "sweep"
    preset = preset.replace(**changes)
    seeds = [args.seed] if args.seed is not None else list(dict.fromkeys(args.seeds or preset.seeds))
    preset = preset.replace(seeds=tuple(seeds))
    out = writable_folder(args.out if args.out is not None else Path("bench-out") / preset.name)
    sweep = None if args.lr_sweep is None else tuple(args.lr_sweep or DEFAULT_SWEEP)
    for reason in skipped.values():
        print(f"conditioner bench: {reason}", file=sys.stderr)
    try:
        dataset = load_dataset(preset.dataset, seed=0)
    except DataUnavailableError as error:
        raise CommandError(f"data set {preset.dataset!r} is not available: {error}") from None
    data = prepare_data(dataset, preset)

    from conditioner.app.bench import plots, report

    argv = list(getattr(args, "argv", []))
    options = {"heavyball_compile": bool(args.heavyball_compile), "save_model": bool(args.save_model)}

    def save(results: BenchResults, with_plots: bool = False) -> dict[str, Any]:
        names = plots.plot_curves(results, out) if with_plots and results.finished_runs() else {}
        payload = report.results_payload(results, argv=argv, skipped=skipped, sweep=sweep, options=options, plots=names)
        report.write_json(out / report.RESULTS, payload)
        return payload

    runner = Runner(
        preset,
        data,
        optimizers,
        seeds,
        sweep=sweep,
        progress=not args.no_progress,
        model_dir=out / "models" if args.save_model else None,
        optimizer_options={"heavyball_compile": bool(args.heavyball_compile)},
        on_update=save,
    )
    started = time.perf_counter()
    results = runner.run()
    payload = None
    try:
        payload = save(results, with_plots=True)
        report.write_report(out, payload)
    except KeyboardInterrupt:  # a second Ctrl-C while writing: the json of the last run is on disk
        results.interrupted = True
    if payload is not None:
        print(payload["table"], flush=True)
    elapsed = time.perf_counter() - started
    if results.interrupted:
        print(
            f"conditioner bench: interrupted; {results.finished_runs()} finished runs written to {out}", file=sys.stderr
        )
        return 130
    print(f"\n{results.finished_runs()} runs in {elapsed:.0f} s; results, plots and report in {out}/", file=sys.stderr)
    return 0
