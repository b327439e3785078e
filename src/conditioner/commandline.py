"""What every ``conditioner`` subcommand shares: argument types, the output folder check, and the
exit statuses (0 done, 2 one-line error, 130 interrupted)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CommandError(Exception):
    """A problem with the request, reported as one line and exit status 2."""


def bounded(kind: type, minimum: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` (int or float) above ``minimum`` (``strict``) or at least it."""
    noun = "an integer" if kind is int else "a number"
    relation = ">" if strict else ">="

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite {noun[2:].lstrip()} {relation} {minimum}, got {text}")
        return value

    return parse


positive_int = bounded(int, 0, strict=True)
non_negative_int = bounded(int, 0, strict=False)
positive_float = bounded(float, 0.0, strict=True)


def writable_folder(out: Path) -> Path:
    """Create ``out`` if needed and check that a file can be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise CommandError(f"cannot write to output folder {str(out)!r}: {error.strerror or error}") from None
    return out


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every long-running subcommand shares: ``--threads`` (applied by
    :func:`run_command`) and ``--no-progress``."""
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace, interrupted: str) -> int:
    """Run ``conditioner NAME`` with ``--threads`` applied first: a :class:`CommandError` is one
    line on stderr and status 2, Ctrl-C prints ``interrupted`` and gives status 130."""
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return run(args)
    except CommandError as error:
        print(f"conditioner {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"conditioner {name}: {interrupted}", file=sys.stderr)
        return 130
