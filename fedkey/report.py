"""runs/<name>/report.md and the summary `fedkey run` prints: the whole product on one page.

`collect` reads the JSON every stage wrote into a list of Sections (tables of formatted strings,
figure links, notes); `render_markdown` and `print_report` only lay those out, so the file and the
terminal always show the same figures. A stage that did not run leaves its section out; a file that
is corrupt or lacks what the report needs turns its section into a one-line note.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkey.errors import FedkeyError
from fedkey.io import atomic_write_bytes, read_json
from fedkey.tables import _num, _pct, console
from personalization.report import format_interval, kept_among

REPORT = "report.md"
CENTRAL = "central"
FP32, INT8 = "model.onnx", "model.int8.onnx"  # keyboard.bundle's names, without importing the runtime
SPLIT_LABEL = {"public_train": "public (tokenizer only)", "train": "train", "test": "test",
               "heldout_train": "held-out users, train", "heldout_test": "held-out users, test"}
METRICS = ["top-1", "top-3", "perplexity", "KSR", "regional-variant acc", "words"]


@dataclass
class Table:
    """A table of already formatted cells; the first column is a label, the rest right-aligned when numeric."""

    header: list[str]
    rows: list[list[str]]
    title: str = ""
    caption: str = ""
    numeric: bool = True


@dataclass
class Section:
    """One part of the report: tables, then figures (caption, path relative to the run), then notes."""

    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def facts(rows: list[tuple[str, str | None]], title: str = "") -> Table:
    """A two-column figure / value table (rows whose value is None are dropped)."""
    return Table(["figure", "value"], [[k, v] for k, v in rows if v is not None], title, numeric=False)


class RunFiles:
    """A run's JSON, read once each; a corrupt file reads as absent and is noted in every section reading it."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.bad: dict[str, str] = {}
        self.touched: list[str] = []
        self._cache: dict[str, Any] = {}

    @property
    def problems(self) -> list[str]:
        """What was wrong with the files read since `touched` was last cleared."""
        return [f"{rel}: {self.bad[rel]}" for rel in dict.fromkeys(self.touched) if rel in self.bad]

    def json(self, rel: str) -> Any | None:
        """The parsed file, or None when it is missing or unreadable."""
        self.touched.append(rel)
        if rel not in self._cache:
            self._cache[rel] = None
            if (self.dir / rel).is_file():
                try:
                    self._cache[rel] = read_json(self.dir / rel)
                except FedkeyError as e:
                    self.bad[rel] = _tail(str(e))
        return self._cache[rel]

    def jsonl(self, rel: str) -> list[dict[str, Any]]:
        """Records of a JSON-lines file, or [] when it is missing or unreadable."""
        self.touched.append(rel)
        path = self.dir / rel
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.bad[rel] = "not valid JSON lines; delete it and re-run the stage that wrote it"
            return []

    def figure(self, *rels: str) -> str | None:
        """The first of these paths that exists (relative to the run), for a link."""
        return next((r for r in rels if (self.dir / r).is_file()), None)


def _tail(msg: str) -> str:
    # read_json's messages start with the absolute path; the note already names the file
    return msg.split(": ", 1)[1] if ": " in msg else msg


# ---------------------------------------------------------------- formatting


def _count(x: float | None) -> str:
    return _num(x, "{:,.0f}")


def _sig(x: float) -> str:
    """Three significant digits without scientific notation (0.42, 41.2, 900, 1,234)."""
    return f"{x:,.{2 if abs(x) < 10 else 1 if abs(x) < 100 else 0}f}"


def _bytes(n: float | None) -> str:
    """Decimal units, as disk and network sizes are quoted."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{_sig(n)} {unit}"
        n /= 1000
    return f"{_sig(n)} TB"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f} pt"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{_sig(x)} ms"


def metric_cells(m: dict[str, Any]) -> list[str]:
    """The DESIGN.md metrics of one evaluation as table cells."""
    return [_pct(m.get("top1")), _pct(m.get("top3")), _count(m.get("perplexity")), _pct(m.get("ksr")),
            _pct(m.get("regional_acc")), _count(m.get("n_words"))]


# ---------------------------------------------------------------- sections


def _data(run: RunFiles) -> Section | None:
    stats = run.json("data_stats.json")
    if stats is None:
        return None
    by_split: dict[str, dict[str, dict[str, Any]]] = {}
    for r in stats["rows"]:
        if r["region"] != "all":
            by_split.setdefault(r["split"], {})[r["region"]] = r
    regions = list(dict.fromkeys(g for per_region in by_split.values() for g in per_region))
    rows = []
    for split, per_region in by_split.items():
        users = " / ".join(_count(per_region.get(g, {}).get("users", 0)) for g in regions)
        totals = [_count(sum(r.get(c) or 0 for r in per_region.values())) for c in ("messages", "words", "tokens")]
        rows.append([SPLIT_LABEL.get(split, split), users, *totals])
    skips = {k: v for k, v in stats.get("skips", {}).items() if v}
    caption = ("dropped while preparing: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in skips.items())
               if skips else "")
    return Section("Data", [Table(["split", f"users ({' / '.join(regions)})", "messages", "words", "tokens"],
                                  rows, caption=caption)])


def _quality(run: RunFiles) -> Section | None:
    models = [(label, run.json(rel)) for label, rel in (("centralized", "central/eval_test.json"),
                                                          ("federated", "fl/eval_test.json"))]
    pers = run.json("personal/report.json")
    base = "centralized" if Path(str((pers or {}).get("base_model", "fl"))).name == CENTRAL else "federated"
    if pers and "personalized" in pers:
        models.append((f"personalized ({base} + gated adapters)", pers["personalized"]))
    models = [(label, ev) for label, ev in models if ev]
    if not models:
        return None
    ngram = next((ev["baseline_ngram"] for _, ev in models if ev.get("baseline_ngram")), None)
    rows = [[label, *metric_cells(ev["pooled"])] for label, ev in models]
    if ngram:
        rows.append(["back-off trigram baseline", *metric_cells(ngram)])
    regions = sorted({g for _, ev in models for g in ev.get("by_region", {})}, reverse=True)  # US before GB
    by_region = [[f"{g}: {label.split(' (')[0]}", *metric_cells(ev["by_region"][g])]
                 for g in regions for label, ev in models if g in ev.get("by_region", {})]
    notes = []
    central = (run.json("central/stage.json") or {}).get("result", {})
    if central.get("tokens"):
        start = (f"from the federated model's start ({_count(central['pretrain_tokens'])} tokens of public users' "
                 "text)" if central.get("pretrain_tokens") else "from a random start")
        notes.append(f"centralized: {_count(central['tokens'])} tokens of the training users' text, {start}")
    if pers and "personalized" in pers:
        glob = pers.get("global", {}).get("pooled", {})
        notes.append(f"personalized: a sample of the {pers.get('users', 0):,} personalized users' test messages; "
                     f"the {base} model on the same sample scores top-1 {_pct(glob.get('top1'))}")
    caption = "; ".join(notes)
    tables = [Table(["model", *METRICS], rows, "test split, pooled over words", caption)]
    if by_region:
        tables.append(Table(["region: model", *METRICS], by_region, "by the user's region"))
    return Section("Next-word quality", tables)


def _fl(run: RunFiles) -> Section | None:
    stage = run.json("fl/stage.json") or {}
    hist = run.jsonl("fl/history.jsonl")
    if not stage and not hist:
        return None
    res = stage.get("result", {})
    cfg = stage.get("config") or _toml(run.dir / "fl" / "config.toml")
    fl, fleet, priv = cfg.get("fl", {}), cfg.get("fleet", {}), cfg.get("privacy") or {}
    last = hist[-1] if hist else {}
    rounds = res.get("rounds", last.get("round"))
    tokens = res.get("tokens", last.get("tokens_total"))
    up = res.get("up_bytes", last.get("up_total"))
    per_round = f" ({_bytes(up / rounds)} a round)" if up and rounds else ""
    budget = f" of a {_count(fl['max_tokens'])} budget" if fl.get("max_tokens") else ""
    clients = None
    if fl.get("clients_per_round"):
        over = f", {fleet['overselect']:g}x over-selected" if fleet.get("overselect", 1) != 1 else ""
        used = (f"; {res['clients_used'] / rounds:.1f} reported a round on average"
                if res.get("clients_used") and rounds else "")
        clients = f"{fl['clients_per_round']}{over}{used}"
    compress = fl.get("compress")
    if compress == "topk":
        compress = f"top-k ({_pct(fl.get('topk_frac'))} of coordinates, error feedback)"
    lost = ", ".join(f"{res[k]:,} {label}" for k, label in (("dropped", "dropped out"), ("late", "past the deadline"),
                                                             ("aborted", "cut off by over-selection")) if res.get(k))
    rows = [("rounds", _count(rounds)), ("tokens trained", (_count(tokens) + budget) if tokens is not None else None),
            ("clients per round", clients), ("uplink, total", _bytes(up) + per_round if up is not None else None),
            ("downlink, total", _bytes(res["down_bytes"]) if "down_bytes" in res else None),
            ("uplink compression", compress),
            ("server's start", f"pretrained on the public users' text: {fl['pretrain_epochs']:g} "
                               f"pass{'' if fl['pretrain_epochs'] == 1 else 'es'}, "
                               f"{_count(res['pretrain_tokens'])} tokens" if res.get("pretrain_tokens") else None),
            ("server optimizer", f"{fl['server_opt']} (lr {fl.get('server_lr', 0):g})"
             if fl.get("server_opt") else None),
            ("client reports not used", lost or None),
            ("simulated fleet time", _duration(3600 * res["sim_hours"]) if "sim_hours" in res else None),
            ("training wall time", _duration(res.get("seconds")) if "seconds" in res else None)]
    rows += _privacy_rows(res, priv)
    sec = Section("Federated training", [facts(rows)])
    for caption, name in (("accuracy vs round", "accuracy_vs_round.png"),
                          ("accuracy vs uplink bytes", "accuracy_vs_uplink.png")):
        path = run.figure(f"fl/plots/{name}", f"fl/{name}")
        if path:
            sec.figures.append((caption, path))
    if not stage:
        sec.notes.append(f"training has not finished (no fl/stage.json); figures as of round {last.get('round', 0)}")
    return sec


def _privacy_rows(res: dict[str, Any], priv: dict[str, Any]) -> list[tuple[str, str]]:
    """DP (only when the run was private and accounted), secure and robust aggregation."""
    rows = []
    if res.get("epsilon") is not None:
        stop = " (stopped at the target epsilon)" if res.get("stopped_at_target_epsilon") else ""
        rows.append(("client-level DP", f"epsilon {res['epsilon']:.3g} at delta {res.get('delta', 0):.1e}{stop}; "
                                        f"noise multiplier {res.get('noise_multiplier', 0):g}, "
                                        f"clip {priv.get('clip', 0):g}, {res.get('dp_sampling', '?')} sampling"))
    if priv.get("secagg"):
        rows.append(("secure aggregation", f"on ({priv.get('secagg_bits', 32)}-bit ring)"))
    if priv.get("robust"):
        bound = f", max update norm {priv['max_norm']:g}" if priv.get("max_norm") else ""
        rows.append(("robust aggregation", f"on{bound}"))
    return rows


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def _personal(run: RunFiles) -> Section | None:
    rep = run.json("personal/report.json")
    if rep is None:
        return None
    users, kept = rep.get("users", 0), rep.get("gated_in", 0)
    share = _pct(kept / users if users else None)
    sizes = " / ".join(_bytes(rep.get(k)) for k in ("adapter_bytes_mean", "adapter_bytes_max"))
    rows = [("adapters kept by the validation gate", f"{kept:,} of {users:,} users ({share})"),
            ("adapter file, mean / max", sizes)]
    ch = rep.get("changes")
    tables = []
    if ch:
        reg = {k: _with_all(v) for k, v in (rep.get("regional_all_positions") or {}).items()}
        table = Table(["region", "users", "improved", "hurt", "unchanged", "mean top-1 gain", "95% interval",
                       "adapters kept",
                       "regional-variant acc, global -> personalized (words)"], [],
                      "users whose top-1 moved more than 0.5 pt (of those with sampled test words)")
        for label, c in [("all", ch), *sorted(ch.get("by_region", {}).items(), reverse=True)]:
            g, p = (reg.get(k, {}).get(label, {}) for k in ("global", "personalized"))
            regional = f"{_pct(g.get('acc'))} -> {_pct(p.get('acc'))} ({g['n']:,})" if g else "-"
            # among the compared users, as the row's other counts are (gated_in also counts users without test words)
            kept_here = kept_among(rep, label)[0] if "top1_gain_per_user" in rep else None
            table.rows.append([label, *_change_cells(c), _count(kept_here), regional])
        tables.append(table)
        if ch.get("by_text"):
            tables.append(Table(["train pieces", "users", "improved", "hurt", "unchanged", "mean top-1 gain",
                                 "95% interval"],
                                [[band, *_change_cells(c)] for band, c in ch["by_text"].items()],
                                "the same by the amount of text each user's device learned from"))
    secs = rep.get("seconds", {})
    rows.append(("time", f"{_duration(secs.get('personalize'))} training adapters, "
                         f"{_duration(secs.get('evaluate'))} evaluating"))
    sec = Section("Personalization", [*tables, facts(rows)])
    if run.figure("personal/gains.png"):
        sec.figures.append(("per-user top-1 gain", "personal/gains.png"))
    if not ch:
        sec.notes.append("no global-vs-personalized comparison (personalized with --no-eval)")
    return sec


def _change_cells(c: dict[str, Any]) -> list[str]:
    """A group's users, improved, hurt, unchanged, mean top-1 gain and its interval, as report.md cells."""
    return [_count(c["users"]), _count(c["improved"]), _count(c["hurt"]), _count(c["unchanged"]),
            _points(c.get("mean_top1_gain")), format_interval(c.get("mean_top1_gain_ci95"))]


def _with_all(acc: dict[str, Any]) -> dict[str, Any]:
    """Regional-variant accuracy by region plus "all", pooled over the regions' words."""
    regions = [v for k, v in acc.items() if "/" not in k and k != "per_user"]
    n = sum(v["n"] for v in regions)
    return {**acc, "all": {"acc": sum(v["acc"] * v["n"] for v in regions) / n, "n": n}} if n else acc


def _export(run: RunFiles) -> Section | None:
    from fedkey.bench.latency import TARGETS

    man, lat = run.json("export/manifest.json"), run.json("export/latency.json")
    if man is None and lat is None:
        return None
    rows: list[tuple[str, str | None]] = []
    if man is not None:
        files = man["files"]
        fp32, int8 = files[FP32]["bytes"], files[INT8]["bytes"]
        rows += [("model.onnx (fp32)", _bytes(fp32)),
                 ("model.int8.onnx", f"{_bytes(int8)} ({_pct(int8 / fp32)} of fp32, {fp32 / int8:.1f}x smaller)"),
                 ("quantization", man.get("quantization", {}).get("mode")),
                 ("adapters shipped", _count(sum(name.startswith("adapters/") for name in files)))]
        par = man.get("parity") or {}
        if par.get("top1_agreement") is not None:
            rows += [(f"top-1 agreement int8 vs torch ({par.get('positions', 0):,} test positions)",
                      _pct(par["top1_agreement"])),
                     ("top-1 accuracy torch -> int8",
                      f"{_pct(par.get('torch_top1'))} -> {_pct(par.get('exported_top1'))}")]
    if lat is not None:
        def timed(key: str) -> str:
            ok = "met" if lat.get(key) is not None and lat[key] <= TARGETS[key] else "missed"
            return f"{_ms(lat.get(key))} (target <= {TARGETS[key]:g} ms: {ok})"

        threads = lat.get("threads", 1)
        rows += [(f"suggestion latency p50 ({lat.get('keystrokes', 0):,} keystrokes, {threads} thread"
                  f"{'s' if threads != 1 else ''})", timed("p50_ms")),
                 ("suggestion latency p99", timed("p99_ms")), ("bundle load (median)", timed("load_ms"))]
    sec = Section("On-device export", [facts(rows)])
    if lat is not None and run.figure("export/latency.png"):
        sec.figures.append(("latency per keystroke (CDF)", "export/latency.png"))
    return sec


def _timings(run: RunFiles) -> Section | None:
    from fedkey.commands.run import stages

    seconds = {}
    for st in stages(run.dir):
        marker = run.json(f"stages/{st.name.replace(' ', '_')}/stage.json")
        if marker and marker.get("seconds") is not None:
            seconds[st.name] = marker["seconds"]
    if not seconds:
        return None
    rows = [[name, _duration(s)] for name, s in {**seconds, "total": sum(seconds.values())}.items()]
    return Section("Stage timings", [Table(["stage", "wall time"], rows, caption="each stage's last completed run")])


SECTIONS: list[tuple[str, Callable[[RunFiles], Section | None]]] = [
    ("Data", _data), ("Next-word quality", _quality), ("Federated training", _fl), ("Personalization", _personal),
    ("On-device export", _export), ("Stage timings", _timings)]


def collect(run_dir: Path) -> list[Section]:
    """Every section whose stage left results; a section whose files are unusable becomes a note."""
    run = RunFiles(run_dir)
    out = []
    for title, build in SECTIONS:
        run.touched.clear()
        try:
            sec = build(run)
        except Exception as e:  # the report ends a long run: one malformed file must not cost the rest of it
            why = f"{type(e).__name__}: {e}"
            sec = Section(title, notes=[f"skipped: a result file lacks what the report needs ({why})"])
        new = run.problems
        if sec is None and new:
            sec = Section(title, notes=[f"skipped: {p}" for p in new])
        elif sec is not None:
            sec.notes += [f"left out {p}" for p in new]
        if sec is not None:
            out.append(sec)
    return out


# ---------------------------------------------------------------- renderers


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(t: Table) -> str:
    lines = [f"**{t.title}**\n"] if t.title else []
    align = "---:|" if t.numeric else "---|"
    lines += ["| " + " | ".join(map(_md_cell, t.header)) + " |", "|---|" + align * (len(t.header) - 1)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
    if t.caption:
        lines.append(f"\n*{t.caption}*")
    return "\n".join(lines)


def render_markdown(sections: list[Section], run_dir: Path) -> str:
    """The report as one Markdown page (figure links relative to the run directory)."""
    parts = [f"# fedkey run `{Path(run_dir).name}`"]
    if not sections:
        parts.append("No stage has finished yet.")
    for sec in sections:
        parts.append(f"## {sec.title}")
        parts += [_md_table(t) for t in sec.tables]
        if sec.figures:
            parts.append(" ".join(f"![{cap}]({path})" for cap, path in sec.figures))
        parts += [f"> {n}" for n in sec.notes]
    return "\n\n".join(parts) + "\n"


def print_report(sections: list[Section], run_dir: Path) -> None:
    """The same sections as rich tables in the terminal (figures as paths)."""
    from rich.table import Table as RichTable

    console.rule(f"[bold]report: {run_dir}[/]")
    for sec in sections:
        for i, t in enumerate(sec.tables):
            title = sec.title if i == 0 else ""
            rt = RichTable(title=" - ".join(filter(None, [title, t.title])) or None, caption=t.caption or None)
            for j, col in enumerate(t.header):
                rt.add_column(col, justify="right" if j and t.numeric else "left")
            for r in t.rows:
                rt.add_row(*r)
            console.print(rt)
        for cap, path in sec.figures:
            console.print(f"[dim]{cap}: {Path(run_dir) / path}[/]")
        for n in sec.notes:
            console.print(f"[yellow]{sec.title}: {n}[/]")


def write_report(run_dir: Path, sections: list[Section] | None = None) -> Path:
    """Write runs/<name>/report.md atomically and return its path."""
    path = Path(run_dir) / REPORT
    atomic_write_bytes(path, render_markdown(collect(run_dir) if sections is None else sections, run_dir).encode())
    return path
