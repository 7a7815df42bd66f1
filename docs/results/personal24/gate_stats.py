"""What the trained adapters learned, from a personalized run's gate.json (issue 4, session 24).

    .venv/bin/python docs/results/personal24/gate_stats.py --run-dir runs/p24 [--json F]

Among the users whose validation slice is large enough to judge an adapter (gate_min_words one-piece words):
how far the trained adapter lowered validation loss (personalized / global, quantiles), at which step its best
check came (0: the untrained adapter was best), how many more validation words it got right at top-1, and why
the gate turned it down. Then, for every user with test words, the gain by what the gate kept, and the gain
relative to the global model (DESIGN's reference point for on-device personalization is a relative one).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np


def main() -> None:
    """Print (and optionally save) the adapter-learning figures of one run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--min-words", type=int, default=20, help="the run's gate_min_words")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    gate = json.loads((a.run_dir / "personal" / "gate.json").read_text())
    rep = json.loads((a.run_dir / "personal" / "report.json").read_text())
    judged = [e for e in gate.values() if e.get("val_global") and e.get("val_words", 0) >= a.min_words]
    ratio = np.array([e["val_personal"] / e["val_global"] for e in judged])
    steps = Counter(int(e["best_step"]) for e in judged)
    lead = np.array([e.get("val_top1_personal", 0) - e.get("val_top1_global", 0) for e in judged])
    why = Counter(e["reason"].split(" (")[0] if not e["reason"].startswith("spelling preference only")
                  else e["reason"].split(" (", 1)[1].split(" (")[0].rstrip(")") for e in judged)
    gains = rep["top1_gain_per_user"]

    def kept(u: str) -> str:
        e = gate[u]
        trained = e["use_adapter"] and not e["reason"].startswith("spelling preference only")
        return f"{'adapter' if trained else 'spelling' if e['use_adapter'] else 'global'}+{'cache' if e.get('use_cache') else 'no cache'}"

    by_kept: dict[str, list[float]] = {}
    for u, g in gains.items():
        by_kept.setdefault(kept(u), []).append(100 * g)
    out = {
        "judged_users": len(judged),
        "val_loss_ratio_quantiles": dict(zip(("p5", "p25", "p50", "p75", "p95"),
                                             np.percentile(ratio, [5, 25, 50, 75, 95]).round(4).tolist())),
        "lowered_val_loss_by_3pct": int((ratio < 0.97).sum()),
        "best_step_0": steps.get(0, 0), "best_step_counts": dict(sorted(steps.items())),
        "val_top1_lead_quantiles": dict(zip(("p5", "p25", "p50", "p75", "p95"),
                                            np.percentile(lead, [5, 25, 50, 75, 95]).tolist())),
        "gate_reasons": dict(why.most_common()),
        "gain_by_kept": {k: {"users": len(v), "mean_gain_pt": round(float(np.mean(v)), 3)}
                         for k, v in sorted(by_kept.items())},
    }
    g_users = {u: rep["global"]["per_user"][u]["top1"] for u in gains}
    scored = [u for u, g in g_users.items() if g > 0]  # a relative gain needs a word the global model got right
    out["relative_gain"] = {
        "users": len(scored),
        "mean_over_users_pct": round(100 * float(np.mean([gains[u] / g_users[u] for u in scored])), 2),
        "pooled_pct": round(100 * (rep["personalized"]["pooled"]["top1"] / rep["global"]["pooled"]["top1"] - 1), 2),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
