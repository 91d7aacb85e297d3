"""The ``scalewatch`` command.

Every subcommand has ``--json`` for machine-readable output and exits non-zero
with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scalewatch import __version__


class CLIError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalewatch",
        description="Watch LLM training runs against the scaling laws they are supposed to follow.",
    )
    parser.add_argument("--version", action="version", version=f"scalewatch {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scalewatch`` console script.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"scalewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
