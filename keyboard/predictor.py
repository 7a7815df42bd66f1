"""The Predictor every part of fedkey uses: typed text in, top-k whole-word suggestions out."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from keyboard.search import StepBackend, search_words
from keyboard.words import Lexicon, PieceTable, split_typed


@dataclass(frozen=True)
class Suggestion:
    """A whole word and the model's probability for it."""

    word: str
    prob: float


class Predictor:
    """Completes the word being typed or, after a space, predicts the next one.

    The LSTM state is kept per piece prefix of the message, so typing one more character
    re-runs nothing and finishing a word costs one step per new piece.
    """

    def __init__(self, backend: StepBackend, table: PieceTable, encode: Callable[[str], list[int]], beam: int = 6,
                 max_pieces: int = 6, max_context: int = 256, lexicon: Lexicon | None = None) -> None:
        self.backend, self.table, self.encode = backend, table, encode
        self.lexicon = lexicon  # None: any word the pieces spell
        self.beam, self.max_pieces = beam, max_pieces
        self._prefix: list[int] = []
        self._states: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [backend.initial(1)]
        self.max_context = max_context
        self.steps_run = 0  # pieces fed to the model: lets tests see that state is reused

    def _state_for(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = ids[-self.max_context:]  # a keyboard conditions on the recent message, bounding memory
        common = 0
        for a, b in zip(self._prefix, ids):
            if a != b:
                break
            common += 1
        del self._prefix[common:], self._states[common + 1:]
        for i in ids[common:]:
            _, h, c = self._states[-1]
            self._states.append(self.backend.step(np.array([i], dtype=np.int64), h, c))
            self._prefix.append(i)
            self.steps_run += 1
        return self._states[-1]

    def suggest(self, text: str, k: int = 3) -> list[Suggestion]:
        """Top-k whole words for the text typed so far (which may end mid-word)."""
        context, partial, space = split_typed(text)
        logp, h, c = self._state_for(self.encode(context) if context.strip() else [])
        found = search_words(self.backend, self.table, logp, h, c, [partial], [space],
                             k=k, beam=max(self.beam, k), max_pieces=self.max_pieces, lexicon=self.lexicon)[0]
        return [Suggestion(w, math.exp(s)) for w, s in found]
