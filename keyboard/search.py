"""Prefix-constrained beam search over word pieces that stops at word boundaries (NumPy only).

A keyboard shows whole words, so candidates are piece sequences that start a word (or extend
the partial word typed so far) and are scored as complete words: P(pieces) * P(a boundary next).
Many queries are searched at once: every beam of every query is one row of one batched step.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from keyboard.words import WORD_RE, Lexicon, PieceTable


class StepBackend(Protocol):
    """One LSTM step for a batch: piece ids and (h, c) rows in, log-probabilities and new rows out."""

    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities (B, V) of the next piece after `ids`, and the new (h, c) rows."""
        ...

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The state after BOS for `n` rows: (log-probabilities, h, c)."""
        ...


LEX_MARGIN = 8.0  # nats: a word e^8 (~3000) times less likely than the best one is not suggested with a lexicon


def _top_per_row(scores: np.ndarray, n: int) -> np.ndarray:
    n = min(n, scores.shape[1])
    return np.argpartition(-scores, n - 1, axis=1)[:, :n]


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest of a 1-D array, in no particular order (all of them when it is that short)."""
    if len(scores) <= n:
        return np.arange(len(scores))
    return np.argpartition(-scores, n - 1)[:n]


def search_words(
    backend: StepBackend,
    table: PieceTable,
    logp0: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    partials: list[str],
    spaces: list[bool],
    k: int = 3,
    beam: int = 6,
    max_pieces: int = 6,
    completed: list[dict[str, float]] | None = None,
    wave: int = 3,
    lexicon: Lexicon | None = None,
) -> list[list[tuple[str, float]]]:
    """Top-k whole words (word, log-probability) for each query, given the state after its context.

    Best-first in waves: each step expands only the `wave` most likely open prefixes of each query;
    a prefix scoring below the k-th complete word found so far can never win (probabilities only
    shrink as pieces are added) and is dropped. `beam` caps the open prefixes kept per query.

    `completed`, if given, receives per query every word the search completed (word -> log-probability),
    not only the top k: a caller can reuse them while the same word is being typed.

    `lexicon`, if given, limits suggestions to its words, and prefixes to those some word starts with; a
    query whose typed part starts no word in it (a word the list lacks) is searched without it.
    """
    nq = len(partials)
    if nq == 1 or lexicon is not None:  # a keyboard asks one query per keystroke: no per-query bookkeeping
        out = []
        for q in range(nq):
            lex = lexicon if lexicon is not None and lexicon.has_prefix(partials[q]) else None
            found, done = _search_one(backend, table, logp0[q], h0[q], c0[q], partials[q], spaces[q], k, beam,
                                      max_pieces, wave, lex)
            if completed is not None:
                completed.append(done)
            out.append(found)
        return out
    completes: list[dict[str, float]] = [{} for _ in range(nq)]
    thresh = np.full(nq, -np.inf)

    # first pieces come straight from the context's distribution: no extra step
    bq: list[np.ndarray] = []
    bpiece: list[np.ndarray] = []
    bscore: list[np.ndarray] = []
    plain = [q for q in range(nq) if not partials[q]]
    for flag, ids in ((True, table.start_space), (False, table.start_nospace)):
        group = np.array([q for q in plain if spaces[q] == flag], dtype=np.int64)
        if len(group) and len(ids):
            sub = logp0.take(group, axis=0).take(ids, axis=1)
            top = _top_per_row(sub, beam)
            bq.append(np.repeat(group, top.shape[1]))
            bpiece.append(ids[top].ravel())
            bscore.append(np.take_along_axis(sub, top, axis=1).ravel())
    for q in range(nq):
        if partials[q]:
            cand = table.compatible("start_space" if spaces[q] else "start_nospace", partials[q])
            if len(cand) == 0:
                continue
            sc = logp0[q, cand]
            order = np.argsort(-sc)[:beam]
            bq.append(np.full(len(order), q)); bpiece.append(cand[order]); bscore.append(sc[order])
    if not bq:
        if completed is not None:
            completed.extend(completes)
        return [[] for _ in range(nq)]
    q_arr = np.concatenate(bq).astype(np.int64)
    piece = np.concatenate(bpiece).astype(np.int64)
    score = np.concatenate(bscore).astype(np.float64)
    H, C = h0[q_arr], c0[q_arr]
    depth = np.zeros(len(q_arr), dtype=np.int64)
    surf = [table.surface[p] for p in piece]

    for _ in range(beam * max_pieces):  # a bound; the frontier empties long before
        if len(q_arr) == 0:
            break
        # drop what can no longer win, rank the rest per query, expand the best `wave`
        order = np.lexsort((-score, q_arr))
        order = order[score[order] >= thresh[q_arr[order]]]
        if len(order) == 0:
            break
        qs = q_arr[order]
        if qs[0] == qs[-1]:  # one query (every keystroke on a device): the rank is the position
            rank = np.arange(len(qs))
        else:
            first = np.r_[0, np.flatnonzero(np.diff(qs)) + 1]
            rank = np.arange(len(qs)) - np.repeat(first, np.diff(np.r_[first, len(qs)]))
        order = order[rank < beam]
        rank = rank[rank < beam]
        go, wait = order[rank < wave], order[rank >= wave]

        if len(wait) and hasattr(backend, "step_ahead"):  # a caching backend may run them in the same call
            backend.step_ahead(piece[wait], H[wait], C[wait])
        logp, Hn, Cn = backend.step(piece[go], H[go], C[go])
        gq, gscore, gdepth = q_arr[go], score[go], depth[go]
        gsurf = [surf[i] for i in go]
        # P(word ends here) = 1 - P(a piece that continues it): the continuing set is the small one
        cont_lp = logp.take(table.cont, axis=1)
        p_more = np.exp(logp.take(table.nonboundary, axis=1)).sum(axis=1)
        bnd = np.log(np.clip(1.0 - p_more, 1e-12, None))
        touched = set()
        for b in range(len(go)):
            q, word = int(gq[b]), gsurf[b]
            part = partials[q]
            if len(word) >= len(part) and word.startswith(part) and WORD_RE.fullmatch(word):
                total = gscore[b] + float(bnd[b])
                old = completes[q].get(word)
                completes[q][word] = total if old is None else float(np.logaddexp(old, total))
                touched.add(q)
        for q in touched:
            vals = sorted(completes[q].values(), reverse=True)
            if len(vals) >= k:
                thresh[q] = vals[k - 1]

        # children: pieces that continue the word (and still fit what was typed)
        grow = gdepth + 1 < max_pieces
        free = np.array([grow[b] and len(gsurf[b]) >= len(partials[int(gq[b])]) for b in range(len(go))], dtype=bool)
        par_l, piece_l, sc_l = [], [], []
        fi = np.flatnonzero(free)
        if len(fi):
            sub = cont_lp[fi]
            top = _top_per_row(sub, beam)
            par_l.append(np.repeat(fi, top.shape[1]))
            piece_l.append(table.cont[top].ravel())
            sc_l.append((gscore[fi, None] + np.take_along_axis(sub, top, axis=1)).ravel())
        for b in np.flatnonzero(grow & ~free):
            word = gsurf[b]
            allowed = table.compatible("cont", partials[int(gq[b])][len(word):])
            if len(allowed) == 0:
                continue
            lp = logp[b, allowed]
            o = np.argsort(-lp)[:beam]
            par_l.append(np.full(len(o), b)); piece_l.append(allowed[o]); sc_l.append(gscore[b] + lp[o])
        if par_l:
            parent = np.concatenate(par_l).astype(np.int64)
            cpiece = np.concatenate(piece_l).astype(np.int64)
            cscore = np.concatenate(sc_l).astype(np.float64)
            ok = np.isfinite(cscore) & (cscore >= thresh[gq[parent]])
            parent, cpiece, cscore = parent[ok], cpiece[ok], cscore[ok]
        else:
            parent = cpiece = np.array([], dtype=np.int64)
            cscore = np.array([], dtype=np.float64)
        # the new frontier: prefixes still waiting plus the children just made
        q_arr = np.concatenate([q_arr[wait], gq[parent]])
        piece = np.concatenate([piece[wait], cpiece])
        score = np.concatenate([score[wait], cscore])
        H = np.concatenate([H[wait], Hn[parent]])
        C = np.concatenate([C[wait], Cn[parent]])
        depth = np.concatenate([depth[wait], gdepth[parent] + 1])
        surf = [surf[i] for i in wait] + [gsurf[p] + table.surface[c] for p, c in zip(parent, cpiece)]

    if completed is not None:
        completed.extend(completes)
    return [sorted(d.items(), key=lambda kv: -kv[1])[:k] for d in completes]


def _search_one(backend: StepBackend, table: PieceTable, logp0: np.ndarray, h0: np.ndarray, c0: np.ndarray,
                part: str, space: bool, k: int, beam: int, max_pieces: int, wave: int, lex: Lexicon | None = None
                ) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """search_words for one query: the same expansions in the same order, with the frontier in Python lists.

    Per keystroke the frontier holds a handful of prefixes, where NumPy's per-call cost exceeded the work;
    only the per-row vocabulary operations (boundary mass, best continuations) stay vectorized.
    With `lex`, every candidate list holds only pieces that still spell the start of a lexicon word.
    """
    done: dict[str, float] = {}
    thresh = -np.inf
    kind = "start_space" if space else "start_nospace"
    if part:
        cand = table.compatible(kind, part) if lex is None else lex.pieces_fitting(table, kind, "", part)
        sc = logp0[cand]
        top = np.argsort(-sc)[:beam]
    else:
        cand = (table.start_space if space else table.start_nospace) if lex is None else lex.pieces_after(table, kind, "")
        if len(cand) == 0:
            return [], done
        sc = logp0[cand]
        top = _top(sc, beam)
    if len(cand) == 0:
        return [], done
    surface = table.surface
    piece = cand[top].tolist()
    score = sc[top].astype(np.float64).tolist()
    n = len(piece)
    H, C = np.repeat(h0[None], n, 0), np.repeat(c0[None], n, 0)
    depth = [0] * n
    surf = [surface[p] for p in piece]
    lp_part = len(part)
    ahead = hasattr(backend, "step_ahead")
    # once every lexicon word that fits what was typed is found, other spellings of them only add a little mass;
    # and when few words fit, a prefix LEX_MARGIN nats below the best word is not worth a suggestion slot
    reachable = lex.count_prefix(part) if lex is not None else -1

    def children_of(b: int, allowed: np.ndarray, ranked: bool) -> None:
        # the best `beam` of these pieces after go-row b join this step's children (best first if ranked)
        lp = logp[b, allowed]
        o = np.argsort(-lp)[:beam] if ranked else _top(lp, beam)
        parent.extend([b] * len(o)); cpiece.extend(allowed[o].tolist())
        cscore.extend((gscore[b] + lp[o].astype(np.float64)).tolist())

    for _ in range(beam * max_pieces):  # a bound; the frontier empties long before
        if not piece:
            break
        # sorted(reverse=True) keeps equal scores in their original order, as the stable lexsort on -score does
        order = [i for i in sorted(range(len(score)), key=score.__getitem__, reverse=True) if score[i] >= thresh]
        if not order:
            break
        order = order[:beam]
        go, wait = order[:wave], order[wave:]
        if wait and ahead:  # a caching backend may run them in the same call
            backend.step_ahead(np.array([piece[i] for i in wait], dtype=np.int64), H[wait], C[wait])
        logp, Hn, Cn = backend.step(np.array([piece[i] for i in go], dtype=np.int64), H[go], C[go])
        gscore = [score[i] for i in go]
        gdepth = [depth[i] for i in go]
        gsurf = [surf[i] for i in go]
        # only rows that spell a whole word need the boundary mass (often none do: a word's first piece is short)
        whole = [b for b, word in enumerate(gsurf)
                 if len(word) >= lp_part and word.startswith(part) and WORD_RE.fullmatch(word) and (lex is None or word in lex)]
        if whole:
            p_more = np.exp(logp[whole].take(table.nonboundary, axis=1)).sum(axis=1)
            bnd = np.log(np.maximum(1.0 - p_more, 1e-12)).tolist()  # np.clip's overhead is a third of this line
        for r, b in enumerate(whole):
            word, total = gsurf[b], gscore[b] + bnd[r]
            old = done.get(word)
            done[word] = total if old is None else float(np.logaddexp(old, total))
        if whole and len(done) >= k:
            thresh = sorted(done.values(), reverse=True)[k - 1]
        if lex is not None and done:
            if len(done) == reachable:
                break
            thresh = max(thresh, max(done.values()) - LEX_MARGIN)

        # children: pieces that continue the word (and still fit what was typed)
        parent: list[int] = []
        cpiece: list[int] = []
        cscore: list[float] = []
        free = [b for b in range(len(go)) if gdepth[b] + 1 < max_pieces and len(gsurf[b]) >= lp_part]
        if free and lex is not None:  # each prefix has its own set of pieces that continue a word
            for b in free:
                allowed = lex.pieces_after(table, "cont", gsurf[b])
                if len(allowed):
                    children_of(b, allowed, ranked=False)
        elif free:
            sub = logp[free].take(table.cont, axis=1)
            top = _top_per_row(sub, beam)
            vals = (np.asarray(gscore)[free, None] + sub[np.arange(len(free))[:, None], top]).tolist()
            ids = table.cont[top].tolist()
            for r, b in enumerate(free):
                parent.extend([b] * len(ids[r])); cpiece.extend(ids[r]); cscore.extend(vals[r])
        for b in range(len(go)):
            if gdepth[b] + 1 < max_pieces and len(gsurf[b]) < lp_part:
                rest = part[len(gsurf[b]):]
                allowed = table.compatible("cont", rest) if lex is None else lex.pieces_fitting(table, "cont", gsurf[b], rest)
                if len(allowed):
                    children_of(b, allowed, ranked=True)
        keep = [j for j, s in enumerate(cscore) if s >= thresh and s != -np.inf]
        kept_parent = [parent[j] for j in keep]
        # the new frontier: prefixes still waiting plus the children just made
        H = np.concatenate([H[wait], Hn[kept_parent]])
        C = np.concatenate([C[wait], Cn[kept_parent]])
        piece = [piece[i] for i in wait] + [cpiece[j] for j in keep]
        score = [score[i] for i in wait] + [cscore[j] for j in keep]
        depth = [depth[i] for i in wait] + [gdepth[p] + 1 for p in kept_parent]
        surf = [surf[i] for i in wait] + [gsurf[parent[j]] + surface[cpiece[j]] for j in keep]
    return sorted(done.items(), key=lambda kv: -kv[1])[:k], done
