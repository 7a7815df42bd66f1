"""Evaluating many users' personalized models at once: the frozen base's states are shared, only each
row's adapter and bias differ.

keyboard.evaluate.evaluate runs one model over all messages; here every row carries the index of its
user's adapter (in an AdapterBank), through the teacher-forced pass and through the whole-word search:
the search only reorders (h, c) rows, so the index rides along as one extra column of h. Message
selection, queries and the tally are keyboard.evaluate's own, so with no adapters the result equals
`evaluate(base, ...)`; the global and personalized evaluations share one LSTM pass and one sample.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedkey.config import EvalConfig
from keyboard.adapter_file import AdapterArrays
from keyboard.batches import frame
from keyboard.evaluate import Message, _Query, _tally, in_chunks, plan, search_queries  # evaluate()'s own sample, search and tally
from keyboard.metrics import regional_hit
from keyboard.model import KeyboardLM
from keyboard.tokenizer import PAD, Tokenizer
from keyboard.torch_backend import lstm_cell
from keyboard.words import RESPELL_SPARE, WORD_RE, PieceTable, normalize, respell
from keyboard.phrase_cache import PhraseCache, ReplayCache, histories, mix_logp
from keyboard.sentinel import Sentinel

if TYPE_CHECKING:
    from keyboard.ngram import BackoffNgram


class AdapterBank:
    """Many users' adapters stacked into tensors; row 0 is the global model (no adapter).

    `caches` adds users' phrase caches: each row then carries its last HISTORY pieces through the search.
    `sent` (user -> their framed messages, in the order of the evaluated messages) makes each cache learn
    them one by one, as the runtime's `learn` does: message j is answered by the cache plus messages 0..j-1.
    """

    def __init__(self, base: KeyboardLM, adapters: dict[str, AdapterArrays],
                 caches: dict[str, PhraseCache] | None = None, respell: dict[str, dict[str, str]] | None = None,
                 sent: dict[str, list[list[int]]] | None = None, sentinel: Sentinel | None = None) -> None:
        d, V = base.cfg.embed_dim, base.vocab_size
        caches = caches or {}
        adapters = {**{u: AdapterArrays(np.zeros((d, 0)), np.zeros((0, d)), np.zeros(V), "", u, {}) for u in caches},
                    **adapters}  # a user with a cache but no adapter gets an empty one
        r = max([ad.A.shape[1] for ad in adapters.values()] + [0])
        self.users = sorted(adapters)
        self.row = {u: i + 1 for i, u in enumerate(self.users)}
        n = len(self.users) + 1
        # a lower-rank adapter padded with zeros is the same function
        self.A, self.B, self.UB = torch.zeros(n, d, r), torch.zeros(n, r, d), torch.zeros(n, V)
        for u, i in self.row.items():
            ad = adapters[u]
            k = ad.A.shape[1]
            self.A[i, :, :k] = torch.from_numpy(np.asarray(ad.A, dtype=np.float32))
            self.B[i, :k] = torch.from_numpy(np.asarray(ad.B, dtype=np.float32))
            self.UB[i] = torch.from_numpy(np.asarray(ad.user_bias, dtype=np.float32))
        sent = sent or {}
        caches = {u: ReplayCache.replay(c, sent[u]) if u in sent else c for u, c in caches.items()}
        self.caches: list[PhraseCache | None] = [None] + [caches.get(u) for u in self.users]
        self.respell = {u: m for u, m in (respell or {}).items() if m}  # user -> {other variant: own}
        self.history = max([c.order - 1 for c in caches.values()] + [0])
        self.sentinel = sentinel

    def mix(self, logp: np.ndarray, rows: np.ndarray, hist: np.ndarray, before: np.ndarray,
            feats: np.ndarray | None = None) -> np.ndarray:
        """Log-probabilities of rows mixed with their users' phrase caches after their piece histories
        (`before`: each row's message number among its user's; `feats`: LSTM outputs, for the sentinel)."""
        if not self.history:
            return logp
        return mix_logp(logp, [self.caches[r] for r in rows.tolist()], hist, before, self.sentinel, feats)

    def rows(self, users: list[str]) -> torch.Tensor:
        """Bank row of each user (0, the global model, for a user without an adapter)."""
        return torch.tensor([self.row.get(u, 0) for u in users], dtype=torch.long)

    def logits(self, base: KeyboardLM, feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Personalized logits of LSTM outputs feats (N, d) or (N, T, d), row i using adapter rows[i]."""
        flat = feats.dim() == 2
        f = feats[:, None] if flat else feats
        if self.A.shape[2]:
            f = f + torch.bmm(torch.bmm(f, self.A[rows]), self.B[rows])
        out = base.logits(f) + self.UB[rows][:, None, :]
        return out[:, 0] if flat else out


class MultiUserBackend:
    """A StepBackend whose rows each use their own user's adapter (and phrase cache).

    h's columns past the LSTM's hold the bank row, the message's number among its user's, then (with
    caches) the row's last pieces, oldest first: the search only reorders rows, so all ride along.
    """

    def __init__(self, base: KeyboardLM, bank: AdapterBank) -> None:
        self.base, self.bank = base.eval(), bank
        self.d = base.lstm.proj_size or base.lstm.hidden_size

    @torch.inference_mode()
    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One LSTM step per row with that row's adapter; the row index (and piece history) go to the new h."""
        d = self.d
        rows = torch.from_numpy(h[:, d].astype(np.int64))
        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        h2, c2 = lstm_cell(self.base.lstm, self.base.embed(x), torch.from_numpy(np.ascontiguousarray(h[:, :d])),
                           torch.from_numpy(np.ascontiguousarray(c)))
        logp = torch.log_softmax(self.bank.logits(self.base, h2, rows), dim=-1).numpy()
        hist = np.concatenate([h[:, d + 3:], np.asarray(ids, dtype=np.float32).reshape(-1, 1)], axis=1)[:, -self.bank.history:] \
            if self.bank.history else h[:, d + 2:d + 2]
        logp = self.bank.mix(logp, rows.numpy(), hist.astype(np.int64), h[:, d + 1].astype(np.int64), h2.numpy())
        return logp, np.concatenate([h2.numpy(), h[:, d:d + 2], hist], axis=1), c2.numpy()

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Not used: rows start from the teacher-forced pass, which knows each row's user."""
        raise NotImplementedError("MultiUserBackend rows start from evaluate_users' teacher-forced pass")


def _lstm_states(base: KeyboardLM, seqs: list[list[int]]):
    """Teacher-forced LSTM pass: inputs, targets, and (h, c) at every input position."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), PAD, dtype=torch.long)
    y = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, : len(s) - 1] = torch.tensor(s[1:])
    with torch.inference_mode():
        emb = base.embed(x)
        h = torch.zeros(len(seqs), base.lstm.proj_size or base.lstm.hidden_size)
        c = torch.zeros(len(seqs), base.lstm.hidden_size)
        hs, cs = [], []
        for t in range(T):  # step by step: nn.LSTM returns only the last cell state
            h, c = lstm_cell(base.lstm, emb[:, t], h, c)
            hs.append(h)
            cs.append(c)
    return y, torch.stack(hs, 1), torch.stack(cs, 1)


def shared_prefix(word: str, variant_of: dict[str, tuple[str, str]]) -> int:
    """Characters of `word` its American and British variants share ("favo" of favorite/favourite)."""
    us, gb = variant_of[word]
    return len(os.path.commonprefix([us, gb]))


def _regional_plan(messages: list[Message], tok: Tokenizer, table: PieceTable, regional: dict, typed_prefix: bool):
    """Every message with a regional-pair word (no sampling) and a query at each such word; with `typed_prefix`,
    also at each later keystroke of the word. Returns what keyboard.evaluate.plan returns."""
    ids = tok.encode_batch([m.text for m in messages])
    parsed: dict[int, tuple] = {}
    for i in range(len(messages)):
        # most messages hold no regional word: a regex over the text is far cheaper than word_positions
        if not any(w in regional for w in WORD_RE.findall(normalize(messages[i].text))):
            continue
        pos, joined = table.word_positions(ids[i])
        if any(w > 0 and word in regional for w, (_, word, _, _) in enumerate(pos)):
            parsed[i] = (pos, joined)
    by_msg: dict[int, list[_Query]] = defaultdict(list)
    for i in sorted(parsed):
        for w, (_, word, _, _) in enumerate(parsed[i][0]):
            if w > 0 and word in regional:
                # with typed_prefix: at every keystroke before the word is complete (as the KSR simulation types
                # it), and at the shared prefix, which is the whole word when it begins its variant ("fulfil")
                last = max(len(word) - 1, shared_prefix(word, regional)) if typed_prefix else 0
                by_msg[i] += [_Query(i, w, k) for k in range(last + 1)]
    return ids, parsed, sorted(parsed), set(), by_msg


def evaluate_users(
    base: KeyboardLM,
    banks: list[AdapterBank],
    tok: Tokenizer,
    messages: list[Message],
    cfg: EvalConfig,
    pairs: dict[str, str] | None = None,
    train_words: dict[str, set[str]] | None = None,
    ngram: BackoffNgram | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """One evaluate() object per bank (each message's user gets their adapter from that bank), on one sample."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base.eval()
    table = PieceTable.from_tokenizer(tok)
    pairs = pairs or {}
    variant_of = {**{a: (a, b) for a, b in pairs.items()}, **{b: (a, b) for a, b in pairs.items()}}
    ids, parsed, chosen, ksr_set, by_msg = plan(messages, tok, table, cfg)
    results, nll_of = _run(base, banks, table, messages, ids, parsed, chosen, by_msg, cfg, progress)
    return [_tally(messages, chosen, parsed, ksr_set, res, nll, variant_of, train_words, ngram, cfg)
            for res, nll in zip(results, nll_of)]


def regional_accuracy(
    base: KeyboardLM,
    banks: list[AdapterBank],
    tok: Tokenizer,
    messages: list[Message],
    cfg: EvalConfig,
    pairs: dict[str, str],
    train_words: dict[str, set[str]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    typed_prefix: bool = False,
) -> list[dict] | tuple[list[dict], list[dict], list[dict]]:
    """Regional-variant accuracy over every regional-pair word of the messages (no sampling), per bank.

    Few words are regional pairs, so a sampled evaluation sees too few of them to tell 85% from 95%.
    DESIGN.md's figure asks with nothing of the word typed; `typed_prefix` also asks, in the same pass,
    at every keystroke of the word, and returns (nothing typed, prefix typed, as typed):
    "prefix typed" judges the suggestions once the prefix both variants share is typed ("favo", "colo");
    "as typed" judges them at the first keystroke where either variant is among the 3 suggestions (the
    moment the keyboard offers the word, and in which spelling), a miss if neither ever is.
    """
    base.eval()
    table = PieceTable.from_tokenizer(tok)
    variant_of = {**{a: (a, b) for a, b in pairs.items()}, **{b: (a, b) for a, b in pairs.items()}}
    ids, parsed, chosen, _, by_msg = _regional_plan(messages, tok, table, variant_of, typed_prefix)
    results, _ = _run(base, banks, table, messages, ids, parsed, chosen, by_msg, cfg, progress)

    def tally(judge: Callable) -> list[dict]:
        return [_regional_tally(messages, parsed, chosen, variant_of, train_words, res, judge) for res in results]

    plain = tally(lambda res, key, word, own, other: res[key + (0,)])
    if not typed_prefix:
        return plain
    return (plain, tally(lambda res, key, word, own, other: res[key + (shared_prefix(word, variant_of),)]),
            tally(_first_offer))


def _first_offer(res: dict, key: tuple, word: str, own: str, other: str) -> list[str]:
    """The suggestions at the first keystroke of `word` where either variant is among the top 3 ([] if never)."""
    for k in range(len(word)):
        sugg = res[key + (k,)]
        if own in sugg[:3] or other in sugg[:3]:
            return sugg
    return []


def _regional_tally(messages, parsed, chosen, variant_of, train_words, res, judge) -> dict:
    """Hits by region / typed-in-train / user, of the suggestions `judge` picks at each regional word."""
    tally: dict = defaultdict(lambda: [0, 0])
    outcomes: dict = defaultdict(lambda: defaultdict(Counter))  # region -> pair -> outcome -> positions
    for i in chosen:
        m = messages[i]
        for w, (_, word, _, _) in enumerate(parsed[i][0]):
            if w == 0 or word not in variant_of:
                continue
            us, gb = variant_of[word]
            own, other = (gb, us) if m.region == "GB" else (us, gb)
            sugg = judge(res, (i, w), word, own, other)
            hit = regional_hit(own, other, sugg)
            typed = train_words is not None and own in train_words.get(m.user, ())
            for key in (m.region, f"{m.region}/{'typed' if typed else 'never_typed'}", f"user/{m.user}"):
                tally[key][0] += hit
                tally[key][1] += 1
            outcomes[m.region][f"{us}/{gb}"][_outcome(own, other, sugg)] += 1
    acc = {k: {"acc": h / n, "n": n} for k, (h, n) in sorted(tally.items()) if not k.startswith("user/")}
    acc["per_user"] = {k[5:]: {"acc": h / n, "n": n} for k, (h, n) in sorted(tally.items()) if k.startswith("user/")}
    acc["outcomes_by_pair"] = {r: {p: dict(c) for p, c in sorted(by.items(), key=lambda kv: -sum(kv[1].values()))}
                               for r, by in sorted(outcomes.items())}
    return acc


OUTCOMES = ("own first", "own in top 3 above other", "own below other", "other in top 3, own not",
            "neither in top 3")


def _outcome(own: str, other: str, suggestions: list[str]) -> str:
    """Where the user's own variant stood among the top 3 (what a miss of regional_hit was)."""
    top = suggestions[:3]
    if own in top:
        return OUTCOMES[0] if top[0] == own else OUTCOMES[1] if other not in top or top.index(own) < top.index(other) else OUTCOMES[2]
    return OUTCOMES[3] if other in top else OUTCOMES[4]


def message_numbers(messages: list[Message]) -> list[int]:
    """Each message's number among its user's (messages are in the order each user sent them)."""
    seen: Counter = Counter()
    out = []
    for m in messages:
        out.append(seen[m.user])
        seen[m.user] += 1
    return out


def respell_results(qs: list[_Query], results: dict, respellings: dict[str, dict[str, str]], messages: list[Message],
                    parsed: dict, k: int = 3) -> list[_Query]:
    """Each query's words in its user's own spelling (top k); returns the queries where two variants merged."""
    merged = []
    for q in qs:
        m = respellings.get(messages[q.msg].user)
        if m:
            key = (q.msg, q.word_idx, q.typed)
            words = respell(results[key], m, parsed[q.msg][0][q.word_idx][1][: q.typed])
            if len(words) < min(len(results[key]), k):
                merged.append(q)
            results[key] = words[:k]
    return merged


def _run(base, banks, table, messages, ids, parsed, chosen, by_msg, cfg, progress):
    """Searches of every query under every bank; the LSTM pass over each chunk of messages is shared."""
    results: list[dict] = [{} for _ in banks]
    nll_of: list[dict] = [{} for _ in banks]
    backends = [MultiUserBackend(base, b) for b in banks]
    number = message_numbers(messages)

    def flush(chunk: list[int]) -> None:
        seqs = [frame(ids[i], 10**9) for i in chunk]
        wanted = [sorted({parsed[i][0][q.word_idx][0] for q in by_msg[i]}) for i in chunk]
        y, H, C = _lstm_states(base, seqs)
        pairs_bt = [(b, t) for b, ts in enumerate(wanted) for t in ts]
        bi = torch.tensor([p[0] for p in pairs_bt], dtype=torch.long)
        ti = torch.tensor([p[1] for p in pairs_bt], dtype=torch.long)
        row_of = {(chunk[b], t): r for r, (b, t) in enumerate(pairs_bt)}
        qs = [q for i in chunk for q in by_msg[i]]
        for k, (bank, backend) in enumerate(zip(banks, backends)):
            rows = bank.rows([messages[i].user for i in chunk])
            with torch.inference_mode():
                logp = torch.log_softmax(bank.logits(base, H, rows), dim=-1)
                nll = -logp.gather(2, y.clamp(min=0)[..., None])[..., 0]
                nll = (nll * (y != PAD)).sum(1).numpy()
                lp_w = logp[bi, ti].numpy()
            for b, i in enumerate(chunk):
                nll_of[k][i] = float(nll[b])
            hist = histories(seqs, pairs_bt, bank.history)
            before = np.array([number[chunk[b]] for b, _ in pairs_bt], dtype=np.int64)
            lp_w = bank.mix(lp_w, rows[bi].numpy(), hist, before, H[bi, ti].numpy())
            h_w = np.concatenate([H[bi, ti].numpy(), rows[bi].numpy()[:, None].astype(np.float32),
                                  before[:, None].astype(np.float32), hist.astype(np.float32)], axis=1)
            c_w = C[bi, ti].numpy()
            search_queries(backend, table, qs, parsed, row_of, lp_w, h_w, c_w, cfg, results[k])
            merged = respell_results(qs, results[k], bank.respell, messages, parsed)
            # as the runtime does: where two variants merged, a few words more fill the freed slot
            search_queries(backend, table, merged, parsed, row_of, lp_w, h_w, c_w, cfg, results[k], k=3 + RESPELL_SPARE)
            respell_results(merged, results[k], bank.respell, messages, parsed)

    in_chunks(chosen, ids, by_msg, flush, progress)  # chunks by length, as evaluate() makes them
    return results, nll_of
