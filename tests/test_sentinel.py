"""The cache's sentinel: fitted on which changes were right, saved and refused like users' files, and applied
by the on-device runtime as by the report."""

from __future__ import annotations

import numpy as np
import pytest

from fedkey.errors import FedkeyError
from fedkey.stages import file_hash
from keyboard.bundle import SENTINEL
from keyboard.checkpoint import save_model
from keyboard.export import build_bundle
from keyboard.phrase_cache import PhraseCacheBackend, mix_logp, save_cache
from keyboard.predictor import Predictor
from keyboard.runtime import load_bundle
from keyboard.sentinel import N_EXTRA, Sentinel, load_sentinel, save_sentinel
from keyboard.torch_backend import TorchBackend
from keyboard.words import PieceTable
from keyboard.batches import frame
from keyboard.phrase_cache import PhraseCache
from tests.test_runtime_phrases import FAN, OWN, own_cache, words


def strong_cache(tok) -> PhraseCache:
    """The user's own messages with most of the weight: it changes top suggestions even of a tiny model."""
    return PhraseCache.build([frame(ids, 64) for ids in tok.encode_batch(OWN)], order=4, lam=0.9, m0=1.0)


def constant(d: int, vocab: int, threshold: float) -> Sentinel:
    """A sentinel that gives every change probability 0.5."""
    return Sentinel(np.zeros(d + N_EXTRA), 0.0, np.zeros(d + N_EXTRA), np.ones(d + N_EXTRA), threshold,
                    np.zeros(vocab, bool))


def test_sentinel_learns_which_changes_are_right_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8 + N_EXTRA))
    y = (X[:, 3] + 0.3 * rng.normal(size=600) > 0).astype(float)  # one feature tells right changes apart
    s = Sentinel.fit(X, y, threshold=0.6, starts=np.zeros(50, bool))
    passed = np.array([s.passes(x) for x in X])
    assert y[passed].mean() > 0.9 and passed.mean() > 0.3  # it lets through mostly right changes, not none
    save_sentinel(tmp_path / "s.npz", s, "a" * 64)
    back = load_sentinel(tmp_path / "s.npz", "a" * 64)
    assert [back.passes(x) for x in X] == passed.tolist() and back.threshold == 0.6
    with pytest.raises(FedkeyError, match="base model"):
        load_sentinel(tmp_path / "s.npz", "b" * 64)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FedkeyError, match="not a fedkey cache sentinel"):
        load_sentinel(tmp_path / "bad.npz")


def test_a_rejected_change_keeps_the_models_row(tiny_model, tiny_tok):
    cache = own_cache(tiny_tok)
    ids = tiny_tok.encode("see you at the")
    V, d = tiny_model.vocab_size, tiny_model.cfg.embed_dim
    rng = np.random.default_rng(1)
    logp = np.log(rng.dirichlet(np.ones(V), size=1)).astype(np.float32)
    hist = np.array([ids[-3:]])
    feats = rng.normal(size=(1, d))
    mixed = mix_logp(logp, [cache], hist)
    assert mixed[0].argmax() != logp[0].argmax()  # the cache changes this row's top piece
    assert np.array_equal(mix_logp(logp, [cache], hist, sentinel=constant(d, V, 0.4), feats=feats), mixed)
    assert np.array_equal(mix_logp(logp, [cache], hist, sentinel=constant(d, V, 0.9), feats=feats), logp)


def test_the_bundle_ships_the_sentinel_and_the_runtime_applies_it(tiny_model, tiny_tok, tmp_path):
    save_model(tmp_path / "model", tiny_model, tiny_tok)
    bid = file_hash(tmp_path / "model" / "model.pt")
    save_cache(tmp_path / "fan.npz", strong_cache(tiny_tok), bid, FAN)
    V, d = tiny_model.vocab_size, tiny_model.cfg.embed_dim
    save_sentinel(tmp_path / "strict.npz", constant(d, V, 0.9), bid)
    man = build_bundle(tmp_path / "model", tmp_path / "bundle", {FAN: (None, "US")},
                       caches={FAN: tmp_path / "fan.npz"}, sentinel=tmp_path / "strict.npz")
    assert SENTINEL in man["files"]
    table = PieceTable.from_tokenizer(tiny_tok)
    glob = Predictor(TorchBackend(tiny_model), table, tiny_tok.encode)
    open_cache = Predictor(PhraseCacheBackend(TorchBackend(tiny_model), strong_cache(tiny_tok)), table,
                           tiny_tok.encode)
    engine = load_bundle(tmp_path / "bundle", FAN, int8=False, cache=False)
    texts = ["", "see you ", "see you at the ", "thank you so much for the "]
    assert any(words(open_cache.suggest(t))[0] != words(glob.suggest(t))[0] for t in texts)
    strict = Predictor(PhraseCacheBackend(TorchBackend(tiny_model), strong_cache(tiny_tok), constant(d, V, 0.9)),
                       table, tiny_tok.encode)
    for t in texts:
        assert words(engine.suggest(t)) == words(strict.suggest(t)), t  # the device does what the report does
    # the sentinel held back changes the open cache makes
    assert any(words(engine.suggest(t)) != words(open_cache.suggest(t)) for t in texts)
    save_sentinel(tmp_path / "other.npz", constant(d, V, 0.9), "0" * 64)
    with pytest.raises(FedkeyError, match="base model"):
        build_bundle(tmp_path / "model", tmp_path / "b2", {FAN: (None, "US")}, caches={FAN: tmp_path / "fan.npz"},
                     sentinel=tmp_path / "other.npz")


def test_fit_reads_the_changes_a_users_cache_makes_on_their_validation_slice(tiny_model, tiny_tok):
    from personalization.config import PersonalConfig
    from personalization.data import UserData
    from personalization.sentinel_fit import fit_sentinel, user_changes

    # this user mostly thanks in their own way ("i" and "you" are one-piece words of the tiny tokenizer)
    own = (["thank i so much for the help"] * 3 + ["thank you so much for the help"]) * 6
    msgs = [frame(ids, 64) for ids in tiny_tok.encode_batch(own)]
    u = UserData("fan", "US", msgs[:-6], msgs[-6:], history=msgs, n_val_messages=6)
    cfg = PersonalConfig(cache_lam=0.9, cache_m0=1.0, sentinel_min_changes=1)
    table = PieceTable.from_tokenizer(tiny_tok)
    starts = np.zeros(tiny_model.vocab_size, bool)
    starts[table.start_space] = True
    cont = np.zeros(tiny_model.vocab_size, bool)
    cont[table.cont] = True
    X, y = user_changes(tiny_model, u, cfg, starts, cont)
    # the cache turns "you" into "i" after "thank" in each of the 6 validation messages: right 3 times in 4
    assert len(y) == 6 and 0.5 < np.mean(y) < 1
    assert all(x.shape == (tiny_model.cfg.embed_dim + N_EXTRA,) for x in X)
    s, info = fit_sentinel(tiny_model, [u], cfg, starts, cont)
    assert info["changes"] == len(y) and (s is None) == (len(set(y)) < 2)
    empty = UserData("quiet", "US", [], [], history=[], n_val_messages=0)
    assert user_changes(tiny_model, empty, cfg, starts, cont) == ([], [])
