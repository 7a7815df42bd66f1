"""runs/<name>/report.md: the whole product on one page, from the JSON every stage wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedkey.io import atomic_write_bytes, read_json


def _load(path: Path) -> Any | None:
    try:
        return read_json(path) if path.is_file() else None
    except Exception:
        return None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def metric_row(label: str, m: dict) -> list[str]:
    """One Markdown table row of the DESIGN.md metrics."""
    ppl = m.get("perplexity")
    return [label, _pct(m.get("top1")), _pct(m.get("top3")), "-" if ppl is None else f"{ppl:,.0f}",
            _pct(m.get("ksr")), _pct(m.get("regional_acc")), f"{m.get('n_words', 0):,}"]


METRIC_HEADER = ["model", "top-1", "top-3", "perplexity/word", "KSR", "regional-variant acc", "words"]


def build_report(run_dir: Path) -> str:
    """Markdown for every stage that has results; stages that did not run are left out."""
    run_dir = Path(run_dir)
    parts = [f"# fedkey report: `{run_dir}`\n"]
    stats = _load(run_dir / "data_stats.json")
    if stats:
        rows = [[r["split"], r["region"], f"{r['users']:,}", f"{r['messages']:,}", f"{r['words']:,}",
                 f"{r.get('tokens') or 0:,}"] for r in stats["rows"]]
        parts.append("## Data\n\n" + _md_table(["split", "region", "users", "messages", "words", "tokens"], rows)
                     + "\n\nSkipped: " + ", ".join(f"{k} {v:,}" for k, v in stats["skips"].items()) + "\n")

    models = [("centralized", run_dir / "central"), ("federated", run_dir / "fl")]
    rows, by_region = [], []
    ngram = None
    for label, d in models:
        ev = _load(d / "eval_test.json")
        if not ev:
            continue
        rows.append(metric_row(label, ev["pooled"]))
        for region, m in ev["by_region"].items():
            by_region.append(metric_row(f"{label}, {region} users", m))
        ngram = ngram or ev.get("baseline_ngram")
    pers = _load(run_dir / "personal" / "report.json")
    if pers and "personalized" in pers:
        rows.append(metric_row("personalized (adapters, gated)", pers["personalized"]["pooled"]))
        for region, m in pers["personalized"]["by_region"].items():
            by_region.append(metric_row(f"personalized, {region} users", m))
    if ngram:
        rows.append(metric_row("back-off trigram baseline", ngram))
    if rows:
        parts.append("## Next-word quality on the test split (pooled over words)\n\n" + _md_table(METRIC_HEADER, rows)
                     + "\n\n### By region\n\n" + _md_table(METRIC_HEADER, by_region) + "\n")
    for name, title in (("accuracy_vs_round.png", "Accuracy vs round"), ("accuracy_vs_uplink.png", "Accuracy vs uplink bytes")):
        if (run_dir / "fl" / name).is_file():
            parts.append(f"### {title}\n\n![{title}](fl/{name})\n")
    if pers:
        parts.append("## Personalization\n\n" + "\n".join(f"- {k}: {v}" for k, v in pers.items()
                                                          if isinstance(v, (int, float, str))) + "\n")
        if (run_dir / "personal" / "gains.png").is_file():
            parts.append("![per-user top-1 gain](personal/gains.png)\n")
    man = _load(run_dir / "export" / "manifest.json")
    if man:
        keep = {k: v for k, v in man.items() if isinstance(v, (int, float, str)) and "hash" not in k and "sha" not in k}
        parts.append("## On-device export\n\n" + "\n".join(f"- {k}: {v}" for k, v in keep.items()) + "\n")
        for key in ("parity", "latency"):
            if isinstance(man.get(key), dict):
                parts.append(f"{key}: " + ", ".join(f"{k} {v}" for k, v in man[key].items()) + "\n")
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write runs/<name>/report.md atomically and return its path."""
    path = Path(run_dir) / "report.md"
    atomic_write_bytes(path, build_report(run_dir).encode())
    return path
