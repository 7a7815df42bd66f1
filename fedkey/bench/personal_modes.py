"""Personalization arms side by side: low-rank adapter + output bias vs fine-tuning the last layers vs the whole model.

A seeded sample of training users; every arm trains on each user's own train split only, early-stops on
the latest-10% validation slice and goes through the same gate (a user whose validation does not improve
keeps the global model). Compared on the users' test splits (every word position): mean top-1 gain over
the global model, users improved / hurt by more than 0.5 point, what each user stores, and training time.
The adaptation layers alone: no phrase cache, spelling preference or respelling in any arm.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fedkey.errors import FedkeyError
from fedkey.io import save_figure, write_json
from fedkey.progress import bar
from fedkey.tables import console

ARMS = ("adapter", "last", "full")


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--model", type=Path, help="global model folder (default: the run's fl/ model, else central/)")
    p.add_argument("--users", type=int, default=40, help="seeded sample of training users")
    p.add_argument("--min-train-tokens", type=int, default=1000,
                   help="sample among users with at least this many train pieces (most users have too little text "
                        "for any arm to pass the gate)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms among {', '.join(ARMS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the user sample and of training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--plot", type=Path, help="PNG (default: beside --json, else RUN_DIR/bench/personal_modes.png)")


def _arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise FedkeyError(f"--arms {text!r}: choose among {', '.join(ARMS)}")
    return arms


def run(args: argparse.Namespace) -> None:
    """Train every arm on the same users and print the comparison."""
    import torch

    from data.british import REGIONAL_PAIRS
    from fedkey import config as C
    from fedkey import pipeline as P
    from fedkey.personal_stage import TRAIN_SPLIT, _messages
    from keyboard.adapter_file import AdapterArrays, save_adapter
    from keyboard.checkpoint import load_model
    from keyboard.evaluate import evaluate
    from keyboard.words import PieceTable
    from personalization.batched import train_adapters
    from personalization.config import PersonalConfig
    from personalization.data import load_users
    from personalization.evaluate import AdapterBank, evaluate_users
    from personalization.finetune import LAST_PARAMS, finetune_user
    from personalization.report import count_changes
    from personalization.store import base_id, default_base

    arms = _arms(args.arms)
    if args.users < 1:
        raise FedkeyError(f"--users {args.users}: at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = args.model or default_base(args.run_dir)
    bid = base_id(model_dir)
    shards, _ = P.load_prepared(args.run_dir)
    base, tok, _ = load_model(model_dir)
    base.eval()
    # the adaptation layers alone: no phrase cache, spelling preference or respelling in any arm
    pcfg = PersonalConfig(seed=args.seed, cache_order=0, regional_penalty=0.0, regional_respell=False)
    ecfg = C.EvalConfig(max_positions=0, ksr_messages=0, threads=args.threads)
    pool = shards.users("train")
    if args.min_train_tokens > 0:
        every = load_users(shards, tok, pool, pcfg.val_frac, pcfg.max_len, 10**9, 0, split=TRAIN_SPLIT["train"])
        pool = [u.user for u in every if u.train_tokens >= args.min_train_tokens]
        if not pool:
            raise FedkeyError(f"no training user has {args.min_train_tokens} train pieces; lower --min-train-tokens")
    rng = np.random.default_rng(args.seed)
    users = sorted(pool[i] for i in rng.choice(len(pool), size=min(args.users, len(pool)), replace=False))
    table = PieceTable.from_tokenizer(tok)
    starts = torch.zeros(tok.vocab_size, dtype=torch.bool)
    starts[torch.from_numpy(table.start_space)] = True
    cont = torch.zeros(tok.vocab_size, dtype=torch.bool)
    cont[torch.from_numpy(table.cont)] = True
    data = load_users(shards, tok, users, pcfg.val_frac, pcfg.max_len, pcfg.max_train_tokens, pcfg.max_val_tokens,
                      split=TRAIN_SPLIT["train"])
    msgs = _messages(shards, users)
    region_of = {u.user: u.region for u in data}
    model_bytes = (model_dir / "model.pt").stat().st_size

    out: dict = {"model": str(model_dir), "users": len(users), "min_train_tokens": args.min_train_tokens,
                 "seed": args.seed, "arms": {}}
    t0 = time.perf_counter()
    adapters = train_adapters(base, data, pcfg, starts, cont) if "adapter" in arms else []
    t_adapter = time.perf_counter() - t0

    def bank(only_gated: bool) -> AdapterBank:
        return AdapterBank(base, {r.user: AdapterArrays(r.A, r.B, r.user_bias, bid, r.user, {})
                                  for r in adapters if r.use_adapter or not only_gated})

    with bar(not args.no_progress, f"evaluating global and adapters on {len(users)} users' test text", len(msgs),
             unit="msg") as update:
        glob, gated, always = evaluate_users(base, [AdapterBank(base, {}), bank(True), bank(False)], tok, msgs, ecfg,
                                             progress=lambda d, n: update(d, ""))
    g_top1 = {u: m["top1"] for u, m in glob["per_user"].items() if m["top1"] is not None}  # users with test words
    out["global"] = {"mean_top1": float(np.mean(list(g_top1.values()))), "pooled_top1": glob["pooled"]["top1"]}
    per_arm: dict[str, tuple[dict, dict]] = {}  # arm -> (gated, always applied) per-user top-1
    if "adapter" in arms:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = [save_adapter(Path(tmp) / f"{r.user}.npz", AdapterArrays(r.A, r.B, r.user_bias, bid, r.user, {}))
                     for r in adapters]
        per_arm["adapter"] = tuple({u: m["top1"] for u, m in e["per_user"].items()} for e in (gated, always))
        out["arms"]["adapter"] = {"gated_in": sum(r.use_adapter for r in adapters), "train_s": t_adapter,
                                  "bytes_per_user": float(np.mean(sizes))}
    for arm in (a for a in arms if a != "adapter"):
        t1, kept, top1_g, top1_a = time.perf_counter(), 0, dict(g_top1), dict(g_top1)
        with bar(not args.no_progress, f"fine-tuning ({arm}) and evaluating", len(data), unit="users") as update:
            for i, u in enumerate(data):
                r = finetune_user(base, u, pcfg, arm, starts, cont)
                kept += r.use_adapter
                if r.model is not None and u.user in g_top1:
                    got = evaluate(r.model, tok, [m for m in msgs if m.user == u.user], ecfg)["per_user"][u.user]["top1"]
                    top1_a[u.user] = got
                    if r.use_adapter:
                        top1_g[u.user] = got
                update(i + 1, "")
        per_arm[arm] = (top1_g, top1_a)
        trained = sum(p.numel() for n, p in base.named_parameters() if arm == "full" or n in LAST_PARAMS)
        out["arms"][arm] = {"gated_in": kept, "train_s": time.perf_counter() - t1, "trained_params": trained,
                            "bytes_per_user": float(model_bytes)}
    for arm, pair in per_arm.items():
        for key, top1 in zip(("gated", "always"), pair):
            gains = {u: 100 * (top1[u] - g_top1[u]) for u in g_top1}
            ch = count_changes({u: g / 100 for u, g in gains.items()}, region_of)
            out["arms"][arm][key] = {"mean_top1": float(np.mean([top1[u] for u in g_top1])),
                                     "mean_gain_points": float(np.mean(list(gains.values()))),
                                     "improved": ch["improved"], "hurt": ch["hurt"], "unchanged": ch["unchanged"],
                                     "gain_per_user": gains}
    console.print(_table(out))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run_dir / "bench" / "personal_modes.png")
    _plot(out, plot)
    console.print(f"per-user gains -> {plot}")
    if args.json:
        write_json(args.json, out)


def _table(out: dict):
    from rich.table import Table

    t = Table(title=f"personalization arms on {out['users']} users' test splits (users with >= "
                    f"{out['min_train_tokens']:,} train pieces; global mean top-1 {100 * out['global']['mean_top1']:.2f}%)")
    for col in ("arm", "gate kept", "mean gain, gated", "improved / hurt > 0.5 / same, gated", "mean gain, always",
                "improved / hurt > 0.5 / same, always", "stored per user", "train time"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    for arm, a in out["arms"].items():
        size = a["bytes_per_user"]
        cells = []
        for key in ("gated", "always"):
            r = a[key]
            cells += [f"{r['mean_gain_points']:+.2f} pt", f"{r['improved']} / {r['hurt']} / {r['unchanged']}"]
        t.add_row(arm, f"{a['gated_in']}", *cells,
                  f"{size / 1e3:.1f} kB" if size < 1e6 else f"{size / 1e6:.1f} MB (whole model)", f"{a['train_s']:.0f} s")
    return t


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    arms = list(out["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, key, title in zip(axes, ("gated", "always"), ("gated on the validation slice", "always applied")):
        ax.boxplot([sorted(out["arms"][a][key]["gain_per_user"].values()) for a in arms], showmeans=True)
        ax.set_xticks(range(1, len(arms) + 1), arms)
        ax.axhline(0, color="grey", lw=1)
        ax.axhline(-0.5, color="tab:red", lw=1, ls="--", label="hurt: below -0.5 point")
        ax.set_title(title)
    axes[0].set_ylabel("per-user top-1 gain over the global model (points)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{out['users']} users with >= {out['min_train_tokens']:,} train pieces")
    fig.tight_layout()
    save_figure(fig, path)
