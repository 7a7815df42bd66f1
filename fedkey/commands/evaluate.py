"""fedkey evaluate: keyboard metrics of a model on a prepared split."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.commands.common import add_common, add_parser
from fedkey.tables import print_eval


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "evaluate", "Top-1/top-3, perplexity, KSR and regional-variant accuracy of a model on a split.")
    add_common(p)
    p.add_argument("--model", type=Path, help="model folder (default: the run's centralized model)")
    p.add_argument("--no-ngram", action="store_true", help="skip the back-off trigram baseline")
    p.add_argument("--user", metavar="ID", help="evaluate this user's personalized model (their adapter, phrase cache "
                   "and spelling, as `fedkey personalize` kept them; base: the run's fl/ model) on their test messages")
    C.add_flags(p, C.EvalConfig)


def run(args: argparse.Namespace) -> None:
    """Evaluate and print the table."""
    ecfg = C.from_args(C.EvalConfig, args)
    if args.user:
        from fedkey.personal_stage import evaluate_user_stage

        res = evaluate_user_stage(args.run_dir, args.model, args.user, ecfg, progress=not args.no_progress,
                                  json_path=args.json)
        print_eval(res, f"user {args.user} ({'personalized' if res.get('personalized') else 'global model'}) on {res['split']}")
        return
    model_dir = args.model or args.run_dir / P.CENTRAL
    res = P.evaluate_stage(args.run_dir, model_dir, ecfg, progress=not args.no_progress,
                           json_path=args.json, with_ngram=not args.no_ngram)
    print_eval(res, f"{model_dir} on {ecfg.split}")
