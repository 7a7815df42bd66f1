"""The app's one door to the model: the engine interface it needs, and stale-proof requests from worker threads.

The engine is `keyboard.runtime.OnDevicePredictor` (int8 ONNX, no torch); anything with the same
members works, which is how the app could be pointed at another runtime.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from keyboard.predictor import Suggestion

SLOTS = 3


class Engine(Protocol):
    """What the app uses of the on-device runtime."""

    model_name: str
    model_bytes: int
    last_latency_ms: float

    @property
    def profile(self) -> str | None:
        """The user whose adapter is applied, None for the global model."""
        ...

    def profiles(self) -> list[tuple[str, str]]:
        """(user id, region) of every shipped user profile."""
        ...

    def set_profile(self, user_id: str | None) -> None:
        """Apply that user's adapter (None: the global model)."""
        ...

    def suggest(self, text: str, k: int = 3) -> list[Suggestion]:
        """The top k words for the text typed so far."""
        ...

    def learn(self, message: str) -> bool:
        """Let the profile's phrase cache learn a sent message; whether it did."""
        ...


@dataclass(frozen=True)
class Prediction:
    """The answer to one request: the words for `text` under `profile`, and how long the model took."""

    ticket: int
    text: str
    profile: str | None
    words: tuple[str, ...]
    latency_ms: float
    global_words: tuple[str, ...] | None = None  # the global model's words for the same text, beside a user's


class Suggester:
    """Runs requests on worker threads, one at a time, answering only the newest.

    Every keystroke takes a ticket on the UI thread. A worker holding an older ticket skips the model
    entirely (a newer keystroke superseded it), and the UI drops any answer that is no longer the
    newest, so typing fast never queues stale work nor shows stale words. The engine's caches are
    not thread-safe; the lock makes the workers take turns.
    """

    def __init__(self, engine: Engine, reference: Engine | None = None) -> None:
        self.engine = engine
        self.reference = reference  # a second engine kept on the global model, to show what personalization changed
        self._lock = threading.Lock()
        self._latest = 0

    def ticket(self) -> int:
        """A new request number (UI thread); every earlier one becomes stale."""
        self._latest += 1
        return self._latest

    def is_current(self, ticket: int) -> bool:
        """Whether no newer request was made since `ticket`."""
        return ticket == self._latest

    def learn(self, message: str, profile: str | None) -> bool:
        """Let `profile` learn a sent message (worker thread); whether its phrase cache took it."""
        with self._lock:
            if self.engine.profile != profile:
                self.engine.set_profile(profile)
            return self.engine.learn(message)

    def predict(self, ticket: int, text: str, profile: str | None) -> Prediction | None:
        """The top words for `text` under `profile` (worker thread); None if the request went stale."""
        with self._lock:
            if not self.is_current(ticket):
                return None
            if self.engine.profile != profile:
                self.engine.set_profile(profile)
            words = tuple(s.word for s in self.engine.suggest(text, SLOTS))
            latency = self.engine.last_latency_ms
            if profile is None or self.reference is None:
                return Prediction(ticket, text, profile, words, latency)
            return Prediction(ticket, text, profile, words, latency,
                              tuple(s.word for s in self.reference.suggest(text, SLOTS)))
