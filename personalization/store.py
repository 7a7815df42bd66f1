"""Where personalization's outputs live in a run, and how a user's personalized model is loaded back.

runs/<name>/personal/adapters/<user>.npz (keyboard.adapter_file) for users whose gate chose the adapter,
runs/<name>/personal/gate.json {user: {"use_adapter": bool, "val_global": x, "val_personal": y, ...}}.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedkey.errors import FedkeyError
from fedkey.io import read_json, write_json
from fedkey.stages import file_hash
from keyboard.adapter_file import AdapterArrays, load_adapter, save_adapter
from keyboard.checkpoint import load_model
from keyboard.model import KeyboardLM
from keyboard.tokenizer import Tokenizer
from personalization.batched import UserResult
from keyboard.phrase_cache import save_cache
from keyboard.respell_file import pack_one, unpack_one, way_maps
from personalization.model import PersonalizedLM

PERSONAL, ADAPTERS, GATE, REPORT, GAINS_PNG = "personal", "adapters", "gate.json", "report.json", "gains.png"
SENTINEL = "sentinel.npz"  # the cache sentinel shared by all users (keyboard/sentinel.py)
CACHES = "caches"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")


def default_base(run_dir: Path) -> Path:
    """The model personalization starts from: the federated model if there is one, else the centralized one."""
    fl = run_dir / "fl"
    return fl if (fl / "model.pt").is_file() else run_dir / "central"


def base_id(model_dir: Path) -> str:
    """The identity adapter files record: sha256 of the base model.pt (which names its tokenizer)."""
    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise FedkeyError(f"{path}: no model here; train one first (`fedkey train` or `fedkey train-central`)")
    return file_hash(path)


def adapter_path(run_dir: Path, user: str) -> Path:
    """The adapter file of one user; refuses an id that is not a plain file name."""
    if not _SAFE_ID.match(user):
        raise FedkeyError(f"user id {user!r} cannot name an adapter file (letters, digits and ._@+- only)")
    return run_dir / PERSONAL / ADAPTERS / f"{user}.npz"


def cache_path(run_dir: Path, user: str) -> Path:
    """The phrase-cache file of one user (beside the adapters)."""
    return adapter_path(run_dir, user).parent.parent / CACHES / f"{user}.npz"


def _ways() -> dict:
    from data.british import REGIONAL_PAIRS

    return way_maps(REGIONAL_PAIRS)


def gate_respelling(entry: dict, where: str = GATE) -> dict[str, str]:
    """A gate entry's whole-word spelling preference {other variant: own} ({} for none)."""
    got = entry.get("respell")
    return unpack_one(got, _ways(), where) if got else {}


def read_gate(run_dir: Path) -> dict:
    """The gate decisions so far ({} when personalization has not run)."""
    path = run_dir / PERSONAL / GATE
    return read_json(path) if path.is_file() else {}


def save_results(run_dir: Path, results: list[UserResult], bid: str, model_dir: Path) -> dict[str, int]:
    """Write the adapters the gate kept and merge the decisions into gate.json; returns user -> file bytes.

    Decisions about another base model are dropped: they no longer describe any file that can be used.
    """
    gate = {u: d for u, d in read_gate(run_dir).items() if d.get("base_id") == bid}
    sizes: dict[str, int] = {}
    ways = _ways()
    for r in results:
        path = adapter_path(run_dir, r.user)
        entry = {"use_adapter": r.use_adapter, "val_global": r.val_global, "val_personal": r.val_personal,
                 "reason": r.reason, "region": r.region, "train_tokens": r.train_tokens, "val_tokens": r.val_tokens,
                 "best_step": r.best_step, **r.extra, "base_id": bid, "base_model": str(model_dir)}
        if r.use_adapter:
            meta = {"region": r.region, "rank": int(r.A.shape[1]), "train_tokens": r.train_tokens}
            sizes[r.user] = save_adapter(path, AdapterArrays(r.A, r.B, r.user_bias, bid, r.user, meta))
            entry["adapter_bytes"] = sizes[r.user]
        elif path.exists():
            path.unlink()  # an older adapter this user's gate now rejects must not be picked up
        cpath = cache_path(run_dir, r.user)
        entry["use_cache"] = r.cache is not None
        if r.cache is not None:
            entry["cache_bytes"] = r.extra["cache_bytes"] = save_cache(cpath, r.cache, bid, r.user)
        elif cpath.exists():
            cpath.unlink()
        if entry.get("respell") is not None:
            # a locale user's map holds every pair (~54 kB): stored as the way plus their exceptions
            entry["respell"] = pack_one(entry["respell"], ways)
        gate[r.user] = entry
    write_json(run_dir / PERSONAL / GATE, dict(sorted(gate.items())))
    return sizes


def load_personalized(run_dir: Path, model_dir: Path | None, user: str) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """The model a user gets: the base with their adapter if their gate chose it, else the base itself.

    Returns (model, tokenizer, info) with info["personalized"] saying which; an adapter made for another
    base model is refused with a one-line error.
    """
    model_dir = Path(model_dir) if model_dir else default_base(run_dir)
    base, tok, _ = load_model(model_dir)
    bid = base_id(model_dir)
    gate = read_gate(run_dir)
    if user not in gate:
        raise FedkeyError(f"{run_dir / PERSONAL / GATE}: no decision for user {user!r}; "
                          f"run `fedkey personalize --run-dir {run_dir} --user {user}` first")
    entry = gate[user]
    if not entry.get("use_adapter"):
        return base, tok, {"personalized": False, "reason": entry.get("reason", ""), "base_model": str(model_dir)}
    ad = load_adapter(adapter_path(run_dir, user), expect_base_id=bid, vocab_size=base.vocab_size,
                      embed_dim=base.cfg.embed_dim)
    return PersonalizedLM.from_arrays(base, ad).eval(), tok, {"personalized": True, "base_model": str(model_dir)}


def personalized_model(base: KeyboardLM, path: Path, bid: str) -> PersonalizedLM:
    """The base with the adapter file at path (refused if it was made for another base)."""
    ad = load_adapter(path, expect_base_id=bid, vocab_size=base.vocab_size, embed_dim=base.cfg.embed_dim)
    return PersonalizedLM.from_arrays(base, ad).eval()
