"""fedkey run: the main job, every stage in order, skipping stages whose inputs did not change."""

from __future__ import annotations

import argparse

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.commands.common import add_common, add_parser
from fedkey.tables import console, dataset_table, print_eval


def register(sub) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "run", "The main job: prepare -> centralized baseline -> evaluate (finished stages are skipped).")
    add_common(p)


def run(args: argparse.Namespace) -> None:
    """Run every stage in order."""
    progress = not args.no_progress
    pcfg = C.from_args(C.PrepareConfig, args)
    res = P.prepare_stage(args.run_dir, pcfg, progress=progress)
    console.print(dataset_table(res["rows"], res["skips"]))
    mcfg, ccfg = C.from_args(C.ModelConfig, args), C.from_args(C.CentralConfig, args)
    # an interrupted run continues from its checkpoint: resume is always safe, the config is checked
    P.central_stage(args.run_dir, mcfg, ccfg, resume=True, progress=progress)
    ecfg = C.from_args(C.EvalConfig, args)
    ev = P.evaluate_stage(args.run_dir, args.run_dir / P.CENTRAL, ecfg, progress=progress, json_path=args.json)
    print_eval(ev, f"centralized model on {ecfg.split}")
