"""Typed run configuration: dataclasses loaded from TOML, overridden by flags, saved beside artifacts."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from fedkey.errors import FedkeyError
from fedkey.fields import option as _f
from fedkey.io import atomic_write_bytes

T = TypeVar("T")


@dataclass
class PrepareConfig:
    """How the corpus becomes per-user shards and a tokenizer."""

    SECTION = "prepare"
    corpus: str = _f("chitchat", "chitchat | PATH (.jsonl/.csv/.parquet with user,text) | hub:NAME")
    seed: int = _f(0, "seed for user roles and British conversion")
    test_frac: float = _f(0.2, "latest fraction of each user's messages kept for test")
    heldout_frac: float = _f(0.1, "fraction of users never trained on (generalization to new users)")
    public_frac: float = _f(0.1, "fraction of users whose train text builds the tokenizer only")
    gb_frac: float = _f(0.2, "fraction of users converted to British spelling")
    min_words: int = _f(20, "users with fewer words are dropped (and counted)")
    max_message_chars: int = _f(5000, "longer messages are skipped (and counted)")
    vocab_size: int = _f(8000, "SentencePiece unigram vocabulary size")


@dataclass
class ModelConfig:
    """Shape of the LSTM language model (Gboard-sized by default)."""

    SECTION = "model"
    embed_dim: int = _f(96, "tied input/output embedding size")
    hidden: int = _f(670, "LSTM units (projected back to embed_dim)")


@dataclass
class CentralConfig:
    """Centralized baseline training on the union of all training users' train splits."""

    SECTION = "central"
    seed: int = _f(0, "seed for init and batch order")
    # 800k-token runs, top-1 on 50k test positions: lr .003 16.3%, .005 16.8%, .007 16.8%, .01 16.3%, .02 13.0%
    lr: float = _f(5e-3, "peak Adam learning rate (cosine decay to 2% over max_tokens)")
    warmup_tokens: int = _f(50_000, "linear learning-rate warm-up over this many tokens")
    batch_size: int = _f(16, "messages per batch (small batches learn most per token here)")
    max_tokens: int = _f(3_000_000, "stop after this many real (non-padding) training tokens")
    max_minutes: float = _f(0.0, "also stop after this many minutes (0: no limit)")
    # one pass (~350k tokens) then 1.0M of the train split matched 1.4M from a random start on the quick
    # preset's 20k positions (17.5% vs 17.5% top-1, docs/results/sweeps.md, session 20)
    pretrain_epochs: float = _f(0.0, "start from a model pretrained on this many passes over the public users' text, "
                                     "the federated stage's start when both ask the same (0: a random start)")
    max_len: int = _f(64, "longer messages are cut to this many pieces for training")
    clip: float = _f(1.0, "gradient norm clip")
    threads: int = _f(0, "torch threads (0: all cores)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise FedkeyError(f"[central].{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_tokens < 0 or self.threads < 0 or self.pretrain_epochs < 0:
            raise FedkeyError(f"[central]: lr must be > 0 and max_tokens, threads, pretrain_epochs >= 0 (got lr "
                              f"{self.lr}, max_tokens {self.max_tokens}, threads {self.threads}, "
                              f"pretrain_epochs {self.pretrain_epochs})")

    @classmethod
    def short(cls, tokens: int, **overrides: Any) -> "CentralConfig":
        """Settings of a short pretraining run of `tokens` tokens: the warm-up shrinks to a tenth of it."""
        return cls(max_tokens=tokens, warmup_tokens=min(cls.warmup_tokens, tokens // 10), **overrides)


@dataclass
class EvalConfig:
    """Evaluation of a model on a prepared split."""

    SECTION = "eval"
    split: str = _f("test", "split to evaluate: test | heldout_test")
    seed: int = _f(0, "seed for the KSR message sample and position sample")
    max_positions: int = _f(0, "evaluate at most this many word positions (0: all)")
    ksr_messages: int = _f(500, "seeded sample of test messages for keystroke savings")
    beam: int = _f(6, "word-piece beam width of the whole-word search")
    max_pieces: int = _f(6, "longest word, in pieces, the search builds")
    batch: int = _f(512, "word positions searched together")
    threads: int = _f(0, "torch threads (0: all cores)")


CONFIGS = {c.SECTION: c for c in (PrepareConfig, ModelConfig, CentralConfig, EvalConfig)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(typ, typ) if isinstance(typ, str) else typ
    origin = typing.get_origin(typ)
    if origin is not None:  # Optional[...] etc.: take the first concrete type
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    try:
        if typ is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return typ(value)
    except (TypeError, ValueError):
        raise FedkeyError(f"{where}: expected {typ.__name__}, got {value!r}") from None


def toml_section(cls: type, toml_path: str | Path) -> dict[str, Any]:
    """The fields a TOML file sets in cls's [section], type-checked, with one-line errors."""
    path = Path(toml_path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedkeyError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedkeyError(f"{path}: not valid TOML ({e})") from None
    names = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, val in doc.get(cls.SECTION, {}).items():
        if key not in names:
            raise FedkeyError(f"{path}: [{cls.SECTION}] has unknown field {key!r}; known: {', '.join(names)}")
        out[key] = _coerce(val, names[key].type, f"{path} [{cls.SECTION}].{key}")
    return out


def build(cls: type[T], toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Make a config: defaults, then the TOML file's [section], then non-None overrides."""
    values = toml_section(cls, toml_path) if toml_path else {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, val in (overrides or {}).items():
        if val is None:
            continue
        if key not in names:
            raise FedkeyError(f"unknown {cls.SECTION} field {key!r}; known: {', '.join(names)}")
        values[key] = _coerce(val, names[key].type, f"--{key.replace('_', '-')}")
    return cls(**values)


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--field` flag per dataclass field (default None, so TOML values are not masked)."""
    group = parser.add_argument_group(f"{cls.SECTION} settings (also from --config TOML, table {cls.SECTION})")
    for f in dataclasses.fields(cls):
        typ = f.type if not isinstance(f.type, str) else {"int": int, "float": float, "str": str, "bool": str}[f.type]
        flag = "--" + prefix + f.name.replace("_", "-")
        group.add_argument(flag, dest=prefix + f.name, type=typ, default=None,
                           help=f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%"))


def from_args(cls: type[T], args: argparse.Namespace, prefix: str = "") -> T:
    """Build a config: defaults < --preset < --config TOML < flags."""
    from fedkey.presets import preset_overrides

    values = preset_overrides(getattr(args, "preset", None), cls.SECTION)
    if getattr(args, "config", None):
        values.update(toml_section(cls, args.config))
    values.update({f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
                   if getattr(args, prefix + f.name, None) is not None})
    return build(cls, None, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (for manifests and JSON)."""
    return dataclasses.asdict(cfg)


def save(path: str | Path, *cfgs: Any) -> None:
    """Save configs as one TOML file with a [section] per config, reloadable with --config."""
    doc = {c.SECTION: to_dict(c) for c in cfgs}
    atomic_write_bytes(path, tomli_w.dumps(doc).encode())
