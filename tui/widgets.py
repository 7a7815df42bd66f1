"""The demo's small widgets: the suggestion bar and the status line. They show app state; they keep none."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from tui.state import Typing
from tui.suggester import SLOTS

SLOT_KEYS = ("F1", "F2", "F3")


class SuggestionSlot(Static):
    """One suggested word; clicking it accepts it."""

    DEFAULT_CSS = """
    SuggestionSlot {
        width: 1fr;
        height: 3;
        border: round $primary-muted;
        border-title-align: left;
        content-align: center middle;
        text-style: bold;
    }
    SuggestionSlot.first { border: round $accent; }
    SuggestionSlot:hover { background: $boost; }
    """

    word: reactive[str] = reactive("")

    def __init__(self, slot: int) -> None:
        super().__init__(id=f"slot{slot + 1}", classes="first" if slot == 0 else "")
        self.slot = slot
        self.border_title = SLOT_KEYS[slot] + (" / Tab" if slot == 0 else "")

    def watch_word(self, word: str) -> None:
        """Show the new word (a blank keeps the slot's height)."""
        self.update(word or " ")

    def on_click(self) -> None:
        """Take this slot's word."""
        if self.word:
            self.post_message(SuggestionBar.Chosen(self.slot))


class SuggestionBar(Horizontal):
    """Three suggestion slots, like the strip above a phone keyboard."""

    DEFAULT_CSS = """
    SuggestionBar { height: 3; }
    """

    words: reactive[tuple[str, ...]] = reactive(tuple)

    class Chosen(Message):
        """The person picked the word in `slot` (0-based)."""

        def __init__(self, slot: int) -> None:
            super().__init__()
            self.slot = slot

    def compose(self) -> ComposeResult:
        """One slot per suggestion."""
        for i in range(SLOTS):
            yield SuggestionSlot(i)

    def watch_words(self, words: tuple[str, ...]) -> None:
        """Fill the slots in order, blanking the rest."""
        for i, slot in enumerate(self.query(SuggestionSlot)):
            slot.word = words[i] if i < len(words) else ""


class CompareLine(Static):
    """Under a user's profile, what the global model suggests for the same text."""

    DEFAULT_CSS = """
    CompareLine { height: 1; padding: 0 1; color: $text-muted; }
    """

    global_words: reactive[tuple[str, ...] | None] = reactive(None)

    def render(self) -> str:
        """The global model's words for the same text, or a hint when none."""
        if self.global_words is None:
            return "global model; F4 switches to a user's personalized profile"
        return "same text, global model: " + " · ".join(self.global_words)


class StatusLine(Static):
    """Per-keystroke latency, the model in use and the keystrokes saved so far."""

    DEFAULT_CSS = """
    StatusLine { height: 1; padding: 0 1; background: $panel; }
    """

    latency_ms: reactive[float | None] = reactive(None)
    typing: reactive[Typing] = reactive(Typing)
    model: reactive[str] = reactive("")

    def render(self) -> str:
        """Latency, model and keystrokes saved, on one line."""
        lat = "--" if self.latency_ms is None else f"{self.latency_ms:.1f}"
        t = self.typing
        return (f"latency {lat} ms/key │ {self.model} │ "
                f"saved {t.saved}/{t.keystrokes + t.saved} keys ({100 * t.savings_rate:.0f}%)")
