"""Keyboard metrics exactly as DESIGN.md defines them, on plain per-position records."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Position:
    """One word position: the true word and the suggestions made before it was typed."""

    user: str
    word: str
    suggestions: list[str]


@dataclass
class UserTally:
    """Running sums for one user (or one pool of users)."""

    n_words: int = 0
    top1: int = 0
    top3: int = 0
    nll: float = 0.0
    ppl_words: int = 0
    keystrokes: int = 0
    chars: int = 0
    regional_hits: int = 0
    regional_n: int = 0
    pairs: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, other: "UserTally") -> None:
        """Pool another tally into this one."""
        for name in ("n_words", "top1", "top3", "nll", "ppl_words", "keystrokes", "chars", "regional_hits", "regional_n"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for p, (h, n) in other.pairs.items():
            self.pairs[p][0] += h
            self.pairs[p][1] += n

    def metrics(self) -> dict:
        """The M object of DESIGN.md (None where nothing was measured)."""
        return {
            "top1": self.top1 / self.n_words if self.n_words else None,
            "top3": self.top3 / self.n_words if self.n_words else None,
            "perplexity": math.exp(self.nll / self.ppl_words) if self.ppl_words else None,
            "ksr": 1 - self.keystrokes / self.chars if self.chars else None,
            "regional_acc": self.regional_hits / self.regional_n if self.regional_n else None,
            "n_words": self.n_words,
        }


def topk_hits(word: str, suggestions: list[str]) -> tuple[bool, bool]:
    """(top-1 hit, top-3 hit) for one position."""
    return bool(suggestions) and suggestions[0] == word, word in suggestions[:3]


def regional_hit(own: str, other: str, suggestions: list[str]) -> bool:
    """The user's own variant is in the top 3 and ranked above the other variant."""
    top = suggestions[:3]
    if own not in top:
        return False
    return other not in top or top.index(own) < top.index(other)


def word_keystrokes(word: str, first_hit: int | None, space_follows: bool) -> tuple[int, int]:
    """(keystrokes used, characters covered) for one word, given the prefix length at which it was suggested.

    Accepting a suggestion costs one keystroke and inserts the word and a space, so a following
    space is saved too.
    """
    covered = len(word) + (1 if space_follows else 0)
    if first_hit is None:
        return len(word), len(word)
    return first_hit + 1, covered


def mean_over(tallies: dict[str, UserTally]) -> dict:
    """Mean of per-user metrics (geometric for perplexity), skipping users where a metric was not measured."""
    per = [t.metrics() for t in tallies.values()]
    out = {}
    for key in ("top1", "top3", "perplexity", "ksr", "regional_acc"):
        vals = [m[key] for m in per if m[key] is not None]
        if key == "perplexity":  # a geometric mean: one user with two words must not dominate
            out[key] = math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None
        else:
            out[key] = sum(vals) / len(vals) if vals else None
    out["n_words"] = sum(m["n_words"] for m in per)
    return out
