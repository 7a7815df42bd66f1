"""Secure aggregation cost: time and bytes per client and for the server, and a round's slowdown vs plain FedAvg.

Two slowdowns, both reported:
- round: local training of the round's clients (real users' train text, real model size,
  1 epoch) plus aggregation; plain = weighted mean in the clear, secure = the whole
  Bonawitz protocol (encode, keys, Shamir shares, masks, unmask, decode). Local training is
  identical in both rounds, so it is measured once per client count and counted in both.
- aggregation only: the protocol against the plain weighted mean.
Everything runs in this one process, so client-side protocol time is the sum over clients
(a real fleet runs them in parallel: the per-client figures say what one device pays).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from fedkey import config as C
from fedkey import pipeline as P
from fedkey.errors import FedkeyError
from fedkey.io import write_json
from fedkey.progress import bar
from fedkey.tables import console


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--clients", default="10,50,100", help="comma-separated clients per round")
    p.add_argument("--dropout", type=float, default=1 / 3,
                   help="also time a round at 50 clients (or the nearest) where this fraction drops after sharing keys")
    p.add_argument("--bits", type=int, default=32, choices=(16, 32), help="fixed-point ring size 2^bits")
    p.add_argument("--range", type=float, default=1.0, help="per-coordinate clamp of an encoded update")
    p.add_argument("--epochs", type=int, default=1, help="local epochs of each client in the round baseline")
    p.add_argument("--batch-size", type=int, default=16, help="local batch size (messages)")
    p.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate (only shapes the updates)")
    p.add_argument("--no-train", action="store_true", help="skip local training (aggregation-only figures)")
    p.add_argument("--seed", type=int, default=0, help="seed of client sampling and model init")
    p.add_argument("--threads", type=int, default=0, help="torch threads for local training (0: torch default)")
    p.add_argument("--plot", type=Path, help="PNG (default: beside --json, else RUN_DIR/bench/secagg.png)")
    C.add_flags(p, C.ModelConfig)


def _local_round(model, user_seqs: list[list[list[int]]], epochs: int, batch_size: int, lr: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Train each client from the same global weights; (deltas, weights = tokens, seconds, tokens)."""
    import torch

    from keyboard.batches import iterate_epoch
    from keyboard.train import lm_loss

    start = [p.detach().clone() for p in model.parameters()]
    dim = sum(p.numel() for p in start)
    deltas = np.empty((len(user_seqs), dim), np.float32)
    weights = np.empty(len(user_seqs))
    t0, tokens = time.perf_counter(), 0
    for i, seqs in enumerate(user_seqs):
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        n = 0
        for e in range(epochs):
            for x, y in iterate_epoch(seqs, batch_size, seed + i, e):
                loss, k = lm_loss(model, x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                n += k
        deltas[i] = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]).numpy()
        weights[i] = max(n, 1)
        tokens += n
    return deltas, weights, time.perf_counter() - t0, tokens


def _plain_mean(deltas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    times, out = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        out = np.einsum("i,ij->j", weights, deltas, dtype=np.float64) / weights.sum()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run(args: argparse.Namespace) -> None:
    """Measure and print the cost table; write JSON and a PNG."""
    import torch

    from fl_core.privacy.aggregator import PrivateAggregator
    from fl_core.privacy.config import PrivacyConfig
    from keyboard.model import KeyboardLM

    try:
        sizes = sorted({int(c) for c in str(args.clients).split(",") if c.strip()})
    except ValueError:
        raise FedkeyError(f"--clients: expected comma-separated integers, got {args.clients!r}") from None
    if not sizes or sizes[0] < 3:
        raise FedkeyError("--clients: every round needs at least 3 clients")
    if args.threads:
        torch.set_num_threads(args.threads)
    shards, tok = P.load_prepared(args.run_dir)
    torch.manual_seed(args.seed)
    model = KeyboardLM(tok.vocab_size, C.from_args(C.ModelConfig, args))
    dim = model.describe()["params"]
    users = shards.users("train")
    if len(users) < sizes[-1]:
        raise FedkeyError(f"{args.run_dir}: only {len(users)} training users, fewer than --clients {sizes[-1]}")
    rng = np.random.default_rng(args.seed)
    cfg = PrivacyConfig(secagg=True, secagg_bits=args.bits, secagg_range=args.range)
    rows = []
    drop_at = min(sizes, key=lambda n: abs(n - 50))
    with bar(not args.no_progress, "secagg bench", len(sizes)) as update:
        for k, n in enumerate(sizes):
            picked = [users[i] for i in rng.choice(len(users), n, replace=False)]
            if args.no_train:
                deltas = rng.normal(0, 1e-3, (n, dim)).astype(np.float32)
                weights, train_s, tokens = rng.integers(10, 1000, n).astype(np.float64), 0.0, 0
            else:
                seqs = [_user_seqs(shards, tok, u) for u in picked]
                deltas, weights, train_s, tokens = _local_round(model, seqs, args.epochs, args.batch_size, args.lr,
                                                                args.seed)
            plain, plain_s = _plain_mean(deltas, weights)
            t0 = time.perf_counter()
            res = PrivateAggregator(cfg, dim).aggregate(deltas, weights)
            sec_s = time.perf_counter() - t0
            row = {"clients": n, "tokens": tokens, "train_s": train_s, "plain_agg_s": plain_s, "secagg_agg_s": sec_s,
                   "max_abs_error": float(np.abs(res.mean - plain).max()), **_costs(res.info, n, dim)}
            if n == drop_at and args.dropout > 0:
                gone = int(args.dropout * n)
                t0 = time.perf_counter()
                PrivateAggregator(cfg, dim).aggregate(deltas[: n - gone], weights[: n - gone], n_dropped=gone)
                row.update(dropped=gone, secagg_dropout_agg_s=time.perf_counter() - t0)
            rows.append(row)
            update(k + 1, f"{n} clients")
    out = _summary(rows, dim, args)
    console.print(_table(rows, out))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run_dir / "bench" / "secagg.png")
    _plot(rows, out, plot)
    console.print(f"plot -> {plot}")
    if args.json:
        write_json(args.json, out)


def _user_seqs(shards, tok, user: str) -> list[list[int]]:
    from keyboard.batches import frame

    return [frame(ids, 64) for ids in tok.encode_batch(shards.user_texts("train", user))]


def _costs(info: dict, n: int, dim: int) -> dict:
    return {"client_s_mean": info["secagg_client_s"] / n, "client_s_max": info["secagg_client_s_max"],
            "encode_s": info["secagg_encode_s"], "server_s": info["secagg_server_s"],
            "phase_s": info["secagg_phase_s"], "client_up_bytes": info["secagg_client_up_bytes"],
            "client_down_bytes": info["secagg_client_down_bytes"], "server_in_bytes": info["secagg_up_bytes"],
            "server_out_bytes": info["secagg_down_bytes"], "plain_client_up_bytes": 4 * dim + 8,
            "threshold": info["secagg_threshold"], "step": info["secagg_step"], "clamped": info["secagg_clamped"]}


def _summary(rows: list[dict], dim: int, args: argparse.Namespace) -> dict:
    plain = [r["train_s"] + r["plain_agg_s"] for r in rows]
    secure = [r["train_s"] + r["secagg_agg_s"] for r in rows]
    at50 = next((i for i, r in enumerate(rows) if r["clients"] == 50), None)
    return {"clients": [r["clients"] for r in rows], "plain_round_s": plain, "secagg_round_s": secure,
            "slowdown_50": secure[at50] / plain[at50] if at50 is not None else None,
            "agg_slowdown_50": rows[at50]["secagg_agg_s"] / rows[at50]["plain_agg_s"] if at50 is not None else None,
            "slowdown": [s / p for s, p in zip(secure, plain)],
            "agg_slowdown": [r["secagg_agg_s"] / r["plain_agg_s"] for r in rows],
            "params": dim, "bits": args.bits, "local_training": None if args.no_train else
            f"sequential per-client torch SGD, {args.epochs} epoch(s), batch {args.batch_size} messages",
            "rows": rows}


def _table(rows: list[dict], out: dict):
    """Two tables: round time (the headline), then per-client and server cost."""
    from rich.console import Group
    from rich.table import Table

    t = Table(title=f"round time, {out['params']:,} params, {out['bits']}-bit ring (seconds, one process)")
    for col in ("clients", "local train", "plain round", "secagg round", "slowdown", "plain agg", "secagg agg",
                "agg slowdown"):
        t.add_column(col, justify="right")
    for r, p, s in zip(rows, out["plain_round_s"], out["secagg_round_s"]):
        t.add_row(str(r["clients"]), f"{r['train_s']:.1f}", f"{p:.1f}", f"{s:.1f}", f"{s / p:.2f}x",
                  f"{r['plain_agg_s']:.3f}", f"{r['secagg_agg_s']:.2f}", f"{r['secagg_agg_s'] / r['plain_agg_s']:.0f}x")
    drop = [r for r in rows if "dropped" in r]
    if drop:
        r = drop[0]
        t.caption = (f"{r['clients']} clients with {r['dropped']} dropped after sharing keys: secagg agg "
                     f"{r['secagg_dropout_agg_s']:.2f} s (vs {r['secagg_agg_s']:.2f} s with none)")
    c = Table(title="cost per client (one device) and for the server")
    for col in ("clients", "client s mean", "client s max", "server s", "client up MB", "plain up MB",
                "client down KB", "server in MB"):
        c.add_column(col, justify="right")
    for r in rows:
        c.add_row(str(r["clients"]), f"{r['client_s_mean']:.3f}", f"{r['client_s_max']:.3f}", f"{r['server_s']:.2f}",
                  f"{r['client_up_bytes'] / 1e6:.3f}", f"{r['plain_client_up_bytes'] / 1e6:.3f}",
                  f"{r['client_down_bytes'] / 1e3:.1f}", f"{r['server_in_bytes'] / 1e6:.0f}")
    c.caption = "client s: that device's protocol compute (keys, shares, masks, unmask; encoding not included)"
    return Group(t, c)


def _plot(rows: list[dict], out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    xs = np.arange(len(rows))
    train = np.array([r["train_s"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    w = 0.38
    ax.bar(xs - w / 2, train, w, color="tab:gray", label="local training")
    ax.bar(xs - w / 2, [r["plain_agg_s"] for r in rows], w, bottom=train, color="tab:blue", label="plain aggregation")
    ax.bar(xs + w / 2, train, w, color="tab:gray")
    ax.bar(xs + w / 2, [r["secagg_agg_s"] for r in rows], w, bottom=train, color="tab:red",
           label="secure aggregation")
    for x, s in zip(xs, out["slowdown"]):
        ax.text(x + w / 2, out["secagg_round_s"][int(x)], f"{s:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [str(r["clients"]) for r in rows])
    ax.set_xlabel("clients per round")
    ax.set_ylabel("seconds per round (one process)")
    ax.set_title(f"round time: plain vs secure aggregation ({out['params']:,} params)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
