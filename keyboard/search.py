"""Prefix-constrained beam search over word pieces that stops at word boundaries (NumPy only).

A keyboard shows whole words, so candidates are piece sequences that start a word (or extend
the partial word typed so far) and are scored as complete words: P(pieces) * P(a boundary next).
Many queries are searched at once: every beam of every query is one row of one batched step.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from keyboard.words import WORD_RE, PieceTable


class StepBackend(Protocol):
    """One LSTM step for a batch: piece ids and (h, c) rows in, log-probabilities and new rows out."""

    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _top_per_row(scores: np.ndarray, n: int) -> np.ndarray:
    n = min(n, scores.shape[1])
    return np.argpartition(-scores, n - 1, axis=1)[:, :n]


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
) -> list[list[tuple[str, float]]]:
    """Top-k whole words (word, log-probability) for each query, given the state after its context."""
    nq = len(partials)
    completes: list[dict[str, float]] = [{} for _ in range(nq)]
    thresh = np.full(nq, -np.inf)

    # first pieces come straight from the context's distribution: no extra step
    bq, bpiece, bscore, bsurf = [], [], [], []
    plain = [q for q in range(nq) if not partials[q]]
    for flag, ids in ((True, table.start_space), (False, table.start_nospace)):
        group = np.array([q for q in plain if spaces[q] == flag], dtype=np.int64)
        if len(group) and len(ids):
            sub = logp0.take(group, axis=0).take(ids, axis=1)
            top = _top_per_row(sub, beam)
            bq.extend(np.repeat(group, top.shape[1]).tolist())
            chosen = ids[top].ravel()
            bpiece.extend(chosen.tolist())
            bscore.extend(np.take_along_axis(sub, top, axis=1).ravel().tolist())
            bsurf.extend(table.surface[p] for p in chosen)
    for q in range(nq):
        if partials[q]:
            cand = table.compatible("start_space" if spaces[q] else "start_nospace", partials[q])
            if len(cand) == 0:
                continue
            sc = logp0[q, cand]
            order = np.argsort(-sc)[:beam]
            for o in order:
                bq.append(q); bpiece.append(int(cand[o])); bscore.append(float(sc[o])); bsurf.append(table.surface[cand[o]])
    q_arr = np.array(bq, dtype=np.int64)
    H, C = h0[q_arr], c0[q_arr]
    piece = np.array(bpiece, dtype=np.int64)
    score = np.array(bscore, dtype=np.float64)
    surf = bsurf

    for depth in range(max_pieces):
        keep = np.flatnonzero(score >= thresh[q_arr]) if len(q_arr) else np.array([], dtype=np.int64)
        if len(keep) == 0:
            break
        q_arr, piece, score, H, C = q_arr[keep], piece[keep], score[keep], H[keep], C[keep]
        surf = [surf[i] for i in keep]
        logp, H, C = backend.step(piece, H, C)
        # P(word ends here) = 1 - P(a piece that continues it): the continuing set is the small one
        cont_lp = logp.take(table.cont, axis=1)
        p_more = np.exp(logp.take(table.nonboundary, axis=1)).sum(axis=1)
        bnd = np.log(np.clip(1.0 - p_more, 1e-12, None))
        touched = set()
        for b in range(len(q_arr)):
            q, word = int(q_arr[b]), surf[b]
            part = partials[q]
            if len(word) >= len(part) and word.startswith(part) and WORD_RE.fullmatch(word):
                total = score[b] + float(bnd[b])
                old = completes[q].get(word)
                completes[q][word] = total if old is None else float(np.logaddexp(old, total))
                touched.add(q)
        for q in touched:
            vals = sorted(completes[q].values(), reverse=True)
            if len(vals) >= k:
                thresh[q] = vals[k - 1]
        if depth == max_pieces - 1:
            break
        # children: pieces that continue the word (and still fit what was typed)
        free = np.array([len(surf[b]) >= len(partials[int(q_arr[b])]) for b in range(len(q_arr))], dtype=bool)
        par_l, piece_l, sc_l = [], [], []
        fi = np.flatnonzero(free)
        if len(fi):
            sub = cont_lp[fi]
            top = _top_per_row(sub, beam)
            par_l.append(np.repeat(fi, top.shape[1]))
            piece_l.append(table.cont[top].ravel())
            sc_l.append((score[fi, None] + np.take_along_axis(sub, top, axis=1)).ravel())
        for b in np.flatnonzero(~free):
            word = surf[b]
            allowed = table.compatible("cont", partials[int(q_arr[b])][len(word):])
            if len(allowed) == 0:
                continue
            lp = logp[b, allowed]
            o = np.argsort(-lp)[:beam]
            par_l.append(np.full(len(o), b)); piece_l.append(allowed[o]); sc_l.append(score[b] + lp[o])
        if not par_l:
            break
        parent = np.concatenate(par_l).astype(np.int64)
        child_piece = np.concatenate(piece_l).astype(np.int64)
        child_score = np.concatenate(sc_l).astype(np.float64)
        child_q = q_arr[parent]
        ok = np.isfinite(child_score) & (child_score >= thresh[child_q])
        parent, child_score, child_piece, child_q = parent[ok], child_score[ok], child_piece[ok], child_q[ok]
        # keep the best `beam` children per query
        order = np.lexsort((-child_score, child_q))
        parent, child_score, child_piece, child_q = parent[order], child_score[order], child_piece[order], child_q[order]
        first = np.r_[0, np.flatnonzero(np.diff(child_q)) + 1] if len(child_q) else np.array([], dtype=np.int64)
        rank = np.arange(len(child_q)) - np.repeat(first, np.diff(np.r_[first, len(child_q)]))
        sel = np.flatnonzero(rank < beam)
        parent = parent[sel]
        q_arr, piece, score = child_q[sel], child_piece[sel], child_score[sel]
        H, C = H[parent], C[parent]
        surf = [surf[p] + table.surface[c] for p, c in zip(parent, piece)]

    return [sorted(d.items(), key=lambda kv: -kv[1])[:k] for d in completes]
