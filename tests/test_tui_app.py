"""The terminal keyboard driven through Textual's Pilot, on a real exported int8 bundle.

The bundle: a tiny LSTM trained on chat phrases where "color" is common and "colour" rare (a few
British messages), exported by keyboard.export, with two users' adapters: a GB user whose user_bias
favours the "colour" piece, and a US user with a zero adapter.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fedkey.cli import main as fedkey_main
from fedkey.config import CentralConfig, ModelConfig
from fedkey.stages import file_hash
from keyboard.adapter_file import AdapterArrays, save_adapter
from keyboard.batches import frame
from keyboard.checkpoint import save_model
from keyboard.export import build_bundle
from keyboard.model import KeyboardLM
from keyboard.runtime import load_bundle
from keyboard.tokenizer import train_tokenizer
from keyboard.train import train_central
from tests.conftest import PHRASES
from tui.app import KeyboardApp
from tui.suggester import Suggester
from tui.widgets import CompareLine, StatusLine, SuggestionSlot

GB_USER, US_USER = "gb0c0ffee-1111", "us0decaf-2222"
BRITISH = ["i like the colour blue", "what is your favourite colour"]
ROOT = Path(__file__).resolve().parents[1]


def demo_texts(n: int = 600, british: float = 0.05, seed: int = 0) -> list[str]:
    """Chat phrases, a few of them with British spellings."""
    rng = random.Random(seed)
    return [rng.choice(BRITISH) if rng.random() < british else rng.choice(PHRASES) for _ in range(n)]


def user_adapter(model: KeyboardLM, base_id: str, user: str, bias: np.ndarray, region: str) -> AdapterArrays:
    d = model.cfg.embed_dim
    return AdapterArrays(A=np.zeros((d, 2), np.float32), B=np.zeros((2, d), np.float32), user_bias=bias,
                         base_id=base_id, user=user, meta={"region": region})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real int8 bundle with a GB user who prefers "colour" and a US user on the global model's words."""
    root = tmp_path_factory.mktemp("demo")
    texts = demo_texts()
    tok = train_tokenizer(texts, vocab_size=380, seed=0)
    assert len(tok.encode("colour")) == 1  # one piece, so the adapter's bias is on exactly that word
    torch.manual_seed(0)
    model = KeyboardLM(tok.vocab_size, ModelConfig(embed_dim=16, hidden=32))
    cfg = CentralConfig(lr=1e-2, batch_size=8, max_tokens=50_000, warmup_tokens=0, seed=0, threads=1)
    train_central(model, [frame(ids, 64) for ids in tok.encode_batch(texts)], cfg, root / "train")
    save_model(root / "model", model.eval(), tok)
    base_id = file_hash(root / "model" / "model.pt")
    gb_bias = np.zeros(tok.vocab_size, np.float32)
    gb_bias[tok.encode("colour")[0]] = 4.0
    adapters = {}
    for user, bias, region in ((GB_USER, gb_bias, "GB"), (US_USER, np.zeros_like(gb_bias), "US")):
        path = root / "personal" / f"{user}.npz"
        save_adapter(path, user_adapter(model, base_id, user, bias, region))
        adapters[user] = (path, region)
    build_bundle(root / "model", root / "export", adapters)
    return root / "export"


@pytest.fixture
def engine(bundle):
    return load_bundle(bundle)


async def settle(pilot) -> None:
    """Let every prediction worker finish and its answer reach the widgets."""
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def type_text(pilot, text: str) -> None:
    await pilot.press(*["space" if ch == " " else ch for ch in text])
    await settle(pilot)


def bar_words(app) -> list[str]:
    return [s.word for s in app.query(SuggestionSlot)]


def screen_text(app) -> str:
    """The screen as plain text, as a terminal shows it (what `tmux capture-pane -p` gives)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, force_terminal=True,
                      color_system=None, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True))  # the same render export_screenshot uses
    return console.export_text()


def test_typing_shows_suggestions_and_latency(engine):
    async def go():
        app = KeyboardApp(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            assert bar_words(app) == [s.word for s in engine.suggest("")]  # first words before any key
            await type_text(pilot, "i like the ")
            assert app.shown_for == "i like the " and bar_words(app)[0] == "color"  # the next word
            await type_text(pilot, "c")
            assert all(w.startswith("c") for w in bar_words(app))  # completing the word mid-word
            status = str(app.query_one(StatusLine).render())
            assert re.search(r"latency \d+\.\d ms/key", status) and app.latency_ms > 0
            assert f"int8 ONNX {engine.model_bytes / 1e6:.2f} MB" in status
            assert app.typing.keystrokes == len("i like the c")
    asyncio.run(go())


def test_tab_and_f_keys_accept_a_word_and_a_space(engine):
    async def go():
        app = KeyboardApp(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "i like the colo")
            first, second = bar_words(app)[:2]
            assert (first, second) == ("color", "colour")
            await pilot.press("tab")
            await settle(pilot)
            assert app.text_area.text == "i like the color "
            assert app.text_area.cursor_location == (0, len("i like the color "))
            await pilot.press("backspace", "backspace")  # back to "colo", mid-word
            await settle(pilot)
            assert app.text_area.text == "i like the colo"
            await pilot.press("f2")
            await settle(pilot)
            assert app.text_area.text == "i like the colour "
            t = app.typing
            assert t.accepted == 2 and t.keystrokes == 15 + 1 + 2 + 1
            assert t.saved == (len("r ") - 1) + (len("ur ") - 1)  # characters typed for you, less one key each
            # after the space the bar predicts the next word again
            assert app.shown_for == "i like the colour " and bar_words(app)[0] == "blue"
    asyncio.run(go())


def test_enter_starts_a_new_message_and_words_are_replaced_at_the_cursor(engine):
    async def go():
        app = KeyboardApp(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "i like the colo")
            await pilot.press("enter")
            await settle(pilot)
            fresh = load_bundle(engine.bundle.dir)
            assert app.shown_for == "" and bar_words(app) == [s.word for s in fresh.suggest("")]
            await type_text(pilot, "i like the cr blue")
            await pilot.press(*["left"] * len("r blue"))  # the cursor after "c", inside the word "cr"
            await settle(pilot)
            assert app.shown_for == "i like the c" and bar_words(app)[0] == "color"
            await pilot.press("tab")
            await settle(pilot)
            assert app.text_area.text == "i like the colo\ni like the color blue"
            assert app.text_area.cursor_location == (1, len("i like the color "))
    asyncio.run(go())


def test_clicking_a_suggestion_accepts_it(engine):
    async def go():
        app = KeyboardApp(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "see you tom")
            words = bar_words(app)
            assert words[0] == "tomorrow"
            assert await pilot.click("#slot1")
            await settle(pilot)
            assert app.text_area.text == "see you tomorrow "
            assert app.focused is app.text_area  # typing goes on without another click
    asyncio.run(go())


def test_gb_profile_completes_colo_as_colour(engine, bundle):
    async def go():
        app = KeyboardApp(engine, reference=load_bundle(bundle))
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "i like the colo")
            assert bar_words(app)[0] == "color"
            assert str(app.query_one(CompareLine).render()).startswith("global model; F4 switches")
            await pilot.press("f4")  # profiles: global, then GB users, then US users
            await settle(pilot)
            assert engine.profile == GB_USER and app.shown_for == "i like the colo"
            assert bar_words(app)[0] == "colour"  # same text, the GB user's adapter
            assert app.global_words[0] == "color" and app.suggester.reference.profile is None
            assert str(app.query_one(CompareLine).render()).startswith("same text, global model: color · ")
            await pilot.press("f4")
            await settle(pilot)
            assert engine.profile == US_USER and bar_words(app)[0] == "color"
            await pilot.press("f4")
            await settle(pilot)
            assert engine.profile is None and bar_words(app)[0] == "color"
            await pilot.press("tab")
            await settle(pilot)
            assert app.text_area.text == "i like the color "
    asyncio.run(go())


def test_starting_profile_and_profile_selector(bundle):
    async def go():
        app = KeyboardApp(load_bundle(bundle, user=GB_USER))
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "i like the colo")
            assert bar_words(app)[0] == "colour"
            await pilot.click("#profile")  # open the selector and pick the first entry, the global model
            await pilot.press("home", "enter")
            await settle(pilot)
            assert app.engine.profile is None and bar_words(app)[0] == "color"
            assert app.focused is app.text_area
    asyncio.run(go())


def test_a_broken_adapter_is_reported_and_the_global_model_stays(bundle, tmp_path):
    broken = tmp_path / "export"
    shutil.copytree(bundle, broken)
    (broken / "adapters" / f"{GB_USER}.npz").write_bytes(b"not an adapter")

    async def go():
        app = KeyboardApp(load_bundle(broken))
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await type_text(pilot, "i like the colo")
            await pilot.press("f4")
            await settle(pilot)
            return app.engine.profile, app.query_one("#profile").value, bar_words(app), screen_text(app)
    profile, selected, words, screen = asyncio.run(go())
    assert profile is None and selected == "" and words[0] == "color"
    assert "does not match the manifest" in " ".join(screen.split())  # the runtime's one-line error, as a toast


def test_stale_answers_are_dropped(engine):
    s = Suggester(engine)
    old, new = s.ticket(), s.ticket()
    assert s.predict(old, "i like the colo", None) is None  # superseded before it ran: the model is not asked
    p = s.predict(new, "i like the colo", GB_USER)
    assert p.words[0] == "colour" and engine.profile == GB_USER and p.latency_ms > 0



class SlowEngine:
    """The real engine with a slow suggest(), as on a weak phone: typing must not wait for it."""

    def __init__(self, engine, delay_s: float) -> None:
        self.engine, self.delay_s, self.asked = engine, delay_s, []

    def suggest(self, text: str, k: int = 3):
        self.asked.append(text)
        time.sleep(self.delay_s)
        return self.engine.suggest(text, k)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_typing_never_waits_for_the_model(engine):
    slow = SlowEngine(engine, delay_s=0.25)

    async def go():
        app = KeyboardApp(slow)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            t0 = time.perf_counter()
            await pilot.press(*["space" if ch == " " else ch for ch in "what is your"])
            typed_s = time.perf_counter() - t0
            text_then = app.text_area.text
            await settle(pilot)
            return typed_s, text_then, app.shown_for, bar_words(app)
    typed_s, text_then, shown_for, words = asyncio.run(go())
    assert text_then == "what is your"  # every key landed while the model was busy
    assert typed_s < 0.6 * 12 * 0.25  # much less than one model call per key
    # keystrokes superseded while the model was busy never reached it; the newest always did
    asked = slow.asked[1:]  # [0] is the empty text at start
    assert len(asked) < 12 and asked[-1] == "what is your" == shown_for
    assert all("what is your".startswith(a) and len(a) < len(b) for a, b in zip(asked, asked[1:]))
    assert words == [w.word for w in load_bundle(engine.bundle.dir).suggest("what is your")]


@pytest.mark.parametrize("key", ["escape", "ctrl+q"])
def test_quit_keys(engine, key):
    async def go():
        app = KeyboardApp(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "hi")
            assert app.return_code is None
            await pilot.press(key)
            await pilot.pause()
            return app.return_code
    assert asyncio.run(go()) == 0


NO_TORCH = """
import asyncio, json, sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not on a phone")


sys.meta_path.insert(0, NoTorch())
from argparse import Namespace
from pathlib import Path

from fedkey.commands import demo
from tui.widgets import SuggestionSlot


async def go():
    app = demo.make_app(Namespace(bundle=Path(sys.argv[1]), run_dir=None, user=None, fp32=False))
    async with app.run_test(size=(80, 24)) as pilot:
        for key in [*"i like the colo", "f4"]:
            await pilot.press("space" if key == " " else key)
        for _ in range(3):
            await pilot.pause()
            await app.workers.wait_for_complete()
        await pilot.pause()
        return [s.word for s in app.query(SuggestionSlot)], app.engine.profile, app.global_words


words, profile, global_words = asyncio.run(go())
print(json.dumps({"words": words, "profile": profile, "global_words": global_words,
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def test_demo_runs_without_torch(bundle):
    """The app, its command module and the runtime work where torch cannot be imported, as on a device."""
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"words": out["words"], "global_words": out["global_words"], "profile": GB_USER, "torch": []}
    assert out["words"][0] == "colour" and out["global_words"][0] == "color"


def test_no_bundle_says_how_to_make_one(tmp_path, capsys):
    assert fedkey_main(["demo", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedkey demo: error: no bundle at {tmp_path / 'run' / 'export'}; "
                   f"run `fedkey export --run-dir {tmp_path / 'run'}` first")


def test_unknown_user_is_one_line(bundle, capsys):
    assert fedkey_main(["demo", "--bundle", str(bundle), "--user", "nobody"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'nobody'" in err and GB_USER in err


def test_session_summary(engine):
    async def go():
        app = KeyboardApp(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "see you tom")
            await pilot.press("tab")
            await settle(pilot)
            return app.summary()
    s = asyncio.run(go())
    assert (s["keystrokes"], s["accepted"], s["saved_keystrokes"]) == (12, 1, len("orrow ") - 1)
    assert s["ksr"] == pytest.approx(1 - 12 / len("see you tomorrow "))
    assert s["model"] == "model.int8.onnx" and s["predictions"] >= 2 and 0 < s["latency_p50_ms"] <= s["latency_p99_ms"]


SNAPSHOT = """\
 fedkey on-device keyboard · profile: GB user gb0c0ffe                ▼
▊▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▔▎
▊ i like the colo                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊                                                                              ▎
▊▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▎
╭─ F1 / Tab ─────────────╮╭─ F2 ────────────────────╮╭─ F3 ────────────────────╮
│                        ││                         ││                         │
╰────────────────────────╯╰─────────────────────────╯╰─────────────────────────╯
 same text, global model: ...
 latency ?.? ms/key │ int8 ONNX 0.02 MB │ saved 0/15 keys (0%)
 Tab/F1-F3/click: take a word │ F4: next profile │ Enter: send │ Esc: quit
"""


def test_screen_at_80x24(engine, bundle):
    """The whole screen under the GB profile, as text.

    Measured latency digits are masked, and so are the suggested words once checked against the app's
    state: the tiny model's lower slots are near-ties between junk words that search changes may reorder;
    which words appear is tested above, this test pins the layout.
    """
    async def go():
        app = KeyboardApp(engine, reference=load_bundle(bundle))
        async with app.run_test(size=(80, 24)) as pilot:
            await type_text(pilot, "i like the colo")
            await pilot.press("f4")
            await settle(pilot)
            return screen_text(app), app.suggestions, app.global_words
    text, words, global_words = asyncio.run(go())
    lines = [line.rstrip() for line in text.splitlines()]
    bar = next(i for i, line in enumerate(lines) if line.startswith("╭─ F1 / Tab")) + 1
    assert re.findall(r"│\s*(\S+)\s*│", lines[bar]) == list(words) and words[0] == "colour"
    lines[bar] = re.sub(r"│(\s*)\S+(\s*)│", lambda m: "│" + " " * (len(m.group(0)) - 2) + "│", lines[bar])
    cmp = next(i for i, line in enumerate(lines) if "same text, global model: " in line)
    assert lines[cmp].split("global model: ")[1] == " · ".join(global_words) and global_words[0] == "color"
    lines[cmp] = lines[cmp].split(": ")[0] + ": ..."
    text = re.sub(r"latency +\d+\.\d", "latency ?.?", "\n".join(lines) + "\n")
    print(text)
    assert text == SNAPSHOT
