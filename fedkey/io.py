"""Files that are never half-written: temp file in the same folder, then rename."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedkey.errors import FedkeyError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temp file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write JSON (NaN-free: None stands for 'not measured')."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read JSON with a one-line error naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedkeyError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedkeyError(f"{path}: not valid JSON ({e}); delete it and re-run the stage that wrote it") from None


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically and close it (no half-written plot beside a table)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save through a temp file, so a kill mid-write keeps the previous good file."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path) -> Any:
    """torch.load with a one-line error for a missing or corrupt file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FedkeyError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise FedkeyError(f"{path}: corrupt or not a fedkey checkpoint ({type(e).__name__}); "
                          "delete it to start over or restore a good copy") from None
