"""fedkey train-central: the centralized baseline."""

from __future__ import annotations

import argparse

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.commands.common import add_common, add_parser
from fedkey.io import write_json
from fedkey.tables import console


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "train-central", "Train the centralized baseline on every training user's train split.")
    add_common(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, C.CentralConfig)


def run(args: argparse.Namespace) -> None:
    """Train (or find it already trained) and print a one-line summary."""
    mcfg, ccfg = C.from_args(C.ModelConfig, args), C.from_args(C.CentralConfig, args)
    res = P.central_stage(args.run_dir, mcfg, ccfg, resume=args.resume, progress=not args.no_progress)
    what = "already trained with these settings" if res.get("skipped") else "trained"
    console.print(f"centralized model {what}: {res['tokens']:,} tokens in {res['seconds']:.0f} s, "
                  f"loss {res['loss']:.3f} -> {args.run_dir / P.CENTRAL}")
    if args.json:
        write_json(args.json, res)
