"""Per-user adapter files: NumPy arrays in one small .npz, readable on device without torch.

An adapter is f' = f + (f @ A) @ B on the LSTM output f, plus a per-user bias on the logits.
It names the base model it was trained on; loading it onto another base is refused.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkey.errors import FedkeyError
from fedkey.io import atomic_write_bytes


@dataclass
class AdapterArrays:
    """The arrays and identity of one user's adapter."""

    A: np.ndarray  # (embed_dim, rank)
    B: np.ndarray  # (rank, embed_dim)
    user_bias: np.ndarray  # (vocab,)
    base_id: str  # sha256 of the base model.pt this adapter was trained on
    user: str
    meta: dict


def save_adapter(path: str | Path, ad: AdapterArrays) -> int:
    """Write an adapter atomically; returns its size in bytes."""
    buf = io.BytesIO()
    header = json.dumps({"base_id": ad.base_id, "user": ad.user, "meta": ad.meta})
    np.savez_compressed(buf, A=ad.A.astype(np.float32), B=ad.B.astype(np.float32),
                        user_bias=ad.user_bias.astype(np.float32), header=np.frombuffer(header.encode(), dtype=np.uint8))
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


def load_adapter(path: str | Path, expect_base_id: str | None = None, vocab_size: int | None = None,
                 embed_dim: int | None = None) -> AdapterArrays:
    """Read an adapter; refuse a corrupt file or one made for a different base model."""
    path = Path(path)
    if not path.is_file():
        raise FedkeyError(f"{path}: adapter not found; run `fedkey personalize` for this user first")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            ad = AdapterArrays(z["A"], z["B"], z["user_bias"], header["base_id"], header["user"], header.get("meta", {}))
    except Exception as e:  # zip, key and JSON errors all mean the same thing to the user
        raise FedkeyError(f"{path}: not a fedkey adapter file ({type(e).__name__}); re-run `fedkey personalize`") from None
    if expect_base_id is not None and ad.base_id != expect_base_id:
        raise FedkeyError(f"{path}: adapter was trained on base model {ad.base_id[:12]}, not {expect_base_id[:12]}; "
                          "re-run `fedkey personalize` against this model")
    if (vocab_size is not None and ad.user_bias.shape != (vocab_size,)) or (
            embed_dim is not None and (ad.A.shape[0] != embed_dim or ad.B.shape[1] != embed_dim)):
        raise FedkeyError(f"{path}: adapter shapes {ad.A.shape}/{ad.B.shape}/{ad.user_bias.shape} do not fit this model")
    return ad


def write_headed_npz(path: str | Path, header: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write arrays and a JSON header (naming the base model) as one compressed .npz, atomically; returns bytes."""
    buf = io.BytesIO()
    np.savez_compressed(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def read_headed_npz(path: str | Path, kind: str, expect_base_id: str | None = None,
                    data: bytes | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a `write_headed_npz` file (from `data` if given, `path` naming it); refuse a corrupt
    file or one made for another base model, naming the file and its `kind`."""
    try:
        with np.load(io.BytesIO(data) if data is not None else path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            arrays = {k: z[k] for k in z.files if k != "header"}
    except Exception as e:  # zip, key and JSON errors all mean the same thing to the user
        raise FedkeyError(f"{path}: not a fedkey {kind} ({type(e).__name__}); re-run `fedkey personalize`") from None
    if expect_base_id is not None and header.get("base_id") != expect_base_id:
        raise FedkeyError(f"{path}: {kind} was made for base model {str(header.get('base_id'))[:12]}, not "
                          f"{expect_base_id[:12]}; re-run `fedkey personalize` against this model")
    return header, arrays
