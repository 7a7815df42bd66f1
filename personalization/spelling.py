"""A user's regional spelling preference, read from their own train text, as a few entries of their output bias.

The data-driven bias cannot flip "favorite" -> "favourite": a word typed a handful of times moves its
bias by a fraction of a nat under any prior strong enough not to hurt top-1 elsewhere, while the base
prefers the American variant by 1-3 nats. A public American/British pair list makes the step explicit:
where the user typed one variant of a pair and never the other, the own variant's first piece takes over
the other's unigram mass, and, where suggestions are not respelled, the other variant's first piece goes
down by `penalty` nats (only where that piece is the whole word: "▁travel" of "travelled" is also "travel").
With respelling on, pushing the other variant down only hides it from the word search before it can be
shown in the user's spelling ("the colo" offered "colon" instead of "colour"). A user
whose typed pairs are all of one region gets that region's variant for every pair ("British-ness
generalizes"). Only first pieces are touched: a continuation piece ("ise", "er") is shared by
unrelated words, and so is a short first piece ("▁the" of "theatre", "▁mu" of "mum").
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from keyboard.tokenizer import Tokenizer
    from personalization.config import PersonalConfig
    from personalization.data import UserData

MIN_PIECE_CHARS = 4  # a first piece shorter than this starts too many unrelated words
MIN_PIECE_SHARE = 0.6  # ... and so does one covering less than this share of its word


def first_piece(tok: Tokenizer, word: str) -> int | None:
    """The word's first piece, if it is specific to the word: the whole word, or a long share of it."""
    ids = tok.encode(word)
    if not ids:
        return None
    if len(ids) == 1:
        return ids[0]
    n = len(tok.sp.id_to_piece(ids[0]).lstrip("\u2581"))
    return ids[0] if n >= MIN_PIECE_CHARS and n >= MIN_PIECE_SHARE * len(word) else None


def preferences(counts: Counter, pairs: dict[str, str], min_words: int,
                locale: str | None = None) -> list[tuple[str, str]]:
    """(own, other) variants the user prefers: each pair typed one way only (of the region the user typed
    more such words of), and with `min_words` or more such words all of one region, every pair that way.
    With a `locale` ("US"/"GB", the keyboard's language setting) that the user's own words do not contradict,
    every pair that locale's way."""
    typed, regions = [], Counter()
    for us, gb in pairs.items():
        cu, cg = counts.get(us, 0), counts.get(gb, 0)
        if cu and not cg:
            typed.append((us, gb)); regions["US"] += cu
        elif cg and not cu:
            typed.append((gb, us)); regions["GB"] += cg
    if len(regions) == 2 and regions["US"] != regions["GB"]:
        # a stray variant ("grey" once among many "favorite"s) is not a preference: the majority region wins
        major = regions.most_common(1)[0][0]
        typed = [(own, other) for own, other in typed if (own in pairs) == (major == "US")]
    way = None
    if min_words and len(regions) == 1 and sum(regions.values()) >= min_words:
        way = next(iter(regions))
    elif locale in ("US", "GB") and (not regions or regions.most_common(1)[0][0] == locale):
        way = locale  # the user's own text says too little: the keyboard's language setting decides
    if way:
        gb_way = way == "GB"
        done = {frozenset(p) for p in typed}
        typed += [((gb, us) if gb_way else (us, gb)) for us, gb in pairs.items()
                  if frozenset((us, gb)) not in done and counts.get(gb if gb_way else us, 0) == 0
                  and counts.get(us if gb_way else gb, 0) == 0]
    return typed


def spelling_bias(prefs: list[tuple[str, str]], tok: Tokenizer, out_bias: np.ndarray, penalty: float,
                  max_lift: float, cache: dict[str, tuple] | None = None,
                  push_down: bool = True) -> dict[int, float]:
    """Bias entries {piece: nats} of the preferences (none if `penalty` <= 0): the own variant's first piece up
    by log(1 + p(other) / p(own)) under the base's unigram bias (at most `max_lift`), and with `push_down` the
    other variant's first piece down by `penalty`."""
    if penalty <= 0 or not prefs:
        return {}
    down: set[int] = set()
    up: dict[int, float] = {}
    cache = {} if cache is None else cache  # first pieces, shared across users (a generalized user asks ~3k)
    for own, other in prefs:
        for w in (own, other):
            if w not in cache:
                cache[w] = (first_piece(tok, w), len(tok.encode(w)))
        (po, _), (pt, n_other) = cache[own], cache[other]
        if pt is None or po == pt:
            continue
        if push_down and n_other == 1:
            # only a piece that is the whole other word goes down: "▁travel" of "travelled" is also "travel"
            down.add(pt)
        if po is not None:
            lift = min(max_lift, math.log1p(math.exp(float(out_bias[pt]) - float(out_bias[po]))))
            up[po] = max(up.get(po, 0.0), lift)
    # a piece the user's own spellings start with is never pushed down by another pair
    out = {p: -penalty for p in down if p not in up}
    out.update(up)
    return out


def attach_spelling(users: list[UserData], tok: Tokenizer, out_bias: np.ndarray, pairs: dict[str, str],
                    cfg: PersonalConfig) -> None:
    """Set each UserData's `spelling` bias entries from the words of their train messages."""
    cache: dict[str, tuple] = {}
    for u in users:
        locale = u.region if cfg.regional_locale else None
        prefs = preferences(u.words, pairs, cfg.regional_min_words, locale)
        u.respell = {other: own for own, other in prefs} if cfg.regional_respell else {}
        # respelled suggestions show the other variant's mass as the own word: it must not be pushed out of them
        u.spelling = spelling_bias(prefs, tok, out_bias, cfg.regional_penalty, cfg.regional_max_lift, cache,
                                   push_down=not cfg.regional_respell)
