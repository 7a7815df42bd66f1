"""How far a user's phrase cache can move top-1 on this corpus: the global model, the cache as shipped,
the cache learning every message the user sends (as the on-device runtime does), and an oracle.

Every user with test messages; at each one-piece word of their test split (the words the gate counts: teacher-
forced, the next word's first piece is the whole word), is the likeliest piece that starts a word right (the
keyboard shows words; the gate's argmax over every piece also lets a message end rank first; session 27) under
- the global model;
- the global model mixed with the user's cache of their train text (ungated, the shipped weights);
- the same, the cache learning each test message once it is sent (the runtime's `learn`);
- an oracle that knows, word by word, whether the model's or the cache's top continuation (at the
  longest context the cache has seen) is right: a ceiling no mixing weight can pass;
- with --dynamic-lr: dynamic evaluation (Krause et al. 2018), the whole model fine-tuned online on the
  user's device: one SGD step on each of their latest --dynamic-pre train messages, then on each test
  message once it is sent; alone and mixed with the learning cache. Each learning arm then also keeps
  its record over those train messages (each answered before it is learned, as the device sees it) and
  is reported gated by it: kept for a user only where it led the global model by >= 1 / 3 / 5 words.
Reported as each user's gain over the global model (mean over users, users worse by > 0.5 point), and
what a per-user gate that knew each user's test words could make of each arm (it keeps the arm only
where it gains): the ceiling of any gate between the global model and that arm.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedkey.io import save_figure, write_json
from fedkey.progress import bar
from fedkey.tables import console
from keyboard.words import one_piece_word

if TYPE_CHECKING:
    from keyboard.model import KeyboardLM
    from personalization.config import PersonalConfig

ARMS = ("cache", "cache_learning", "oracle")
DYNAMIC_ARMS = ("dynamic", "dynamic_cache")
RECORDED = ("cache_learning", *DYNAMIC_ARMS)  # arms whose record over the latest train messages is counted
RECORD_GATES = (1, 3, 5)  # words right beyond the global model on that record


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--model", type=Path, help="global model folder (default: the run's fl/ model, else central/)")
    p.add_argument("--max-users", type=int, default=0, help="the first N users by id with test messages (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--dynamic-lr", type=float, default=0.0,
                   help="add the dynamic-evaluation arms at this SGD learning rate (0: off; 0.03 was best of 0.01/0.03/0.1)")
    p.add_argument("--dynamic-pre", type=int, default=300,
                   help="dynamic evaluation: SGD steps over the user's latest this many train messages before the test ones")
    p.add_argument("--plot", type=Path, help="PNG (default: beside --json, else RUN_DIR/bench/phrase_ceiling.png)")


def _right(p: np.ndarray, y: int, starts: np.ndarray) -> int:
    """Whether y is the likeliest piece that starts a word: the keyboard suggests words, so an end of message or a
    comma ranked first is never its top suggestion, and an arm that pushes it down has not made a word right."""
    return int(np.where(starts, p, -np.inf).argmax() == y)


def _cache_top(cache, hist: list[int]) -> int | None:
    """The most frequent continuation at the longest context of `hist` the cache has seen."""
    top = None
    for k in range(1, cache.order):
        hit = cache.table.get(tuple(hist[-k:])) if len(hist) >= k else None
        if hit is None:
            break
        top = int(hit[0][hit[1].argmax()])
    return top


class _Dynamic:
    """A copy of the model that takes one SGD step on every message it is shown (dynamic evaluation)."""

    def __init__(self, base, lr: float) -> None:
        import copy

        import torch

        self.model = copy.deepcopy(base).eval()  # a copy: the global model stays the other arms' baseline
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def answer_then_learn(self, s: list[int]) -> np.ndarray:
        """Teacher-forced next-piece log-probabilities over one framed message as the model was before it, then
        one SGD step on the message's mean next-piece loss (one forward pass serves both)."""
        import torch

        logp = torch.log_softmax(self.model(torch.tensor([s[:-1]]))[0][0], -1)
        loss = torch.nn.functional.nll_loss(logp, torch.tensor(s[1:]))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return logp.detach().double().numpy()


def _logp(model, s: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([s[:-1]]))[0][0], -1).double().numpy()


def _tally(out: dict[str, int], key: str, s: list[int], starts: np.ndarray, cont: np.ndarray, base, learning,
           shipped=None, dlogp: np.ndarray | None = None) -> None:
    """Add one framed message's one-piece words to the counts `key + arm` (the shipped cache and the oracle
    only when `shipped` is given; the dynamic arms only with `dlogp`, the dynamic model's log-probabilities)."""
    logp = _logp(base, s)
    for t, y in enumerate(s[1:]):
        if not one_piece_word(s, t, starts, cont):
            continue
        hist, p = s[:t + 1], np.exp(logp[t])
        out[key + "words"] += 1
        right = _right(p, y, starts)
        out[key + "global"] += right
        out[key + "cache_learning"] += _right(learning.mix_row(p.copy(), hist), y, starts)
        if shipped is not None:
            out[key + "cache"] += _right(shipped.mix_row(p.copy(), hist), y, starts)
            out[key + "oracle"] += int(right or _cache_top(shipped, hist) == y)
        if dlogp is not None:
            q = np.exp(dlogp[t])
            out[key + "dynamic"] += _right(q, y, starts)
            out[key + "dynamic_cache"] += _right(learning.mix_row(q.copy(), hist), y, starts)


def user_counts(base: KeyboardLM, cfg: "PersonalConfig", starts: np.ndarray, cont: np.ndarray, train: list[list[int]],
                test: list[list[int]], dynamic_lr: float = 0.0, dynamic_pre: int = 300) -> dict[str, int]:
    """Right top-1 words of the global model and of each arm over one user's framed test messages; with
    dynamic_lr > 0 the dynamic-evaluation arms too, and each learning arm's record over the latest
    dynamic_pre train messages, each answered before it is learned ("pre_" counts: a gate's evidence)."""
    from collections import Counter

    from keyboard.phrase_cache import PhraseCache

    def build(seqs: list[list[int]]) -> PhraseCache:
        return PhraseCache.build(seqs, cfg.cache_order, cfg.cache_lam, cfg.cache_m0, cfg.cache_max_pieces)

    shipped, learning = build(train), build(train)
    out: Counter = Counter(dict.fromkeys(("words", "global", *ARMS), 0))
    dyn = _Dynamic(base, dynamic_lr) if dynamic_lr > 0 else None
    if dyn:
        out.update(dict.fromkeys(DYNAMIC_ARMS, 0))
        recent = train[-dynamic_pre:] if dynamic_pre > 0 else []
        record = build(train[: len(train) - len(recent)])  # the cache as it was before those messages
        for s in recent:
            _tally(out, "pre_", s, starts, cont, base, record, dlogp=dyn.answer_then_learn(s))
            record.learn(s)
    for s in test:
        _tally(out, "", s, starts, cont, base, learning, shipped, dyn.answer_then_learn(s) if dyn else None)
        learning.learn(s)  # sent: it counts from the next message on
    return dict(out)


def run(args: argparse.Namespace) -> None:
    """Count every user's right words under each arm; print, plot and save the gains."""
    import torch

    from fedkey import config as C
    from fedkey import pipeline as P
    from fedkey.personal_stage import TEST_SPLIT, TRAIN_SPLIT
    from keyboard.batches import frame
    from keyboard.checkpoint import load_model
    from keyboard.words import PieceTable
    from personalization.config import PersonalConfig
    from personalization.store import default_base

    torch.set_num_threads(max(1, args.threads))
    cfg = PersonalConfig()
    model_dir = args.model or default_base(args.run_dir)
    base, tok, _ = load_model(model_dir)
    base.eval()
    table = PieceTable.from_tokenizer(tok)
    starts = np.zeros(tok.vocab_size, bool)
    starts[table.start_space] = True
    cont = np.zeros(tok.vocab_size, bool)
    cont[table.cont] = True
    shards, _ = P.load_prepared(args.run_dir)
    users = [u for u in shards.all_users() if shards.role(u) in TRAIN_SPLIT
             and shards.user_texts(TEST_SPLIT[shards.role(u)], u)]
    users = users[: args.max_users] if args.max_users > 0 else users
    per_user = {}
    with bar(not args.no_progress, f"phrase cache ceiling over {len(users):,} users", len(users), unit="users") as update:
        for u in users:
            role = shards.role(u)
            seqs = [[frame(ids, cfg.max_len) for ids in tok.encode_batch(shards.user_texts(split, u))] if
                    shards.user_texts(split, u) else [] for split in (TRAIN_SPLIT[role], TEST_SPLIT[role])]
            counts = user_counts(base, cfg, starts, cont, *seqs, dynamic_lr=args.dynamic_lr,
                                 dynamic_pre=args.dynamic_pre)
            if counts["words"]:
                per_user[u] = counts
            update(1, "")
    res = {"model": str(model_dir), "users": len(per_user), "config": C.to_dict(cfg), "arms": {}, "per_user": per_user,
           "dynamic": {"lr": args.dynamic_lr, "pre_messages": args.dynamic_pre} if args.dynamic_lr > 0 else None}
    for arm in _arms(per_user):
        gains = _gains(per_user, arm)
        res["arms"][arm] = {"mean_gain_points": float(gains.mean()), "hurt": int((gains < -0.5).sum()),
                            "improved": int((gains > 0.5).sum()), "hurt_frac": float((gains < -0.5).mean()),
                            "user_gate_oracle_points": float(np.maximum(gains, 0).mean())}
        if args.dynamic_lr > 0 and arm in RECORDED:
            res["arms"][arm]["record_gate"] = _record_gate(per_user, arm, gains)
    res["global_top1_mean_over_users"] = float(np.mean([c["global"] / c["words"] for c in per_user.values()]))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run_dir / "bench" / "phrase_ceiling.png")
    res["plot"] = str(_plot(per_user, plot))
    _print(res)
    if args.json:
        write_json(args.json, res)


def _record_gate(per_user: dict, arm: str, gains: np.ndarray) -> dict[str, dict]:
    """The arm kept only for users whose record over their latest train messages has it right at >= N more
    words than the global model: mean gain and users hurt, for each N in RECORD_GATES."""
    lead = np.array([c.get("pre_" + arm, 0) - c.get("pre_global", 0) for c in per_user.values()])
    out = {}
    for n in RECORD_GATES:
        g = np.where(lead >= n, gains, 0.0)
        out[str(n)] = {"kept": int((lead >= n).sum()), "mean_gain_points": float(g.mean()),
                       "hurt": int((g < -0.5).sum()), "hurt_frac": float((g < -0.5).mean())}
    return out


def _arms(per_user: dict) -> list[str]:
    """The arms these counts hold, in report order."""
    first = next(iter(per_user.values()), {})
    return [a for a in (*ARMS, *DYNAMIC_ARMS) if a in first]


def _gains(per_user: dict, arm: str) -> np.ndarray:
    """Each user's top-1 gain of the arm over the global model, in points."""
    return np.array([100 * (c[arm] - c["global"]) / c["words"] for c in per_user.values()])


def _plot(per_user: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-10, 15, 51)
    for arm in _arms(per_user):
        gains = _gains(per_user, arm)
        ax.hist(np.clip(gains, -10, 15), bins=bins, histtype="step", label=f"{arm} (mean {np.mean(gains):+.2f})")
    ax.set_xlabel("per-user top-1 gain over the global model (points, one-piece words)")
    ax.set_ylabel("users")
    ax.set_yscale("log")
    ax.legend()
    save_figure(fig, path)
    return path


def _print(res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"phrase cache ceiling, {res['users']:,} users (global mean top-1 "
                    f"{100 * res['global_top1_mean_over_users']:.2f}%)")
    gates = [f"kept where the record leads by >= {n}" for n in RECORD_GATES] if res["dynamic"] else []
    for col in ("arm", "mean gain (points)", "improved", "worse by > 0.5", "with a per-user test-set oracle gate", *gates):
        t.add_column(col, justify="right" if col != "arm" else "left")
    for arm, r in res["arms"].items():
        rec = r.get("record_gate", {})
        t.add_row(arm, f"{r['mean_gain_points']:+.2f}", str(r["improved"]), f"{r['hurt']} ({100 * r['hurt_frac']:.1f}%)",
                  f"{r['user_gate_oracle_points']:+.2f}",
                  *(f"{rec[str(n)]['mean_gain_points']:+.2f} / {rec[str(n)]['hurt']} hurt" if rec else "" for n in RECORD_GATES))
    console.print(t)
