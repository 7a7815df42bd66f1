"""Tokenizer round trip, model shape and the stateful forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkey.config import ModelConfig
from fedkey.errors import FedkeyError
from keyboard.checkpoint import load_model, save_model
from keyboard.model import KeyboardLM
from keyboard.tokenizer import Tokenizer
from keyboard.torch_backend import TorchBackend


def test_tokenizer_round_trip_and_reload(tiny_tok, tmp_path):
    text = "how are you doing today? i like the color blue 😀"
    assert tiny_tok.decode(tiny_tok.encode(text)) == text  # byte fallback keeps the emoji
    tiny_tok.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.sha256 == tiny_tok.sha256 and again.encode(text) == tiny_tok.encode(text)


def test_tokenizer_bad_file(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(FedkeyError, match="bad.model"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(FedkeyError, match="prepare"):
        Tokenizer.load(tmp_path / "missing.model")


def test_gboard_size_model_has_about_1_4m_params():
    n = KeyboardLM(10_000).describe()["params"]
    assert 1.3e6 < n < 1.6e6


def test_stateful_forward_equals_whole_sequence():
    torch.manual_seed(0)
    model = KeyboardLM(50, ModelConfig(embed_dim=8, hidden=16)).eval()
    ids = torch.randint(0, 50, (3, 7))
    whole, _ = model(ids)
    state, steps = None, []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)


def test_backend_step_matches_model(tiny_model, tiny_tok):
    """The hand-written cell used for search equals nn.LSTM's own step."""
    backend = TorchBackend(tiny_model)
    ids = tiny_tok.encode("how are you")
    logp, h, c = backend.initial(1)
    for i in ids:
        logp, h, c = backend.step(np.array([i]), h, c)
    with torch.no_grad():
        logits, _ = tiny_model(torch.tensor([[1] + ids]))
    ref = torch.log_softmax(logits[0, -1], -1).numpy()
    np.testing.assert_allclose(logp[0], ref, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_and_foreign_tokenizer(tiny_model, tiny_tok, tmp_path):
    save_model(tmp_path / "m", tiny_model, tiny_tok)
    model, tok, _ = load_model(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()):
        assert torch.equal(a, b)
    from keyboard.tokenizer import train_tokenizer

    train_tokenizer(["something else entirely"] * 200 + ["another line of text"] * 200, 300).save(tmp_path / "m" / "tokenizer.model")
    with pytest.raises(FedkeyError, match="does not belong"):
        load_model(tmp_path / "m")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(FedkeyError, match="corrupt"):
        load_model(tmp_path)
