"""The terminal keyboard: type, see three whole-word suggestions per keystroke, take one, switch profiles.

All state lives on `KeyboardApp` (reactives the widgets are bound to); the model is behind
`tui.suggester.Suggester`, run on worker threads so typing never waits for it.
"""

from __future__ import annotations

import statistics

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Label, Select, Static, TextArea

from fedkey.errors import FedkeyError
from tui.state import Typing, accept
from tui.suggester import Engine, Prediction, Suggester
from tui.widgets import CompareLine, StatusLine, SuggestionBar

GLOBAL = ""  # the profile selector's value for the global model (the engine's None)
HELP = "Tab/F1-F3/click: take a word │ F4: next profile │ Enter: send │ Esc: quit"


def profile_label(user: str, region: str) -> str:
    """A short name for a shipped user (ids are UUIDs)."""
    return f"{region} user {user[:8]}"


def model_label(engine: Engine) -> str:
    """Which model answers, e.g. "int8 ONNX 1.45 MB" (model.int8.onnx) or "fp32 ONNX 5.60 MB" (model.onnx)."""
    kind = "int8 ONNX" if "int8" in engine.model_name else "fp32 ONNX"
    return f"{kind} {engine.model_bytes / 1e6:.2f} MB"


class KeyboardApp(App):
    """Suggestions as you type from the on-device model, for the global model or a user's adapter."""

    TITLE = "fedkey keyboard"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #top { height: 1; }
    #top Label { padding: 0 1; }
    #profile { width: 34; }
    #text { height: 1fr; }
    #help { height: 1; padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("tab", "take(0)", "take 1st", priority=True, show=False),
        # F-keys, not Ctrl/Alt+digit: terminals do not send Ctrl+digit, and Textual reads Alt+digit
        # (ESC + digit) as the macOS Option characters ¡ ™ £
        *(Binding(f"f{i + 1}", f"take({i})", f"take word {i + 1}", priority=True, show=False) for i in range(3)),
        Binding("f4", "next_profile", "next profile", priority=True, show=False),
        Binding("escape", "quit", "quit", show=False),
    ]

    suggestions: reactive[tuple[str, ...]] = reactive(tuple)
    global_words: reactive[tuple[str, ...] | None] = reactive(None)
    latency_ms: reactive[float | None] = reactive(None)
    typing: reactive[Typing] = reactive(Typing)
    profile: reactive[str | None] = reactive(None, init=False)

    class Predicted(Message):
        """A worker's answer."""

        def __init__(self, prediction: Prediction) -> None:
            super().__init__()
            self.prediction = prediction

    class Failed(Message):
        """A worker's one-line error (e.g. an adapter that does not load)."""

        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def __init__(self, engine: Engine, reference: Engine | None = None) -> None:
        """`reference`: a second engine on the global model; with it a user's profile also shows the global words."""
        super().__init__()
        self.engine = engine
        self.suggester = Suggester(engine, reference)
        self.set_reactive(KeyboardApp.profile, engine.profile)
        self.shown_for: str | None = None  # the text the shown suggestions were made for
        self.latencies: list[float] = []  # every shown prediction's model time, for the session summary
        self._asked: tuple[str, str | None] | None = None
        self._own_edits = 0  # acceptances whose text change is still to arrive: those are not keystrokes
        self._lines = 1  # the text's line count: Enter at the end of a line sends that line
        self.learned = 0  # sent lines the profile's phrase cache took

    def compose(self) -> ComposeResult:
        """The profile picker, the text, the suggestion bar, the global comparison, status and help."""
        options = [("global model", GLOBAL)] + [
            (profile_label(u, r), u) for u, r in sorted(self.engine.profiles(), key=lambda ur: (ur[1], ur[0]))]
        self._profile_values = [v for _, v in options]
        with Horizontal(id="top"):
            yield Label("[b]fedkey[/b] on-device keyboard · profile:")
            yield Select(options, value=self.profile or GLOBAL, allow_blank=False, compact=True, id="profile")
        yield TextArea(id="text", soft_wrap=True, placeholder="Type here; suggestions appear below.")
        yield SuggestionBar().data_bind(words=KeyboardApp.suggestions)
        if self.suggester.reference is not None:
            yield CompareLine().data_bind(KeyboardApp.global_words)
        yield StatusLine().data_bind(KeyboardApp.latency_ms, KeyboardApp.typing)
        yield Static(HELP, id="help")

    def on_mount(self) -> None:
        """Show the model, focus the text and ask for the first suggestions."""
        self.query_one(StatusLine).model = model_label(self.engine)
        self.text_area.focus()
        self.request()

    @property
    def text_area(self) -> TextArea:
        """The text being typed."""
        return self.query_one("#text", TextArea)

    def before_cursor(self) -> str:
        """The current line up to the cursor: the message being typed."""
        row, col = self.text_area.cursor_location
        return self.text_area.document.get_line(row)[:col]

    def after_cursor(self) -> str:
        """The rest of the current line."""
        row, col = self.text_area.cursor_location
        return self.text_area.document.get_line(row)[col:]

    # asking the model

    def request(self) -> None:
        """Ask for suggestions for the text before the cursor, unless that was just asked."""
        asked = (self.before_cursor(), self.profile)
        if asked == self._asked:
            return
        self._asked = asked
        self._predict(self.suggester.ticket(), *asked)

    @work(thread=True, group="predict")
    def _predict(self, ticket: int, text: str, profile: str | None) -> None:
        try:
            found = self.suggester.predict(ticket, text, profile)
        except FedkeyError as e:
            self.post_message(self.Failed(str(e)))
            return
        if found is not None:
            self.post_message(self.Predicted(found))

    def on_keyboard_app_predicted(self, message: Predicted) -> None:
        """Show an answer unless a newer keystroke has asked since."""
        p = message.prediction
        if not self.suggester.is_current(p.ticket):
            return  # a newer keystroke's answer is on its way
        self.suggestions, self.latency_ms, self.shown_for = p.words, p.latency_ms, p.text
        self.global_words = p.global_words
        self.latencies.append(p.latency_ms)

    def on_keyboard_app_failed(self, message: Failed) -> None:
        """Say what failed and fall back to the profile that works."""
        self.notify(message.error, severity="error", timeout=8)
        self.query_one("#profile", Select).value = self.engine.profile or GLOBAL  # back to what works

    # typing and taking words

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        """Count the keystroke, learn a line sent with Enter and ask again."""
        if self._own_edits:  # each edit posts exactly one Changed, in order
            self._own_edits -= 1
        else:
            self.typing = self.typing.typed()
        lines = self.text_area.document.line_count
        row, col = self.text_area.cursor_location
        if lines > self._lines and row > 0 and col == 0:  # Enter finished the line above: the message is sent
            self._learn(self.text_area.document.get_line(row - 1), self.profile)
        self._lines = lines
        self.request()

    @work(thread=True, group="learn")
    def _learn(self, message: str, profile: str | None) -> None:
        try:
            self.learned += self.suggester.learn(message, profile)
        except FedkeyError as e:
            self.post_message(self.Failed(str(e)))

    def on_text_area_selection_changed(self, event: TextArea.SelectionChanged) -> None:
        """A moved cursor has new text before it: ask again."""
        self.request()

    def action_take(self, slot: int) -> None:
        """Put suggestion `slot` in place of the partial word, followed by a space."""
        if slot >= len(self.suggestions):
            return
        ta = self.text_area
        acc = accept(self.before_cursor(), self.suggestions[slot], self.after_cursor())
        row, col = ta.cursor_location
        self._own_edits += 1
        ta.replace(acc.insert, (row, col - acc.before), (row, col + acc.after), maintain_selection_offset=False)
        self.typing = self.typing.accept(acc)
        ta.focus()

    def on_suggestion_bar_chosen(self, message: SuggestionBar.Chosen) -> None:
        """A clicked suggestion is taken like its key."""
        self.action_take(message.slot)

    # profiles

    def action_next_profile(self) -> None:
        """Cycle through the global model and the shipped users."""
        select = self.query_one("#profile", Select)
        values = self._profile_values
        select.value = values[(values.index(select.value) + 1) % len(values)]

    def on_select_changed(self, event: Select.Changed) -> None:
        """Switch to the picked profile and return to typing."""
        self.profile = event.value or None
        self.text_area.focus()

    def watch_profile(self) -> None:
        """Another profile suggests differently: ask again."""
        self.request()

    def summary(self) -> dict:
        """The session's figures (for `fedkey demo --json`)."""
        lat = sorted(self.latencies)
        t = self.typing
        return {"model": self.engine.model_name, "model_bytes": self.engine.model_bytes,
                "profile": self.engine.profile, "keystrokes": t.keystrokes, "accepted": t.accepted,
                "saved_keystrokes": t.saved, "ksr": t.savings_rate, "predictions": len(lat), "learned_lines": self.learned,
                "latency_p50_ms": statistics.median(lat) if lat else None,
                "latency_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}
