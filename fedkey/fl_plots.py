"""PNG plots of a federated run's history: accuracy against rounds and against uplink bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedkey.io import save_figure


def _series(hist: list[dict[str, Any]], split: str) -> tuple[list[int], list[float], list[float]]:
    rows = [h for h in hist if split in h.get("eval", {}) and h["eval"][split].get("top1") is not None]
    return [h["round"] for h in rows], [h["up_total"] / 2**20 for h in rows], [100 * h["eval"][split]["top1"] for h in rows]


def plot_history(hist: list[dict[str, Any]], out_dir: Path, central_top1: float | None = None,
                 final_top1: float | None = None) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_uplink.png (with the centralized model's accuracy as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for x_name, xlabel, fname in (("round", "round", "accuracy_vs_round.png"),
                                  ("up", "uplink MiB (cumulative)", "accuracy_vs_uplink.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for split, label in (("test", "training users' test split"), ("heldout_test", "held-out users")):
            rounds, up, acc = _series(hist, split)
            if acc:
                ax.plot(rounds if x_name == "round" else up, acc, marker=".", label=f"federated: {label} (sampled)")
        if final_top1 is not None and hist:
            x = hist[-1]["round"] if x_name == "round" else hist[-1]["up_total"] / 2**20
            ax.scatter([x], [100 * final_top1], marker="*", s=120, color="C3", zorder=3, label="federated: final (eval split)")
        if central_top1 is not None:
            ax.axhline(100 * central_top1, color="k", linestyle="--", linewidth=1, label="centralized model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 next-word accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without evaluations has nothing to label
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        save_figure(fig, out_dir / fname)
        paths.append(out_dir / fname)
    return paths
