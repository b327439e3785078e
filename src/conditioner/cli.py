"""The ``conditioner`` command line."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from conditioner import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conditioner",
        description="Eigenbasis preconditioning for deep learning: Shampoo, SOAP and eigenvalue-corrected Shampoo.",
    )
    parser.add_argument("--version", action="version", version=f"conditioner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
