"""Secure aggregation cost: time and bytes per client and for the server, and a round's slowdown vs plain FedAvg.

Two slowdowns, both reported:
- round: one real round of `fedkey train`'s engine (fl_core.simulation: client selection,
  data, local training with the [fl] settings and executor, upload codec, aggregation,
  server optimizer step, checkpoint; real users, real model size) with its plain weighted
  mean, against the same round with the weighted mean replaced by secure aggregation of
  the very same updates (encode, keys, Shamir shares, masks, unmask, decode). The rest of
  the round is identical, so it is run once and counted in both.
- aggregation only: the protocol against the plain weighted mean.
Everything runs in this one process, so client-side protocol time is the sum over clients
(a real fleet runs them in parallel: the per-client figures say what one device pays).
`--neighbors K` adds SecAgg+ rows (masks and shares with K random peers instead of all).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.errors import FedkeyError
from fedkey.io import save_figure, write_json
from fedkey.progress import bar
from fedkey.tables import console
from fl_core.config import FLConfig


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--clients", default="10,50,100", help="comma-separated clients per round")
    p.add_argument("--neighbors", default="0", help="comma-separated SecAgg+ peer counts to time (0: all pairs, "
                                                   "Bonawitz et al. 2017, the one in the headline keys)")
    p.add_argument("--dropout", type=float, default=1 / 3,
                   help="also time a round at 50 clients (or the nearest) where this fraction drops after sharing keys")
    p.add_argument("--bits", type=int, default=32, choices=(16, 32), help="fixed-point ring size 2^bits")
    p.add_argument("--range", type=float, default=1.0, help="per-coordinate clamp of an encoded update")
    p.add_argument("--plot", type=Path, help="PNG (default: beside --json, else RUN_DIR/bench/secagg.png)")
    C.add_flags(p, C.ModelConfig)
    C.add_flags(p, FLConfig)


class _Recorder:
    """The engine's weighted mean, timed, keeping the round's updates so secure aggregation can sum the same ones."""

    def __init__(self, dim: int) -> None:
        from fl_core.aggregate import WeightedMean

        self.inner = WeightedMean(dim)

    def aggregate(self, updates, weights, ids=None, n_dropped=0):
        """Aggregate in the clear and remember what was aggregated."""
        t0, c0 = time.perf_counter(), time.process_time()
        res = self.inner.aggregate(updates, weights, ids, n_dropped)
        self.seconds, self.cpu_s = time.perf_counter() - t0, time.process_time() - c0
        self.updates, self.weights, self.mean = updates, weights, res.mean
        return res

    def state_dict(self) -> dict:
        """Nothing to keep."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


def _plain_round(run_dir: Path, mcfg: C.ModelConfig, fl: FLConfig, n: int, tmp: Path) -> tuple[dict, _Recorder]:
    """One round of the engine at n clients (everyone eligible, no over-selection or dropouts)."""
    from dataclasses import replace

    from fedkey.fl_stage import build_simulation
    from fl_core.config import FleetConfig

    cfg = replace(fl, clients_per_round=n, max_rounds=1, eval_every=0, compress="none", pretrain_epochs=0.0)
    fleet = FleetConfig(availability=False, overselect=1.0, dropout=0.0)
    sim, _, _ = build_simulation(run_dir, mcfg, cfg, fleet, tmp / f"round{n}")
    rec = _Recorder(sim.spec.n_shared)
    sim.aggregator = rec
    sim.checkpoint()  # the round-0 checkpoint a fresh run writes first is not part of the round
    c0 = time.process_time()
    log = sim.run_round()
    log["cpu_s"] = time.process_time() - c0
    if log["completed"] != n:
        raise FedkeyError(f"the engine ran {log['completed']} of {n} clients; the round cannot be compared")
    return log, rec


def run(args: argparse.Namespace) -> None:
    """Measure and print the cost table; write JSON and a PNG."""
    import torch

    from fl_core.privacy.aggregator import PrivateAggregator
    from fl_core.privacy.config import PrivacyConfig

    try:
        sizes = sorted({int(c) for c in str(args.clients).split(",") if c.strip()})
        ks = sorted({int(c) for c in str(args.neighbors).split(",") if c.strip()} | {0})
    except ValueError:
        raise FedkeyError(f"--clients/--neighbors: expected comma-separated integers") from None
    if not sizes or sizes[0] < 3:
        raise FedkeyError("--clients: every round needs at least 3 clients")
    fl, mcfg = C.from_args(FLConfig, args), C.from_args(C.ModelConfig, args)
    if fl.threads:
        torch.set_num_threads(fl.threads)
    shards, _ = P.load_prepared(args.run_dir)
    if len(shards.users("train")) < sizes[-1]:
        raise FedkeyError(f"{args.run_dir}: fewer training users than --clients {sizes[-1]}")
    rows = []
    drop_at = min(sizes, key=lambda n: abs(n - 50))
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp, \
            bar(not args.no_progress, "secagg bench", len(sizes)) as update:
        for i, n in enumerate(sizes):
            log, rec = _plain_round(args.run_dir, mcfg, fl, n, Path(tmp))
            dim = rec.updates[0].shape[0]
            row = {"clients": n, "params": dim, "tokens": log["tokens"], "round_s": log["wall_s"],
                   "round_cpu_s": log["cpu_s"], "train_s": log["train_s"], "plain_agg_s": rec.seconds,
                   "plain_agg_cpu_s": rec.cpu_s}
            for k in ks:
                cfg = PrivacyConfig(secagg=True, secagg_bits=args.bits, secagg_range=args.range, secagg_neighbors=k)
                t0, c0 = time.perf_counter(), time.process_time()
                res = PrivateAggregator(cfg, dim).aggregate(rec.updates, rec.weights)
                sec_s, sec_cpu = time.perf_counter() - t0, time.process_time() - c0
                tag = "" if k == 0 else f"_k{k}"
                row.update({f"secagg_agg_s{tag}": sec_s, f"secagg_agg_cpu_s{tag}": sec_cpu,
                            f"max_abs_error{tag}": float(np.abs(res.mean - rec.mean).max()),
                            **{f"{key}{tag}": v for key, v in _costs(res.info, n, dim).items()}})
            if n == drop_at and args.dropout > 0:
                gone = int(args.dropout * n)
                cfg = PrivacyConfig(secagg=True, secagg_bits=args.bits, secagg_range=args.range)
                t0 = time.perf_counter()
                PrivateAggregator(cfg, dim).aggregate(rec.updates[: n - gone], rec.weights[: n - gone], n_dropped=gone)
                row.update(dropped=gone, secagg_dropout_agg_s=time.perf_counter() - t0)
            rows.append(row)
            update(i + 1, f"{n} clients")
    out = _summary(rows, ks, args, fl)
    console.print(_table(rows, out))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run_dir / "bench" / "secagg.png")
    _plot(rows, out, plot)
    console.print(f"plot -> {plot}")
    if args.json:
        write_json(args.json, out)


def _costs(info: dict, n: int, dim: int) -> dict:
    return {"client_s_mean": info["secagg_client_s"] / n, "client_s_max": info["secagg_client_s_max"],
            "encode_s": info["secagg_encode_s"], "server_s": info["secagg_server_s"],
            "phase_s": info["secagg_phase_s"], "client_up_bytes": info["secagg_client_up_bytes"],
            "client_down_bytes": info["secagg_client_down_bytes"], "server_in_bytes": info["secagg_up_bytes"],
            "server_out_bytes": info["secagg_down_bytes"], "plain_client_up_bytes": 4 * dim + 8,
            "threshold": info["secagg_threshold"], "step": info["secagg_step"], "clamped": info["secagg_clamped"]}


def _summary(rows: list[dict], ks: list[int], args: argparse.Namespace, fl: FLConfig) -> dict:
    """The DESIGN.md keys (all-pairs protocol) plus both slowdowns, SecAgg+ figures and every row."""

    def series(tag: str) -> dict:
        plain = [r["round_s"] for r in rows]
        secure = [r["round_s"] - r["plain_agg_s"] + r[f"secagg_agg_s{tag}"] for r in rows]
        at50 = next((i for i, r in enumerate(rows) if r["clients"] == 50), None)
        plain_cpu = [r["round_cpu_s"] for r in rows]
        secure_cpu = [r["round_cpu_s"] - r["plain_agg_cpu_s"] + r[f"secagg_agg_cpu_s{tag}"] for r in rows]
        return {"secagg_round_s": secure, "slowdown": [s / p for s, p in zip(secure, plain)],
                "secagg_round_cpu_s": secure_cpu, "slowdown_cpu": [s / p for s, p in zip(secure_cpu, plain_cpu)],
                "slowdown_cpu_50": secure_cpu[at50] / plain_cpu[at50] if at50 is not None else None,
                "agg_slowdown": [r[f"secagg_agg_s{tag}"] / r["plain_agg_s"] for r in rows],
                "slowdown_50": secure[at50] / plain[at50] if at50 is not None else None,
                "agg_slowdown_50": (rows[at50][f"secagg_agg_s{tag}"] / rows[at50]["plain_agg_s"]
                                    if at50 is not None else None)}

    out = {"clients": [r["clients"] for r in rows], "plain_round_s": [r["round_s"] for r in rows],
           "plain_round_cpu_s": [r["round_cpu_s"] for r in rows], **series(""),
           "secagg_plus": {str(k): series(f"_k{k}") for k in ks if k},
           "params": rows[0].get("params"), "bits": args.bits, "executor": fl.executor,
           "round": "one fl_core.simulation round: selection, data, local training, codec, aggregation, server "
                    "step, checkpoint; secure = the same round with the weighted mean replaced",
           "rows": rows}
    return out


def _table(rows: list[dict], out: dict):
    """Round time (the headline, wall and CPU), aggregation alone, SecAgg+ if asked, then bytes."""
    from rich.console import Group
    from rich.table import Table

    def table(title: str, cols: tuple[str, ...]) -> Table:
        t = Table(title=title)
        for col in cols:
            t.add_column(col, justify="right")
        return t

    t = table(f"one engine round, {out['params']:,} params, {out['bits']}-bit ring, all pairs (seconds)",
              ("clients", "plain", "secagg", "slowdown", "plain CPU", "secagg CPU", "CPU slowdown"))
    for i, r in enumerate(rows):
        t.add_row(str(r["clients"]), f"{out['plain_round_s'][i]:.1f}", f"{out['secagg_round_s'][i]:.1f}",
                  f"{out['slowdown'][i]:.2f}x", f"{out['plain_round_cpu_s'][i]:.1f}",
                  f"{out['secagg_round_cpu_s'][i]:.1f}", f"{out['slowdown_cpu'][i]:.2f}x")
    t.caption = "CPU: seconds of CPU this process used (all threads), steadier than wall time on a shared machine"
    a = table("aggregation alone (seconds)", ("clients", "plain", "secagg", "slowdown", "encode", "client mean",
                                              "client max", "server"))
    for r in rows:
        a.add_row(str(r["clients"]), f"{r['plain_agg_s']:.3f}", f"{r['secagg_agg_s']:.2f}",
                  f"{r['secagg_agg_s'] / r['plain_agg_s']:.0f}x", f"{r['encode_s']:.2f}", f"{r['client_s_mean']:.3f}",
                  f"{r['client_s_max']:.3f}", f"{r['server_s']:.2f}")
    drop = [r for r in rows if "dropped" in r]
    a.caption = "client: one device's protocol compute (keys, Shamir shares, masks, unmasking)"
    if drop:
        a.caption += (f"; {drop[0]['clients']} clients with {drop[0]['dropped']} dropped after sharing keys: "
                      f"secagg {drop[0]['secagg_dropout_agg_s']:.2f} s")
    parts = [t, a]
    for k, ser in out["secagg_plus"].items():
        q = table(f"SecAgg+ with {k} peers per client (same rounds)",
                  ("clients", "secagg agg", "secagg round", "slowdown", "CPU slowdown", "client mean", "server"))
        for i, r in enumerate(rows):
            q.add_row(str(r["clients"]), f"{r[f'secagg_agg_s_k{k}']:.2f}", f"{ser['secagg_round_s'][i]:.1f}",
                      f"{ser['slowdown'][i]:.2f}x", f"{ser['slowdown_cpu'][i]:.2f}x", f"{r[f'client_s_mean_k{k}']:.3f}",
                      f"{r[f'server_s_k{k}']:.2f}")
        parts.append(q)
    b = table("bytes per round, all pairs", ("clients", "client up MB", "plain up MB", "client down KB", "server in MB"))
    for r in rows:
        b.add_row(str(r["clients"]), f"{r['client_up_bytes'] / 1e6:.3f}", f"{r['plain_client_up_bytes'] / 1e6:.3f}",
                  f"{r['client_down_bytes'] / 1e3:.1f}", f"{r['server_in_bytes'] / 1e6:.0f}")
    parts.append(b)
    return Group(*parts)


def _plot(rows: list[dict], out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    xs = np.arange(len(rows))
    rest = np.array([r["round_s"] - r["plain_agg_s"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    w = 0.38
    ax.bar(xs - w / 2, rest, w, color="tab:gray", label="rest of the round (local training, ...)")
    ax.bar(xs - w / 2, [r["plain_agg_s"] for r in rows], w, bottom=rest, color="tab:blue", label="plain aggregation")
    ax.bar(xs + w / 2, rest, w, color="tab:gray")
    ax.bar(xs + w / 2, [r["secagg_agg_s"] for r in rows], w, bottom=rest, color="tab:red",
           label="secure aggregation (all pairs)")
    for x, s in zip(xs, out["slowdown"]):
        ax.text(x + w / 2, out["secagg_round_s"][int(x)], f"{s:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [str(r["clients"]) for r in rows])
    ax.set_xlabel("clients per round")
    ax.set_ylabel("seconds per round (one process)")
    ax.set_title(f"round time: plain vs secure aggregation ({out['params']:,} params)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)
