"""A user's phrase cache on the device: shipped in the bundle, applied by the runtime, grown by what they send."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from fedkey.errors import FedkeyError
from fedkey.stages import file_hash
from keyboard.batches import frame
from keyboard.bundle import PROFILES, adapter_name, cache_name
from keyboard.checkpoint import save_model
from keyboard.export import build_bundle
from keyboard.phrase_cache import PhraseCache, PhraseCacheBackend, save_cache
from keyboard.predictor import Predictor
from keyboard.runtime import load_bundle
from keyboard.torch_backend import TorchBackend
from keyboard.words import PieceTable
from tests.test_export_bundle import BRITISH_USER, british_adapter

FAN = "phrase_fan"  # a user shipped for their phrase cache alone (their gate rejected the adapter)
OWN = ["see you at the store", "see you at the store", "thank you so much for the store"]


def own_cache(tok) -> PhraseCache:
    """The user's phrase cache, from their own messages, at the personalization defaults."""
    return PhraseCache.build([frame(ids, 64) for ids in tok.encode_batch(OWN)], order=4, lam=0.2, m0=5.0)


@pytest.fixture(scope="module")
def shipped(tiny_model, tiny_tok, tmp_path_factory):
    """A bundle with the British user's adapter and cache, and FAN's cache alone."""
    from keyboard.adapter_file import save_adapter

    root = tmp_path_factory.mktemp("phrases")
    save_model(root / "model", tiny_model, tiny_tok)
    bid = file_hash(root / "model" / "model.pt")
    save_adapter(root / "gb.npz", british_adapter(tiny_model, tiny_tok, bid))
    for user in (BRITISH_USER, FAN):
        save_cache(root / f"{user}.cache.npz", own_cache(tiny_tok), bid, user)
    man = build_bundle(root / "model", root / "bundle", {BRITISH_USER: (root / "gb.npz", "GB"), FAN: (None, "US")},
                       caches={u: root / f"{u}.cache.npz" for u in (BRITISH_USER, FAN)})
    return root, man


def words(sugg) -> list[str]:
    return [s.word for s in sugg]


def test_bundle_ships_phrase_caches_and_cache_only_users(shipped):
    root, man = shipped
    for user in (BRITISH_USER, FAN):
        assert cache_name(user) in man["files"]
    assert adapter_name(BRITISH_USER) in man["files"] and adapter_name(FAN) not in man["files"]
    assert json.loads((root / "bundle" / PROFILES).read_text()) == {BRITISH_USER: "GB", FAN: "US"}


def test_runtime_applies_the_cache_as_the_torch_path_does(shipped, tiny_model, tiny_tok):
    root, _ = shipped
    ref = Predictor(PhraseCacheBackend(TorchBackend(tiny_model), own_cache(tiny_tok)),
                    PieceTable.from_tokenizer(tiny_tok), tiny_tok.encode)
    glob = Predictor(TorchBackend(tiny_model), PieceTable.from_tokenizer(tiny_tok), tiny_tok.encode)
    engine = load_bundle(root / "bundle", FAN, int8=False, cache=False)
    changed = 0
    for text in ["", "see you ", "see you at the ", "thank you so much for the ", "how are yo"]:
        assert words(engine.suggest(text)) == words(ref.suggest(text)), text
        changed += words(ref.suggest(text)) != words(glob.suggest(text))
    assert changed  # the cache moves some suggestion (else this test would not see it applied)
    def p_store(pred) -> float:
        return {s.word: s.prob for s in pred.suggest("see you at the ", 16)}.get("store", 0.0)

    assert p_store(engine) > 1.5 * p_store(glob)  # what this user sent after these words before


def test_sent_messages_are_learned_by_the_profile_only(shipped):
    root, _ = shipped
    engine = load_bundle(root / "bundle", FAN)
    glob = load_bundle(root / "bundle")
    text = "i am going to the "

    def p_park(pred) -> float:
        return {s.word: s.prob for s in pred.suggest(text, 16)}.get("park", 0.0)

    before = p_park(engine)
    assert "park" not in words(engine.suggest(text))
    for _ in range(12):
        assert engine.learn("i am going to the park")
    assert "park" in words(engine.suggest(text)) and p_park(engine) > 0.05 > 10 * before
    engine.set_profile(None)
    assert not engine.learn("i am going to the park")  # the global model learns nothing
    assert words(engine.suggest(text)) == words(glob.suggest(text))
    engine.set_profile(FAN)  # what the profile learned survives switching away and back
    assert p_park(engine) > 0.05
    assert p_park(load_bundle(root / "bundle", FAN)) == pytest.approx(before)  # the bundle itself is untouched


def test_a_cache_for_another_model_or_user_is_refused(shipped, tiny_model, tiny_tok, tmp_path):
    root, _ = shipped
    save_cache(tmp_path / "other.npz", own_cache(tiny_tok), "0" * 64, FAN)
    with pytest.raises(FedkeyError, match="base model"):
        build_bundle(root / "model", tmp_path / "b1", {FAN: (None, "US")}, caches={FAN: tmp_path / "other.npz"})
    with pytest.raises(FedkeyError, match="not a shipped user"):
        build_bundle(root / "model", tmp_path / "b2", {}, caches={FAN: root / f"{FAN}.cache.npz"})
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()  # refused before writing anything


def test_enter_in_the_demo_sends_the_line_to_the_profile(shipped):
    from tests.test_tui_app import settle, type_text
    from tui.app import KeyboardApp

    root, _ = shipped

    async def go(profile):
        app = KeyboardApp(load_bundle(root / "bundle", profile))
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(2):
                await type_text(pilot, "see you at the park")
                await pilot.press("enter")
                await settle(pilot)
            return app.learned, app.summary()["learned_lines"]

    assert asyncio.run(go(FAN)) == (2, 2)
    assert asyncio.run(go(None)) == (0, 0)


def _ceiling_inputs(tok):
    """Word-start and continuation masks of the tokenizer, and 30 copies of one phrase, framed."""
    import numpy as np

    table = PieceTable.from_tokenizer(tok)
    starts = np.zeros(tok.vocab_size, bool)
    starts[table.start_space] = True
    cont = np.zeros(tok.vocab_size, bool)
    cont[table.cont] = True
    return starts, cont, [frame(ids, 64) for ids in tok.encode_batch(["you the the you park help blue store"] * 30)]


def test_phrase_ceiling_counts_what_each_arm_gets_right(tiny_model, tiny_tok):
    from fedkey.bench.phrase_ceiling import user_counts
    from personalization.config import PersonalConfig

    starts, cont, framed = _ceiling_inputs(tiny_tok)
    cfg = PersonalConfig(cache_lam=0.9, cache_m0=0.1)
    # nothing of it in train: the shipped cache is empty, the learning one knows the phrase from the 2nd message on
    got = user_counts(tiny_model, cfg, starts, cont, [], framed)
    assert got["cache"] == got["global"] < got["cache_learning"] <= got["words"]
    assert got["oracle"] == got["global"]  # the oracle judges the shipped cache
    learned = user_counts(tiny_model, cfg, starts, cont, framed, framed)
    assert learned["cache"] == learned["cache_learning"] == learned["oracle"] == learned["words"]


def test_phrase_ceiling_counts_the_likeliest_word_not_a_message_end():
    """The keyboard shows its likeliest word even where the model ranks the message's end first."""
    from fedkey.bench.phrase_ceiling import _right

    starts = np.array([False, False, True, True])  # pieces 2 and 3 start words; 1 is the end of the message
    p = np.array([0.0, 0.6, 0.3, 0.1])
    assert _right(p, 2, starts) == 1 and _right(p, 3, starts) == 0 and p.argmax() == 1


def test_phrase_ceiling_dynamic_arm_learns_the_sent_messages_and_leaves_the_base_alone(tiny_model, tiny_tok):
    import torch

    from fedkey.bench.phrase_ceiling import user_counts
    from personalization.config import PersonalConfig

    starts, cont, framed = _ceiling_inputs(tiny_tok)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    off = user_counts(tiny_model, PersonalConfig(), starts, cont, [], framed)
    assert "dynamic" not in off
    got = user_counts(tiny_model, PersonalConfig(), starts, cont, [], framed, dynamic_lr=0.5, dynamic_pre=0)
    assert got["global"] == off["global"] < got["dynamic"] <= got["words"]
    # the same messages as train: the record over all 30 counts each before it is learned, as the test arm did
    rec = user_counts(tiny_model, PersonalConfig(), starts, cont, framed, framed[:1], dynamic_lr=0.5, dynamic_pre=30)
    assert rec["pre_words"] == got["words"] and rec["pre_global"] == got["global"]
    assert rec["pre_dynamic"] == got["dynamic"] and rec["pre_dynamic_cache"] == got["dynamic_cache"]
    assert rec["pre_cache_learning"] == got["cache_learning"]
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))  # each user adapts a copy


def test_cache_counts_every_context_as_counting_piece_by_piece_would(tiny_tok):
    from collections import Counter, defaultdict

    from tests.conftest import PHRASES

    seqs = [frame(ids, 64) for ids in tiny_tok.encode_batch(PHRASES + OWN)] + [[1], []]  # and messages too short
    for order in (2, 4, 6):
        counted: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for s in seqs:
            for t in range(1, len(s)):
                for k in range(1, min(order - 1, t) + 1):
                    counted[tuple(s[t - k:t])][s[t]] += 1
        cache = PhraseCache.build(seqs, order, 0.2, 5.0)
        # contexts and their pieces in the order they are first met: the file's rows, and so its size, follow it
        assert list(cache.table) == list(counted)
        assert {c: list(zip(ids.tolist(), n.tolist())) for c, (ids, n) in cache.table.items()} == \
            {c: list(cnt.items()) for c, cnt in counted.items()}
        again = PhraseCache.from_arrays(cache.to_arrays())
        assert list(again.table) == list(counted)
        assert all((again.table[c][0] == cache.table[c][0]).all() and (again.table[c][1] == cache.table[c][1]).all()
                   for c in counted)
    assert PhraseCache.build([[1], []], 4, 0.2, 5.0).table == {}
