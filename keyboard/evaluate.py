"""The evaluation harness: next-word top-1/top-3, per-word perplexity, KSR, regional-variant accuracy."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedkey.config import EvalConfig
from keyboard.batches import frame
from keyboard.metrics import UserTally, mean_over, regional_hit, topk_hits, word_keystrokes
from keyboard.ngram import BackoffNgram
from keyboard.search import StepBackend, search_words
from keyboard.tokenizer import PAD, Tokenizer
from keyboard.torch_backend import TorchBackend, lstm_cell
from keyboard.words import WORD_RE, PieceTable, normalize


@dataclass
class Message:
    """One test message and who wrote it."""

    user: str
    region: str
    text: str


@dataclass
class _Query:
    msg: int
    word_idx: int
    typed: int  # characters of the word already typed (0: next-word prediction)


def _states(model: torch.nn.Module, seqs: list[list[int]], wanted: list[list[int]]):
    """Teacher-forced pass: per-message piece NLL, and (logp, h, c) at the wanted input positions."""
    T = max(len(s) for s in seqs) - 1
    B = len(seqs)
    x = torch.full((B, T), PAD, dtype=torch.long)
    y = torch.full((B, T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, : len(s) - 1] = torch.tensor(s[1:])
    with torch.inference_mode():
        backend = TorchBackend(model)
        emb = backend.embed(x)
        h = torch.zeros(B, backend.lstm.proj_size or backend.lstm.hidden_size)
        c = torch.zeros(B, backend.lstm.hidden_size)
        hs, cs = [], []
        for t in range(T):  # step by step: nn.LSTM returns only the last cell state
            h, c = lstm_cell(backend.lstm, emb[:, t], h, c)
            hs.append(h)
            cs.append(c)
        feats = [backend.post(torch.stack(hs, 1))]
        logp = torch.log_softmax(model.logits(torch.cat(feats, 1)), dim=-1)
        nll = -logp.gather(2, y.clamp(min=0)[..., None])[..., 0]
        nll = (nll * (y != PAD)).sum(1).numpy()
        H, C = torch.stack(hs, 1), torch.stack(cs, 1)
        rows = [(b, t) for b, ts in enumerate(wanted) for t in ts]
        bi = torch.tensor([r[0] for r in rows], dtype=torch.long)
        ti = torch.tensor([r[1] for r in rows], dtype=torch.long)
        # time t has consumed BOS + pieces[:t], so its distribution is over piece t: a word's first piece
        return nll, logp[bi, ti].numpy(), H[bi, ti].numpy(), C[bi, ti].numpy(), rows


def _states_stepwise(backend, seqs: list[list[int]], wanted: list[list[int]]):
    """`_states` through a StepBackend, one message at a time as a device runs it."""
    nll = np.zeros(len(seqs))
    out_lp, out_h, out_c, rows = [], [], [], []
    logp, h0, c0 = backend.initial(1)
    for b, s in enumerate(seqs):
        h, c = np.zeros_like(h0), np.zeros_like(c0)  # the framed message starts with BOS itself
        want = set(wanted[b])
        for t in range(len(s) - 1):
            logp, h, c = backend.step(np.array([s[t]], dtype=np.int64), h, c)
            nll[b] -= logp[0, s[t + 1]]
            if t in want:
                out_lp.append(logp[0]); out_h.append(h[0]); out_c.append(c[0]); rows.append((b, t))
    if not rows:
        return nll, logp[:0], h0[:0], c0[:0], rows
    return nll, np.stack(out_lp), np.stack(out_h), np.stack(out_c), rows


def search_queries(backend: StepBackend, table: PieceTable, qs: list[_Query], parsed: dict, row_of: dict,
                   logp: np.ndarray, h: np.ndarray, c: np.ndarray, cfg: EvalConfig, results: dict, k: int = 3) -> None:
    """Top-k whole-word searches of queries from their rows' (logp, h, c), cfg.batch at a time, into results."""
    for s in range(0, len(qs), cfg.batch):
        part = qs[s : s + cfg.batch]
        r = np.array([row_of[(q.msg, parsed[q.msg][0][q.word_idx][0])] for q in part], dtype=np.int64)
        partials = [parsed[q.msg][0][q.word_idx][1][: q.typed] for q in part]
        spaces = [parsed[q.msg][0][q.word_idx][2] for q in part]
        found = search_words(backend, table, logp[r], h[r], c[r], partials, spaces,
                             k=k, beam=cfg.beam, max_pieces=cfg.max_pieces)
        for q, f in zip(part, found):
            results[(q.msg, q.word_idx, q.typed)] = [w for w, _ in f]


def in_chunks(chosen: list[int], ids: list[list[int]], by_msg: dict, flush: Callable[[list[int]], None],
              progress: Callable[[int, int], None] | None) -> None:
    """Call flush on chunks of similar-length messages of bounded work (pieces + 8 per query), reporting progress."""
    done, budget, chunk = 0, 0, []
    for i in sorted(chosen, key=lambda i: len(ids[i])):
        chunk.append(i)
        budget += (len(ids[i]) + 2) + 8 * len(by_msg[i])
        if budget >= 6000:
            flush(chunk)
            done += len(chunk)
            if progress:
                progress(done, len(chosen))
            chunk, budget = [], 0
    if chunk:
        flush(chunk)
        done += len(chunk)
        if progress:
            progress(done, len(chosen))


def plan(messages: list[Message], tok: Tokenizer, table: PieceTable, cfg: EvalConfig,
         ) -> tuple[list[list[int]], dict[int, tuple], list[int], set[int], dict[int, list[_Query]]]:
    """The seeded sample of messages (cfg.max_positions caps its word positions), the KSR sample, and each
    message's queries: (piece ids, parsed words, chosen messages, KSR messages, queries by message)."""
    rng = np.random.default_rng(cfg.seed)
    ids = tok.encode_batch([m.text for m in messages])
    order = rng.permutation(len(messages))
    parsed = {}
    n_pos = 0
    for i in order:  # a seeded sample of messages when max_positions caps the work
        pos, joined = table.word_positions(ids[i])
        parsed[int(i)] = (pos, joined)
        n_pos += max(0, len(pos) - 1)
        if cfg.max_positions and n_pos >= cfg.max_positions:
            break
    chosen = sorted(parsed)
    with_words = [i for i in chosen if parsed[i][0]]
    ksr_set = set(rng.choice(with_words, size=min(cfg.ksr_messages, len(with_words)), replace=False).tolist()) if with_words else set()
    by_msg: dict[int, list[_Query]] = defaultdict(list)
    for i in chosen:
        for w, (_, word, _, _) in enumerate(parsed[i][0]):
            if i in ksr_set:
                by_msg[i].extend(_Query(i, w, L) for L in range(len(word)))
            elif w > 0:
                by_msg[i].append(_Query(i, w, 0))
    return ids, parsed, chosen, ksr_set, by_msg


def evaluate(
    model: torch.nn.Module | StepBackend,
    tok: Tokenizer,
    messages: list[Message],
    cfg: EvalConfig,
    pairs: dict[str, str] | None = None,
    train_words: dict[str, set[str]] | None = None,
    ngram: BackoffNgram | None = None,
    progress: Callable[[int, int], None] | None = None,
    record: dict | None = None,
) -> dict:
    """Evaluate a model on messages; returns the DESIGN.md `evaluate` JSON object.

    `model` is a torch module or any StepBackend (e.g. the exported ONNX graph's); `record`, if given,
    receives every search's suggestions keyed (message, word index, characters typed).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    table = PieceTable.from_tokenizer(tok)
    backend = TorchBackend(model) if isinstance(model, torch.nn.Module) else model
    pairs = pairs or {}
    variant_of = {**{a: (a, b) for a, b in pairs.items()}, **{b: (a, b) for a, b in pairs.items()}}
    ids, parsed, chosen, ksr_set, by_msg = plan(messages, tok, table, cfg)

    results: dict[tuple[int, int, int], list[str]] = {}
    nll_of: dict[int, float] = {}

    def flush(chunk: list[int]) -> None:
        seqs = [frame(ids[i], 10**9) for i in chunk]
        wanted = [sorted({parsed[i][0][q.word_idx][0] for q in by_msg[i]}) for i in chunk]
        states = _states if isinstance(model, torch.nn.Module) else _states_stepwise
        nll, logp, h, c, rows = states(model, seqs, wanted)
        for b, i in enumerate(chunk):
            nll_of[i] = float(nll[b])
        row_of = {(chunk[b], t): r for r, (b, t) in enumerate(rows)}
        qs = [q for i in chunk for q in by_msg[i]]
        search_queries(backend, table, qs, parsed, row_of, logp, h, c, cfg, results)

    in_chunks(chosen, ids, by_msg, flush, progress)

    if record is not None:
        record.update(results)
    return _tally(messages, chosen, parsed, ksr_set, results, nll_of, variant_of, train_words, ngram, cfg)


def _tally(messages, chosen, parsed, ksr_set, results, nll_of, variant_of, train_words, ngram, cfg) -> dict:
    users: dict[str, UserTally] = defaultdict(UserTally)
    base: dict[str, UserTally] = defaultdict(UserTally)
    pair_stats = {"typed": [0, 0], "untyped": [0, 0]}
    for i in chosen:
        m = messages[i]
        pos, joined = parsed[i]
        u, bu = users[m.user], base[m.user]
        u.nll += nll_of[i]
        u.ppl_words += len(WORD_RE.findall(normalize(m.text)))
        words = [p[1] for p in pos]
        for w, (_, word, _, off) in enumerate(pos):
            if w == 0:
                continue
            sugg = results[(i, w, 0)]
            h1, h3 = topk_hits(word, sugg)
            u.n_words += 1; u.top1 += h1; u.top3 += h3
            if ngram is not None:
                ns = ngram.suggest(words[:w])
                b1, b3 = topk_hits(word, ns)
                bu.n_words += 1; bu.top1 += b1; bu.top3 += b3
            if word in variant_of:
                us, gb = variant_of[word]
                own, other = (gb, us) if m.region == "GB" else (us, gb)
                hit = regional_hit(own, other, sugg)
                u.regional_n += 1; u.regional_hits += hit
                u.pairs[us][0] += hit; u.pairs[us][1] += 1
                if train_words is not None:
                    typed = own in train_words.get(m.user, ())
                    pair_stats["typed" if typed else "untyped"][0] += hit
                    pair_stats["typed" if typed else "untyped"][1] += 1
                if ngram is not None:
                    bh = regional_hit(own, other, ns)
                    bu.regional_n += 1; bu.regional_hits += bh
        if i in ksr_set:
            text = joined.lstrip(" ")
            u.chars += len(text); bu.chars += len(text)
            saved = bsaved = 0
            for w, (_, word, _, off) in enumerate(pos):
                nxt = joined[off + len(word) : off + len(word) + 1]
                first = next((L for L in range(len(word)) if word in results[(i, w, L)]), None)
                used, covered = word_keystrokes(word, first, nxt == " ")
                saved += covered - used
                if ngram is not None:
                    bfirst = next((L for L in range(len(word)) if word in ngram.suggest(words[:w], 3, word[:L])), None)
                    bused, bcovered = word_keystrokes(word, bfirst, nxt == " ")
                    bsaved += bcovered - bused
            u.keystrokes += len(text) - saved
            bu.keystrokes += len(text) - bsaved

    region_of = {m.user: m.region for m in messages}
    pooled, by_region = UserTally(), defaultdict(UserTally)
    for user, t in users.items():
        pooled.add(t)
        by_region[region_of[user]].add(t)
    out = {
        "pooled": pooled.metrics(),
        "mean_over_users": mean_over(users),
        "by_region": {r: t.metrics() for r, t in sorted(by_region.items())},
        "per_user": {user: t.metrics() for user, t in sorted(users.items())},
        "regional": _regional_summary(pooled, by_region, pair_stats),
        "ksr_messages": len(ksr_set),
        "messages": len(chosen),
        "users": len(users),
    }
    if ngram is not None:
        bpool = UserTally()
        for t in base.values():
            bpool.add(t)
        out["baseline_ngram"] = bpool.metrics()
    return out


def _regional_summary(pooled: UserTally, by_region: dict, pair_stats: dict) -> dict:
    macro = [h / n for h, n in pooled.pairs.values() if n]
    frac = lambda hn: hn[0] / hn[1] if hn[1] else None  # noqa: E731
    return {
        "pooled": pooled.metrics()["regional_acc"],
        "macro_over_pairs": sum(macro) / len(macro) if macro else None,
        "pairs_seen": len(macro),
        "typed_in_train": frac(pair_stats["typed"]), "typed_in_train_n": pair_stats["typed"][1],
        "never_typed_in_train": frac(pair_stats["untyped"]), "never_typed_in_train_n": pair_stats["untyped"][1],
        "by_region": {r: {"acc": t.metrics()["regional_acc"], "n": t.regional_n,
                          "macro_over_pairs": (lambda v: sum(v) / len(v) if v else None)([h / n for h, n in t.pairs.values() if n])}
                      for r, t in sorted(by_region.items())},
    }
