"""Whole words over word pieces: what a word is, and which pieces start, continue or end one.

Everything here is plain Python/NumPy so the on-device runtime can use it without torch.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from functools import lru_cache

import numpy as np

SPACE = "\u2581"
WORD_RE = re.compile(r"\w+(?:'\w+)*")
_OPAQUE = "\ufffd"  # stands in for byte-fallback and control pieces: never part of a word


def normalize(text: str) -> str:
    """The tokenizer's normalization (NFKC + case folding), so typed text matches piece surfaces."""
    return unicodedata.normalize("NFKC", text).casefold()


def _wordish(s: str) -> bool:
    return bool(s) and all(ch.isalnum() or ch in "_'" for ch in s)


class PieceTable:
    """Per-piece facts the whole-word search needs, computed once per tokenizer."""

    def __init__(self, pieces: list[str], opaque: list[bool], eos_id: int) -> None:
        self.vocab_size = len(pieces)
        self.eos_id = eos_id
        self.space = np.array([p.startswith(SPACE) for p in pieces])
        self.surface = [_OPAQUE if o else p.lstrip(SPACE) if p.startswith(SPACE) else p
                        for p, o in zip(pieces, opaque)]
        self.surface = [s.replace(SPACE, " ") for s in self.surface]
        wordish = np.array([_wordish(s) for s in self.surface])
        starts_word = np.array([bool(s) and (s[0].isalnum() or s[0] == "_") for s in self.surface])
        bare_space = np.array([p == SPACE for p in pieces])
        self.bare_space = bare_space
        # a word after a space starts with a "▁word" piece, or a bare "▁" followed by word pieces
        self.start_space = np.flatnonzero((self.space & wordish & starts_word) | bare_space)
        self.start_nospace = np.flatnonzero(~self.space & wordish & starts_word)
        self.cont = np.flatnonzero(~self.space & wordish)
        nonword_start = np.array([bool(s) and not (s[0].isalnum() or s[0] in "_'") for s in self.surface])
        boundary = self.space | (~self.space & nonword_start)
        boundary[eos_id] = True
        self.boundary = np.flatnonzero(boundary)
        self.nonboundary = np.flatnonzero(~boundary)
        self._by_surface: dict[tuple[bool, str], list[int]] = {}
        space = self.space.tolist()  # Python bools: comparing NumPy scalars per piece made loading slow
        for i, (sp, s) in enumerate(zip(space, self.surface)):
            self._by_surface.setdefault((sp, s), []).append(i)
        self._sorted = {flag: sorted((s, i) for i, (sp, s) in enumerate(zip(space, self.surface)) if sp == flag)
                        for flag in (True, False)}
        self._sorted_keys = {flag: [s for s, _ in v] for flag, v in self._sorted.items()}
        self._allowed = {"start_space": set(self.start_space.tolist()),
                         "start_nospace": set(self.start_nospace.tolist()), "cont": set(self.cont.tolist())}
        self.compatible = lru_cache(maxsize=65536)(self._compatible)

    @classmethod
    def from_tokenizer(cls, tok) -> "PieceTable":
        """Build from a keyboard Tokenizer (or anything with pieces()/is_byte())."""
        pieces = tok.pieces()
        opaque = [tok.is_byte(i) or (p.startswith("<") and p.endswith(">") and len(p) > 2) for i, p in enumerate(pieces)]
        return cls(pieces, opaque, eos_id=2)

    def _compatible(self, kind: str, rest: str) -> np.ndarray:
        """Ids of `kind` pieces whose surface is a prefix of `rest` or extends it."""
        flag = kind == "start_space"
        found = set()
        for n in range(1, len(rest)):
            found.update(self._by_surface.get((flag, rest[:n]), ()))
        keys = self._sorted_keys[flag]
        lo = bisect.bisect_left(keys, rest)
        hi = bisect.bisect_left(keys, rest + "\U0010ffff")
        found.update(i for _, i in self._sorted[flag][lo:hi])
        if flag and not rest:
            found.update(self._by_surface.get((True, ""), ()))
        elif flag:
            found.update(self._by_surface.get((True, ""), ()))  # a bare "▁" then the word's pieces
        return np.array(sorted(found & self._allowed[kind]), dtype=np.int64)

    def word_positions(self, ids: list[int]) -> tuple[list[tuple[int, str, bool, int]], str]:
        """Words of a message's piece ids and its text as the model sees it.

        Each word is (index of its first piece, the word, whether a space precedes, its offset in the text).
        """
        chars: list[str] = []
        owner: list[int] = []
        for j, i in enumerate(ids):
            text = (" " if self.space[i] else "") + self.surface[i]
            chars.extend(text)
            owner.extend([j] * len(text))
        joined = "".join(chars)
        out = []
        for m in WORD_RE.finditer(joined):
            s = m.start()
            # a word starting inside a piece (rare) is kept: it counts, as a miss, like any word typed
            j = owner[s]
            if j > 0 and self.bare_space[ids[j - 1]] and not self.space[ids[j]]:
                j -= 1  # a bare "▁" piece then the word's pieces: the word starts at the "▁"
            out.append((j, m.group(), bool(self.space[ids[j]]), s))
        return out, joined


def split_typed(text: str) -> tuple[str, str, bool]:
    """Split typed text into (context, partial word being typed, whether the word starts after a space)."""
    m = re.search(r"\w+(?:'\w*)*$", text)
    partial = m.group() if m else ""
    context = text[: len(text) - len(partial)]
    space = context == "" or context[-1].isspace()
    return context, normalize(partial), space
