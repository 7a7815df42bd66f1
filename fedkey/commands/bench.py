"""fedkey bench WHAT: each benchmark lives in fedkey/bench/WHAT.py with `add_flags(p)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import fedkey.bench
from fedkey.commands.common import add_common, add_parser


def _benches() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(fedkey.bench.__path__) if not m.name.startswith("_"))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand with one nested subcommand per benchmark."""
    p = add_parser(sub, "bench", "Benchmarks; speed and memory targets live here, never in unit tests.")
    inner = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name in _benches():
        mod = importlib.import_module(f"fedkey.bench.{name}")
        q = add_parser(inner, name, mod.__doc__.strip().splitlines()[0])
        add_common(q)
        mod.add_flags(q)


def run(args: argparse.Namespace) -> None:
    """Run the chosen benchmark."""
    importlib.import_module(f"fedkey.bench.{args.what}").run(args)
