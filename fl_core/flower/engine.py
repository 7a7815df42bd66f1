"""`fedkey train --engine flower-sim|flower`: the same training settings, run by Flower instead of in-process.

- flower-sim: a SuperLink in simulation mode on 127.0.0.1 and `flwr run` with Flower's Ray backend;
  `--sim-slots` simulated SuperNodes (default: one per client of a round) read the run directory.
- flower: a real deployment. With `--superlink HOST:PORT` fedkey submits the app to a SuperLink you run
  (see docs/flower.md); with `--local-nodes N` it starts a SuperLink and N SuperNodes on 127.0.0.1
  itself, with throwaway TLS certificates and SuperNode authentication, and stops them afterwards.

The ServerApp writes what `--engine local` writes (model dir, history.jsonl, checkpoints) into the run's
output folder on the SuperLink machine; this command then runs the same final evaluation and plots.
"""

from __future__ import annotations

import argparse
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from fedkey import config as C
from fedkey.errors import FedkeyError
from fedkey.io import read_json
from fedkey.progress import bar
from fl_core.config import FleetConfig, FLConfig

ENGINES = ("local", "flower-sim", "flower")
ROUND_LINE = re.compile(r"\[fedkey\] round (\d+): (\d+)/(\d+) users, loss ([\d.]+), ([\d,]+) tokens")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """--engine and the Flower settings (used only when --engine is not local)."""
    g = p.add_argument_group("engine (Flower: see docs/flower.md)")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: fedkey's in-process engine | flower-sim: Flower's simulation runtime (Ray) | "
                        "flower: a Flower deployment (--superlink or --local-nodes)")
    g.add_argument("--superlink", metavar="HOST:PORT", help="address of a running SuperLink (--engine flower)")
    g.add_argument("--root-certificates", type=Path, metavar="CA_CRT",
                   help="CA certificate that signed the SuperLink's TLS certificate")
    g.add_argument("--insecure", action="store_true", help="talk to the SuperLink without TLS (a lab network only)")
    g.add_argument("--local-nodes", type=int, default=0, metavar="N",
                   help="--engine flower without --superlink: start a SuperLink and N SuperNodes on 127.0.0.1")
    g.add_argument("--expect-nodes", type=int, default=0, help="wait for this many SuperNodes before round 1")
    g.add_argument("--wait-nodes", type=float, default=300.0, help="...for at most this many seconds")
    g.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for SuperNodes; the ones that did not answer are dropped from it")
    g.add_argument("--straggler-factor", type=float, default=0.0,
                   help="also end a round at this many times the first reply's latency (0: off)")
    g.add_argument("--secagg", action="store_true", help="secure aggregation: fl_core.privacy's Bonawitz protocol on "
                   "--engine local, Flower's SecAgg+ on Flower engines (needs >= 3 nodes)")
    g.add_argument("--sim-slots", type=int, default=0, help="flower-sim: simulated SuperNodes (0: clients per round)")
    g.add_argument("--cpus-per-client", type=int, default=1, help="flower-sim: Ray CPUs per ClientApp")


def _job(args: argparse.Namespace, out: Path, mcfg: C.ModelConfig, fcfg: FLConfig, fleet: FleetConfig,
         resume: bool):
    from fl_core.flower.job import Job

    simulation = args.engine == "flower-sim"
    slots = args.sim_slots or fcfg.clients_per_round
    return Job(Path(args.run_dir).resolve(), out.resolve(), fcfg, fleet, mcfg,
               expect_nodes=slots if simulation else (args.expect_nodes or args.local_nodes),
               wait_nodes_s=args.wait_nodes, round_timeout_s=args.round_timeout,
               straggler_factor=args.straggler_factor, secagg=args.secagg,
               threads=args.cpus_per_client if simulation else fcfg.threads,
               placement="any" if simulation else "held", resume=resume)


def _follow(log: Path, stop: threading.Event, update, budget: int) -> None:
    """Move the progress bar as the ServerApp's round lines appear in the streamed log."""
    seen = 0
    while not stop.wait(0.5):
        if not log.exists():
            continue
        lines = ROUND_LINE.findall(log.read_text(errors="replace"))
        for rnd, done, sel, loss, tokens in lines[seen:]:
            update(min(int(tokens.replace(",", "")), budget), f"round {rnd}  loss {loss}  {done}/{sel} clients")
        seen = len(lines)


def train_on_flower(args: argparse.Namespace, mcfg: C.ModelConfig, fcfg: FLConfig, fleet: FleetConfig,
                    ecfg: C.EvalConfig, resume: bool = False, progress: bool = True, out_name: str = "fl",
                    final_eval: bool = True) -> dict[str, Any]:
    """Train with Flower; returns the in-process stage's result dict (plus `engine`)."""
    from fedkey.fl_stage import _with_evals
    from fedkey.pipeline import load_prepared
    from fl_core.flower.app_dir import write_app
    from fl_core.flower.cluster import Federation
    from fl_core.flower.server_app import RESULT

    run_dir = Path(args.run_dir)
    load_prepared(run_dir)  # a one-line error now rather than inside the ServerApp
    out = run_dir / out_name
    job = _job(args, out, mcfg, fcfg, fleet, resume)
    C.save(out / "config.toml", mcfg, fcfg, fleet)
    work = run_dir / "flower" / args.engine
    if work.exists():
        shutil.rmtree(work)
    app = write_app(work / "app")
    fed_cfg = None
    if args.engine == "flower-sim":
        fed = Federation(work, simulation=True, tls=False)
        fed_cfg = {"num-supernodes": job.expect_nodes, "client-resources-num-cpus": args.cpus_per_client}
    elif args.superlink:
        if not (args.insecure or args.root_certificates):
            raise FedkeyError("--superlink needs --root-certificates CA_CRT (or --insecure on a lab network)")
        fed = Federation(work, address=args.superlink, root_certificates=args.root_certificates,
                         tls=not args.insecure)
    elif args.local_nodes > 0:
        nodes = [{"data": str(run_dir.resolve()), "partition-id": i, "num-partitions": args.local_nodes}
                 for i in range(args.local_nodes)]
        fed = Federation(work, node_configs=nodes)
    else:
        raise FedkeyError("--engine flower needs --superlink HOST:PORT (a running SuperLink) "
                          "or --local-nodes N (start N SuperNodes on this machine)")
    stop = threading.Event()
    with fed, bar(progress, f"federated training on Flower ({args.engine})", fcfg.max_tokens, unit="tok") as update:
        follower = threading.Thread(target=_follow, args=(fed.logs / "flwr_run.log", stop, update, fcfg.max_tokens),
                                    daemon=True)
        follower.start()
        try:
            res = fed.run(app, job.to_run_config(), fed_cfg, timeout_s=7 * 24 * 3600)
        finally:
            stop.set()
            follower.join()
    if res.returncode != 0 or not (out / RESULT).is_file():
        errors = [line for line in res.log.splitlines() if "Error" in line or "error" in line or "[fedkey]" in line]
        raise FedkeyError(f"the Flower run failed (flwr exit {res.returncode}): "
                          f"{(errors[-1] if errors else 'no output').strip()[:500]}; full log: {fed.logs / 'flwr_run.log'}")
    result = read_json(out / RESULT)
    return _with_evals(run_dir, out, ecfg, {**result, "skipped": False}, progress, final_eval)
