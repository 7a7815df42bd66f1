"""Session 23's table and plot: each further-trained model's arms against the global model it started from.

    .venv/bin/python docs/results/personal23/summarize.py docs/results/personal21/phrase_ceiling.json \
        fedsgd=docs/results/personal23/fedsgd.json \
        meta=docs/results/personal23/meta.json reptile=docs/results/personal23/reptile.json --out docs/results/personal23/summary
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedkey.io import read_json, save_figure, write_json

ARMS = ("global", "cache_learning", "dynamic", "dynamic_cache")
LABELS = ("the model alone", "+ learning phrase cache", "+ dynamic evaluation", "+ dynamic evaluation and cache")


def rates(per_user: dict, users: list[str], arm: str) -> np.ndarray:
    """Each user's top-1 (points) under one arm."""
    return np.array([100 * per_user[u][arm] / per_user[u]["words"] for u in users])


def main() -> None:
    """Print and save every model's gains over the starting model, and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("start", type=Path, help="phrase_ceiling JSON of the model the probes started from")
    ap.add_argument("runs", nargs="+", help="NAME=phrase_ceiling JSON of a further-trained model")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    a = ap.parse_args()
    start = read_json(a.start)["per_user"]
    runs = {"start": start} | {n: read_json(Path(p))["per_user"] for n, p in (r.split("=", 1) for r in a.runs)}
    users = sorted(set.intersection(*(set(pu) for pu in runs.values())))
    ref = rates(start, users, "global")
    res = {"users": len(users), "start_global_top1": float(ref.mean()), "models": {}}
    for name, pu in runs.items():
        own = rates(pu, users, "global")
        res["models"][name] = {arm: {"over_start": float((rates(pu, users, arm) - ref).mean()),
                                     "over_own_global": float((rates(pu, users, arm) - own).mean()),
                                     "hurt_vs_own_global": int(((rates(pu, users, arm) - own) < -0.5).sum()),
                                     "oracle_vs_own_global": float(np.maximum(rates(pu, users, arm) - own, 0).mean())}
                               for arm in ARMS}
        row = res["models"][name]
        print(f"{name:8s} " + "  ".join(f"{arm} {row[arm]['over_start']:+.2f} (own {row[arm]['over_own_global']:+.2f}, "
                                         f"{row[arm]['hurt_vs_own_global']} hurt)" for arm in ARMS))
    write_json(a.out.with_suffix(".json"), res)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(ARMS)
    for k, (arm, label) in enumerate(zip(ARMS, LABELS)):
        ax.bar(np.arange(len(runs)) + k * w, [res["models"][n][arm]["over_start"] for n in runs], w, label=label)
    ax.set_xticks(np.arange(len(runs)) + w * (len(ARMS) - 1) / 2, ["start" if n == "start" else f"+1,000 rounds\n{n}" for n in runs])
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_ylabel("mean top-1 gain over the starting model (points)")
    ax.set_title(f"1,000 more rounds, then on-device adaptation ({len(users)} users, teacher-forced)")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    save_figure(fig, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
