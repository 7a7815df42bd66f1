"""The `fedkey` command: one subcommand per stage, each with --help, configs from TOML and flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich_argparse import RichHelpFormatter

from fedkey import config as C
from fedkey.errors import FedkeyError


def _common(p: argparse.ArgumentParser, preset: bool = True) -> None:
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="folder holding every artifact of a run")
    p.add_argument("--config", type=Path, help="TOML file with one table per settings section (e.g. [central])")
    if preset:
        p.add_argument("--preset", choices=["quick", "full"], help="named settings (flags and --config still win)")
    p.add_argument("--json", type=Path, help="also write the measured figures to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedkey", description="A personalized federated keyboard.",
                                     formatter_class=RichHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=RichHelpFormatter)

    p = add("prepare", "Corpus -> per-user shards (temporal split, held-out users, British users) and the tokenizer.")
    _common(p, preset=False)
    C.add_flags(p, C.PrepareConfig)

    p = add("train-central", "Train the centralized baseline on every training user's train split.")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, C.CentralConfig)

    p = add("evaluate", "Top-1/top-3, perplexity, KSR and regional-variant accuracy of a model on a split.")
    _common(p)
    p.add_argument("--model", type=Path, help="model folder (default: the run's centralized model)")
    p.add_argument("--no-ngram", action="store_true", help="skip the back-off trigram baseline")
    C.add_flags(p, C.EvalConfig)

    p = add("bench", "Benchmarks: `central` (training tokens/s).")
    p.add_argument("what", choices=["central"], help="what to measure")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--steps", type=int, default=20, help="training steps per repeat")
    _common(p)
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, C.CentralConfig)

    p = add("run", "The main job: prepare -> centralized baseline -> evaluate, skipping finished stages.")
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedkey` console script."""
    args = build_parser().parse_args(argv)
    try:
        from fedkey import commands

        getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
        return 0
    except FedkeyError as e:
        print(f"fedkey {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedkey {args.command}: interrupted; finished stages and checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
