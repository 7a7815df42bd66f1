"""Session 23's table and plot: each further-trained model's arms against the global model it started from.

    .venv/bin/python docs/results/personal23/summarize.py docs/results/personal21/phrase_ceiling.json \
        fedsgd=docs/results/personal23/fedsgd.json \
        meta=docs/results/personal23/meta.json reptile=docs/results/personal23/reptile.json --out docs/results/personal23/summary \
        --reports start=runs/full21/personal/report.json fedsgd=runs/psgd/personal/report.json \
        meta=runs/pmeta/personal/report.json fedsgd_seed1=runs/psgd1/personal/report.json \
        meta_seed1=runs/pmeta1/personal/report.json

(runs/pX: `fedkey personalize --all --run-dir runs/pX --model runs/X1k --preset full`, each run folder linking
runs/full21's data, tokenizer and fl; the seed-1 models from `meta_probe.py ... --seed 1`.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedkey.io import read_json, save_figure, write_json
from personalization.report import mean_interval

ARMS = ("global", "cache_learning", "dynamic", "dynamic_cache")
LABELS = ("the model alone", "+ learning phrase cache", "+ dynamic evaluation", "+ dynamic evaluation and cache")


def rates(per_user: dict, users: list[str], arm: str) -> np.ndarray:
    """Each user's top-1 (points) under one arm."""
    return np.array([100 * per_user[u][arm] / per_user[u]["words"] for u in users])


def _ci(d: np.ndarray, rng: np.random.Generator, weights: np.ndarray | None = None) -> list[float]:
    """The mean of per-user differences and its 95% bootstrap interval, the report's; with weights (each user's
    words) the pooled mean, resampling users the same way."""
    if weights is None:
        return [float(d.mean()), *mean_interval(list(d))]
    boots = [(d[i] * weights[i]).sum() / weights[i].sum() for i in (rng.integers(0, len(d), len(d)) for _ in range(2000))]
    return [float((d * weights).sum() / weights.sum()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def compare_reports(reports: dict[str, dict], out: Path) -> dict:
    """`fedkey personalize --json` reports of models trained further, paired per user against the first one's global
    model and against each other; writes the per-user figures and the comparison to `out`."""
    rng = np.random.default_rng(0)
    users = sorted(u for u in set.intersection(*(set(r["global"]["per_user"]) for r in reports.values()))
                   if all(r[k]["per_user"][u]["top1"] is not None for r in reports.values()
                          for k in ("global", "personalized")))
    top1 = {n: {k: np.array([100 * r[k]["per_user"][u]["top1"] for u in users]) for k in ("global", "personalized")}
            for n, r in reports.items()}
    words = np.array([next(iter(reports.values()))["global"]["per_user"][u]["n_words"] for u in users], float)
    start = top1[next(iter(reports))]["global"]
    res = {"users": len(users), "models": {}}
    for n, r in reports.items():
        g, p = top1[n]["global"], top1[n]["personalized"]
        res["models"][n] = {
            "base_model": r["base_model"],
            "gain_per_user": _ci(p - g, rng), "hurt": int((p - g < -0.5).sum()), "improved": int((p - g > 0.5).sum()),
            "pooled_gain": _ci(p - g, rng, words), "global_over_start": _ci(g - start, rng),
            "personalized_over_start": _ci(p - start, rng),
            "pooled": {k: {m: r[k]["pooled"][m] for m in ("top1", "top3", "ksr")} for k in ("global", "personalized")},
            "gb_regional_as_typed": {k: r["regional_as_typed"][k]["GB"]["acc"] for k in ("global", "personalized")},
            "us_regional_as_typed": {k: r["regional_as_typed"][k]["US"]["acc"] for k in ("global", "personalized")},
            "per_user_top1": {u: [int(words[i]), float(g[i]), float(p[i])] for i, u in enumerate(users)}}
        m = res["models"][n]
        print(f"{n:8s} gain {m['gain_per_user'][0]:+.2f} ({m['gain_per_user'][1]:+.2f} .. {m['gain_per_user'][2]:+.2f}), "
              f"{m['hurt']} hurt; pooled {m['pooled_gain'][0]:+.2f}; personalized over the start's global "
              f"{m['personalized_over_start'][0]:+.2f} ({m['personalized_over_start'][1]:+.2f} .. "
              f"{m['personalized_over_start'][2]:+.2f})")
    names = list(reports)
    for a, b in zip(names[1::2], names[2::2]):  # after the start: (control, treatment) pairs
        for k in ("global", "personalized"):
            d = top1[b][k] - top1[a][k]
            res[f"{b}_minus_{a}_{k}"] = {"per_user": _ci(d, rng), "pooled": _ci(d, rng, words)}
            print(f"{b} - {a}, {k}: per user {res[f'{b}_minus_{a}_{k}']['per_user']}, "
                  f"pooled {res[f'{b}_minus_{a}_{k}']['pooled']}")
    write_json(out, res)
    return res


def main() -> None:
    """Print and save every model's gains over the starting model, and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("start", type=Path, help="phrase_ceiling JSON of the model the probes started from")
    ap.add_argument("runs", nargs="+", help="NAME=phrase_ceiling JSON of a further-trained model")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    ap.add_argument("--reports", nargs="+", default=[],
                    help="NAME=`fedkey personalize --json` report, the starting model's first, then (control, treatment) "
                         "pairs: also writes OUT_personalize.json, the shipped personalization of each model paired "
                         "per user")
    a = ap.parse_args()
    if a.reports:
        compare_reports({n: read_json(Path(p)) for n, p in (r.split("=", 1) for r in a.reports)},
                        a.out.with_name(a.out.name + "_personalize.json"))
    start = read_json(a.start)["per_user"]
    runs = {"start": start} | {n: read_json(Path(p))["per_user"] for n, p in (r.split("=", 1) for r in a.runs)}
    users = sorted(set.intersection(*(set(pu) for pu in runs.values())))
    ref = rates(start, users, "global")
    res = {"users": len(users), "start_global_top1": float(ref.mean()), "models": {}}
    for name, pu in runs.items():
        own = rates(pu, users, "global")
        res["models"][name] = {}
        for arm in ARMS:
            r = rates(pu, users, arm)
            res["models"][name][arm] = {"over_start": float((r - ref).mean()), "over_own_global": float((r - own).mean()),
                                        "hurt_vs_own_global": int((r - own < -0.5).sum()),
                                        "oracle_vs_own_global": float(np.maximum(r - own, 0).mean())}
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
