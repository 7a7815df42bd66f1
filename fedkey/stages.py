"""Stage bookkeeping: a stage whose inputs (configs and input files) did not change is skipped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedkey.io import read_json, write_json

STAGE_FILE = "stage.json"


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_key(config: dict[str, Any], inputs: dict[str, str]) -> str:
    """One hash of a stage's configuration and its inputs' hashes."""
    return hashlib.sha256(json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str).encode()).hexdigest()


def is_done(stage_dir: str | Path, key: str, outputs: list[str]) -> bool:
    """Whether the stage finished with this key and all its outputs are still there."""
    path = Path(stage_dir) / STAGE_FILE
    if not path.is_file():
        return False
    try:
        st = read_json(path)
    except Exception:
        return False
    return st.get("key") == key and all((Path(stage_dir) / o).exists() for o in outputs)


def mark_done(stage_dir: str | Path, key: str, config: dict[str, Any], inputs: dict[str, str], **extra: Any) -> None:
    """Record that the stage finished (written last, atomically, so a kill before it means 'redo')."""
    write_json(Path(stage_dir) / STAGE_FILE, {"key": key, "config": config, "inputs": inputs, **extra})
