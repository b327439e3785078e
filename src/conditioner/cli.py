"""The ``conditioner`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from conditioner import __version__


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
    from conditioner.bench.command import add_parser as add_bench
    from conditioner.curvature.command import add_parser as add_spectrum
    from conditioner.influence.command import add_parser as add_influence

    add_bench(commands)
    add_spectrum(commands)
    add_influence(commands)
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


if __name__ == "__main__":
    raise SystemExit(main())
