"""Each user's local data: train messages and the latest slice of them for validation (never test)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keyboard.batches import frame

if TYPE_CHECKING:
    from data.shards import Shards
    from keyboard.tokenizer import Tokenizer


@dataclass
class UserData:
    """One user's framed messages (BOS ... EOS), split in time: train, then the latest ones for validation."""

    user: str
    region: str
    train: list[list[int]]
    val: list[list[int]]
    words: Counter = field(default_factory=Counter)  # words of the train messages (not the validation slice)
    spelling: dict[int, float] = field(default_factory=dict)  # fixed bias entries of the spelling preference
    respell: dict[str, str] = field(default_factory=dict)  # other variant -> the user's own (whole words)
    history: list[list[int]] = field(default_factory=list)  # every framed train message, validation slice last
    n_val_messages: int = 0  # the validation slice's messages at the end of `history`

    @property
    def train_tokens(self) -> int:
        """Pieces predicted in training (every framed position after BOS)."""
        return sum(len(s) - 1 for s in self.train)

    @property
    def val_tokens(self) -> int:
        """Pieces predicted in validation."""
        return sum(len(s) - 1 for s in self.val)

    @property
    def text_tokens(self) -> int:
        """Pieces of every train message the device holds (validation slice included, no max_train_tokens cut)."""
        return sum(len(s) - 1 for s in self.history)


def _latest(seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The latest messages holding at most max_tokens predicted pieces (at least one message)."""
    out, n = [], 0
    for s in reversed(seqs):
        if out and n + len(s) - 1 > max_tokens:
            break
        out.append(s)
        n += len(s) - 1
    return out[::-1]


def n_val(n_messages: int, val_frac: float) -> int:
    """How many of a user's latest train messages form the validation slice."""
    return math.ceil(val_frac * n_messages) if n_messages >= 2 else 0


def split_user(user: str, region: str, ids: list[list[int]], val_frac: float, max_len: int,
               max_train_tokens: int, max_val_tokens: int) -> UserData:
    """Frame a user's time-ordered train messages; the latest val_frac of them (by count) validate."""
    seqs = [frame(x, max_len) for x in ids]
    nv = n_val(len(seqs), val_frac)
    train, val = seqs[: len(seqs) - nv], seqs[len(seqs) - nv:]
    return UserData(user, region, _latest(train, max_train_tokens) if train else [],
                    _latest(val, max_val_tokens) if val else [], history=seqs,
                    n_val_messages=nv)


def load_users(shards: Shards, tok: Tokenizer, users: list[str], val_frac: float, max_len: int, max_train_tokens: int,
               max_val_tokens: int, split: str = "train") -> list[UserData]:
    """UserData for each user from a prepared train split (the test splits are never read here)."""
    if "test" in split:
        raise ValueError(f"personalization never reads a test split ({split})")
    from keyboard.words import WORD_RE, normalize

    texts = [shards.user_texts(split, u) for u in users]
    flat = tok.encode_batch([t for ts in texts for t in ts])
    out, i = [], 0
    for u, ts in zip(users, texts):
        d = split_user(u, shards.region(u), flat[i:i + len(ts)], val_frac, max_len, max_train_tokens, max_val_tokens)
        # every train message, not only the latest max_train_tokens; the validation slice stays unseen
        d.words = Counter(w for t in ts[: len(ts) - n_val(len(ts), val_frac)] for w in WORD_RE.findall(normalize(t)))
        out.append(d)
        i += len(ts)
    return out
