"""The on-device engine on the tiny model's bundle: same suggestions as torch, state reuse, profiles, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedkey.errors import FedkeyError
from keyboard.bundle import INT8
from keyboard.predictor import Predictor
from keyboard.runtime import load_bundle, recent_text
from keyboard.torch_backend import TorchBackend
from keyboard.words import PieceTable
from tests.conftest import PHRASES, tiny_texts
from tests.test_export_bundle import BRITISH_USER, make_bundle


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, tiny_tok, tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("runtime"), tiny_model, tiny_tok)[0]


def words(sugg) -> list[str]:
    return [s.word for s in sugg]


def test_fp32_engine_suggests_what_the_torch_predictor_does(bundle_dir, tiny_model, tiny_tok):
    ref = Predictor(TorchBackend(tiny_model), PieceTable.from_tokenizer(tiny_tok), tiny_tok.encode)
    exact = load_bundle(bundle_dir, int8=False, cache=False)
    cached = load_bundle(bundle_dir, int8=False)
    for text in ["", "how are ", "how are yo", "what is your favorite ", "see you tomorrow at the p", "the weather is n",
                 "I like the Colo", "my favorite food is piz"]:
        want = ref.suggest(text)
        assert words(exact.suggest(text)) == words(want), text
        assert words(cached.suggest(text)) == words(want), text
        assert [s.prob for s in exact.suggest(text)] == pytest.approx([s.prob for s in want], rel=1e-3, abs=1e-6)


def test_typing_keeps_state_and_equals_a_fresh_run(bundle_dir, tiny_tok):
    text = "thank you so much for the help"
    live = load_bundle(bundle_dir)
    for i in range(len(text) + 1):
        last = live.suggest(text[:i])
    fresh = load_bundle(bundle_dir).suggest(text)
    assert words(last) == words(fresh)
    assert [s.prob for s in last] == pytest.approx([s.prob for s in fresh], rel=1e-4)

    p = load_bundle(bundle_dir)
    p.suggest("thank you so much for the ")
    before = p.steps_run
    p.suggest("thank you so much for the h")
    p.suggest("thank you so much for the he")
    assert p.steps_run == before  # mid-word keystrokes never re-run the message
    p.suggest("thank you so much for the help ")
    assert p.steps_run - before == len(tiny_tok.encode("help"))  # a finished word costs its own pieces only


def test_word_cache_agrees_with_searching_every_keystroke(bundle_dir):
    cached, exact = load_bundle(bundle_dir), load_bundle(bundle_dir, cache=False)
    same = top1 = n = 0
    for msg in tiny_texts(30, seed=5):
        for i in range(len(msg) + 1):
            a, b = words(cached.suggest(msg[:i])), words(exact.suggest(msg[:i]))
            same += a == b
            top1 += a[:1] == b[:1]
            n += 1
    assert top1 == n and same >= 0.97 * n
    assert cached.predictor.reused > 0.1 * n  # the cache did serve keystrokes
    assert cached.backend.steps < exact.backend.steps


def test_profiles_switch_adapters(bundle_dir):
    p = load_bundle(bundle_dir)
    assert p.profiles() == [(BRITISH_USER, "GB")] and p.profile is None
    assert p.model_name == INT8 and p.model_bytes == (bundle_dir / INT8).stat().st_size
    glob = words(p.suggest("i like the "))
    assert glob[0] == "color" and "colour" not in glob
    assert p.last_latency_ms > 0
    p.set_profile(BRITISH_USER)  # its user bias favours the British spelling
    mine = words(p.suggest("i like the "))
    assert p.profile == BRITISH_USER and "colour" in mine and mine[0] != "color"
    p.set_profile(None)
    assert p.profile is None and words(p.suggest("i like the ")) == glob
    assert words(load_bundle(bundle_dir, user=BRITISH_USER).suggest("i like the ")) == mine
    with pytest.raises(FedkeyError, match="no adapter"):
        p.set_profile("nobody")


def test_runtime_imports_and_runs_without_torch(bundle_dir):
    script = f"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now fails
from keyboard.runtime import load_bundle
p = load_bundle({str(bundle_dir)!r}, user={BRITISH_USER!r})
out = [s.word for s in p.suggest("i like the ")]
p.set_profile(None)
out += [s.word for s in p.suggest("how are yo")]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "datasets", "fedkey.pipeline") and sys.modules[m])
print(json.dumps({{"words": out, "heavy": heavy}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert "colour" in got["words"][:3] and got["words"][3] == "you"


def test_recent_text_window_is_stable():
    long = " ".join(PHRASES * 40)
    cut = recent_text(long)
    assert long.endswith(cut) and 256 <= len(cut) <= 512 and cut[0] != " "
    assert recent_text(long + "abc").startswith(cut[:100])  # typing on does not move the window
    assert recent_text("short text") == "short text"


def test_bundle_ships_a_lexicon_the_engine_keeps_to(tmp_path, tiny_model, tiny_tok):
    from keyboard.bundle import LEXICON
    from keyboard.words import collect_words

    words_ = [w for w in collect_words(PHRASES) if w != "color"]
    out, man = make_bundle(tmp_path, tiny_model, tiny_tok, with_adapter=False,
                           lexicon={"words": words_, "source": "test phrases", "min_count": 1})
    assert man["lexicon"] == {"words": len(words_), "source": "test phrases", "min_count": 1}
    assert (out / LEXICON).read_text().split() == sorted(words_)
    engine = load_bundle(out)
    assert "color" not in words(engine.suggest("what is your favorite ", k=5))
    assert all(w in words_ for w in words(engine.suggest("see you tomorrow at the ")))
    engine.suggest("my color is ")  # typed words are learned
    assert "color" in words(engine.suggest("what is your favorite ", k=5))


def test_shipped_spelling_preference_shows_the_users_own_variant(tmp_path, tiny_model, tiny_tok):
    from collections import Counter

    from data.british import REGIONAL_PAIRS
    from keyboard.bundle import RESPELL
    from keyboard.respell_file import unpack
    from personalization.spelling import preferences

    # a GB-locale user who typed both "color" and "colour": every pair British but that one
    own = {other: w for w, other in preferences(Counter({"colour": 1, "color": 1}), REGIONAL_PAIRS, 2, "GB")}
    assert own["favorite"] == "favourite" and "color" not in own and len(own) == len(REGIONAL_PAIRS) - 1
    out, man = make_bundle(tmp_path, tiny_model, tiny_tok, respellings={BRITISH_USER: own,
                                                                          "not-shipped": {"color": "colour"}},
                           pairs=REGIONAL_PAIRS)
    doc = json.loads((out / RESPELL).read_text())
    assert list(doc["users"]) == [BRITISH_USER] and unpack(doc, BRITISH_USER, "respell.json") == own
    assert len(json.dumps(doc["users"][BRITISH_USER])) < 100  # the pair list is stored once, not per user
    assert RESPELL in man["files"]
    engine = load_bundle(out)
    plain = engine.suggest("what is your f")
    assert "favorite" in words(plain)
    engine.set_profile(BRITISH_USER)
    got = engine.suggest("what is your f")
    assert "favourite" in words(got) and "favorite" not in words(got)
    assert "favorite" in words(engine.suggest("what is your favori"))  # typed past the split: the word as typed
    engine.set_profile(None)
    assert words(engine.suggest("what is your f")) == words(plain)


def test_merged_spelling_variants_leave_no_suggestion_slot_empty(tmp_path, tiny_model, tiny_tok):
    from keyboard.bundle import RESPELL
    from keyboard.respell_file import unpack

    plain_out, _ = make_bundle(tmp_path / "plain", tiny_model, tiny_tok)
    mine = load_bundle(plain_out, user=BRITISH_USER)
    wide = mine.suggest("what is your f", k=6)
    # a respelling that folds the profile's 2nd and 4th words into its 1st: two of the top three merge
    first = wide[0].word
    folded = {wide[1].word: first, wide[3].word: first}
    out, _ = make_bundle(tmp_path / "spelled", tiny_model, tiny_tok, respellings={BRITISH_USER: folded})
    assert unpack(json.loads((out / RESPELL).read_text()), BRITISH_USER, "respell.json") == folded
    engine = load_bundle(out, user=BRITISH_USER)
    got = engine.suggest("what is your f", k=3)
    assert words(got) == [first, wide[2].word, wide[4].word]  # the slots the merge freed are filled in order
    assert got[0].prob == pytest.approx(wide[0].prob + wide[1].prob + wide[3].prob)  # one word, all its variants' mass
    assert len(engine.suggest("what is your f", k=1)) == 1

