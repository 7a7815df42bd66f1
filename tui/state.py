"""What the keyboard does to text and how the session's keystrokes are counted (plain Python, no Textual).

A suggestion is accepted as a phone keyboard does it: the partial word before the cursor is replaced
by the whole word and a space follows. The session counts keystrokes as DESIGN.md's keystroke
savings rate does: an accepted suggestion costs one keystroke and types every character it adds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# the same "word being typed" as keyboard.words.split_typed, so what is replaced is what was completed
_PARTIAL = re.compile(r"\w+(?:'\w*)*$")


def partial_word(before_cursor: str) -> str:
    """The word being typed just before the cursor, as typed ('' right after a space or punctuation)."""
    m = _PARTIAL.search(before_cursor)
    return m.group() if m else ""


def match_case(partial: str, word: str) -> str:
    """The suggestion in the case the person started typing it ("Colo" -> "Colour", "COLO" -> "COLOUR")."""
    if len(partial) > 1 and partial.isupper():
        return word.upper()
    if partial[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


@dataclass(frozen=True)
class Acceptance:
    """How accepting a word changes the line: `before` characters before the cursor and `after` after it
    become `insert`, and the cursor ends after it."""

    before: int
    insert: str
    after: int = 0

    @property
    def typed_for_you(self) -> int:
        """Characters the suggestion added beyond what was already typed."""
        return max(0, len(self.insert) - self.before - self.after)


def accept(before_cursor: str, word: str, after_cursor: str = "") -> Acceptance:
    """Replace the word at the cursor with `word` (in the case it was typed) followed by one space.

    With the cursor inside a word the whole word is replaced, and a space already following it is
    reused rather than doubled, so the cursor lands where the next word starts.
    """
    partial = partial_word(before_cursor)
    rest = re.match(r"\w*(?:'\w+)* ?", after_cursor).group()
    return Acceptance(len(partial), match_case(partial, word) + " ", len(rest))


@dataclass(frozen=True)
class Typing:
    """The session's keystroke accounting."""

    keystrokes: int = 0  # edits the person made, each acceptance counting as one
    accepted: int = 0
    saved: int = 0  # characters suggestions typed beyond the one keystroke each acceptance cost

    def typed(self) -> "Typing":
        """One more keystroke that edited the text."""
        return Typing(self.keystrokes + 1, self.accepted, self.saved)

    def accept(self, acc: Acceptance) -> "Typing":
        """One acceptance: one keystroke that typed `acc.typed_for_you` characters."""
        return Typing(self.keystrokes + 1, self.accepted + 1, self.saved + acc.typed_for_you - 1)

    @property
    def savings_rate(self) -> float:
        """Saved keystrokes over the keystrokes typing everything by hand would have taken."""
        total = self.keystrokes + self.saved
        return self.saved / total if total else 0.0
