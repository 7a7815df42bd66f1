"""`fedkey prepare`: corpus -> kept users -> roles, regions, British text, temporal split -> shards on disk."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from data.british import to_british
from data.corpus import SkipCounts, column, hash_files, load_corpus, source_files
from data.shards import FORMAT_VERSION, SPLITS, TEST_SPLITS, TRAIN_SPLITS, read_manifest, write_shards
from data.split import (
    REGIONS,
    assign_regions,
    assign_roles,
    check_fractions,
    drop_small_users,
    normalize_region,
    temporal_split,
    words_per_user,
)
from fedkey.config import PrepareConfig, to_dict
from fedkey.errors import FedkeyError


@dataclass
class PrepareResult:
    """What `prepare` did: where, whether it was a no-op, what it skipped, and per split/region sizes."""

    out_dir: Path
    skipped: bool
    source_hash: str
    skips: dict[str, int]
    stats: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def stats_rows(result: PrepareResult) -> list[dict[str, Any]]:
    """Rows of split, region, users, messages, words (one per split and region) for a table."""
    return [dict(r) for r in result.stats]


def prepare(cfg: PrepareConfig, out_dir: str | Path, progress: bool = True) -> PrepareResult:
    """Build the shards in `out_dir` from `cfg.corpus`; a no-op if they were built from the same inputs."""
    try:
        return _prepare(cfg, Path(out_dir), progress)
    except OSError as e:  # unreadable corpus, unwritable or full disk: one line, not a traceback
        msg = f"{e.filename or out_dir}: {e.strerror or e}; check the path, permissions and free space"
        raise FedkeyError(msg) from None


def _prepare(cfg: PrepareConfig, out_dir: Path, progress: bool) -> PrepareResult:
    t0 = time.perf_counter()
    check_fractions(cfg.public_frac, cfg.heldout_frac, cfg.test_frac, cfg.gb_frac)
    if cfg.min_words < 0 or cfg.max_message_chars < 1:
        raise FedkeyError("--min-words must be >= 0 and --max-message-chars >= 1")
    config = to_dict(cfg)
    old = read_manifest(out_dir)

    with _steps(progress) as step:
        files = source_files(cfg.corpus)
        source_hash = ""
        if files:
            step("hashing corpus")
            source_hash = hash_files(files)
            if _same_inputs(out_dir, old, source_hash, config):
                return _skipped(out_dir, old, t0)
        step(f"loading {cfg.corpus}")
        ds, skips = load_corpus(cfg.corpus, cfg.max_message_chars)
        cols = {c: column(ds, c) for c in ds.column_names}
        if not files:  # hub corpora have no local bytes to hash before loading; hash the content instead
            source_hash = _content_hash(cols)
            if _same_inputs(out_dir, old, source_hash, config):
                return _skipped(out_dir, old, t0)

        step("assigning users")
        splits, users, stats = _build(cfg, cols, skips, step)

        step("writing shards")
        manifest = {
            "format": FORMAT_VERSION,
            "corpus": cfg.corpus,
            "source_hash": source_hash,
            "config": config,
            "seed": cfg.seed,
            "counts": {s: len(splits[s]["user"]) for s in SPLITS},
            "skips": skips.as_dict(),
            "stats": stats,
        }
        write_shards(out_dir, splits, manifest, users)
    return PrepareResult(out_dir, False, source_hash, skips.as_dict(), stats, time.perf_counter() - t0)


def _same_inputs(out_dir: Path, old: dict[str, Any] | None, source_hash: str, config: dict[str, Any]) -> bool:
    if not old or not all((out_dir / name).is_file() for name in ("users.json", "dataset_dict.json")):
        return False
    return old.get("format") == FORMAT_VERSION and old.get("source_hash") == source_hash and old.get("config") == config


def _skipped(out_dir: Path, old: dict[str, Any], t0: float) -> PrepareResult:
    return PrepareResult(out_dir, True, old["source_hash"], old["skips"], old["stats"], time.perf_counter() - t0)


def _content_hash(cols: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for c in sorted(cols):
        for v in cols[c]:
            h.update(v.encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()


def _build(cfg: PrepareConfig, cols: dict[str, list[str]], skips: SkipCounts, step):
    """Split rows into per-split columns, plus users.json entries and the stats table."""
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(cols["user"]):
        by_user.setdefault(u, []).append(i)

    kept, dropped = drop_small_users(words_per_user(cols["user"], cols["text"]), cfg.min_words)
    skips.few_words_users = len(dropped)
    skips.few_words_messages = sum(len(by_user[u]) for u in dropped)
    if not kept:
        raise FedkeyError(
            f"{cfg.corpus}: no user wrote at least {cfg.min_words} words; lower --min-words or use a bigger corpus"
        )

    given = {}
    for u in kept:
        given[u] = next((r for r in (normalize_region(cols["region"][i], u) for i in by_user[u]) if r), "")
    roles = assign_roles(kept, cfg.public_frac, cfg.heldout_frac, cfg.seed)
    regions = assign_regions(kept, cfg.gb_frac, cfg.seed, given)

    splits = {s: {c: [] for c in ("user", "text", "timestamp", "region")} for s in SPLITS}
    users: dict[str, Any] = {}
    acc = {(s, r): [0, 0, 0] for s in SPLITS for r in REGIONS}  # users, messages, words
    step("splitting users", total=len(kept))
    for u in kept:  # sorted, so each user's rows are contiguous and rows are ordered by user then time
        idx = by_user[u]
        train, test = temporal_split([cols["timestamp"][i] for i in idx], cfg.test_frac)
        region = regions[u]
        # Only users we made British are converted; a region given by the corpus describes real text.
        convert = region == "GB" and not given[u]
        info = {"role": roles[u], "region": region, "converted": convert,
                "n_train": len(train), "n_test": 0, "rows": {}}
        parts = [(TRAIN_SPLITS[roles[u]], train)]
        if roles[u] in TEST_SPLITS:
            parts.append((TEST_SPLITS[roles[u]], test))
            info["n_test"] = len(test)
        for split, positions in parts:
            if not positions:
                continue
            out = splits[split]
            start = len(out["user"])
            texts = [cols["text"][idx[p]] for p in positions]
            if convert:
                texts = [to_british(t) for t in texts]
            out["user"].extend([u] * len(texts))
            out["text"].extend(texts)
            out["timestamp"].extend(cols["timestamp"][idx[p]] for p in positions)
            out["region"].extend([region] * len(texts))
            info["rows"][split] = [start, start + len(texts)]
            a = acc[(split, region)]
            a[0] += 1
            a[1] += len(texts)
            a[2] += sum(len(t.split()) for t in texts)
        users[u] = info
        step.advance()
    stats = [
        {"split": s, "region": r, "users": v[0], "messages": v[1], "words": v[2]} for (s, r), v in acc.items()
    ]
    return splits, users, stats


class _Step:
    """Callable that starts the next progress stage, marking the previous one complete."""

    def __init__(self, progress: Progress | None) -> None:
        self._p = progress
        self._task = None
        self._total = 1

    def __call__(self, description: str, total: int | None = None) -> None:
        if self._p is None:
            return
        self.finish()
        self._total = total or 1
        self._task = self._p.add_task(description, total=total)

    def advance(self) -> None:
        if self._p is not None and self._task is not None:
            self._p.advance(self._task)

    def finish(self) -> None:
        if self._p is not None and self._task is not None:
            self._p.update(self._task, total=self._total, completed=self._total)


@contextlib.contextmanager
def _steps(enabled: bool) -> Iterator[_Step]:
    if not enabled:
        yield _Step(None)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns) as p:
        step = _Step(p)
        yield step
        step.finish()
