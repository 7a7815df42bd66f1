"""What personalization changed: per-user gains, who improved or got worse, the histogram and tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedkey.io import save_figure
from fedkey.tables import metrics_table

THRESHOLD = 0.005  # a user counts as improved / hurt when top-1 moves by more than half a point
BOOTSTRAP_SAMPLES = 2000


def top1_gains(glob: dict, pers: dict) -> dict[str, float]:
    """Per-user top-1 gain (personalized - global) over users with test words."""
    out = {}
    for u, m in glob["per_user"].items():
        p = pers["per_user"].get(u)
        if m["top1"] is not None and p is not None and p["top1"] is not None:
            out[u] = p["top1"] - m["top1"]
    return out


def count_changes(gains: dict[str, float], region_of: dict[str, str]) -> dict:
    """How many users improved, got worse, stayed within THRESHOLD; overall and by region."""
    def tally(us: list[str]) -> dict:
        g = [gains[u] for u in us]
        return {"users": len(g), "improved": sum(x > THRESHOLD for x in g), "hurt": sum(x < -THRESHOLD for x in g),
                "unchanged": sum(abs(x) <= THRESHOLD for x in g),
                "mean_top1_gain": sum(g) / len(g) if g else None, "mean_top1_gain_ci95": mean_interval(g)}
    out = tally(sorted(gains))
    out["by_region"] = {r: tally([u for u in sorted(gains) if region_of.get(u) == r])
                        for r in sorted({region_of.get(u, "?") for u in gains})}
    return out


def mean_interval(values: list[float], seed: int = 0) -> list[float] | None:
    """95% bootstrap interval (percentile, resampling users) of the mean of per-user values; None under 2 users."""
    # a few dozen sampled words a user make each gain noisy: the interval says how far the mean itself could move
    if len(values) < 2:
        return None
    v = np.sort(np.asarray(values, dtype=np.float64))  # the same users in any order: the same interval
    idx = np.random.default_rng(seed).integers(0, len(v), size=(BOOTSTRAP_SAMPLES, len(v)))
    lo, hi = np.percentile(v[idx].mean(axis=1), [2.5, 97.5])
    return [float(lo), float(hi)]


def format_interval(ci: list[float] | None) -> str:
    """A mean gain's interval in points ("-" where none was measured, as in reports written before it was)."""
    return "-" if not ci else f"{100 * ci[0]:+.2f} .. {100 * ci[1]:+.2f} pt"


def histogram(gains: dict[str, float], region_of: dict[str, str], path: Path, title: str) -> None:
    """PNG histogram of per-user top-1 gains in points, one colour per region."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    regions = sorted({region_of.get(u, "?") for u in gains})
    data = [[100 * g for u, g in gains.items() if region_of.get(u, "?") == r] for r in regions]
    lo = min([min(d) for d in data if d] + [-1.0])
    hi = max([max(d) for d in data if d] + [1.0])
    bins = [lo + (hi - lo) * i / 40 for i in range(41)]
    ax.hist(data, bins=bins, stacked=True, label=[f"{r} ({len(d)} users)" for r, d in zip(regions, data)])
    ax.axvline(0, color="black", lw=0.8)
    for x in (-100 * THRESHOLD, 100 * THRESHOLD):
        ax.axvline(x, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("top-1 gain of the personalized model over the global model (points)")
    ax.set_ylabel("users")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}%")


def print_report(rep: dict, console: Console, per_user_rows: int = 10) -> None:
    """The tables `fedkey personalize` prints."""
    g, p = rep["global"], rep["personalized"]
    rows = [("global (pooled)", g["pooled"]), ("personalized (pooled)", p["pooled"]),
            ("global (mean over users)", g["mean_over_users"]), ("personalized (mean over users)", p["mean_over_users"])]
    for r in sorted(g["by_region"]):
        rows += [(f"global, {r} users", g["by_region"][r]), (f"personalized, {r} users", p["by_region"].get(r, {}))]
    console.print(metrics_table(f"global vs personalized on {rep['split']} ({rep['users']} users)", rows))

    t = Table(title="users whose top-1 moved by more than 0.5 point")
    for col in ("region", "users", "improved", "got worse", "unchanged", "mean top-1 gain (pt)", "95% interval",
                "gate chose adapter"):
        t.add_column(col, justify="left" if col == "region" else "right")
    ch = rep["changes"]
    for label, c in [("all", ch)] + list(ch["by_region"].items()):
        t.add_row(label, str(c["users"]), str(c["improved"]), str(c["hurt"]), str(c["unchanged"]),
                  _pct(c["mean_top1_gain"], True), format_interval(c.get("mean_top1_gain_ci95")), str(rep["gated_in_by_region"].get(label, rep["gated_in"]) if label != "all" else rep["gated_in"]))
    console.print(t)

    reg = rep.get("regional_all_positions")
    if reg:
        empty = {"global": {}, "personalized": {}}
        pre = rep.get("regional_after_shared_prefix") or empty
        off = rep.get("regional_as_typed") or empty
        t = Table(title="regional-variant accuracy over every regional-pair word of the test split: own variant in "
                        "the top 3 and above the other (DESIGN.md: with nothing typed; also once the variants' shared "
                        "prefix, e.g. \"favo\", is typed; and as typed: at the first keystroke that offers either variant)")
        for col in ("users", "own variant typed in train?", "global", "personalized", "global, prefix typed",
                    "personalized, prefix typed", "global, as typed", "personalized, as typed", "positions"):
            t.add_column(col, justify="left" if col in ("users", "own variant typed in train?") else "right")
        for key in sorted(k for k in reg["global"] if k != "per_user"):
            region, _, sub = key.partition("/")
            t.add_row(region, {"": "all", "typed": "yes", "never_typed": "no"}[sub], _pct(reg["global"][key]["acc"]),
                      _pct(reg["personalized"].get(key, {}).get("acc")),
                      *[_pct(v[m].get(key, {}).get("acc")) for v in (pre, off) for m in ("global", "personalized")],
                      str(reg["global"][key]["n"]))
        console.print(t)

    gains = rep["top1_gain_per_user"]
    if gains:
        t = Table(title="per user (largest changes first)" if len(gains) > per_user_rows else "per user")
        for col in ("user", "region", "words", "top-1 global", "top-1 personal", "top-3 global", "top-3 personal",
                    "KSR global", "KSR personal", "regional global", "regional personal", "adapter"):
            t.add_column(col, justify="left" if col in ("user", "region", "adapter") else "right")
        order = sorted(gains, key=lambda u: -abs(gains[u]))[:per_user_rows]
        for u in order:
            gm, pm = g["per_user"][u], p["per_user"][u]
            t.add_row(u[:12], rep["region_of"].get(u, "?"), str(gm["n_words"]), _pct(gm["top1"]), _pct(pm["top1"]),
                      _pct(gm["top3"]), _pct(pm["top3"]), _pct(gm["ksr"]), _pct(pm["ksr"]),
                      _pct(gm["regional_acc"]), _pct(pm["regional_acc"]), "yes" if rep["use_adapter"].get(u) else "no")
        console.print(t)
    console.print(f"adapters kept by the gate: {rep['gated_in']:,} of {rep['users']:,} users; "
                  f"mean adapter file {rep['adapter_bytes_mean'] or 0:,.0f} bytes; phrase caches kept: "
                  f"{rep.get('caches_kept', 0):,} (mean {rep.get('cache_bytes_mean') or 0:,.0f} bytes, "
                  f"max {rep.get('cache_bytes_max') or 0:,.0f}); "
                  f"personalizing took {rep['seconds']['personalize']:.0f} s, evaluating {rep['seconds']['evaluate']:.0f} s"
                  + (f"; histogram: {rep['histogram']}" if rep.get("histogram") else ""))
