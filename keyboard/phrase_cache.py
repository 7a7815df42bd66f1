"""A user's phrase cache: n-gram statistics of their own train text, mixed into the model's next-piece distribution.

The classic cache LM (Kuhn & De Mori 1990), which keyboards ship as the personal dictionary: what a user typed
after the same few pieces before is likely again ("how are you doing today?"). With contexts c_1 (the last
piece) .. c_n (the last n pieces), each seen in the user's train text with `tot` continuations, the
distribution is interpolated from the shortest context to the longest:

    p_0 = p_model,   p_k = (1 - l_k) p_{k-1} + l_k q(. | c_k),   l_k = lam * tot / (tot + m0)

so an often-seen context moves the prediction more than a once-seen one, and an unseen context leaves the
model alone. There is no unigram term: a user's frequent words alone did not help (the model knows them).
NumPy only: the on-device runtime applies it (`PhraseCacheBackend`) and adds each message the user sends
(`learn`), as a keyboard's personal dictionary does.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedkey.errors import FedkeyError
from keyboard.adapter_file import read_headed_npz, write_headed_npz
from keyboard.sentinel import Sentinel, features
from keyboard.tokenizer import BOS

if TYPE_CHECKING:
    from keyboard.search import StepBackend


@dataclass
class PhraseCache:
    """One user's n-gram continuation counts, by context of 1..order-1 previous pieces."""

    order: int  # longest n-gram: contexts of up to order-1 pieces
    lam: float
    m0: float
    table: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # ctx -> (ids, counts)

    @classmethod
    def build(cls, seqs: list[list[int]], order: int, lam: float, m0: float, max_pieces: int = 0) -> "PhraseCache":
        """Counts of the (context, next piece) pairs of the latest messages holding at most max_pieces pieces (0: all)."""
        seqs = [s for s in latest(seqs, max_pieces) if len(s) > 1]
        n = order - 1
        if not seqs or n < 1:
            return cls(order, lam, m0, {})
        # every message at once, in NumPy: personalization builds ~2 caches a user (Counters took 24 ms each)
        lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
        flat = np.fromiter(chain.from_iterable(seqs), np.int64, int(lens.sum()))
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)  # each piece's place in its message
        ctx, nxt, occ = [], [], []
        for k in range(1, n + 1):
            at = np.flatnonzero(pos >= k)  # pieces with k earlier pieces of their own message
            # the context's k pieces, padded with -1 on the left to n columns
            ctx.append(np.stack([flat[at - n + j] if j >= n - k else np.full(len(at), -1) for j in range(n)], axis=1))
            nxt.append(flat[at])
            occ.append(at * n + k - 1)  # when a piece-by-piece count would have met this pair
        nxt_all = np.concatenate(nxt)
        return cls(order, lam, m0, _table_of(np.concatenate(ctx), nxt_all, np.ones(len(nxt_all)), np.concatenate(occ)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an adapter file: contexts padded with -1 on the left, next piece, count."""
        n = self.order - 1
        rows = [((-1,) * (n - len(ctx)) + ctx, i, c) for ctx, (ids, cnt) in self.table.items() for i, c in zip(ids, cnt)]
        ctx = np.array([r[0] for r in rows], dtype=np.int32).reshape(-1, n)
        return {"cache_ctx": ctx, "cache_next": np.array([r[1] for r in rows], dtype=np.int32),
                "cache_count": np.array([r[2] for r in rows], dtype=np.int32),
                "cache_params": np.array([self.order, self.lam, self.m0], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray]) -> "PhraseCache":
        """The cache of `to_arrays`' arrays."""
        order, lam, m0 = z["cache_params"].tolist()
        nxt = z["cache_next"].astype(np.int64)
        table = _table_of(z["cache_ctx"].astype(np.int64).reshape(len(nxt), -1), nxt,
                          z["cache_count"].astype(np.float64), np.arange(len(nxt)))
        return cls(int(order), float(lam), float(m0), table)

    def learn(self, seq: list[int]) -> None:
        """Add one framed message's (context, next piece) pairs: what the user just sent counts from now on."""
        n = self.order - 1
        grown: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for t in range(1, len(seq)):
            for k in range(1, min(n, t) + 1):
                grown[tuple(seq[t - k:t])][seq[t]] += 1
        for ctx, add in grown.items():
            ids, cnt = self.table.get(ctx, (np.zeros(0, np.int64), np.zeros(0)))
            old = dict(zip(ids.tolist(), cnt.tolist()))
            for i, c in add.items():
                old[i] = old.get(i, 0) + c
            self.table[ctx] = (np.array(list(old), dtype=np.int64), np.array(list(old.values()), dtype=np.float64))

    def __len__(self) -> int:
        return sum(len(ids) for ids, _ in self.table.values())

    def hit(self, ctx: tuple[int, ...], before: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(continuations, counts) of one context, None if never seen (`before`: see ReplayCache)."""
        return self.table.get(ctx)

    def longest(self, history: list[int], before: int | None = None) -> tuple[int, float, float]:
        """(length, continuations, top continuation's share) of the longest context of `history` seen (0s: none)."""
        out = (0, 0.0, 0.0)
        for k in range(1, min(self.order - 1, len(history)) + 1):
            hit = self.hit(tuple(history[-k:]), before)
            if hit is None:
                break
            tot = float(hit[1].sum())
            out = (k, tot, float(hit[1].max()) / tot)
        return out

    def _orders(self, history: list[int], before: int | None) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
        """Per context length seen after `history`, shortest first: its weight lam_k, and each piece seen after it
        with lam_k times its share of the context's count."""
        for k in range(1, self.order):
            if len(history) < k:
                break
            hit = self.hit(tuple(history[-k:]), before)
            if hit is None:
                break  # a longer context containing an unseen one is unseen too
            ids, cnt = hit
            tot = cnt.sum()
            lk = self.lam * tot / (tot + self.m0)
            yield lk, ids, lk * cnt / tot

    def mix_logrow(self, logp: np.ndarray, history: list[int], before: int | None = None) -> np.ndarray:
        """mix_row of one row of log-probabilities, as float64 log-probabilities.

        Each order scales the whole distribution by (1 - lam_k) and adds mass to a few pieces, so every piece the
        cache never saw after this history moves by one shift: only the seen ones need exp and log, which were
        most of the cost of mixing 8k-piece rows one by one.
        """
        scale, extra = 1.0, {}
        for lk, ids, mass in self._orders(history, before):
            scale *= 1 - lk
            for j in extra:
                extra[j] *= 1 - lk
            for j, c in zip(ids.tolist(), mass.tolist()):
                extra[j] = extra.get(j, 0.0) + c
        row = logp.astype(np.float64) + np.log(scale)
        if extra:
            ids = np.fromiter(extra, dtype=np.int64, count=len(extra))
            add = np.fromiter(extra.values(), dtype=np.float64, count=len(extra))
            row[ids] = np.log(np.exp(logp[ids].astype(np.float64)) * scale + add + 1e-30)
        return row

    def mix_row(self, p: np.ndarray, history: list[int], before: int | None = None) -> np.ndarray:
        """One distribution p (vocab,) after `history` (pieces, oldest first) mixed with the cache, in place."""
        for lk, ids, mass in self._orders(history, before):
            p *= 1 - lk
            p[ids] += mass
        return p


@dataclass
class ReplayCache(PhraseCache):
    """A cache replaying a user's later messages in the order they were sent, as `learn` would take them on
    the device: asked `before` message j, it holds its own counts plus those of messages 0..j-1.

    Lets one batched evaluation answer every message with the cache that user had at that moment.
    """

    sent: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # ctx -> (ids, message)
    # (context, message) -> merged counts: a beam search asks the same few contexts again and again
    _merged: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def replay(cls, cache: PhraseCache, seqs: list[list[int]]) -> "ReplayCache":
        """`cache` followed by the framed messages `seqs`, oldest first (message j learned after answering j)."""
        grown: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for j, s in enumerate(seqs):
            for t in range(1, len(s)):
                for k in range(1, min(cache.order - 1, t) + 1):
                    grown[tuple(s[t - k:t])].append((s[t], j))
        sent = {ctx: (np.array([i for i, _ in v], dtype=np.int64), np.array([j for _, j in v], dtype=np.int64))
                for ctx, v in grown.items()}
        return cls(cache.order, cache.lam, cache.m0, cache.table, sent)

    def hit(self, ctx: tuple[int, ...], before: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The context's counts with those of the messages sent before message `before` (None: none of them)."""
        own, sent = self.table.get(ctx), self.sent.get(ctx)
        if before is None or sent is None:
            return own
        n = int(np.searchsorted(sent[1], before))  # messages are replayed in order: the learned ones come first
        if not n:
            return own
        key = (ctx, n)
        if key not in self._merged:
            ids, w = sent[0][:n], np.ones(n)
            if own is not None:
                ids, w = np.concatenate([own[0], ids]), np.concatenate([own[1], w])
            uniq, inv = np.unique(ids, return_inverse=True)
            self._merged[key] = (uniq, np.bincount(inv, weights=w))
        return self._merged[key]


def _table_of(ctx: np.ndarray, nxt: np.ndarray, weight: np.ndarray,
              occ: np.ndarray) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
    """context -> (piece ids, summed weights) of rows (context padded with -1 on the left, next piece, weight),
    contexts and their pieces in the order of their first occurrence `occ`: the order counting them one by one
    gives, which keeps cache files as small (and bitwise the same) as before."""
    if not len(nxt):
        return {}
    o = np.lexsort([occ, nxt] + [ctx[:, j] for j in range(ctx.shape[1] - 1, -1, -1)])
    ctx, nxt, weight, occ = ctx[o], nxt[o], weight[o], occ[o]
    new_ctx = np.r_[True, (ctx[1:] != ctx[:-1]).any(axis=1)]
    pair = np.flatnonzero(new_ctx | np.r_[True, nxt[1:] != nxt[:-1]])  # first row of each (context, piece)
    count = np.add.reduceat(weight, pair)
    ctx_of = np.cumsum(new_ctx[pair]) - 1  # each pair's context, numbered in sorted order
    first_ctx = np.minimum.reduceat(occ[pair], np.flatnonzero(new_ctx[pair]))
    o = np.lexsort([occ[pair], first_ctx[ctx_of]])
    pair, count, ctx_of = pair[o], count[o], ctx_of[o]
    ids = nxt[pair]
    starts = np.flatnonzero(np.r_[True, ctx_of[1:] != ctx_of[:-1]])
    ends = np.r_[starts[1:], len(pair)].tolist()
    heads = ctx[pair[starts]]
    keys, pads = heads.tolist(), (heads < 0).sum(axis=1).tolist()
    return {tuple(key[p:]): (ids[a:b], count[a:b]) for key, p, a, b in zip(keys, pads, starts.tolist(), ends)}


def latest(seqs: list[list[int]], max_pieces: int) -> list[list[int]]:
    """The newest messages (the list is oldest first) that together hold at most max_pieces pieces (0: all)."""
    if max_pieces <= 0:
        return seqs
    total, start = 0, len(seqs)
    while start > 0 and total + len(seqs[start - 1]) <= max_pieces:
        start -= 1
        total += len(seqs[start])
    return seqs[start:]


def mix_logp(logp: np.ndarray, caches: list[PhraseCache | None], histories: np.ndarray,
             before: np.ndarray | None = None, sentinel: Sentinel | None = None,
             feats: np.ndarray | None = None) -> np.ndarray:
    """Rows of log-probabilities (N, vocab) mixed with each row's cache (None: unchanged) after its history
    (N, H) of piece ids, oldest first, -1 padded on the left; `before` (N,): each row's message number,
    for ReplayCaches. With a `sentinel` and the rows' LSTM outputs `feats` (N, d), a row whose top piece the
    cache changes keeps the model's distribution unless the sentinel lets the change through."""
    if sentinel is not None and feats is None:
        raise ValueError("mix_logp: the sentinel reads each row's LSTM output; pass feats")
    out = logp
    for i, cache in enumerate(caches):
        if cache is None:
            continue
        hist = [int(x) for x in histories[i] if x >= 0]
        b = None if before is None else int(before[i])
        if not hist or cache.hit(tuple(hist[-1:]), b) is None:
            continue  # most rows: nothing typed after this piece before
        if out is logp:
            out = logp.copy()
        row = cache.mix_logrow(logp[i], hist, b)
        if sentinel is not None and row.argmax() != logp[i].argmax() and not sentinel.passes(
                features(feats[i], logp[i], row, cache.longest(hist, b), sentinel.starts)):
            continue
        out[i] = row
    return out


class PhraseCacheBackend:
    """A StepBackend whose next-piece distributions are mixed with a user's phrase cache.

    Each row's last order-1 pieces ride in extra columns of h (-1: none yet), as the search only reorders
    rows; the wrapped backend sees its own h. With a `sentinel`, the cache changes a row's top piece only
    where the sentinel lets it. Mixing happens after the wrapped step, so a StepCache below
    stays valid when the cache learns.
    """

    def __init__(self, inner: StepBackend, cache: PhraseCache, sentinel: Sentinel | None = None) -> None:
        self.inner, self.cache, self.sentinel, self.n = inner, cache, sentinel, cache.order - 1

    def _mixed(self, out: tuple[np.ndarray, np.ndarray, np.ndarray], hist: np.ndarray):
        logp, h, c = out  # h: the wrapped backend's LSTM output, which the sentinel reads
        mixed = mix_logp(logp, [self.cache] * len(logp), hist, sentinel=self.sentinel, feats=h)
        return mixed, np.concatenate([h, hist.astype(h.dtype)], axis=1), c

    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step of the wrapped backend, its distribution mixed with the cache after the rows' histories."""
        d = h.shape[1] - self.n
        hist = np.concatenate([h[:, d:], np.asarray(ids, dtype=h.dtype).reshape(-1, 1)], axis=1)[:, 1:]
        return self._mixed(self.inner.step(ids, np.ascontiguousarray(h[:, :d]), c), hist.astype(np.int64))

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """State after the begin-of-message piece, which starts every row's history."""
        hist = np.full((n, self.n), -1, dtype=np.int64)
        hist[:, -1] = BOS
        return self._mixed(self.inner.initial(n), hist)


def histories(seqs: list[list[int]], rows: list[tuple[int, int]], n: int) -> np.ndarray:
    """The last n input pieces (through input t, oldest first, -1 padded) of each (message b, input t) row."""
    out = np.full((len(rows), n), -1, dtype=np.int64)
    if n:
        for r, (b, t) in enumerate(rows):
            ctx = seqs[b][max(0, t + 1 - n):t + 1]
            out[r, n - len(ctx):] = ctx
    return out


def save_cache(path: str | Path, cache: PhraseCache, base_id: str, user: str) -> int:
    """Write a user's phrase cache (one small .npz naming the base model); returns its size in bytes."""
    return write_headed_npz(path, {"base_id": base_id, "user": user}, cache.to_arrays())


def load_cache(path: str | Path, expect_base_id: str | None = None, data: bytes | None = None) -> PhraseCache:
    """Read a phrase cache (from `data` if given, `path` naming it); refuse a corrupt file or one made with
    another base model's pieces."""
    _, arrays = read_headed_npz(path, "phrase cache", expect_base_id, data)
    try:
        return PhraseCache.from_arrays(arrays)
    except Exception as e:
        raise FedkeyError(f"{path}: not a fedkey phrase cache ({type(e).__name__}); re-run `fedkey personalize`") from None
