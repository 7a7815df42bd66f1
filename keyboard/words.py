"""Whole words over word pieces: what a word is, and which pieces start, continue or end one.

Everything here is plain Python/NumPy so the on-device runtime can use it without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import bisect
import re
import unicodedata
from functools import lru_cache

import numpy as np

if TYPE_CHECKING:
    from keyboard.tokenizer import Tokenizer

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
    def from_tokenizer(cls, tok: Tokenizer) -> PieceTable:
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

    def pieces_with(self, kind: str, surfaces: set[str]) -> np.ndarray:
        """Sorted ids of `kind` pieces ("start_space", "start_nospace", "cont") whose surface is in `surfaces`."""
        flag = kind == "start_space"
        found = {i for s in surfaces for i in self._by_surface.get((flag, s), ())}
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


def one_piece_word(seq: list[int], t: int, starts: np.ndarray, cont: np.ndarray) -> bool:
    """Whether seq[t + 1] is a whole word of one piece: it starts a word and the piece after it does not continue
    it (`starts`, `cont`: (vocab,) bool masks of a PieceTable's start and continuation pieces)."""
    return bool(starts[seq[t + 1]]) and not (t + 2 < len(seq) and cont[seq[t + 2]])


def split_typed(text: str) -> tuple[str, str, bool]:
    """Split typed text into (context, partial word being typed, whether the word starts after a space)."""
    m = re.search(r"\w+(?:'\w*)*$", text)
    partial = m.group() if m else ""
    context = text[: len(text) - len(partial)]
    space = context == "" or context[-1].isspace()
    return context, normalize(partial), space


class Lexicon:
    """The words a keyboard may suggest: a shipped word list plus the words this user has typed.

    The model spells words piece by piece and can join pieces into strings nobody types ("colourime");
    a keyboard suggests dictionary words. Prefix checks are bisections in sorted lists, so loading a
    list is a read and a sort, with no trie to build.
    """

    def __init__(self, words: list[str] | set[str] | tuple[str, ...], normalized: bool = False) -> None:
        if not normalized:
            words = {normalize(w) for w in words}
        self._base = sorted({w for w in words if WORD_RE.fullmatch(w)})
        self._base_set = set(self._base)
        self._user: list[str] = []
        self._user_set: set[str] = set()
        self._after: dict[tuple[str, str], np.ndarray] = {}
        self._fit: dict[tuple[str, str, str], np.ndarray] = {}
        self._table: PieceTable | None = None
        self._base_arr: np.ndarray | None = None  # the shipped words as one NumPy array, for batched prefix tests

    @classmethod
    def from_text(cls, text: str) -> "Lexicon":
        """Parse a word list (one word a line), as written by `to_text` (normalized already)."""
        return cls(text.split(), normalized=True)

    def to_text(self) -> str:
        """The shipped words, one a line, sorted (the user's words are not part of a bundle)."""
        return "".join(w + "\n" for w in self._base)

    def fresh(self) -> "Lexicon":
        """The same shipped words with no user words (a new user or profile)."""
        other = Lexicon.__new__(Lexicon)
        other._base, other._base_set, other._user, other._user_set = self._base, self._base_set, [], set()
        other._after, other._table = dict(self._after), self._table  # the shipped words' piece sets hold
        other._fit = dict(self._fit)
        other._base_arr = self._base_arr
        return other

    def learn(self, words: list[str]) -> None:
        """Add words the user typed, so they can be suggested too."""
        for w in words:
            w = normalize(w)
            if w not in self._base_set and w not in self._user_set and WORD_RE.fullmatch(w):
                self._user_set.add(w)
                bisect.insort(self._user, w)
                self._extend_pieces(w)
                self._fit.clear()  # its entries were cut from piece sets that may have grown

    def _extend_pieces(self, word: str) -> None:
        # the cached piece sets of the word's prefixes grow; recomputing them all would stall a keystroke
        for n in range(len(word) + 1):
            rest = word[n:]
            surfaces = {rest[:m] for m in range(1, len(rest) + 1)}
            for kind in ("start_space", "start_nospace", "cont"):
                got = self._after.get((kind, word[:n]))
                if got is None or self._table is None:
                    continue
                new = self._table.pieces_with(kind, surfaces)
                if len(_sorted_common(new, got)) < len(new):  # usually every piece is there already
                    self._after[(kind, word[:n])] = np.union1d(got, new)

    def __len__(self) -> int:
        return len(self._base) + len(self._user)

    def __contains__(self, word: str) -> bool:
        return word in self._base_set or word in self._user_set

    def pieces_after(self, table: PieceTable, kind: str, prefix: str) -> np.ndarray:
        """Sorted ids of `kind` pieces that extend `prefix` to the start of a word (cached per prefix).

        With kind "start_space" the bare space piece counts too: the word's pieces follow it.
        """
        if table is not self._table:  # piece ids belong to one tokenizer
            self._table, self._after, self._fit = table, {}, {}
        key = (kind, prefix)
        got = self._after.get(key)
        if got is None:
            if len(self._after) >= 16384:  # bounded: a long session visits many prefixes once
                self._after.clear()
            got = self._after[key] = self._pieces_after(table, kind, prefix)
        return got

    def pieces_fitting(self, table: PieceTable, kind: str, prefix: str, typed: str) -> np.ndarray:
        """Sorted ids of `kind` pieces that extend `prefix` towards a word and fit the still-untyped `typed` rest.

        The search asks this for the same (prefix, rest) on every keystroke of a word, so it is cached.
        """
        if table is not self._table:
            self.pieces_after(table, kind, prefix)  # adopts the table and drops sets of another one
        key = (kind, prefix, typed)
        got = self._fit.get(key)
        if got is None:
            if len(self._fit) >= 16384:
                self._fit.clear()
            got = self._fit[key] = _sorted_common(table.compatible(kind, typed), self.pieces_after(table, kind, prefix))
        return got

    def warm(self, table: PieceTable) -> None:
        """Compute at load the piece sets that cost most: word starts, and what follows each first letter."""
        for kind in ("start_space", "start_nospace", "cont"):
            self.pieces_after(table, kind, "")
        for letter in sorted({w[0] for w in self._base}):
            if self.count_prefix(letter) > 150:
                self.pieces_after(table, "cont", letter)

    def _pieces_after(self, table: PieceTable, kind: str, prefix: str) -> np.ndarray:
        spans = []
        for words in (self._base, self._user):
            lo = bisect.bisect_left(words, prefix)
            spans.append(words[lo:bisect.bisect_left(words, prefix + "\U0010ffff")])
        if sum(map(len, spans)) > 150:  # a short prefix starts hundreds of words: test each piece instead
            ids = getattr(table, kind)
            if len(ids) == 0:
                return ids
            if self._base_arr is None:
                self._base_arr = np.array(self._base or [""])
            cand = np.array([prefix + table.surface[i] for i in ids.tolist()])
            at = np.minimum(np.searchsorted(self._base_arr, cand), len(self._base_arr) - 1)
            ok = np.char.startswith(self._base_arr[at], cand)
            if self._user:
                ok |= np.array([self._has_user_prefix(c) for c in cand.tolist()])
            return ids[ok]
        surfaces = {""} if kind == "start_space" else set()
        for span in spans:
            for w in span:
                rest = w[len(prefix):]
                surfaces.update(rest[:n] for n in range(1, len(rest) + 1))
        return table.pieces_with(kind, surfaces)

    def count_prefix(self, prefix: str) -> int:
        """How many words start with `prefix`."""
        return sum(bisect.bisect_left(w, prefix + "\U0010ffff") - bisect.bisect_left(w, prefix)
                   for w in (self._base, self._user))

    def _has_user_prefix(self, prefix: str) -> bool:
        i = bisect.bisect_left(self._user, prefix)
        return i < len(self._user) and self._user[i].startswith(prefix)

    def has_prefix(self, prefix: str) -> bool:
        """Whether some word starts with `prefix`."""
        for words in (self._base, self._user):
            i = bisect.bisect_left(words, prefix)
            if i < len(words) and words[i].startswith(prefix):
                return True
        return False


def _sorted_common(small: np.ndarray, large: np.ndarray) -> np.ndarray:
    """The ids of sorted `small` also in sorted `large`: bisections, not intersect1d's sort of both."""
    if len(small) == 0 or len(large) == 0:
        return small[:0]
    at = np.minimum(np.searchsorted(large, small), len(large) - 1)
    return small[large[at] == small]


# where a profile respells, the search is asked for this many words beyond k: a pair's two variants merge into
# one suggestion, which must not leave a slot empty
RESPELL_SPARE = 3


def respell(suggestions: list[str], respelling: dict[str, str], partial: str = "") -> list[str]:
    """Suggestions with the other variant of a preferred pair shown as the user's own (once, in its place),
    where the own variant fits what is typed: continuation pieces ("ise"/"ize") are shared by unrelated words,
    so a bias cannot tell the variants apart after a shared first piece ("▁organ"), but a whole word can."""
    return [w for w, _ in respell_scored([(w, 0.0) for w in suggestions], respelling, partial)]


def respell_scored(suggestions: list[tuple[str, float]], respelling: dict[str, str],
                   partial: str = "") -> list[tuple[str, float]]:
    """`respell` for (word, probability) pairs: a word shown in the user's spelling carries both variants' mass."""
    out: dict[str, float] = {}
    for w, p in suggestions:
        own = respelling.get(w)
        w = own if own is not None and own.startswith(partial) else w
        out[w] = out.get(w, 0.0) + p
    return list(out.items())


def collect_words(texts: list[str], min_count: int = 1) -> list[str]:
    """Words (normalized, as the tokenizer sees them) occurring at least `min_count` times in `texts`."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in WORD_RE.findall(normalize(t)):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, n in counts.items() if n >= min_count)
