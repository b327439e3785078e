"""What a benchmark leaves behind: the terminal table, ``results.json`` and ``report.md``.

``results.json`` is rewritten (atomically) after every finished run, so an interrupted benchmark
leaves the runs it finished. Non-finite numbers are written as ``null``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

import conditioner
from conditioner.app.bench.runner import BenchResults
from conditioner.app.bench.summary import run_targets, run_to_target, summarize

RESULTS = "results.json"
REPORT = "report.md"

COLUMNS = (
    "optimizer",
    "lr",
    "train loss",
    "val loss",
    "val acc",
    "steps to ref",
    "secs to ref",
    "step ms",
    "state",
    "B/param",
    "refreshes",
    "runs",
)


def _mean_std(stat: dict[str, float] | None, fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    text = format(stat["mean"] * scale, fmt)
    return text + ("±" + format(stat["std"] * scale, fmt) if stat["n"] > 1 else "")


def _bytes(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "-"
    value = stat["mean"]
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _per_parameter(row: dict[str, Any]) -> str:
    stat = row["state_bytes"]
    return "-" if stat is None or not row["parameters"] else f"{stat['mean'] / row['parameters']:.2f}"


def _reached(row: dict[str, Any], key: str, fmt: str) -> str:
    if row["reached_target"] == 0:
        return "never" if row["ok"] else "-"
    text = _mean_std(row[key], fmt)
    return text if row["reached_target"] == row["runs"] else f"{text} ({row['reached_target']}/{row['runs']})"


def _runs(row: dict[str, Any]) -> str:
    parts = [f"{row['ok']}/{row['runs']} ok"]
    if row["diverged"]:
        parts.append(f"{row['diverged']} diverged")
    if row["failed"]:
        parts.append(f"{row['failed']} failed")
    return ", ".join(parts)


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, row in summary["optimizers"].items():
        if row["ok"] == 0:
            status = "diverged" if row["diverged"] else "failed"
            losses = [status, status, "-"]
        else:
            losses = [
                _mean_std(row["final_train_loss"], ".4f"),
                _mean_std(row["final_val_loss"], ".4f"),
                _mean_std(row["final_val_accuracy"], ".2%").replace("%±", "±").rstrip(),
            ]
        rows.append(
            [
                name,
                f"{row['lr']:.3g}",
                *losses,
                _reached(row, "steps_to_target", ".0f"),
                _reached(row, "time_to_target", ".2f"),
                _mean_std(row["median_step_time"], ".2f", 1e3),
                _bytes(row["state_bytes"]),
                _per_parameter(row),
                _mean_std(row["refreshes"], ".0f"),
                _runs(row),
            ]
        )
    return rows


def format_table(summary: dict[str, Any], results: BenchResults) -> str:
    """The aligned plain-text table printed at the end (mean±std over seeds)."""
    rows = table_rows(summary)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths))),
        "  ".join("-" * w for w in widths),
    ]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    p = results.preset
    seeds = ", ".join(map(str, results.seeds))
    reference = summary["reference"] or "-"
    header = (
        f"preset {p.name}: {p.dataset}, {p.model}, {p.steps} steps of batch {p.batch_size}, seeds {seeds}; "
        f"mean±std over seeds"
    )
    notes = (
        f"steps/secs to ref: first evaluation (every {p.eval_every} steps) at or below {reference}'s final "
        "validation loss of the same seed, and the training wall time (evaluation excluded) to get there.\n"
        "step ms: median optimizer.step() time. state: optimizer-state memory, B/param: its bytes per parameter. refreshes: eigenbasis "
        "(or inverse-root) recomputations, summed over factors."
    )
    if results.interrupted:
        header += f"  [INTERRUPTED: {results.finished_runs()} finished runs]"
    return "\n".join([header, *lines, notes])


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _versions() -> dict[str, str]:
    versions = {"conditioner": conditioner.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for module, distribution in (("heavyball", "heavyball"), ("pytorch_optimizer", "pytorch-optimizer")):
        if module in sys.modules:
            try:
                versions[module] = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                versions[module] = getattr(sys.modules[module], "__version__", "unknown")
    return versions


def results_payload(
    results: BenchResults,
    *,
    argv: list[str],
    skipped: dict[str, str],
    sweep: tuple[float, ...] | None,
    options: dict[str, Any],
    plots: dict[str, str] | None = None,
) -> dict[str, Any]:
    summary = summarize(results)
    _, targets = run_targets(results)
    per_optimizer = {}
    for name in results.optimizers:
        runs = []
        for run in results.runs.get(name, []):
            data = run.to_dict()
            data["steps_to_target"], data["time_to_target"] = run_to_target(run, targets)
            runs.append(data)
        per_optimizer[name] = {"summary": summary["optimizers"].get(name), "runs": runs}
    complete = not results.interrupted and all(len(results.runs.get(n, [])) == len(results.seeds) for n in results.optimizers)
    payload = {
        "schema_version": 1,
        "command": shlex.join(["conditioner", *argv]),
        "argv": list(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "preset": results.preset.to_dict(),
        "seeds": results.seeds,
        "optimizers": results.optimizers,
        "skipped": skipped,
        "options": options,
        "lr_sweep": None
        if not sweep
        else {
            "factors": list(sweep),
            "seed": 0,
            "points": {k: [vars(p) for p in v] for k, v in results.sweeps.items()},
            "chosen": {k: results.lrs[k] for k in results.sweeps if k in results.lrs},
        },
        "complete": complete,
        "interrupted": results.interrupted,
        "finished_runs": results.finished_runs(),
        "reference": summary["reference"],
        "targets": summary["targets"],
        "results": per_optimizer,
        "table": format_table(summary, results),
        "plots": plots or {},
        "saved_models": results.saved_models,
    }
    return _clean(payload)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_report(out: Path, payload: dict[str, Any]) -> Path:
    """``report.md``: the setting, the table and both plots."""
    preset = payload["preset"]
    lines = [
        f"# Optimizer benchmark: preset `{preset['name']}`",
        "",
        f"{preset['description']}. {preset['steps']} steps of batch {preset['batch_size']}, evaluated every "
        f"{preset['eval_every']} steps; seeds {', '.join(map(str, payload['seeds']))}; learning rates: "
        + ("chosen by the sweep below" if payload["lr_sweep"] else f"preset ({preset['lr_source']})")
        + f"; schedule: linear warm-up over {preset['warmup_fraction']:.0%} of the steps, then cosine decay to "
        f"{preset['final_lr_fraction']:g}× the peak, the same for every optimizer.",
        "",
        f"Command: `{payload['command']}`  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in payload['versions'].items())}; "
        f"{payload['machine']['torch_threads']} torch threads.",
        "",
    ]
    if payload["interrupted"]:
        lines += [f"**Interrupted**: {payload['finished_runs']} runs finished; the table covers those only.", ""]
    if payload["skipped"]:
        lines += ["Skipped: " + "; ".join(payload["skipped"].values()), ""]
    lines += ["```", payload["table"], "```", ""]
    if payload["lr_sweep"]:
        lines += [f"Learning-rate sweep on seed 0, factors {payload['lr_sweep']['factors']} of the preset's rate:", ""]
        for name, points in payload["lr_sweep"]["points"].items():
            tried = ", ".join(
                f"{p['lr']:.3g} → " + (f"{p['final_val_loss']:.4f}" if p["final_val_loss"] is not None else p["status"])
                for p in points
            )
            lines.append(f"- {name}: {tried}; chosen {payload['lr_sweep']['chosen'].get(name, float('nan')):.3g}")
        lines.append("")
    for axis, filename in payload["plots"].items():
        what = "steps" if axis == "steps" else "wall time"
        lines += [f"## Validation loss against {what}", "", f"![validation loss against {what}]({filename})", ""]
    options = payload["options"]
    if any(name.startswith("heavyball") for name in payload["optimizers"]):
        lines += [
            "heavyball ran " + ("with" if options.get("heavyball_compile") else "without")
            + " torch.compile (`heavyball.utils.compile_mode`); heavyball-muon is `heavyball.MuonAdamW`.",
            "",
        ]
    path = out / REPORT
    path.write_text("\n".join(lines))
    return path
