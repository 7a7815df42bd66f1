"""The `fedkey` command: one subcommand per stage (fedkey/commands/), each with --help."""

from __future__ import annotations

import argparse
import importlib
import sys

from rich_argparse import RichHelpFormatter

from fedkey.commands import ORDER
from fedkey.errors import FedkeyError


def _modules() -> dict[str, object]:
    mods = {}
    for name in ORDER:
        try:
            mods[name.replace("_", "-")] = importlib.import_module(f"fedkey.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"fedkey.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedkey", description="A personalized federated keyboard.",
                                     formatter_class=RichHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _modules().values():
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedkey` console script."""
    args = build_parser().parse_args(argv)
    try:
        _modules()[args.command].run(args)
        return 0
    except FedkeyError as e:
        print(f"fedkey {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedkey {args.command}: interrupted; finished stages and checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
