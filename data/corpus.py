"""Load a chat corpus (built-in, local file or hub) into a Dataset of user, text, timestamp, region."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import datasets

from fedkey.errors import FedkeyError

COLUMNS = ("user", "text", "timestamp", "region")
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FEATURES = datasets.Features({c: datasets.Value("string") for c in COLUMNS})


@dataclass
class SkipCounts:
    """Messages and users left out of the shards, and why."""

    empty_user: int = 0
    empty_text: int = 0
    too_long: int = 0
    few_words_users: int = 0
    few_words_messages: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for manifests and JSON)."""
        return asdict(self)


def chitchat_path() -> Path:
    """Path of the built-in corpus file shipped in the `chitchat_dataset` package."""
    try:
        import chitchat_dataset
    except ImportError:
        msg = "the built-in corpus needs the chitchat-dataset package: pip install chitchat-dataset"
        raise FedkeyError(msg) from None
    return Path(chitchat_dataset.__file__).with_name("dataset.json")


def source_files(spec: str) -> list[Path]:
    """The local files a corpus spec reads (empty for hub corpora), for hashing."""
    if spec == "chitchat":
        return [chitchat_path()]
    if spec.startswith("hub:"):
        return []
    return [_local_path(spec)]


def hash_files(paths: list[Path]) -> str:
    """sha256 over the bytes of the given files, in order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_corpus(spec: str, max_message_chars: int) -> tuple[datasets.Dataset, SkipCounts]:
    """Load `chitchat`, a local .jsonl/.json/.csv/.parquet path, or `hub:NAME`; skip and count bad messages."""
    if spec == "chitchat":
        columns = _read_chitchat(chitchat_path())
    elif spec.startswith("hub:"):
        columns = _columns(_load_hub(spec[4:]), where=spec)
    else:
        columns = _columns(_load_local(_local_path(spec)), where=spec)
    return _clean(columns, max_message_chars)


def _read_chitchat(path: Path) -> dict[str, list[str]]:
    with open(path, encoding="utf-8") as fh:
        convs = json.load(fh)
    user, text, ts = [], [], []
    # Each {text, timestamp, sender} item is one message; a "turn" is just consecutive items of one sender.
    for conv in convs.values():
        for turn in conv["messages"]:
            for item in turn:
                user.append(item["sender"])
                text.append(item["text"])
                ts.append(item.get("timestamp") or "")
    return {"user": user, "text": text, "timestamp": ts, "region": [""] * len(user)}


def _local_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.suffix.lower() not in BUILDERS:
        raise FedkeyError(
            f"{spec}: unknown corpus; pass chitchat, hub:NAME, "
            f"or a {'/'.join(BUILDERS)} file with user and text columns"
        )
    if not path.is_file():
        raise FedkeyError(f"{path}: corpus file not found; pass chitchat or an existing file")
    if path.stat().st_size == 0:
        raise FedkeyError(f"{path}: the corpus file is empty; it needs rows with user and text")
    return path


def _load_local(path: Path) -> datasets.Dataset:
    builder = BUILDERS[path.suffix.lower()]
    if builder != "parquet":
        _check_text_file(path, builder)
    # A private cache: a stale or shared ~/.cache entry must never stand in for the file's current bytes.
    with tempfile.TemporaryDirectory(prefix="fedkey-load-") as cache, quiet_datasets():
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as e:  # noqa: BLE001 - Arrow/pandas raise many types; the user needs one line
            if builder == "json":
                _check_json_lines(path)  # finds the line number where Arrow gives none
            raise FedkeyError(f"{path}: could not read as {path.suffix} ({_first_line(e)}); fix the file") from None
    if len(ds) == 0:
        raise FedkeyError(f"{path}: the corpus file has no rows; it needs rows with user and text")
    return ds


def _check_text_file(path: Path, builder: str) -> None:
    """Reject non-UTF-8 bytes, blank files and malformed JSON up front, naming the line."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        msg = f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        raise FedkeyError(msg) from None
    if not text.strip():
        raise FedkeyError(f"{path}: the corpus file is empty; it needs rows with user and text")
    if builder == "json":
        _check_json_text(path, text)


def _check_json_lines(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    _check_json_text(path, text)


def _check_json_text(path: Path, text: str) -> None:
    if text.lstrip().startswith("["):  # one JSON array, not JSON Lines
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise FedkeyError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix that line") from None
        if not all(isinstance(r, dict) for r in doc):
            raise FedkeyError(f"{path}: the JSON array must hold objects with user and text")
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedkeyError(f"{path}:{n}: malformed JSON line ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise FedkeyError(f"{path}:{n}: expected a JSON object with user and text; fix or delete that line")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str) -> datasets.Dataset:
    # Checked first because load_dataset retries for ~20 s before giving up offline.
    if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise FedkeyError(
            f"hub:{name}: could not reach the Hugging Face Hub; pass a local .jsonl/.csv/.parquet file instead"
        )
    try:
        with quiet_datasets():
            loaded = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001
        msg = f"hub:{name}: could not load from the Hub ({_first_line(e)}); pass a local file instead"
        raise FedkeyError(msg) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _columns(ds: datasets.Dataset, where: str) -> dict[str, list[str]]:
    missing = [c for c in ("user", "text") if c not in ds.column_names]
    if missing:
        raise FedkeyError(
            f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(ds.column_names) or 'none'}; "
            "rename them to user and text"
        )
    n = len(ds)
    out = {c: _as_strings(column(ds, c)) for c in ("user", "text")}
    out["timestamp"] = _timestamps(column(ds, "timestamp")) if "timestamp" in ds.column_names else [""] * n
    out["region"] = _as_strings(column(ds, "region")) if "region" in ds.column_names else [""] * n
    return out


def column(ds: datasets.Dataset, name: str) -> list:
    """One column as a Python list, through Arrow (indexing `ds[name]` element by element is very slow)."""
    return ds.with_format("arrow")[name].to_pylist()


def _as_strings(values) -> list[str]:
    return ["" if v is None else v if isinstance(v, str) else str(v) for v in values]


def _timestamps(values) -> list[str]:
    """ISO strings, so that sorting the strings sorts by time (numbers are read as Unix seconds)."""
    out = []
    for v in values:
        if v is None:
            out.append("")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            seconds = v / 1000 if abs(v) > 1e11 else v  # beyond year 5000 as seconds: it was milliseconds
            try:
                out.append(dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat())
            except (OverflowError, OSError, ValueError):
                raise FedkeyError(f"timestamp {v!r} is not a valid time; use ISO strings or Unix seconds") from None
        elif isinstance(v, dt.datetime):
            out.append(v.isoformat())
        else:
            out.append(str(v))
    return out


def _clean(cols: dict[str, list[str]], max_message_chars: int) -> tuple[datasets.Dataset, SkipCounts]:
    skips = SkipCounts()
    keep = []
    for i, (u, t) in enumerate(zip(cols["user"], cols["text"])):
        if not u.strip():
            skips.empty_user += 1
        elif not t.strip():
            skips.empty_text += 1
        elif len(t) > max_message_chars:
            skips.too_long += 1
        else:
            keep.append(i)
    if len(keep) < len(cols["user"]):
        cols = {c: [v[i] for i in keep] for c, v in cols.items()}
    cols["user"] = [u.strip() for u in cols["user"]]
    return datasets.Dataset.from_dict(cols, features=_FEATURES), skips


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide datasets' own progress bars and log lines; errors reach the user as one FedkeyError line."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # datasets wraps the informative Arrow/pandas error
        e = e.__cause__
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:200]
