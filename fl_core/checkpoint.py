"""Round checkpoints: checksummed, written atomically, and the previous good one always kept.

Layout: MAGIC, sha256 of the payload, then the torch.save payload. Saving writes
`checkpoint.new.pt` atomically, moves the current file to `checkpoint.prev.pt`, then the
new one into place, so a kill at any moment leaves at least one complete checkpoint.
A checkpoint that fails its checksum is never loaded silently: the error names the
previous good one and how to use it.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fedkey.errors import FedkeyError
from fedkey.io import atomic_write_bytes

MAGIC = b"FKFLCK01"
NAME, PREV, NEW = "checkpoint.pt", "checkpoint.prev.pt", "checkpoint.new.pt"


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint, keeping the previous one as checkpoint.prev.pt."""
    folder = Path(folder)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(folder / NEW, MAGIC + hashlib.sha256(payload).digest() + payload)
    if (folder / NAME).exists():
        os.replace(folder / NAME, folder / PREV)
    os.replace(folder / NEW, folder / NAME)
    return folder / NAME


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint file; FedkeyError if it is missing, truncated or fails its checksum."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FedkeyError(f"{path}: checkpoint not found") from None
    payload = raw[len(MAGIC) + 32:]
    if raw[:len(MAGIC)] != MAGIC or hashlib.sha256(payload).digest() != raw[len(MAGIC):len(MAGIC) + 32]:
        raise FedkeyError(f"{path}: corrupt checkpoint (bad header or checksum)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a checksummed file that does not unpickle is foreign
        raise FedkeyError(f"{path}: not a fedkey FL checkpoint ({type(e).__name__})") from None


def load_latest(folder: str | Path) -> dict[str, Any] | None:
    """The newest good checkpoint in `folder` (None if there is none); a corrupt newest one is an error."""
    folder = Path(folder)
    if not (folder / NAME).exists():
        # a kill between the two renames leaves the new file complete beside the previous one
        for name in (NEW, PREV):
            if (folder / name).exists():
                return read_checkpoint(folder / name)
        return None
    try:
        return read_checkpoint(folder / NAME)
    except FedkeyError as e:
        hint = "delete it to start over"
        if (folder / PREV).exists():
            try:
                prev_round = read_checkpoint(folder / PREV).get("round", "?")
                hint = (f"the previous good checkpoint (after round {prev_round}) is kept at {folder / PREV}: "
                        f"move it over {folder / NAME} to resume from there, or delete both to start over")
            except FedkeyError:
                hint = "the previous one is corrupt too; delete both to start over"
        raise FedkeyError(f"{e}; {hint}") from None
