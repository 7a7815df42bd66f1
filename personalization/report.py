"""What personalization changed: per-user gains, who improved or got worse, the histogram and tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from fedkey.io import save_figure
from fedkey.tables import metrics_table

THRESHOLD = 0.005  # a user counts as improved / hurt when top-1 moves by more than half a point
BOOTSTRAP_SAMPLES = 2000
# a user's train split in word pieces: what the device has to learn from (the median chitchat user has ~300)
TEXT_EDGES = (100, 300, 1000, 3000)


def top1_gains(glob: dict, pers: dict) -> dict[str, float]:
    """Per-user top-1 gain (personalized - global) over users with test words."""
    out = {}
    for u, m in glob["per_user"].items():
        p = pers["per_user"].get(u)
        if m["top1"] is not None and p is not None and p["top1"] is not None:
            out[u] = p["top1"] - m["top1"]
    return out


def text_bucket(pieces: int) -> str:
    """The TEXT_EDGES band a user's amount of train text falls in ("300-999", "3000+")."""
    lo = 0
    for hi in TEXT_EDGES:
        if pieces < hi:
            return f"{lo}-{hi - 1}"
        lo = hi
    return f"{lo}+"


TEXT_BANDS = tuple(text_bucket(x) for x in (0, *TEXT_EDGES))  # every band, fewest pieces first


def count_changes(gains: dict[str, float], region_of: dict[str, str], text_of: dict[str, int] | None = None) -> dict:
    """How many users improved, got worse, stayed within THRESHOLD; overall, by region and (with text_of, each
    user's train pieces) by the amount of text the user's device learned from."""
    def tally(us: list[str]) -> dict:
        g = [gains[u] for u in us]
        return {"users": len(g), "improved": sum(x > THRESHOLD for x in g), "hurt": sum(x < -THRESHOLD for x in g),
                "unchanged": sum(abs(x) <= THRESHOLD for x in g),
                "mean_top1_gain": sum(g) / len(g) if g else None, "mean_top1_gain_ci95": mean_interval(g)}
    out = tally(sorted(gains))
    out["by_region"] = {r: tally([u for u in sorted(gains) if region_of.get(u) == r])
                        for r in sorted({region_of.get(u, "?") for u in gains})}
    if text_of:
        band = {u: text_bucket(text_of.get(u, 0)) for u in gains}
        out["by_text"] = {b: tally([u for u in sorted(gains) if band[u] == b])
                          for b in TEXT_BANDS if b in band.values()}
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


def format_interval(ci: list[float] | None, compact: bool = False) -> str:
    """A mean gain's interval in points ("-" where none was measured, as in reports written before it was)."""
    if not ci:
        return "-"
    return f"{100 * ci[0]:+.2f}..{100 * ci[1]:+.2f}" if compact else f"{100 * ci[0]:+.2f} .. {100 * ci[1]:+.2f} pt"


def histogram(gains: dict[str, float], region_of: dict[str, str], path: Path, title: str,
              text_of: dict[str, int] | None = None) -> None:
    """PNG histogram of per-user top-1 gains in points, one colour per region; with text_of (each user's train
    pieces), beside it each user's gain against their amount of text and each band's mean with its interval."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if text_of else 1, figsize=(13 if text_of else 7, 4), squeeze=False)
    ax = axes[0, 0]
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
    if text_of:
        _gain_by_text(axes[0, 1], gains, text_of)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _gain_by_text(ax, gains: dict[str, float], text_of: dict[str, int]) -> None:
    """Each user's gain against their train pieces (log scale), and each text_bucket band's mean and interval."""
    us = sorted(gains)
    x = np.array([max(1, text_of.get(u, 0)) for u in us], dtype=np.float64)
    y = 100 * np.array([gains[u] for u in us])
    band = np.array([text_bucket(text_of.get(u, 0)) for u in us])
    ax.scatter(x, y, s=6, alpha=0.35, color="tab:blue", label="a user")
    for b in TEXT_BANDS:
        sel = band == b
        if not sel.any():
            continue
        mid = float(np.exp(np.log(x[sel]).mean()))  # the band's users' geometric mean: where they sit on a log axis
        m, ci = float(y[sel].mean()), mean_interval(list(y[sel]))
        err = [[m - ci[0]], [ci[1] - m]] if ci else None
        ax.errorbar([mid], [m], yerr=err, fmt="o", color="tab:red", capsize=4, zorder=3)
        ax.annotate(f"{m:+.2f}\n({int(sel.sum())})", (mid, ci[1] if ci else m), textcoords="offset points",
                    xytext=(0, 4), ha="center", va="bottom", fontsize=8, color="tab:red")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    # a user of a few test words moves by 25-100 points on one word: the bands' means would sit on a flat line
    lim = (max(-8.0, float(y.min()) - 1), min(8.0, float(y.max()) + 1))
    ax.set_ylim(*lim)
    off = int(((y < lim[0]) | (y > lim[1])).sum())
    ax.set_xlabel("the user's train text (word pieces)" + (f"; {off} users beyond the axis" if off else ""))
    ax.set_ylabel("top-1 gain (points)")
    ax.set_title("gain by amount of text: band mean, 95% interval (users)")


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{100 * x:+.2f}" if signed else f"{100 * x:.1f}%")


def _move(a: float | None, b: float | None) -> str:
    """One cell for a percentage before and after personalization: "13.3→40.0"."""
    if a is None and b is None:
        return "-"
    return "→".join("-" if x is None else f"{100 * x:.1f}" for x in (a, b))


def kept_among(rep: dict, region: str) -> tuple[int, int | None]:
    """Adapters and phrase caches the gate kept among the compared users of a region ("all": every region);
    caches None for a report that did not record them."""
    us = [u for u in rep["top1_gain_per_user"] if region == "all" or rep["region_of"].get(u) == region]
    caches = rep.get("use_cache")
    return (sum(bool(rep["use_adapter"].get(u)) for u in us),
            None if caches is None else sum(bool(caches.get(u)) for u in us))


def _kept(user: str, rep: dict) -> str:
    """What the gate kept for a user: their adapter, phrase cache, both or neither ("?": not recorded)."""
    ad, cache = rep["use_adapter"].get(user), rep.get("use_cache", {}).get(user)
    if cache is None:
        return "adapter" if ad else "-" if ad is not None else "?"
    return {(True, True): "both", (True, False): "adapter", (False, True): "cache"}.get((bool(ad), cache), "-")


def _compact(title: str, columns: list[str]) -> Table:
    """A table without vertical rules: the per-user and regional tables then fit an 80-column terminal."""
    # the title's blank line keeps it apart from the table above: with no rules, titles would run into rows
    t = Table(title="\n" + title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for col in columns:
        left = col in ("user", "region", "users", "typed in train", "kept", "train pieces")
        t.add_column(col, justify="left" if left else "right", no_wrap=True)
    return t


def _change_cells(c: dict) -> list[str]:
    """A group's users, better, worse, same, mean gain and its interval, as table cells."""
    return [str(c["users"]), str(c["improved"]), str(c["hurt"]), str(c["unchanged"]),
            f"{_pct(c['mean_top1_gain'], True)} pt", format_interval(c.get("mean_top1_gain_ci95"), compact=True)]


def print_report(rep: dict, console: Console, per_user_rows: int = 10) -> None:
    """The tables `fedkey personalize` prints."""
    g, p = rep["global"], rep["personalized"]
    rows = [("global (pooled)", g["pooled"]), ("personalized (pooled)", p["pooled"]),
            ("global (mean over users)", g["mean_over_users"]), ("personalized (mean over users)", p["mean_over_users"])]
    for r in sorted(g["by_region"]):
        rows += [(f"global, {r} users", g["by_region"][r]), (f"personalized, {r} users", p["by_region"].get(r, {}))]
    console.print(metrics_table(f"global vs personalized on {rep['split']} ({rep['users']} users)", rows))

    gains = rep["top1_gain_per_user"]
    t = _compact("users whose top-1 moved by more than 0.5 point; mean top-1 gain with its 95% bootstrap interval; "
                 "adapters and phrase caches the gate kept among these users",
                 ["region", "users", "better", "worse", "same", "gain", "95% interval", "adapters", "caches"])
    ch = rep["changes"]
    for label, c in [("all", ch)] + list(ch["by_region"].items()):
        adapters, caches = kept_among(rep, label)
        t.add_row(label, *_change_cells(c), str(adapters), "-" if caches is None else str(caches))
    console.print(t)

    if ch.get("by_text"):
        t = _compact("the same by the amount of text each user's device learned from (word pieces of their train "
                     "split)", ["train pieces", "users", "better", "worse", "same", "gain", "95% interval", "caches"])
        caches = rep.get("use_cache")
        for band, c in ch["by_text"].items():
            us = [u for u in gains if text_bucket(rep["text_of"].get(u, 0)) == band]
            t.add_row(band, *_change_cells(c), "-" if caches is None else str(sum(bool(caches.get(u)) for u in us)))
        console.print(t)

    reg = rep.get("regional_all_positions")
    if reg:
        empty = {"global": {}, "personalized": {}}
        views = [reg, rep.get("regional_after_shared_prefix") or empty, rep.get("regional_as_typed") or empty]
        t = _compact("regional-variant accuracy in %, global → personalized, over every regional-pair word of the test "
                     "split: own variant in the top 3 and above the other, with nothing of the word typed (DESIGN.md), "
                     "once the variants' shared prefix (\"favo\") is typed, and as typed (at the first keystroke that "
                     "offers either variant)",
                     ["users", "typed in train", "nothing typed", "prefix typed", "as typed", "words"])
        for key in sorted(k for k in reg["global"] if k != "per_user"):
            region, _, sub = key.partition("/")
            t.add_row(region, {"": "all", "typed": "yes", "never_typed": "no"}[sub],
                      *[_move(v["global"].get(key, {}).get("acc"), v["personalized"].get(key, {}).get("acc"))
                        for v in views], f"{reg['global'][key]['n']:,}")
        console.print(t)

    if gains:
        cols = {"top-1": "top1", "top-3": "top3", "KSR": "ksr", "regional": "regional_acc"}
        order = sorted(gains, key=lambda u: -abs(gains[u]))[:per_user_rows]
        # KSR and regional accuracy exist only for users with KSR messages or regional words: drop empty columns
        shown = [c for c, k in cols.items() if any(g["per_user"][u][k] is not None for u in order)]
        t = _compact("per user, in %, global → personalized" + (" (largest top-1 changes first)"
                                                                 if len(gains) > per_user_rows else ""),
                     ["user", "region", "words", *shown, "kept"])
        for u in order:
            gm, pm = g["per_user"][u], p["per_user"][u]
            t.add_row(u[:8], rep["region_of"].get(u, "?"), str(gm["n_words"]),
                      *[_move(gm[cols[c]], pm[cols[c]]) for c in shown], _kept(u, rep))
        console.print(t)
    console.print(f"adapters kept by the gate: {rep['gated_in']:,} of {rep['users']:,} users; "
                  f"mean adapter file {rep['adapter_bytes_mean'] or 0:,.0f} bytes; phrase caches kept: "
                  f"{rep.get('caches_kept', 0):,} (mean {rep.get('cache_bytes_mean') or 0:,.0f} bytes, "
                  f"max {rep.get('cache_bytes_max') or 0:,.0f}); "
                  f"personalizing took {rep['seconds']['personalize']:.0f} s, evaluating {rep['seconds']['evaluate']:.0f} s"
                  + (f"; histogram: {rep['histogram']}" if rep.get("histogram") else ""))
