"""Replay other phrase-cache gates on two finished personalization runs (issue 4, session 25).

    .venv/bin/python docs/results/personal25/cache_rules.py --gated runs/p24 --always runs/pall [--json F]

`--gated` is a run with the shipped cache gate, `--always` the same job with `--cache-gate-top1 -1` (every user
keeps their cache) and every other setting the same (`--max-val-tokens` too: the slice also picks each adapter's
best check). Both share the adapters and spelling decisions, so a user's test gain with their cache on is
the --always run's, and with it off the --gated run's wherever that run turned the cache down. A rule keeps the
cache where the shipped gate did or where the rule says so, from what the device has: the user's amount of train
text and their validation slice (gate.json). The rules are judged on the test words they are replayed on, so the
best row flatters itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

from personalization.report import THRESHOLD

Rule = Callable[[dict, int], bool]


def _loss_lower(e: dict, margin: float = 0.0) -> bool:
    """The cache lowers the user's validation loss by more than `margin` (relative)."""
    return bool(e.get("val_nll_cache") is not None and e.get("val_global")
                and e["val_nll_cache"] < e["val_global"] * (1 - margin))


def rules() -> dict[str, Rule]:
    """The replayed rules by name (the shipped gate is the first)."""
    out: dict[str, Rule] = {"shipped gate": lambda e, n: False}
    for n_min in (1000, 2000, 3000, 5000):
        out[f"always for >= {n_min:,} train pieces"] = lambda e, n, m=n_min: n >= m
        out[f"lower validation loss, >= {n_min:,} train pieces"] = lambda e, n, m=n_min: n >= m and _loss_lower(e)
    for w in (20, 60, 100):
        out[f"lower validation loss, >= {w} validation words"] = \
            lambda e, n, w=w: e.get("val_words", 0) >= w and _loss_lower(e)
    for margin in (0.0, 0.01, 0.02):
        out[f"validation loss lower by > {100 * margin:g}%"] = lambda e, n, m=margin: _loss_lower(e, m)
    return out


def main() -> None:
    """Print (and optionally save) each rule's mean top-1 gain per user and users hurt."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gated", type=Path, required=True)
    ap.add_argument("--always", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rep = json.loads((a.gated / "personal" / "report.json").read_text())
    gate = json.loads((a.gated / "personal" / "gate.json").read_text())
    on = json.loads((a.always / "personal" / "report.json").read_text())["top1_gain_per_user"]
    off, text = rep["top1_gain_per_user"], rep["text_of"]
    out = {}
    for name, rule in rules().items():
        g = 100 * np.array([on[u] if gate[u].get("use_cache") or rule(gate[u], text.get(u, 0)) else off[u]
                            for u in sorted(off)])
        out[name] = {"users": len(g), "mean_gain_pt": round(float(g.mean()), 3),
                     "hurt": int((g < -100 * THRESHOLD).sum()), "improved": int((g > 100 * THRESHOLD).sum())}
        print(f"{name:48s} {g.mean():+.3f} per user, {out[name]['hurt']} hurt "
              f"({100 * out[name]['hurt'] / len(g):.1f}%), {out[name]['improved']} improved")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
