"""Rich tables for what commands print: dataset statistics and evaluation results."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def dataset_table(rows: list[dict[str, Any]], skips: dict[str, int]) -> Table:
    """Users, messages, words and tokens per split and region."""
    t = Table(title="prepared shards")
    for col in ("split", "region", "users", "messages", "words", "tokens"):
        t.add_column(col, justify="left" if col in ("split", "region") else "right")
    for r in rows:
        t.add_row(r["split"], r["region"], *(_num(r.get(c), "{:,}") for c in ("users", "messages", "words", "tokens")))
    if skips:
        t.caption = "skipped: " + ", ".join(f"{k} {v:,}" for k, v in skips.items())
    return t


def metrics_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    """One row per (label, M) with the DESIGN.md metrics."""
    t = Table(title=title)
    for col in ("model / group", "top-1", "top-3", "perplexity", "KSR", "regional acc", "words"):
        t.add_column(col, justify="left" if col == "model / group" else "right")
    for label, m in rows:
        t.add_row(label, _pct(m.get("top1")), _pct(m.get("top3")), _num(m.get("perplexity")),
                  _pct(m.get("ksr")), _pct(m.get("regional_acc")), _num(m.get("n_words"), "{:,}"))
    return t


def eval_rows(res: dict, name: str = "LSTM") -> list[tuple[str, dict]]:
    """The rows an evaluation prints: pooled, mean over users, per region, and the n-gram baseline."""
    rows = [(f"{name} (pooled)", res["pooled"]), (f"{name} (mean over users)", res["mean_over_users"])]
    rows += [(f"{name} {region} users", m) for region, m in res["by_region"].items()]
    if "baseline_ngram" in res:
        rows.append(("back-off trigram (pooled)", res["baseline_ngram"]))
    return rows


def print_eval(res: dict, title: str) -> None:
    """Print an evaluation's table and the regional-variant breakdown."""
    console.print(metrics_table(title, eval_rows(res)))
    reg = res.get("regional", {})
    if reg.get("pooled") is not None:
        parts = [f"pooled {_pct(reg['pooled'])}", f"macro over {reg['pairs_seen']} pairs {_pct(reg['macro_over_pairs'])}",
                 f"pairs typed in own train split {_pct(reg['typed_in_train'])} (n={reg['typed_in_train_n']})",
                 f"never typed {_pct(reg['never_typed_in_train'])} (n={reg['never_typed_in_train_n']})"]
        console.print("regional-variant accuracy: " + "; ".join(parts))
    console.print(f"{res['messages']:,} messages from {res['users']:,} users; KSR on a seeded sample of "
                  f"{res['ksr_messages']:,} messages; {res.get('seconds', 0):.0f} s")
