"""The keyboard's text rules and keystroke accounting (no model, no Textual)."""

from __future__ import annotations

from keyboard.words import split_typed
from tui.state import Typing, accept, match_case, partial_word


def test_partial_word_is_what_the_predictor_completes():
    for text in ("i like the colo", "i like the ", "hello,", "", "don't", "it's Colo", "a\tb"):
        _, partial, _ = split_typed(text)
        assert partial_word(text).casefold() == partial, text


def test_accept_replaces_the_partial_word_and_adds_a_space():
    acc = accept("i like the colo", "colour")
    assert (acc.before, acc.insert, acc.after, acc.typed_for_you) == (4, "colour ", 0, 3)
    acc = accept("i like the ", "colour")  # next word: nothing replaced
    assert (acc.before, acc.insert, acc.after, acc.typed_for_you) == (0, "colour ", 0, 7)
    assert accept("I like the Colo", "colour").insert == "Colour "
    assert accept("COLO", "colour").insert == "COLOUR "


def test_accept_inside_a_word_replaces_the_whole_word():
    def apply(line: str, cursor: int, word: str) -> tuple[str, int]:
        acc = accept(line[:cursor], word, line[cursor:])
        start = cursor - acc.before
        return line[:start] + acc.insert + line[cursor + acc.after:], start + len(acc.insert)

    assert apply("the colr is blue", 7, "colour") == ("the colour is blue", 11)  # no doubled space
    assert apply("the colr", 7, "colour") == ("the colour ", 11)
    assert apply("say it's", 6, "it's") == ("say it's ", 9)
    assert apply("a b", 2, "cat") == ("a cat ", 6)  # after a space, the word there is replaced


def test_match_case():
    assert match_case("", "word") == "word"
    assert match_case("w", "word") == "word"
    assert match_case("W", "word") == "Word"
    assert match_case("WO", "word") == "WORD"


def test_savings_follow_the_keystroke_savings_definition():
    # type "i like the colo" by hand (15 keys), take "colour " (1 key typing 3 characters): 19 characters, 16 keys
    t = Typing()
    for _ in "i like the colo":
        t = t.typed()
    t = t.accept(accept("i like the colo", "colour"))
    chars = len("i like the colour ")
    assert (t.keystrokes, t.accepted, t.saved) == (16, 1, chars - 16)
    assert abs(t.savings_rate - (1 - 16 / chars)) < 1e-12
    assert Typing().savings_rate == 0.0
