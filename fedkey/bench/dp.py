"""DP-FedAvg tradeoff: next-word accuracy vs epsilon for a few noise levels, and the population a small epsilon needs.

Recipe (public pretraining, private federated fine-tuning, as production keyboards do):
1. a model is trained centrally on the public users only (the corpus split's `public_train`
   users, whose text also built the tokenizer; they are outside the privacy guarantee);
2. from it, federated rounds over the training users with Poisson client sampling
   (expected K per round), adaptive clipping and noise multiplier z, for each z given,
   plus one run without DP (same sampling and optimizer, no clipping, no noise);
3. every final model, and the public-only start, is evaluated on the test split (capped).
Epsilon comes from dp-accounting for the Poisson sampling actually used. The population
table keeps the noise on the averaged update (z C / K) of each run and asks how many users
it would take to reach a target epsilon with the same number of rounds, choosing K.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.errors import FedkeyError
from fedkey.io import save_figure, write_json
from fedkey.tables import console
from fl_core.config import FleetConfig, FLConfig

# DP-FedAvg's server step (McMahan et al. 2018): x += mean update. An adaptive server optimizer
# would rescale the noise per coordinate, and momentum 0.9 multiplies it tenfold: with only
# tens of clients per round the noise dominates and momentum made runs diverge
SERVER = {"server_opt": "sgd", "server_lr": 1.0, "server_momentum": 0.0}


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--noise", default="0,0.3,1,3", help="noise multipliers z to compare (0: FedAvg without DP)")
    p.add_argument("--clip", type=float, default=0.5, help="initial clipping norm (adaptive, median of update norms)")
    p.add_argument("--init", type=Path, help="model dir to start from (default: pretrain on the public users)")
    p.add_argument("--public-tokens", type=int, default=250_000, help="tokens of the public pretraining")
    p.add_argument("--targets", default="1,3,8", help="epsilons for the population table")
    p.add_argument("--plot", type=Path, help="PNG (default: beside --json, else RUN_DIR/privacy/dp_tradeoff.png)")
    C.add_flags(p, FLConfig)  # --max-rounds (default here 20) and --clients-per-round (expected K) included


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedkeyError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def public_model(run_dir: Path, tokens: int, threads: int) -> Path:
    """Centrally train on the public users' text (skipped when already done with the same inputs)."""
    import torch

    from fedkey.config import CentralConfig, ModelConfig, to_dict
    from fedkey.stages import file_hash, is_done, mark_done, stage_key
    from keyboard.checkpoint import save_model
    from keyboard.model import KeyboardLM
    from keyboard.train import train_central

    out = run_dir / "privacy" / "public"
    shards, tok = P.load_prepared(run_dir)
    ccfg = CentralConfig.short(tokens, threads=threads)
    inputs = {"tokenizer": tok.sha256, "shards": shards.manifest.get("source_hash", "")}
    key = stage_key({"central": to_dict(ccfg), "split": "public_train"}, inputs)
    if is_done(out, key, ["model.pt"]):
        return out
    seqs = P.encode_split(shards, tok, "public_train", ccfg.max_len)
    if not seqs:
        raise FedkeyError(f"{run_dir}: no public users to pretrain on; pass --init MODEL_DIR")
    torch.manual_seed(ccfg.seed)
    model = KeyboardLM(tok.vocab_size, ModelConfig())
    console.print(f"pretraining on {len(seqs):,} public messages for {tokens:,} tokens")
    result = train_central(model, seqs, ccfg, out)
    save_model(out, model, tok, config=to_dict(ccfg), result=result)
    mark_done(out, key, to_dict(ccfg), {**inputs, "model": file_hash(out / "model.pt")}, result=result)
    return out


def federated_run(run_dir: Path, init: Path, out: Path, fl: FLConfig, z: float, k: int, clip: float
                  ) -> dict[str, Any]:
    """Rounds from `init` with DP at noise z (or none for z = 0); the final model is saved in `out` (reused when done)."""
    from fedkey.io import read_json
    from fedkey.stages import file_hash

    settings = {"fl": C.to_dict(fl), "z": z, "k": k, "clip": clip, "init": file_hash(init / "model.pt")}
    done = out / "run.json"
    if done.is_file() and (out / "model.pt").is_file() and read_json(done)["settings"] == settings:
        return read_json(done)["result"]
    result = _federated_run(run_dir, init, out, fl, z, k, clip)
    write_json(done, {"settings": settings, "result": result})
    return result


def _federated_run(run_dir: Path, init: Path, out: Path, fl: FLConfig, z: float, k: int, clip: float
                   ) -> dict[str, Any]:

    from fedkey.fl_task import KeyboardTask
    from fl_core.params import ParamSpec
    from fl_core.privacy.config import PrivacyConfig
    from fl_core.privacy.engine import PoissonFleet, attach, epsilon_line
    from fl_core.simulation import Simulation
    from keyboard.checkpoint import load_model, save_model

    shards, _ = P.load_prepared(run_dir)
    model, tok, _ = load_model(init)
    spec = ParamSpec.of(model)
    users = shards.users("train")
    fleet = FleetConfig(availability=False, overselect=1.0, dropout=0.0)
    task = KeyboardTask(shards, tok, model, fl.batch_size, fl.max_messages, fl.max_len, fl.local_epochs)
    sim = Simulation(task, spec, users, spec.flatten(dict(model.named_parameters())), fl, fleet, out / "sim")
    pcfg = PrivacyConfig(dp=z > 0, noise_multiplier=z or 1.0, clip=clip, adaptive_clip=True, dp_sampling="poisson",
                         noise_seed=fl.seed)
    agg = attach(sim, pcfg)
    if agg is None:  # the no-DP run samples clients the same way
        sim.fleet = PoissonFleet(len(users), fleet, fl.seed, None, k / len(users))
    t0 = time.perf_counter()

    def show(log: dict[str, Any]) -> None:
        console.print(f"  z={z:g} round {log['round']}: {log['completed']} clients, loss {log['loss']:.3f} "
                      f"{epsilon_line(agg)}")

    sim.run(on_round=show)
    spec.load_into(model, sim.full_params())
    save_model(out, model, tok)
    return {"noise_multiplier": z, "epsilon": agg.epsilon() if agg else None,
            "delta": agg.accountant.delta if agg else None, "final_clip": agg.clip if agg else None,
            "noise_on_mean": z * (agg.clip if agg else 0) / k, "rounds": sim.state.round,
            "seconds": time.perf_counter() - t0}


MAX_Q = 0.1  # at most a tenth of the population in one round: beyond that "sampling" stops being a deployment


def population_table(z: float, k: int, rounds: int, targets: list[float], population: int) -> list[dict[str, Any]]:
    """Users needed for each target epsilon at the same rounds and noise on the mean (z C / K) as the run,
    choosing the clients per round K' (at most MAX_Q of the users) and z' = z K' / K."""
    from fl_core.privacy.accounting import PrivacyAccountant, Sampling

    def best_eps(n: int) -> tuple[float, int]:
        out = (float("inf"), k)
        for kk in (k, 2 * k, 5 * k, 10 * k, 50 * k, 100 * k, 500 * k, 1000 * k, 5000 * k):
            if kk > n * MAX_Q:
                break
            out = min(out, (PrivacyAccountant(z * kk / k, Sampling("poisson", n, kk)).epsilon(rounds), kk))
        return out

    rows = []
    for target in targets:
        lo, hi = population, population
        while best_eps(hi)[0] > target and hi < 10**9:
            lo, hi = hi, hi * 10
        while hi / lo > 1.05:  # geometric bisection to 5%
            mid = int((lo * hi) ** 0.5)
            lo, hi = (mid, hi) if best_eps(mid)[0] > target else (lo, mid)
        eps, kk = best_eps(hi)
        rows.append({"target_epsilon": target, "population": hi, "clients_per_round": kk,
                     "noise_multiplier": z * kk / k, "epsilon": eps})
    return rows


def run(args: argparse.Namespace) -> None:
    """Train and evaluate every noise level; print and save the table, the plot and the population table."""
    from dataclasses import replace

    from fedkey.config import EvalConfig

    fl = C.from_args(FLConfig, args)
    fl = replace(fl, **SERVER, max_rounds=fl.max_rounds or 20, max_tokens=10**12, eval_every=0)
    k, rounds = fl.clients_per_round, fl.max_rounds
    noises, targets = _floats(args.noise, "--noise"), _floats(args.targets, "--targets")
    shards, _ = P.load_prepared(args.run_dir)
    population = len(shards.users("train"))
    init = args.init or public_model(args.run_dir, args.public_tokens, fl.threads)
    ecfg = EvalConfig(max_positions=fl.eval_positions, ksr_messages=0)

    def accuracy(model_dir: Path) -> dict[str, Any]:
        return P.evaluate_stage(args.run_dir, model_dir, ecfg, progress=not args.no_progress, with_ngram=False)["pooled"]

    rows = [{"label": "public only", "noise_multiplier": None, "epsilon": 0.0, **accuracy(init)}]
    for z in noises:
        out = args.run_dir / "privacy" / f"fl_z{z:g}_k{k}_r{rounds}"
        res = federated_run(args.run_dir, init, out, fl, z, k, args.clip)
        rows.append({"label": f"DP z={z:g}" if z else "FedAvg, no DP", **res, **accuracy(out)})
    pop = [{"noise_multiplier": r["noise_multiplier"], "top1": r["top1"],
            "needed": population_table(r["noise_multiplier"], k, rounds, targets, population)}
           for r in rows if r.get("noise_multiplier")]
    result = {"population": population, "expected_clients": k, "rounds": rounds,
              "runs": rows, "population_needed": pop, "fl": C.to_dict(fl)}
    console.print(_table(rows, pop, result))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run_dir / "privacy" / "dp_tradeoff.png")
    _plot(rows, plot, result)
    console.print(f"plot -> {plot}")
    if args.json:
        write_json(args.json, result)


def _table(rows: list[dict], pop: list[dict], res: dict):
    from rich.console import Group
    from rich.table import Table

    t = Table(title=f"accuracy vs epsilon: {res['population']} users, Poisson K={res['expected_clients']}, "
                    f"{res['rounds']} rounds")
    for col in ("run", "epsilon", "final clip", "top-1", "top-3", "perplexity"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        eps = "-" if r.get("epsilon") is None else ("0 (public)" if r["label"] == "public only" else f"{r['epsilon']:.3g}")
        t.add_row(r["label"], eps if r["label"] != "FedAvg, no DP" else "inf",
                  "-" if not r.get("final_clip") else f"{r['final_clip']:.3g}",
                  f"{100 * r['top1']:.1f}%", f"{100 * r['top3']:.1f}%", f"{r['perplexity']:.0f}")
    p = Table(title="users needed for the same noise on the averaged update and rounds as each run "
                    f"(clients per round chosen, at most {MAX_Q:.0%} of the users)")
    for col in ("run z", "top-1", "target epsilon", "users needed", "clients/round", "z"):
        p.add_column(col, justify="right")
    for block in pop:
        for need in block["needed"]:
            p.add_row(f"{block['noise_multiplier']:g}", f"{100 * block['top1']:.1f}%", f"{need['target_epsilon']:g}",
                      f"{need['population']:,}", f"{need['clients_per_round']:,}", f"{need['noise_multiplier']:.3g}")
    return Group(t, p)


def _plot(rows: list[dict], path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    dp = [r for r in rows if r.get("epsilon") and r["label"] != "FedAvg, no DP"]
    ax.plot([r["epsilon"] for r in dp], [100 * r["top1"] for r in dp], "o-", label="DP-FedAvg (top-1)")
    for r in dp:
        ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], 100 * r["top1"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    for r, style in ((rows[0], ":"), (next((r for r in rows if r["label"] == "FedAvg, no DP"), None), "--")):
        if r:
            ax.axhline(100 * r["top1"], ls=style, color="gray", label=f"{r['label']} ({100 * r['top1']:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = N^-1.1, N = {res['population']})")
    ax.set_ylabel("top-1 next-word accuracy (%)")
    ax.set_title(f"DP-FedAvg, K={res['expected_clients']} expected clients, {res['rounds']} rounds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
