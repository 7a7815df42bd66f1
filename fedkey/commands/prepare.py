"""fedkey prepare: corpus -> per-user shards and the tokenizer."""

from __future__ import annotations

import argparse

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.commands.common import add_common, add_parser
from fedkey.io import write_json
from fedkey.tables import console, dataset_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "prepare", "Corpus -> per-user shards (temporal split, held-out users, British users) and the tokenizer.")
    add_common(p, preset=False)
    C.add_flags(p, C.PrepareConfig)


def run(args: argparse.Namespace) -> None:
    """Prepare and print the dataset table."""
    cfg = C.from_args(C.PrepareConfig, args)
    res = P.prepare_stage(args.run_dir, cfg, progress=not args.no_progress)
    console.print(dataset_table(res["rows"], res["skips"]))
    console.print(("unchanged inputs: nothing to do" if res["skipped"] else f"prepared in {res['seconds']:.1f} s")
                  + f"; shards in {args.run_dir / P.DATA}")
    if args.json:
        write_json(args.json, res)
