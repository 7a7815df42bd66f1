"""The whole-word search: the one-query path a keyboard takes equals the batched path evaluation takes."""

from __future__ import annotations

import numpy as np
import pytest

from keyboard.predictor import Predictor
from keyboard.search import search_words
from keyboard.torch_backend import TorchBackend
from keyboard.words import PieceTable, split_typed

TEXTS = ["", "how are ", "how are yo", "I like the Colo", "my favorite food is piz", "the weather is n",
         "see you tomorrow at the ", "hi,how", "thank you so much for the he", "hello zzq", "don't"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_one_query_matches_batched(tiny_model, tiny_tok, k):
    backend, table = TorchBackend(tiny_model), PieceTable.from_tokenizer(tiny_tok)
    pred = Predictor(backend, table, tiny_tok.encode)
    queries = []
    for text in TEXTS:
        context, partial, space = split_typed(text)
        logp, h, c = pred._state_for(tiny_tok.encode(context) if context.strip() else [])
        queries.append((logp, h, c, partial, space))
    batched = search_words(backend, table, *(np.concatenate([q[i] for q in queries]) for i in range(3)),
                           [q[3] for q in queries], [q[4] for q in queries], k=k)
    for q, want in zip(queries, batched):
        done: list[dict[str, float]] = []
        got = search_words(backend, table, q[0], q[1], q[2], [q[3]], [q[4]], k=k, completed=done)[0]
        assert [w for w, _ in got] == [w for w, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
        assert all(done[0][w] == s for w, s in got)  # every returned word is among the completed ones


@pytest.mark.parametrize("capacity", [2, 128])
def test_step_cache_returns_what_the_model_computes(tiny_model, capacity):
    from keyboard.onnx_backend import StepCache

    backend = TorchBackend(tiny_model)
    cache = StepCache(backend, capacity=capacity)
    _, h, c = backend.initial(4)
    ids = np.array([5, 6, 7, 8])
    for rows in ([0, 1], [1, 2, 3], [3, 3, 0], [0, 1, 2, 3]):  # hits, misses, a row asked twice
        cache.step_ahead(ids[[2, 3]], h[[2, 3]], c[[2, 3]])
        got = cache.step(ids[rows], h[rows], c[rows])
        want = backend.step(ids[rows], h[rows], c[rows])
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.allclose(g, w, atol=1e-5)
    assert cache.hits > 0 and len(cache._slot) <= capacity


def test_lexicon_limits_suggestions_to_its_words(tiny_model, tiny_tok):
    from tests.conftest import PHRASES
    from keyboard.words import Lexicon, collect_words

    lex = Lexicon(collect_words(PHRASES))  # no "colour": the British spelling is not a word here
    table = PieceTable.from_tokenizer(tiny_tok)
    free = Predictor(TorchBackend(tiny_model), table, tiny_tok.encode)
    fenced = Predictor(TorchBackend(tiny_model), table, tiny_tok.encode, lexicon=lex)
    for text in TEXTS:
        got = [s.word for s in fenced.suggest(text)]
        partial = split_typed(text)[1]
        if lex.has_prefix(partial):
            assert got and all(w in lex for w in got), text
        else:  # a word the list lacks is still completed, from the model's own spellings
            assert got == [s.word for s in free.suggest(text)], text
    assert fenced.suggest("how are ")[0].word == "you"  # the best word was a word already
    assert "colour" not in [s.word for s in fenced.suggest("i like the colo", k=5)]
    lex.learn(["Colour"])  # a word the user typed joins the list
    assert "colour" in lex and lex.has_prefix("colou") and "colour" in [s.word for s in fenced.suggest("i like the colo", k=5)]


def test_lexicon_text_round_trip():
    from keyboard.words import Lexicon

    lex = Lexicon(["Hello", "don't", "x-ray", "über", "hello"])
    assert Lexicon.from_text(lex.to_text()).to_text() == lex.to_text() == "don't\nhello\nüber\n"
    assert lex.count_prefix("") == 3 and lex.count_prefix("h") == 1 and not lex.has_prefix("x")


def test_lexicon_fitting_pieces_match_a_fresh_intersection_before_and_after_learning(tiny_tok):
    from tests.conftest import PHRASES
    from keyboard.words import Lexicon, collect_words

    lex = Lexicon(collect_words(PHRASES))
    table = PieceTable.from_tokenizer(tiny_tok)

    def want(kind: str, prefix: str, typed: str) -> list[int]:
        return np.intersect1d(table.compatible(kind, typed), lex.pieces_after(table, kind, prefix)).tolist()

    asks = [("start_space", "", "co"), ("start_space", "", "colo"), ("cont", "co", "lo"), ("cont", "col", "ou"),
            ("start_nospace", "", "zz")]
    for ask in asks:
        assert lex.pieces_fitting(table, *ask).tolist() == want(*ask), ask
    lex.learn(["colourful", "zzyzx"])  # the cached answers grow with the user's words
    for ask in asks:
        assert lex.pieces_fitting(table, *ask).tolist() == want(*ask), ask
    assert len(lex.pieces_fitting(table, "cont", "col", "ou")) > 0
