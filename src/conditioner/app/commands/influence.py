"""``conditioner influence``: score training data with every method and judge them by LDS.

For each experiment (:mod:`conditioner.app.attribution`): train the model, compute the
scores of the queries with each method (timed), retrain models on random subsets (cached under
``OUT/lds-cache``, so an interrupted run resumes), and report each method's linear datamodeling
score and time as a table, ``OUT/results.json`` and ``OUT/lds.png``. The ``bhm`` experiment (the
setting of "Better Hessians Matter") compares curvatures instead, each at the damping chosen on
validation queries, over four subset fractions: its table, ``OUT/bhm.png``.

Exit status: 0 after a run; 2 with one line for bad arguments, an unwritable output folder, or
when no experiment's data is installed; 130 after Ctrl-C (cached retraining is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from conditioner.app.attribution import (
    CURVATURES,
    DAMPING_RATIOS,
    EXPERIMENTS,
    ITERATIVE_RATIOS,
    curvature_study,
    evaluate,
    lds_measurements,
    prepare,
    score_methods,
)
from conditioner.app.cli import (
    CommandError,
    add_run_options,
    bounded,
    non_negative_int,
    positive_int,
    progress_bars,
    run_command,
    writable_folder,
)
from conditioner.influence.scores import METHODS

fraction_type = bounded(float, 0.0, strict=True)
FULL_PROTOCOL = {"subsets": 100, "fraction": 0.5, "repeats": 5, "queries": 100}
# Better Hessians Matter's protocol (α ∈ {0.3, 0.5, 0.7, 0.9} is the experiment's own).
BHM_FULL_PROTOCOL = {"subsets": 100, "repeats": 100, "queries": 100, "validation_queries": 80}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "influence",
        help="training-data attribution: scores by each method, judged by the linear datamodeling score",
        description=(
            "Train an MLP on UCI Concrete and on the 8x8 digits, score every training example's influence on "
            "held-out queries with each method (gradient dot product, K-FAC, EK-FAC, CG on the GGN, LiSSA, "
            "ASTRA), retrain on random subsets and report each method's LDS and time. The bhm experiment "
            "(Better Hessians Matter: digits, GELU MLP 64-64-32-10) compares curvatures (exact Hessian, GGN, "
            "block GGN, EK-FAC, K-FAC, gradient, CG, ASTRA), each at the damping chosen on validation queries, "
            "at four subset fractions. Defaults take minutes on 2 CPU cores; --full runs the usual protocol "
            f"({FULL_PROTOCOL}; bhm: {BHM_FULL_PROTOCOL})."
        ),
    )
    parser.add_argument("--experiments", nargs="+", choices=sorted(EXPERIMENTS), default=["bhm"], metavar="NAME",
                        help=f"which experiments, of {', '.join(EXPERIMENTS)} (default: bhm)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"scoring methods (default: all of {', '.join(METHODS)})")
    parser.add_argument("--queries", type=positive_int, default=50, help="validation examples to explain (default 50)")
    parser.add_argument("--subsets", type=positive_int, default=16, help="LDS subsets M (default 16)")
    parser.add_argument("--fraction", type=fraction_type, default=0.5, help="LDS subset fraction α in (0, 1) (default 0.5)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="models retrained per subset R (default 2)")
    parser.add_argument("--full", action="store_true",
                        help="the full protocol: M=100, α=0.5, R=5, 100 queries; bhm: M=100 per α, R=100, 100 queries "
                             "and 80 validation queries, CG and ASTRA at 4 dampings")
    parser.add_argument("--curvatures", nargs="+", choices=CURVATURES, default=list(CURVATURES), metavar="NAME",
                        help=f"bhm: curvatures compared (default: all of {', '.join(CURVATURES)})")
    parser.add_argument("--validation-queries", type=positive_int, default=20,
                        help="bhm: queries that choose each curvature's damping, besides --queries (default 20)")
    parser.add_argument("--damping-ratio", type=bounded(float, 0.0, strict=True), default=0.1,
                        help="damping as a multiple of the GGN's mean eigenvalue (default 0.1)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="batch size of the curvature passes (default 256)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the subsets and stochastic solvers")
    parser.add_argument("--out", type=Path, default=Path("influence-out"), help="output folder (default influence-out)")
    add_run_options(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``conditioner influence`` with parsed ``args``; return the exit status."""
    return run_command("influence", _run, args, "interrupted; finished retraining is cached in OUT/lds-cache")


def _run(args: argparse.Namespace) -> int:
    from conditioner.app.data import DataUnavailableError

    bhm = {name: getattr(args, name) for name in BHM_FULL_PROTOCOL}
    if args.full:
        for name, value in FULL_PROTOCOL.items():
            setattr(args, name, value)
        bhm = dict(BHM_FULL_PROTOCOL)
    if not args.fraction < 1:
        raise CommandError(f"--fraction must be in (0, 1), got {args.fraction}")
    out = writable_folder(args.out)
    progress = progress_bars(not args.no_progress)
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
                              "experiments": {}}
    for name in args.experiments:
        experiment = EXPERIMENTS[name]
        study = bool(experiment.fractions)
        count = bhm["queries"] + bhm["validation_queries"] if study else args.queries
        try:
            prepared = prepare(experiment, count, seed=args.seed)
        except DataUnavailableError as error:
            print(f"conditioner influence: skipping {name}: {error}", file=sys.stderr)
            continue
        print(f"{name}: model trained in {prepared.train_seconds:.1f} s; scoring {prepared.queries[0].shape[0]} queries "
              f"against {prepared.x_train.shape[0]} training examples", flush=True)
        if study:
            if prepared.queries[0].shape[0] <= bhm["validation_queries"]:
                raise CommandError(f"--validation-queries {bhm['validation_queries']} leaves no evaluation query of "
                                   f"the {prepared.queries[0].shape[0]} available")
            result = curvature_study(prepared, bhm["validation_queries"], bhm["subsets"], bhm["repeats"], out / "lds-cache",
                                     args.seed, tuple(args.curvatures), ITERATIVE_RATIOS if args.full else None, progress)
            report["experiments"][name] = {"kind": "curvatures", **result}
            print(_study_table(name, result), flush=True)
            continue
        damping, scores = score_methods(prepared, args.methods, args.damping_ratio, args.batch_size, args.seed, progress)
        masks, measurements = lds_measurements(prepared, args.subsets, args.fraction, args.repeats, out / "lds-cache", args.seed, progress)
        table = evaluate(scores, masks, measurements)
        report["experiments"][name] = {"damping": damping, "train_examples": prepared.x_train.shape[0],
                                       "queries": prepared.queries[0].shape[0], "methods": table}
        print(_table(name, damping, table), flush=True)
    if not report["experiments"]:
        raise CommandError("no experiment could run: their data sets are not installed (see the messages above)")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    written = [out / "results.json"]
    if any("methods" in value for value in report["experiments"].values()):
        _plot(report, out / "lds.png")
        written.append(out / "lds.png")
    for name, value in report["experiments"].items():
        if value.get("kind") == "curvatures":
            _plot_study(name, value, out / f"{name}.png")
            written.append(out / f"{name}.png")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# The paper's ordering, as consecutive pairs, and the iterative solvers against EK-FAC.
PAIRS = (("hessian", "ggn"), ("ggn", "block_ggn"), ("block_ggn", "ekfac"), ("ekfac", "kfac"), ("cg", "ekfac"),
         ("astra", "ekfac"), ("cg", "ggn"), ("astra", "ggn"), ("ekfac", "gradient"))


def _study_table(name: str, result: dict[str, Any]) -> str:
    fractions = result["fractions"]
    heading = (f"{name}: {result['train_examples']} training examples, {result['parameters']} parameters, "
               f"M={result['subsets']} per α, R={result['repeats']}, {result['evaluation_queries']} evaluation and "
               f"{result['validation_queries']} validation queries; damping = ratio × mean GGN eigenvalue "
               f"{result['mean_ggn_eigenvalue']:.3g} (grid {DAMPING_RATIOS[0]:g}…{DAMPING_RATIOS[-1]:g})")
    lines = [heading,
             f"  {'curvature':10s} {'ratio':>7s} {'LDS':>6s} {'± se':>6s} " + " ".join(f"{'α=' + str(f):>7s}" for f in fractions)
             + f" {'time (s)':>9s}"]
    for method, row in result["curvatures"].items():
        ratio = "-" if row["damping_ratio"] is None else f"{row['damping_ratio']:.3g}"
        per = " ".join(f"{row['lds_per_fraction'][str(f)]['mean']:7.3f}" for f in fractions)
        lines.append(f"  {method:10s} {ratio:>7s} {row['lds']['mean']:6.3f} {row['lds']['se']:6.3f} {per} {row['seconds']:9.1f}")
        for note in row["solver_warnings"]:
            lines.append(f"    warning: {note}")
    lines.append("  paired differences (mean ± se over evaluation queries):")
    for a, b in PAIRS:
        key = f"{a}-{b}"
        if key in result["paired"]:
            value = result["paired"][key]
            lines.append(f"    {key:20s} {value['mean']:+.3f} ± {value['se']:.3f}")
    lines.append(f"  retraining {result['retrain_seconds']:.0f} s, whole study {result['seconds']:.0f} s")
    return "\n".join(lines)


def _plot_study(name: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = result["curvatures"]
    methods = list(rows)
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 3.8))
    left.bar(range(len(methods)), [rows[m]["lds"]["mean"] for m in methods],
             yerr=[rows[m]["lds"]["se"] for m in methods], capsize=3)
    left.set_xticks(range(len(methods)), methods, rotation=30)
    left.set_ylabel("LDS (mean over α, ± se over queries)")
    left.axhline(0.0, color="black", linewidth=0.5)
    for method in methods:
        right.plot(result["fractions"], [rows[method]["lds_per_fraction"][str(f)]["mean"] for f in result["fractions"]],
                   marker="o", label=method)
    right.set_xlabel("subset fraction α")
    right.set_ylabel("LDS")
    right.legend(fontsize=7, ncol=2)
    figure.suptitle(f"{name}: LDS per curvature, each at its validation-chosen damping")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _table(name: str, damping: float, table: dict[str, dict[str, Any]]) -> str:
    lines = [f"{name} (damping {damping:.3g})", f"  {'method':10s} {'LDS':>7s} {'time (s)':>9s}"]
    for method, row in table.items():
        lines.append(f"  {method:10s} {row['lds']:7.3f} {row['seconds']:9.2f}")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    experiments = [name for name in report["experiments"] if "methods" in report["experiments"][name]]
    methods = list(report["experiments"][experiments[0]]["methods"])
    figure, axis = pyplot.subplots(figsize=(2.0 + 1.0 * len(methods), 3.6))
    width = 0.8 / len(experiments)
    for index, name in enumerate(experiments):
        rows = report["experiments"][name]["methods"]
        positions = [m + index * width for m in range(len(methods))]
        axis.bar(positions, [rows[m]["lds"] for m in methods], width, label=name)
    axis.set_xticks([m + 0.4 - width / 2 for m in range(len(methods))], methods)
    axis.set_ylabel("linear datamodeling score")
    axis.axhline(0.0, color="black", linewidth=0.5)
    axis.legend()
    axis.set_title("LDS per scoring method (higher is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
