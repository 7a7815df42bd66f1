"""Personalization on tiny real models: a British user's spelling survives, the gate protects, files round-trip."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from fedkey.cli import main
from fedkey.config import CentralConfig, EvalConfig, ModelConfig
from fedkey.errors import FedkeyError
from keyboard.adapter_file import AdapterArrays, load_adapter, save_adapter
from keyboard.batches import frame
from keyboard.checkpoint import save_model
from keyboard.evaluate import Message, evaluate
from keyboard.model import KeyboardLM
from keyboard.predictor import Predictor
from keyboard.torch_backend import TorchBackend
from keyboard.train import train_central
from keyboard.words import PieceTable, respell, split_typed
from personalization.batched import Positions, UserResult, step_nll, train_adapters
from personalization.config import PersonalConfig
from personalization.data import UserData, split_user
from personalization.evaluate import AdapterBank, evaluate_users, regional_accuracy
from personalization.model import PersonalizedLM
from personalization.report import mean_interval
from personalization.spelling import attach_spelling, first_piece, preferences, spelling_bias
from personalization.store import load_personalized, save_results
from tests.conftest import PHRASES
from tests.test_fl_fixtures import tiny_run  # noqa: F401  (fixture)

BRITISH = ["i like the colour blue", "what is your favourite colour"]


def words(model, tok, text: str) -> list[str]:
    return [s.word for s in Predictor(TorchBackend(model), PieceTable.from_tokenizer(tok), tok.encode).suggest(text)]


def user_data(tok, user: str, texts: list[str], cfg: PersonalConfig, region: str = "GB"):
    return split_user(user, region, tok.encode_batch(texts), cfg.val_frac, cfg.max_len, cfg.max_train_tokens,
                      cfg.max_val_tokens)


def starts_of(tok) -> torch.Tensor:
    s = torch.zeros(tok.vocab_size, dtype=torch.bool)
    s[torch.from_numpy(PieceTable.from_tokenizer(tok).start_space)] = True
    return s


def british_texts(n: int = 60) -> list[str]:
    """A user who writes like everyone else, except that every color is a colour."""
    rng = np.random.default_rng(0)
    return [BRITISH[i % 2] if i % 3 == 0 else PHRASES[rng.integers(len(PHRASES))].replace("color", "colour")
            for i in range(n)]


@pytest.fixture(scope="module")
def fed_model(tiny_tok, tmp_path_factory) -> KeyboardLM:
    """A tiny model of a mostly American federation: one message in eight spells colour the British way."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    texts = [PHRASES[i] for i in rng.integers(len(PHRASES), size=400)]
    texts = [t.replace("color", "colour").replace("favorite", "favourite") if k % 8 == 0 else t for k, t in enumerate(texts)]
    model = KeyboardLM(tiny_tok.vocab_size, ModelConfig(embed_dim=16, hidden=48))
    cfg = CentralConfig(lr=1e-2, batch_size=8, max_tokens=60_000, warmup_tokens=0, seed=0)
    train_central(model, [frame(ids, 64) for ids in tiny_tok.encode_batch(texts)], cfg, tmp_path_factory.mktemp("fed"))
    return model.eval()


def with_words(ud, texts: list[str]):
    """The user's train words (the validation slice left out), as load_users counts them."""
    from collections import Counter

    from keyboard.words import WORD_RE

    ud.words = Counter(w for t in texts[: len(texts) - len(ud.val)] for w in WORD_RE.findall(t))
    return ud


def british_user(fed_model, tiny_tok, cfg: PersonalConfig, user: str = "brit") -> tuple[UserResult, UserData]:
    """The British user personalized under `cfg`: their result and their UserData (spelling bias, respelling)."""
    ud = with_words(user_data(tiny_tok, user, british_texts(), cfg), british_texts())
    attach_spelling([ud], tiny_tok, fed_model.out_bias.detach().numpy(), PAIRS, cfg)
    return train_adapters(fed_model, [ud], cfg, starts_of(tiny_tok))[0], ud


@pytest.fixture(scope="module")
def brit(fed_model, tiny_tok):
    # the tiny model has memorised its phrases: its color/colour gap is wider than the default penalty. Without
    # respelling the preference is all in the model (the other variant pushed down), as a runtime that does not
    # respell would get it
    return british_user(fed_model, tiny_tok, PersonalConfig(steps=40, regional_penalty=8.0, regional_respell=False))[0]


def test_british_user_gets_colour_first(fed_model, tiny_tok, brit):
    for context in ("i like the ", "what is your favorite "):
        assert words(fed_model, tiny_tok, context)[0] == "color"  # the federation's spelling
    pm = PersonalizedLM(fed_model, torch.from_numpy(brit.A), torch.from_numpy(brit.B), torch.from_numpy(brit.user_bias))
    for context in ("i like the ", "what is your favorite "):
        got = words(pm, tiny_tok, context)
        assert "colour" in got and ("color" not in got or got.index("colour") < got.index("color")), (context, got)
    assert brit.use_adapter  # the trained adapter, or the spelling preference alone if the adapter did not help
    # the base is untouched: personalization adds layers, it does not train the shared model
    assert words(fed_model, tiny_tok, "i like the ")[0] == "color"


def test_gate_keeps_global_without_useful_data(fed_model, tiny_tok):
    cfg = PersonalConfig(steps=30)
    rng = np.random.default_rng(1)
    noise = ["".join(rng.choice(list("qxzjvkw"), 12)) for _ in range(40)]  # nothing the validation slice resembles
    users = [user_data(tiny_tok, "one_message", ["how are you doing today"], cfg, "US"),
             user_data(tiny_tok, "noise", noise[:36] + PHRASES[:4], cfg, "US"),
             user_data(tiny_tok, "light_noise", noise[:18] + PHRASES[4:6], cfg, "US")]
    one, noisy, light = train_adapters(fed_model, users, cfg, starts_of(tiny_tok))
    assert light.extra["val_words"] < cfg.gate_min_words and light.cache is None  # judged by the loss: no help
    assert not one.use_adapter and one.reason == "no validation slice"
    assert not noisy.use_adapter and "did not improve" in noisy.reason or "worse" in noisy.reason
    assert one.cache is None and noisy.cache is None  # no phrase cache either: the global model as it is


def test_gate_needs_enough_validation_words_to_keep_a_trained_adapter():
    from personalization.gate import decide

    cfg = PersonalConfig()
    z = np.zeros((16, 8), dtype=np.float32)

    def result(n_words: int) -> UserResult:  # loss down 10%, 2 more words right: what the gate asks for
        return UserResult("u", "US", z, z.T, np.zeros(50, np.float32), 500, 60, 4.0, 3.6, 10, False, "",
                          {"val_words": n_words, "val_top1_global": 3, "val_top1_personal": 5})

    assert decide(result(40), cfg) == (True, "validation improved")
    kept, why = decide(result(11), cfg)
    assert not kept and why == "validation slice too small to judge (11 one-piece words)"
    assert decide(result(11), PersonalConfig(gate_min_words=0))[0]


def test_cache_gate_judges_a_light_writers_slice_by_its_loss():
    from personalization.gate import decide_cache

    z = np.zeros((16, 8), dtype=np.float32)

    def result(n_words: int, nll_cache: float, top1_cache: int) -> UserResult:  # global: loss 4.0, 3 words right
        return UserResult("u", "US", z, z.T, np.zeros(50, np.float32), 500, 60, 4.0, 4.0, 10, False, "",
                          {"val_words": n_words, "val_top1_global": 3, "val_nll_cache": nll_cache,
                           "val_top1_cache": top1_cache})

    def keep(r: UserResult, cfg: PersonalConfig) -> bool:
        return decide_cache(r, cfg)[0]

    cfg = PersonalConfig()
    # a slice too small for top-1 to judge: the loss decides, either way
    assert keep(result(12, 3.8, 3), cfg) and not keep(result(12, 4.1, 4), cfg)
    assert decide_cache(result(12, 4.1, 4), cfg)[1] == "validation loss not lower (slice too small for top-1)"
    # a slice big enough: cache_gate_top1 more words right (2 by default) at no higher loss, as before
    assert not keep(result(40, 3.8, 4), cfg) and keep(result(40, 3.8, 5), cfg)
    assert decide_cache(result(40, 3.8, 4), cfg)[1] == "validation top-1 +1 words (needs +2)"
    assert decide_cache(result(40, 4.1, 5), cfg) == (False, "validation loss higher")
    one = PersonalConfig(cache_gate_top1=1)
    assert not keep(result(40, 3.8, 3), one) and keep(result(40, 3.8, 4), one)
    assert not keep(result(12, 3.8, 3), PersonalConfig(cache_small_slice_loss=False))


def test_validation_is_the_latest_tenth_of_train(tiny_tok):
    cfg = PersonalConfig()
    texts = [f"message number {i}" for i in range(30)]
    ud = user_data(tiny_tok, "u", texts, cfg)
    assert len(ud.val) == 3 and ud.val[-1] == frame(tiny_tok.encode(texts[-1]), cfg.max_len)
    assert ud.train[-1] == frame(tiny_tok.encode(texts[26]), cfg.max_len)


def test_adapter_round_trip_and_size(fed_model, tiny_tok, brit, tmp_path):
    run = tmp_path / "run"
    save_model(run / "central", fed_model, tiny_tok)
    from personalization.store import base_id
    bid = base_id(run / "central")
    sizes = save_results(run, [brit], bid, run / "central")
    model, _, info = load_personalized(run, None, "brit")
    assert info["personalized"] and sizes["brit"] == (run / "personal" / "adapters" / "brit.npz").stat().st_size
    ids = torch.tensor([tiny_tok.encode("i like the colour blue")])
    direct = PersonalizedLM(fed_model, torch.from_numpy(brit.A), torch.from_numpy(brit.B), torch.from_numpy(brit.user_bias))
    assert torch.equal(model(ids)[0], direct(ids)[0])
    # a Gboard-size adapter (vocab 8000, 96-d, rank 8) stays under the 100 KB target
    rng = np.random.default_rng(0)
    big = AdapterArrays(rng.normal(size=(96, 8)), rng.normal(size=(8, 96)), rng.normal(size=8000), "x" * 64, "u", {})
    assert save_adapter(tmp_path / "big.npz", big) <= 100_000
    back = load_adapter(tmp_path / "big.npz")
    assert np.array_equal(back.user_bias, big.user_bias.astype(np.float32)) and back.A.shape == (96, 8)


def test_adapter_for_another_base_is_refused(fed_model, tiny_tok, brit, tmp_path):
    run = tmp_path / "run"
    save_model(run / "central", fed_model, tiny_tok)
    from personalization.store import base_id
    save_results(run, [brit], base_id(run / "central"), run / "central")
    torch.manual_seed(5)
    other = KeyboardLM(tiny_tok.vocab_size, ModelConfig(embed_dim=16, hidden=48))
    seqs = [frame(ids, 64) for ids in tiny_tok.encode_batch(PHRASES * 4)]
    train_central(other, seqs, CentralConfig(lr=1e-2, batch_size=8, max_tokens=500, warmup_tokens=0), tmp_path / "o")
    save_model(run / "other", other, tiny_tok)
    with pytest.raises(FedkeyError, match="trained on base model .* re-run `fedkey personalize`"):
        load_personalized(run, run / "other", "brit")
    # the gate's own record is tied to the base too: a decision made for another model is not reused
    save_results(run, [], base_id(run / "other"), run / "other")
    with pytest.raises(FedkeyError, match="no decision for user 'brit'"):
        load_personalized(run, run / "other", "brit")


def test_hand_written_gradients_match_autograd():
    torch.manual_seed(0)
    U, T, K, d, r, V = 3, 7, 11, 5, 2, 20
    E = torch.randn(V, d, dtype=torch.float64)
    S = torch.stack([torch.randperm(V)[:K] for _ in range(U)])
    Y = torch.randint(0, V, (U, T))
    lookup = torch.full((U, V), -1).scatter_(1, S, torch.arange(K).expand(U, K).contiguous())
    dbl = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    pos = Positions(dbl(U, T, d), torch.rand(U, T) > 0.2, dbl(U, T, K), lookup.gather(1, Y), dbl(U, T), E[Y],
                    dbl(U, T), dbl(U, T, d), torch.zeros(U, T, dtype=torch.float64))
    A, B, ub, w = dbl(U, d, r), 0.3 * dbl(U, r, d), 0.3 * dbl(U, K), torch.rand(U, T, dtype=torch.float64)
    nll, (dA, dB, dub, _) = step_nll(pos, E[S], A, B, ub, w)
    A2, B2, ub2 = (x.clone().requires_grad_() for x in (A, B, ub))
    a = torch.bmm(pos.F, A2)
    g = torch.bmm(a, B2)
    logits = pos.base_S + ub2[:, None] + torch.bmm(a, torch.bmm(B2, E[S].transpose(1, 2)))
    lse = torch.logaddexp(torch.logsumexp(logits, -1), pos.tail + (g * pos.tail_mean).sum(-1))
    in_S = pos.y_pos >= 0
    tgt = torch.where(in_S, logits.gather(2, pos.y_pos.clamp(min=0)[..., None])[..., 0], pos.base_y + (g * pos.E_y).sum(-1))
    ((lse - tgt) * pos.mask * w).sum().backward()
    assert torch.allclose(nll, (lse - tgt).detach() * pos.mask)
    for mine, ref in ((dA, A2.grad), (dB, B2.grad), (dub, ub2.grad)):
        assert torch.allclose(mine, ref, atol=1e-10)


def test_batched_evaluation_equals_evaluate(fed_model, tiny_tok, brit):
    msgs = [Message("brit", "GB", t) for t in BRITISH * 2] + [Message("yank", "US", t) for t in PHRASES[:6]]
    cfg = EvalConfig(ksr_messages=3)
    pairs = {"color": "colour", "favorite": "favourite"}
    glob, pers = evaluate_users(fed_model, [AdapterBank(fed_model, {}), AdapterBank(fed_model, {"brit": UserResult_arrays(brit)})],
                                tiny_tok, msgs, cfg, pairs)
    ref = evaluate(fed_model, tiny_tok, msgs, cfg, pairs)
    assert glob["pooled"] == ref["pooled"] and glob["per_user"] == ref["per_user"]
    pm = PersonalizedLM.from_arrays(fed_model, UserResult_arrays(brit))
    ref_brit = evaluate(pm, tiny_tok, [m for m in msgs if m.user == "brit"], cfg, pairs)
    assert pers["per_user"]["brit"]["top1"] == ref_brit["per_user"]["brit"]["top1"]
    assert pers["per_user"]["yank"] == glob["per_user"]["yank"]  # no adapter: the global model
    assert pers["per_user"]["brit"]["regional_acc"] > glob["per_user"]["brit"]["regional_acc"]


def UserResult_arrays(r: UserResult) -> AdapterArrays:  # noqa: N802
    return AdapterArrays(r.A, r.B, r.user_bias, "x", r.user, {})


PAIRS = {"color": "colour", "favorite": "favourite", "colors": "colours"}


def test_spelling_preferences_from_own_words():
    from collections import Counter

    # typed one way only: that pair; typed both ways: no preference
    assert preferences(Counter({"colour": 3, "favorite": 1, "favourite": 1}), PAIRS, 0) == [("colour", "color")]
    # enough British words and no American ones: every pair the British way
    got = preferences(Counter({"colour": 2}), PAIRS, 2)
    assert set(got) == {("colour", "color"), ("favourite", "favorite"), ("colours", "colors")}
    # a mixed user generalizes nothing; a stray variant gives way to the user's majority
    assert preferences(Counter({"colour": 2, "favorite": 2}), PAIRS, 2) == [("colour", "color"), ("favorite", "favourite")]
    assert preferences(Counter({"colour": 1, "favorite": 5}), PAIRS, 2) == [("favorite", "favourite")]


@pytest.fixture(scope="module")
def brit_respelled(fed_model, tiny_tok):
    """The British user as shipped: suggestions respelled, so the American variant is lifted over, not pushed down."""
    return british_user(fed_model, tiny_tok, PersonalConfig(steps=40))


def test_respelled_suggestions_show_colour_where_the_global_model_shows_color(fed_model, tiny_tok, brit_respelled):
    r, ud = brit_respelled
    assert ud.respell["color"] == "colour" and ud.spelling and min(ud.spelling.values()) > 0  # nothing pushed down
    pm = PersonalizedLM.from_arrays(fed_model, UserResult_arrays(r))
    for context in ("i like the ", "i like the c", "i like the colo"):
        assert words(fed_model, tiny_tok, context)[0] == "color", context  # the federation's spelling
        shown = respell(words(pm, tiny_tok, context), ud.respell, split_typed(context)[1])
        assert shown[0] == "colour" and "color" not in shown, (context, shown)


def test_spelling_bias_touches_only_specific_first_pieces(fed_model, tiny_tok):
    ob = fed_model.out_bias.detach().numpy()
    sb = spelling_bias([("colour", "color")], tiny_tok, ob, 4.0, 3.0)
    pc, pu = first_piece(tiny_tok, "color"), first_piece(tiny_tok, "colour")
    assert pc is not None and sb[pc] == -4.0
    assert pu is None or pu == pc or 0 < sb[pu] <= 3.0
    # "the" is the first piece of "theatre": too short to push down for an American-spelling user
    assert first_piece(tiny_tok, "theatre") is None or len(tiny_tok.encode("theatre")) == 1
    assert spelling_bias([("colour", "color")], tiny_tok, ob, 0.0, 3.0) == {}


def test_spelling_alone_when_the_adapter_is_rejected(fed_model, tiny_tok):
    """A margin no adapter can meet rejects the trained one; the spelling alone only has to do no harm."""
    r, ud = british_user(fed_model, tiny_tok, PersonalConfig(steps=0, regional_penalty=8.0, gate_margin=0.5), "brit0")
    assert r.use_adapter and r.reason.startswith("spelling preference only"), r.reason
    assert not r.B.any()
    pm = PersonalizedLM(fed_model, torch.from_numpy(r.A), torch.from_numpy(r.B), torch.from_numpy(r.user_bias))
    got = respell(words(pm, tiny_tok, "i like the "), ud.respell)  # as the keyboard shows them
    assert got[0] == "colour" and "color" not in got, got


def test_regional_accuracy_after_the_shared_prefix(fed_model, tiny_tok, brit):
    msgs = [Message("brit", "GB", t) for t in BRITISH] + [Message("yank", "US", "i like the color blue")]
    banks = [AdapterBank(fed_model, {}), AdapterBank(fed_model, {"brit": UserResult_arrays(brit)})]
    cfg = EvalConfig()
    (plain_g, plain_p), (pre_g, pre_p), (off_g, off_p) = regional_accuracy(fed_model, banks, tiny_tok, msgs, cfg,
                                                                           PAIRS, typed_prefix=True)
    assert [plain_g, plain_p] == regional_accuracy(fed_model, banks, tiny_tok, msgs, cfg, PAIRS)  # one pass, same figures
    # 2 colour positions and one favourite ("favo" typed); the adapter at least fixes the colours
    assert pre_g["GB"]["n"] == 3 and pre_g["GB"]["acc"] < pre_p["GB"]["acc"] and pre_p["GB"]["acc"] >= 2 / 3
    assert pre_g["US"]["acc"] == pre_p["US"]["acc"] == 1.0  # no adapter for the American user
    # as typed: the global model offers "color" first, the personalized one "colour"
    assert off_g["GB"]["n"] == 3 and off_g["GB"]["acc"] < off_p["GB"]["acc"] and off_p["GB"]["acc"] >= 2 / 3


def test_first_offer_judges_the_first_keystroke_showing_either_variant():
    from personalization.evaluate import _first_offer

    res = {(0, 1, 0): ["the", "a", "my"], (0, 1, 1): ["colour", "cold", "color"], (0, 1, 2): ["color", "colour"]}
    assert _first_offer(res, (0, 1), "colour", "colour", "color") == ["colour", "cold", "color"]
    res[(0, 1, 1)] = ["cold", "call", "cool"]
    assert _first_offer(res, (0, 1), "co", "colour", "color") == []  # never offered before the word was typed
    assert _first_offer(res, (0, 1), "col", "colour", "color") == ["color", "colour"]


WEATHER = "i like the weather"  # the federation says "i like the color": this user's own phrase differs


def test_phrase_cache_mixes_own_continuations(tiny_tok, tmp_path):
    from keyboard.phrase_cache import PhraseCache, histories, load_cache, mix_logp, save_cache

    seqs = [frame(ids, 64) for ids in tiny_tok.encode_batch([WEATHER] * 5)]
    cache = PhraseCache.build(seqs, order=4, lam=0.5, m0=1.0)
    V = tiny_tok.vocab_size
    logp = np.full((2, V), -np.log(V))
    s = seqs[0]
    t = len(s) - 3  # the input before "weather"'s first piece ... and an unseen history
    hist = np.vstack([histories([s], [(0, t)], 3), np.array([[-1, -1, tiny_tok.encode("pizza")[0]]])])
    mixed = mix_logp(logp, [cache, cache], hist)
    assert np.allclose(np.exp(mixed).sum(1), 1.0)
    assert mixed[0, s[t + 1]] > np.log(0.5) and np.array_equal(mixed[1], logp[1])  # unseen context: unchanged
    path = tmp_path / "u.npz"
    save_cache(path, cache, "base-a", "u")
    back = load_cache(path, "base-a")
    assert np.array_equal(mix_logp(logp[:1], [back], hist[:1]), mixed[:1])
    with pytest.raises(FedkeyError, match="another base|made for base model"):
        load_cache(path, "base-b")


def test_gated_cache_suggests_the_users_phrase(fed_model, tiny_tok):
    cfg = PersonalConfig(steps=5, cache_lam=0.5)
    ud = user_data(tiny_tok, "fan", [WEATHER, "how are you doing today"] * 20, cfg, "US")
    r = train_adapters(fed_model, [ud], cfg, starts_of(tiny_tok))[0]
    assert r.cache is not None and r.extra["val_nll_cache"] < r.val_global  # the validation slice says it helps
    msgs = [Message("fan", "US", WEATHER), Message("other", "US", WEATHER)]
    glob, pers = evaluate_users(fed_model, [AdapterBank(fed_model, {}), AdapterBank(fed_model, {}, {"fan": r.cache})],
                                tiny_tok, msgs, EvalConfig(ksr_messages=0))
    assert glob["per_user"]["fan"]["top1"] < 1.0 and pers["per_user"]["fan"]["top1"] == 1.0
    assert pers["per_user"]["other"] == glob["per_user"]["other"]  # no cache: the global model


def test_light_writer_keeps_a_cache_that_lowers_validation_loss(fed_model, tiny_tok):
    cfg = PersonalConfig(steps=5, cache_lam=0.5)
    ud = user_data(tiny_tok, "light_fan", [WEATHER, "how are you doing today"] * 5, cfg, "US")
    r = train_adapters(fed_model, [ud], cfg, starts_of(tiny_tok))[0]
    assert r.extra["val_words"] < cfg.gate_min_words and r.extra["val_nll_cache"] < r.val_global
    assert r.cache is not None
    off = train_adapters(fed_model, [ud], PersonalConfig(steps=5, cache_lam=0.5, cache_small_slice_loss=False),
                         starts_of(tiny_tok))[0]
    assert off.cache is None  # top-1 on so few words does not move


def test_heavy_writer_keeps_the_cache_whatever_one_slice_says(fed_model, tiny_tok):
    from dataclasses import replace

    # years of one phrase, then a latest tenth of other messages: the slice alone would turn the cache down
    later = ["park blue store you the help", "store help you blue the park", "you the park help store blue",
             "blue you help the park store"]
    cfg = PersonalConfig(steps=5, cache_lam=0.5, max_train_tokens=40, cache_keep_pieces=0)
    ud = user_data(tiny_tok, "heavy", [WEATHER] * 36 + later, cfg, "US")
    n = ud.text_tokens  # every message the device holds, not only the latest max_train_tokens it trains on
    assert n > ud.train_tokens + ud.val_tokens
    gated = train_adapters(fed_model, [ud], cfg, starts_of(tiny_tok))[0]
    assert gated.cache is None and gated.extra["text_tokens"] == n
    assert gated.extra["cache_reason"].startswith("validation")  # what the slice said, saved in gate.json
    kept = train_adapters(fed_model, [ud], replace(cfg, cache_keep_pieces=n), starts_of(tiny_tok))[0]
    assert kept.cache is not None and kept.extra["cache_reason"] == f"{n:,} pieces of text, at least {n:,}"
    assert train_adapters(fed_model, [ud], replace(cfg, cache_keep_pieces=n + 1), starts_of(tiny_tok))[0].cache is None


def test_replayed_cache_answers_each_message_with_what_was_sent_before_it(fed_model, tiny_tok):
    from keyboard.phrase_cache import PhraseCache, ReplayCache

    own = [frame(ids, 64) for ids in tiny_tok.encode_batch(["how are you doing today"] * 3)]
    later = [frame(ids, 64) for ids in tiny_tok.encode_batch(["park blue store you the help"] * 4)]
    replay = ReplayCache.replay(PhraseCache.build(own, 4, 0.5, 1.0), later)
    rng = np.random.default_rng(0)
    for j in range(len(later) + 1):  # message j sees the cache plus messages 0..j-1, as learn() would give it
        grown = PhraseCache.build(own, 4, 0.5, 1.0)
        for s in later[:j]:
            grown.learn(s)
        for t in range(1, len(later[0])):
            p = rng.dirichlet(np.ones(tiny_tok.vocab_size))
            assert np.allclose(replay.mix_row(p.copy(), later[0][:t], j), grown.mix_row(p.copy(), later[0][:t]))
    # evaluated in order, the scrambled phrase is right from its second sending on, and only with learning
    msgs = [Message("fan", "US", "park blue store you the help")] * 4
    cache = PhraseCache.build(own, 4, 0.5, 1.0)
    glob, static, learning = evaluate_users(
        fed_model, [AdapterBank(fed_model, {}), AdapterBank(fed_model, {}, {"fan": cache}),
                    AdapterBank(fed_model, {}, {"fan": cache}, sent={"fan": later})],
        tiny_tok, msgs, EvalConfig(ksr_messages=0))
    assert static["per_user"]["fan"]["top1"] == glob["per_user"]["fan"]["top1"] < 0.5
    assert learning["per_user"]["fan"]["top1"] > glob["per_user"]["fan"]["top1"] + 0.3


def test_regional_outcomes_say_where_the_own_variant_stood():
    from personalization.evaluate import OUTCOMES, _outcome

    got = [_outcome("colour", "color", s) for s in (["colour", "color"], ["the", "colour"], ["color", "colour"],
                                                    ["color", "red"], ["red", "blue", "green", "colour"])]
    assert got == list(OUTCOMES)


def test_fedper_comparison_refuses_an_unprepared_run(tmp_path, capsys):
    assert main(["bench", "fedper", "--run-dir", str(tmp_path), "--users", "4"]) == 2
    err = capsys.readouterr().err
    assert "no prepared data" in err and len(err.strip().splitlines()) == 1


def test_fedper_adapter_arm_serves_each_user_their_own_local_layer(fed_model, tiny_tok):
    from fl_core.params import ParamSpec
    from keyboard.tokenizer import BOS
    from personalization.fedper import ADAPTER_LOCAL, AdaptedLM, _local_adapters

    ada = AdaptedLM(fed_model, 4, seed=0)
    spec = ParamSpec.of(ada, ADAPTER_LOCAL.split(","))
    assert sorted(e.name for e in spec.local) == ["adapter_A", "adapter_B", "out_bias"]  # the rest is federated
    flat = spec.flatten(dict(ada.named_parameters()))
    g = torch.Generator().manual_seed(0)
    own = flat[spec.n_shared:] + 0.3 * torch.randn(spec.n_total - spec.n_shared, generator=g)  # one device's copy
    device = spec.load_into(AdaptedLM(fed_model, 4, seed=0), torch.cat([flat[: spec.n_shared], own]))
    shared = ada.shared_model()
    arrays = _local_adapters(spec, {"u": own, "never selected": None}, shared)
    assert list(arrays) == ["u"]
    x = torch.tensor([[BOS] + tiny_tok.encode("what is your favorite color")])
    with torch.no_grad():  # the user's adapter file over the shared model answers as their device's model did
        torch.testing.assert_close(PersonalizedLM.from_arrays(shared, arrays["u"])(x)[0], device(x)[0])
        assert not torch.allclose(shared(x)[0], device(x)[0], atol=1e-3)


def test_locale_fills_in_where_the_users_own_words_say_nothing():
    pairs = {"color": "colour", "favorite": "favourite"}
    assert preferences(Counter(), pairs, 2) == []
    assert sorted(preferences(Counter(), pairs, 2, "GB")) == [("colour", "color"), ("favourite", "favorite")]
    # the user's own words win over the locale
    assert preferences(Counter({"color": 3}), pairs, 5, "GB") == [("color", "colour")]


def test_respelling_shows_the_users_own_variant_once():
    from keyboard.words import respell

    m = {"color": "colour", "organized": "organised"}
    assert respell(["color", "red", "colour"], m) == ["colour", "red"]
    assert respell(["organized", "organ"], m, "organ") == ["organised", "organ"]
    assert respell(["color"], m, "colo") == ["colour"] and respell(["color"], m, "color") == ["color"]  # typed past the split


def test_report_respells_each_query_and_names_those_whose_variants_merged():
    from keyboard.evaluate import _Query
    from personalization.evaluate import respell_results

    msgs = [Message("brit", "GB", "my colour"), Message("yank", "US", "my color")]
    parsed = {0: ([(1, "my", True), (2, "colour", True)], ""), 1: ([(1, "my", True), (2, "color", True)], "")}
    qs = [_Query(0, 1, 0), _Query(0, 1, 4), _Query(1, 1, 0)]
    results = {(0, 1, 0): ["color", "colour", "red"], (0, 1, 4): ["colors", "color", "colon"], (1, 1, 0): ["color", "colour", "red"]}
    merged = respell_results(qs, results, {"brit": {"color": "colour", "colors": "colours"}}, msgs, parsed)
    assert merged == [qs[0]]  # only there did two words become one: the report searches it again for a third
    assert results[(0, 1, 0)] == ["colour", "red"] and results[(0, 1, 4)] == ["colours", "colour", "colon"]
    assert results[(1, 1, 0)] == ["color", "colour", "red"]  # a user without a preference keeps the model's words
    results[(0, 1, 0)] = ["color", "colour", "red", "blue"]  # the wider search's answer
    assert respell_results([qs[0]], results, {"brit": {"color": "colour"}}, msgs, parsed) == []
    assert results[(0, 1, 0)] == ["colour", "red", "blue"]


def test_phrase_cache_cap_keeps_only_the_latest_messages():
    from keyboard.phrase_cache import PhraseCache

    old, new = [1, 5, 6, 2], [1, 7, 8, 2]  # framed: BOS ... EOS
    full = PhraseCache.build([old, new], order=3, lam=0.2, m0=5.0)
    capped = PhraseCache.build([old, new], order=3, lam=0.2, m0=5.0, max_pieces=4)
    assert (5,) in full.table and (7,) in full.table
    assert (5,) not in capped.table and (7,) in capped.table  # the older message no longer fits
    assert len(capped) < len(full)


def colour_odds(model, tok, context: str = "i like the ") -> float:
    p = {s.word: s.prob for s in Predictor(TorchBackend(model), PieceTable.from_tokenizer(tok), tok.encode).suggest(context, k=5)}
    return p.get("colour", 0.0) / p["color"]


def test_fine_tuning_arms_learn_colour_touch_only_their_layers_and_are_gated(fed_model, tiny_tok):
    from personalization.finetune import LAST_PARAMS, finetune_user

    cfg = PersonalConfig(steps=40, gate_top1_gain=0, gate_min_words=0)  # a validation slice of 8 words: the loss decides
    cont = torch.zeros(tiny_tok.vocab_size, dtype=torch.bool)
    cont[torch.from_numpy(PieceTable.from_tokenizer(tiny_tok).cont)] = True
    ud = user_data(tiny_tok, "brit", british_texts(), cfg)
    before = {n: p.detach().clone() for n, p in fed_model.named_parameters()}
    for mode in ("last", "full"):
        r = finetune_user(fed_model, ud, cfg, mode, starts_of(tiny_tok), cont)
        assert r.use_adapter and r.model is not None and r.val_personal < r.val_global, (mode, r.reason)
        odds = colour_odds(r.model, tiny_tok)
        assert odds > 5 * colour_odds(fed_model, tiny_tok), (mode, odds)  # from 0.08 (last: ~0.7, full: ~1.3)
        if mode == "full":
            assert odds > 1  # colour above color
        changed = {n for n, p in r.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == set(LAST_PARAMS) if mode == "last" else len(changed) == len(before), (mode, changed)
    assert all(torch.equal(p, before[n]) for n, p in fed_model.named_parameters())  # the global model is untouched
    one = finetune_user(fed_model, user_data(tiny_tok, "one", ["how are you doing today"], cfg, "US"), cfg, "full",
                        starts_of(tiny_tok), cont)
    assert one.model is None and not one.use_adapter and one.reason == "no validation slice"


def test_personal_modes_bench_gives_one_line_errors(tmp_path, capsys):
    from fedkey.cli import main

    assert main(["bench", "personal_modes", "--run-dir", str(tmp_path), "--arms", "adapter,everything"]) == 2
    assert "--arms 'adapter,everything': choose among adapter, last, full" in capsys.readouterr().err
    assert main(["bench", "personal_modes", "--run-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_personalize_command_reports_and_reuses_its_result(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train-central", "--run-dir", str(run), "--embed-dim", "8", "--hidden", "12", "--max-tokens", "3000",
                 "--no-progress"]) == 0
    argv = ["personalize", "--run-dir", str(run), "--no-progress", "--eval-ksr-messages", "20", "--threads", "1"]
    assert main([*argv, "--json", str(tmp_path / "p.json")]) == 0
    rep = json.loads((tmp_path / "p.json").read_text())
    gate = json.loads((run / "personal" / "gate.json").read_text())
    assert rep["use_cache"] == {u: e["use_cache"] for u, e in gate.items()}
    assert all(e["cache_reason"] for e in gate.values())  # why each cache was kept or not, beside the adapter's reason
    # every locale user's spelling preference covers the whole pair list, stored as their way of spelling
    from data.british import REGIONAL_PAIRS
    from personalization.store import gate_respelling

    for e in gate.values():
        assert e["respell"]["way"] == e["region"] and len(json.dumps(e["respell"])) < 1000, e["respell"]
        assert len(gate_respelling(e)) > 0.9 * len(REGIONAL_PAIRS)
    gains = list(rep["top1_gain_per_user"].values())
    assert rep["changes"]["mean_top1_gain_ci95"] == mean_interval(gains) and len(gains) >= 2
    out = capsys.readouterr().out
    assert "95% interval" in out and "train pieces" in out
    # each user's amount of train text, and the gain split by it: every compared user in exactly one band
    assert set(rep["text_of"]) == set(gate) and all(rep["text_of"][u] >= gate[u]["train_tokens"] for u in gate)
    by_text = rep["changes"]["by_text"]
    assert sum(c["users"] for c in by_text.values()) == len(gains)
    assert sum(c["mean_top1_gain"] * c["users"] for c in by_text.values()) == pytest.approx(sum(gains))
    # a report saved before the interval, use_cache and the amounts of text were recorded: the saved run is
    # reused, its figures completed (the amounts counted again from the prepared data)
    saved = json.loads((run / "personal" / "report.json").read_text())
    del saved["use_cache"], saved["changes"]["mean_top1_gain_ci95"], saved["text_of"], saved["changes"]["by_text"]
    (run / "personal" / "report.json").write_text(json.dumps(saved))
    assert main([*argv, "--json", str(tmp_path / "again.json")]) == 0
    assert "already personalized" in capsys.readouterr().out
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["use_cache"] == rep["use_cache"] and again["changes"] == rep["changes"]
    assert again["text_of"] == rep["text_of"]
    # one user by name: the tables, then what their gate decided about each part and why
    user = sorted(gate)[0]
    assert main([*argv, "--user", user, "--no-eval"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    e = json.loads((run / "personal" / "gate.json").read_text())[user]
    assert f"{user}: adapter {'kept' if e['use_adapter'] else 'not kept'}: {e['reason']}" in out
    assert f"phrase cache {'kept' if e['use_cache'] else 'not kept'}: {e['cache_reason']}" in out
