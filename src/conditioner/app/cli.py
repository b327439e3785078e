"""The ``conditioner`` command line: the parser, the entry point, and what every subcommand shares
(argument types, the output folder check, the exit statuses: 0 done, 2 one-line error, 130
interrupted)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conditioner import __version__
from conditioner.progress import Progress


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


def progress_bars(enabled: bool) -> Progress | None:
    """What the library's ``progress`` arguments take: tqdm bars on stderr, or None for silence."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return functools.partial(tqdm, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5)


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


class OneLineErrorParser(argparse.ArgumentParser):
    """Report a usage error as one line, ``PROG: error: MESSAGE`` on stderr, and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="conditioner",
        description="Eigenbasis preconditioning for deep learning: Shampoo, SOAP and eigenvalue-corrected Shampoo.",
    )
    parser.add_argument("--version", action="version", version=f"conditioner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    from conditioner.app.commands import bench, influence, spectrum

    for command in (bench, spectrum, influence):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    return args.func(args)
