"""The on-device bundle's layout and its verified reading (NumPy/stdlib only: devices read it without torch).

A bundle directory holds model.onnx, model.int8.onnx, tokenizer.model, manifest.json (hashes, shapes,
quantization settings, source checkpoint, base_id) and, optionally, lexicon.txt (the words suggestions
come from) and, per shipped user (profiles.json), adapters/<user>.npz and/or caches/<user>.npz (their phrase
cache), with respell.json holding the shipped users' whole-word spelling preferences (other variant -> their own).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fedkey.errors import FedkeyError

FORMAT = "fedkey-bundle/1"
FP32, INT8, TOKENIZER, MANIFEST, PROFILES, ADAPTERS, LEXICON, RESPELL, CACHES = (
    "model.onnx", "model.int8.onnx", "tokenizer.model", "manifest.json", "profiles.json", "adapters", "lexicon.txt",
    "respell.json", "caches")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def adapter_name(user: str) -> str:
    """Bundle-relative path of a user's adapter."""
    return f"{ADAPTERS}/{user}.npz"


SENTINEL = f"{CACHES}/sentinel.npz"  # the check shared by every shipped phrase cache (keyboard.sentinel)


def cache_name(user: str) -> str:
    """Bundle-relative path of a user's phrase cache."""
    return f"{CACHES}/{user}.npz"


@dataclass
class Bundle:
    """An opened bundle: where it is, what its manifest says, which users' adapters it ships."""

    dir: Path
    manifest: dict
    profiles: dict[str, str]

    def read(self, name: str) -> bytes:
        """A bundle file's bytes, refused if missing or not the file the manifest lists."""
        path = self.dir / name
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise FedkeyError(f"{path}: not listed in {self.dir / MANIFEST}; re-run `fedkey export`")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FedkeyError(f"{path}: missing from the bundle; re-run `fedkey export` or copy the whole folder") from None
        except OSError as e:
            raise FedkeyError(f"{path}: unreadable ({e.strerror}); re-run `fedkey export`") from None
        if sha256_bytes(data) != entry["sha256"]:
            raise FedkeyError(f"{path}: content does not match the manifest (corrupt, or from another export); "
                              "re-run `fedkey export` or copy the whole bundle again")
        return data


def open_bundle(bundle_dir: str | Path) -> Bundle:
    """Read and check a bundle's manifest (and profiles); files are verified when read."""
    bdir = Path(bundle_dir)
    if not bdir.is_dir():
        raise FedkeyError(f"{bdir}: no such bundle folder; run `fedkey export` first")
    mpath = bdir / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedkeyError(f"{mpath}: missing; this is not a fedkey export bundle (run `fedkey export`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise FedkeyError(f"{mpath}: unreadable ({type(e).__name__}); re-run `fedkey export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise FedkeyError(f"{mpath}: not a {FORMAT} manifest; re-run `fedkey export` with this fedkey version")
    for key in ("base_id", "vocab_size", "embed_dim", "hidden"):
        if key not in manifest:
            raise FedkeyError(f"{mpath}: field {key!r} missing; re-run `fedkey export`")
    profiles: dict[str, str] = {}
    if PROFILES in manifest["files"]:
        try:
            profiles = json.loads(Bundle(bdir, manifest, {}).read(PROFILES).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FedkeyError(f"{bdir / PROFILES}: not valid JSON; re-run `fedkey export`") from None
        if not isinstance(profiles, dict):
            raise FedkeyError(f"{bdir / PROFILES}: expected {{user: region}}; re-run `fedkey export`")
    return Bundle(bdir, manifest, {str(u): str(r) for u, r in profiles.items()})
