"""The Predictor's two modes on a tiny trained model, and its state reuse."""

from __future__ import annotations

from keyboard.predictor import Predictor
from keyboard.torch_backend import TorchBackend
from keyboard.words import PieceTable, split_typed


def make(tiny_model, tiny_tok) -> Predictor:
    return Predictor(TorchBackend(tiny_model), PieceTable.from_tokenizer(tiny_tok), tiny_tok.encode)


def test_next_word_after_space(tiny_model, tiny_tok):
    p = make(tiny_model, tiny_tok)
    assert p.suggest("how are ")[0].word == "you"
    assert p.suggest("what is your favorite ")[0].word == "color"
    words = [s.word for s in p.suggest("see you tomorrow at the ")]
    assert words[0] == "park" and len(words) == 3 and len(set(words)) == 3


def test_completes_the_word_being_typed(tiny_model, tiny_tok):
    p = make(tiny_model, tiny_tok)
    assert p.suggest("how are yo")[0].word == "you"
    assert p.suggest("I like the Colo")[0].word == "color"  # typed case does not matter
    assert all(s.word.startswith("piz") for s in p.suggest("my favorite food is piz"))
    # suggestions are whole words, never raw pieces, and probabilities are ordered
    sugg = p.suggest("the weather is n")
    assert sugg[0].word == "nice" and all(a.prob >= b.prob for a, b in zip(sugg, sugg[1:]))


def test_typing_a_character_reuses_state(tiny_model, tiny_tok):
    p = make(tiny_model, tiny_tok)
    p.suggest("thank you so much for the ")
    before = p.steps_run
    p.suggest("thank you so much for the h")
    p.suggest("thank you so much for the he")
    assert p.steps_run == before  # mid-word keystrokes run no context steps
    p.suggest("thank you so much for the help ")
    assert p.steps_run - before == len(tiny_tok.encode("help"))  # only the new word's pieces


def test_no_suggestion_for_impossible_prefix(tiny_model, tiny_tok):
    p = make(tiny_model, tiny_tok)
    assert all(s.word.startswith("zzq") for s in p.suggest("hello zzq"))


def test_split_typed():
    assert split_typed("I like the Colo") == ("I like the ", "colo", True)
    assert split_typed("hi there ") == ("hi there ", "", True)
    assert split_typed("") == ("", "", True)
    assert split_typed("hi,how") == ("hi,", "how", False)
    assert split_typed("don't") == ("", "don't", True)
