"""The ``surm`` command line (also ``python -m surm``)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"surm {__version__}")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="every family on real layer shapes: parameters and apply time")
    demo.add_argument("--tokens", type=int, default=2048, help="rows of the input (default 2048 = 32 x 64)")
    demo.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import run_demo

        for name in ("tokens", "repeats"):
            value = getattr(args, name, 1)
            if value < 1:
                raise SystemExit(f"surm demo: --{name} must be at least 1, got {value}")
        print(run_demo(tokens=getattr(args, "tokens", 2048), repeats=getattr(args, "repeats", 20)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
