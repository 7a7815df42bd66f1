"""fedkey personalize: per-user adapters on the global model, gated per user, compared with the global model."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkey import config as C
from fedkey.commands.common import add_common, add_parser
from fedkey.tables import console
from personalization.config import PersonalConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "personalize", "Train a small adapter per user on their own train text (global model frozen), "
                   "keep it only where the user's validation slice improves, and compare with the global model.")
    add_common(p)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", action="append", metavar="ID", help="personalize this user (repeatable)")
    who.add_argument("--all", action="store_true", help="personalize every training user (the default)")
    p.add_argument("--model", type=Path, help="base model folder (default: the run's fl/ model if trained, else central/)")
    p.add_argument("--no-eval", action="store_true", help="only write adapters and gate.json; skip the comparison")
    C.add_flags(p, PersonalConfig)
    C.add_flags(p, C.EvalConfig, prefix="eval-")


def run(args: argparse.Namespace) -> None:
    """Personalize, then print the comparison tables."""
    from fedkey.personal_stage import personal_stage
    from personalization.report import print_report
    from personalization.store import PERSONAL, read_gate

    pcfg = C.from_args(PersonalConfig, args)
    ecfg = C.from_args(C.EvalConfig, args, prefix="eval-")
    rep = personal_stage(args.run_dir, args.model, pcfg, ecfg, users=args.user, progress=not args.no_progress,
                         json_path=args.json, with_eval=not args.no_eval)
    if rep.get("skipped"):
        console.print(f"already personalized with these settings ({args.run_dir / PERSONAL}); showing the saved report")
    if "global" in rep:
        print_report(rep, console)
    else:
        console.print(f"adapters kept by the gate: {rep['gated_in']:,} of {rep['users']:,} users; mean adapter file "
                      f"{rep['adapter_bytes_mean'] or 0:,.0f} bytes; {rep['seconds']['personalize']:.0f} s")
    if args.user:
        # a user asked for by name: say what their gate decided and why, not only the tables
        gate = read_gate(args.run_dir)
        for u in args.user:
            e = gate.get(u, {})
            console.print(f"{u}: adapter {'kept' if e.get('use_adapter') else 'not kept'}: {e.get('reason', '?')}; "
                          f"phrase cache {'kept' if e.get('use_cache') else 'not kept'}: {e.get('cache_reason', '?')}")
