"""Each metric against a hand-computed example, and the harness against the Predictor."""

from __future__ import annotations

import math

import pytest

from fedkey.config import EvalConfig
from keyboard.evaluate import Message, evaluate
from keyboard.metrics import UserTally, mean_over, regional_hit, topk_hits, word_keystrokes
from keyboard.ngram import BackoffNgram
from keyboard.predictor import Predictor
from keyboard.torch_backend import TorchBackend
from keyboard.words import PieceTable


def test_topk_hits():
    assert topk_hits("you", ["you", "the", "a"]) == (True, True)
    assert topk_hits("a", ["you", "the", "a"]) == (False, True)
    assert topk_hits("x", ["you", "the", "a", "x"]) == (False, False)  # only the first 3 count
    assert topk_hits("x", []) == (False, False)


def test_regional_hit():
    assert regional_hit("colour", "color", ["colour", "color", "red"])
    assert not regional_hit("colour", "color", ["color", "colour", "red"])  # ranked below the other variant
    assert regional_hit("colour", "color", ["red", "colour", "blue"])
    assert not regional_hit("colour", "color", ["red", "blue", "green"])


def test_keystrokes_of_one_word():
    # "hello" suggested after typing "he": h, e, accept = 3 keystrokes for "hello " (6 characters)
    assert word_keystrokes("hello", 2, True) == (3, 6)
    assert word_keystrokes("hello", 0, False) == (1, 5)
    assert word_keystrokes("hello", None, True) == (5, 5)  # typed in full; the space is typed separately


def test_tally_and_mean():
    a = UserTally(n_words=4, top1=1, top3=2, nll=4 * math.log(10), ppl_words=4, keystrokes=6, chars=10,
                  regional_hits=1, regional_n=2)
    b = UserTally(n_words=1, top1=1, top3=1, nll=0.0, ppl_words=1, keystrokes=5, chars=5)
    m = a.metrics()
    assert m["top1"] == 0.25 and m["top3"] == 0.5 and m["ksr"] == pytest.approx(0.4)
    assert m["perplexity"] == pytest.approx(10.0) and m["regional_acc"] == 0.5
    pooled = UserTally()
    pooled.add(a)
    pooled.add(b)
    assert pooled.metrics()["top1"] == pytest.approx(2 / 5)
    mean = mean_over({"a": a, "b": b})
    assert mean["top1"] == pytest.approx((0.25 + 1.0) / 2)
    assert mean["regional_acc"] == 0.5  # b has no regional positions: not averaged in
    assert b.metrics()["regional_acc"] is None


def test_ngram_backoff():
    ng = BackoffNgram(["a b c", "a b c", "a b d", "x b e"])
    assert ng.suggest(["a", "b"])[:2] == ["c", "d"]  # trigram counts first
    assert ng.suggest(["zz", "b"])[0] == "c"  # unseen trigram: back off to the bigram "b"
    assert ng.suggest(["a", "b"], prefix="e") == ["e"]


def test_harness_agrees_with_predictor(tiny_model, tiny_tok):
    """Teacher-forced batched evaluation gives what the Predictor shows a typing user."""
    texts = ["how are you doing today", "my favorite food is pizza", "i like the colour blue"]
    msgs = [Message("u1", "GB", texts[0]), Message("u1", "GB", texts[2]), Message("u2", "US", texts[1])]
    res = evaluate(tiny_model, tiny_tok, msgs, EvalConfig(ksr_messages=10), pairs={"color": "colour"},
                   train_words={"u1": set(), "u2": set()})
    p = Predictor(TorchBackend(tiny_model), PieceTable.from_tokenizer(tiny_tok), tiny_tok.encode)
    hits1 = hits3 = n = keys = chars = 0
    reg_hits = reg_n = 0
    for m in msgs:
        words = m.text.split()
        for i, w in enumerate(words):
            ctx = " ".join(words[:i]) + (" " if i else "")
            if i:
                sugg = [s.word for s in p.suggest(ctx)]
                hits1 += sugg[0] == w
                hits3 += w in sugg
                n += 1
                if w in ("color", "colour"):
                    own, other = ("colour", "color") if m.region == "GB" else ("color", "colour")
                    reg_n += 1
                    reg_hits += regional_hit(own, other, sugg)
            first = next((L for L in range(len(w)) if w in [s.word for s in p.suggest(ctx + w[:L])]), None)
            used, covered = word_keystrokes(w, first, i < len(words) - 1)
            keys += used + (len(w) + (i < len(words) - 1) - covered)
        chars += len(m.text)
    assert res["pooled"]["n_words"] == n
    assert res["pooled"]["top1"] == pytest.approx(hits1 / n)
    assert res["pooled"]["top3"] == pytest.approx(hits3 / n)
    assert res["pooled"]["ksr"] == pytest.approx(1 - keys / chars)
    assert res["pooled"]["regional_acc"] == pytest.approx(reg_hits / reg_n)
    assert res["pooled"]["top1"] > 0.5  # the tiny model has learnt the phrases
    assert set(res["by_region"]) == {"GB", "US"} and set(res["per_user"]) == {"u1", "u2"}
