"""fedkey train: federated training (FedAvg and adaptive server optimizers) over the training users' shards."""

from __future__ import annotations

import argparse

from fedkey import config as C
from fedkey.commands.common import add_common, add_parser
from fedkey.errors import FedkeyError
from fedkey.io import write_json
from fedkey.tables import console, metrics_table
from fl_core.config import FleetConfig, FLConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "train", "Federated training: each round sampled users train locally; the server averages.")
    add_common(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--out", default="fl", help="output folder inside the run dir (default: fl)")
    p.add_argument("--no-final-eval", action="store_true", help="skip the full evaluation at the end")
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, FLConfig)
    C.add_flags(p, FleetConfig)
    from fl_core.flower.engine import add_engine_flags  # --engine local|flower-sim|flower (docs/flower.md)

    add_engine_flags(p)
    from fl_core.privacy.config import add_privacy_flags  # --dp, --robust ...; --secagg is shared (threat_model.md)

    add_privacy_flags(p)


def _eval_config(args: argparse.Namespace) -> C.EvalConfig:
    """The final evaluation's settings: [eval] of the preset and --config (its flags belong to `fedkey evaluate`)."""
    from fedkey.presets import preset_overrides

    values = preset_overrides(args.preset, C.EvalConfig.SECTION)
    if args.config:
        values.update(C.toml_section(C.EvalConfig, args.config))
    return C.build(C.EvalConfig, None, values)


def run(args: argparse.Namespace) -> None:
    """Train (or find it already trained) and print the result."""
    from fedkey.fl_stage import fl_stage

    from fl_core.privacy.config import PrivacyConfig

    mcfg, fcfg, fleet = C.from_args(C.ModelConfig, args), C.from_args(FLConfig, args), C.from_args(FleetConfig, args)
    args.secagg = args.secagg or None  # the shared switch defaults to False, which must not mask [privacy] in TOML
    privacy = C.from_args(PrivacyConfig, args)
    ecfg = _eval_config(args)
    if getattr(args, "engine", "local") != "local" and (privacy.dp or privacy.robust):
        raise FedkeyError("--dp and --robust run on --engine local (on Flower, --secagg is Flower's SecAgg+)")
    if getattr(args, "engine", "local") != "local":
        from fl_core.flower.engine import train_on_flower

        res = train_on_flower(args, mcfg, fcfg, fleet, ecfg, resume=args.resume, progress=not args.no_progress,
                              out_name=args.out, final_eval=not args.no_final_eval)
    else:
        res = fl_stage(args.run_dir, mcfg, fcfg, fleet, ecfg, resume=args.resume, progress=not args.no_progress,
                       out_name=args.out, final_eval=not args.no_final_eval, privacy=privacy)
    what = "already trained with these settings" if res.get("skipped") else "trained"
    console.print(f"federated model {what}: {res['rounds']} rounds, {res['tokens']:,} tokens, "
                  f"{res['clients_used']:,} client updates ({res['dropped']} dropped, {res['late']} late, "
                  f"{res['aborted']} cut off), uplink {res['up_bytes'] / 2**20:,.1f} MiB -> {args.run_dir / args.out}")
    if res.get("epsilon") is not None:
        stop = " (stopped: one more round would pass --target-epsilon)" if res.get("stopped_at_target_epsilon") else ""
        console.print(f"client-level DP: epsilon {res['epsilon']:.3g} at delta {res['delta']:.2g} "
                      f"({res['dp_sampling']} sampling, noise multiplier {res['noise_multiplier']:g}){stop}")
    rows = [(f"federated on {s}", res[f"eval_{s}"]) for s in ("test", "heldout_test") if f"eval_{s}" in res]
    if rows:
        console.print(metrics_table("federated model (pooled)", rows))
    if args.json:
        write_json(args.json, res)
