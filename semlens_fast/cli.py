"""The ``semlens`` command."""
from __future__ import annotations

import argparse
import sys

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semlens",
        description="semlens_fast: explain neural networks by mapping their components into a foundation model's space.",
    )
    p.add_argument("--version", action="version", version=f"semlens_fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="run the offline example: track top-k activating samples of a CNN layer")
    d.add_argument("--k", type=int, default=5, help="examples kept per channel (default 5)")
    d.add_argument("--channels", type=int, default=8, help="channels to print (default 8)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import topk_example

        return topk_example(k=args.k, show=args.channels, progress=not args.no_progress)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
