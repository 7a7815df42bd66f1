"""Shared tiny federated setups (a real prepared run with a tiny corpus and model), and checks of the task glue."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkey.config import ModelConfig, PrepareConfig
from fedkey.fl_task import KeyboardTask, lane_lm_loss, pack_lanes
from fedkey.pipeline import load_prepared, prepare_stage
from fl_core.config import FleetConfig, FLConfig
from fl_core.params import ParamSpec
from keyboard.batches import frame
from keyboard.model import KeyboardLM
from keyboard.tokenizer import BOS, PAD
from tests.conftest import PHRASES

TINY_MODEL = ModelConfig(embed_dim=8, hidden=12)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread (a busy 2-core box makes 2-thread barriers slow)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_corpus(path: Path, n_users: int = 30, seed: int = 0) -> Path:
    """Users with different amounts of chat built from the shared phrases (some users write a lot)."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        n = rng.choice([6, 10, 25, 60])
        for k in range(n):
            words = rng.choice(PHRASES).split()
            text = " ".join(words[: rng.randint(2, len(words))])
            rows.append({"user": f"user{u:02d}", "text": text, "timestamp": f"2021-03-01T{k // 60:02d}:{k % 60:02d}:00Z"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A prepared run dir (shards + tokenizer) of the tiny corpus."""
    root = tmp_path_factory.mktemp("flrun")
    cfg = PrepareConfig(corpus=str(tiny_corpus(root / "chat.jsonl")), min_words=5, vocab_size=300)
    prepare_stage(root / "run", cfg, progress=False)
    return root / "run"


def fl_cfg(**kw) -> FLConfig:
    """Small, fast federated settings for tests."""
    base = dict(max_tokens=10**9, max_rounds=3, clients_per_round=4, max_messages=12, batch_size=4,
                eval_every=0, client_lr=0.5, server_opt="sgd", server_lr=1.0, workers=2, lanes=3, pretrain_epochs=0.0)
    return FLConfig(**{**base, **kw})


def fleet_cfg(**kw) -> FleetConfig:
    """A fleet where everyone is available and nothing fails unless asked."""
    return FleetConfig(**{**dict(availability=False, overselect=1.0, dropout=0.0, deadline_s=1e9), **kw})


def tiny_task(run: Path, model: KeyboardLM | None = None, **kw) -> tuple[KeyboardTask, KeyboardLM]:
    """The keyboard task over the tiny run with a tiny model."""
    shards, tok = load_prepared(run)
    torch.manual_seed(0)
    model = model or KeyboardLM(tok.vocab_size, TINY_MODEL)
    opts = {**dict(batch_size=4, max_messages=12, max_len=64), **kw}
    return KeyboardTask(shards, tok, model, **opts), model


def random_batches(rng: np.random.Generator, sizes: list[int], vocab: int = 40) -> list[list[list[int]]]:
    """Framed messages of random lengths, one batch per size."""
    return [[[BOS] + rng.integers(4, vocab, rng.integers(1, 12)).tolist() + [2] for _ in range(n)] for n in sizes]


def test_packing_keeps_every_token_once():
    rng = np.random.default_rng(0)
    batches = random_batches(rng, [5, 1, 9])
    x, tgt, pos, n = pack_lanes(batches)
    for lane, b in enumerate(batches):
        real = sorted(t for s in b for t in s[1:])
        assert sorted(tgt[lane][tgt[lane] != PAD].tolist()) == real
        inputs = x[lane].reshape(-1)[pos[lane][tgt[lane] != PAD]]
        assert sorted(inputs.tolist()) == sorted(t for s in b for t in s[:-1])
        assert int((x[lane] == BOS).sum()) == len(b)  # one state reset per message
    assert n == max(sum(len(s) - 1 for s in b) for b in batches)


@pytest.mark.parametrize("rank", [0, 3])
def test_packed_lane_loss_equals_nn_lstm_loss_and_gradients(tiny_run, rank):
    task, model = tiny_task(tiny_run)
    if rank:  # FedPer's local residual adapter on the LSTM output (personalization.fedper)
        from personalization.fedper import AdaptedLM

        model = AdaptedLM(model, rank, seed=0)
        with torch.no_grad():
            model.adapter_B.normal_(0, 0.3)  # B starts at zero: make the adapter change something
        task, _ = tiny_task(tiny_run, model=model)
    spec = ParamSpec.of(model)
    flat = spec.flatten(dict(model.named_parameters()))
    batches = random_batches(np.random.default_rng(1), [3, 7, 1, 4], vocab=model.vocab_size)
    stack = {n: v.unsqueeze(0).repeat(len(batches), *[1] * v.dim()).clone().requires_grad_()
             for n, v in spec.views(flat).items()}
    lane = lane_lm_loss(stack, batches)
    lane_grads = torch.autograd.grad(lane.sum(), list(stack.values()))
    for i, b in enumerate(batches):
        params = {n: v.clone().requires_grad_() for n, v in spec.views(flat).items()}
        ref = task.reference_loss(params, b)
        ref_grads = torch.autograd.grad(ref, list(params.values()))
        assert float(lane[i]) == pytest.approx(float(ref), rel=1e-5)
        for g_ref, g_lane in zip(ref_grads, lane_grads):
            torch.testing.assert_close(g_lane[i], g_ref, rtol=1e-4, atol=1e-6)


def test_client_data_is_a_capped_seeded_sample(tiny_run):
    task, _ = tiny_task(tiny_run, max_messages=8)
    shards, _ = load_prepared(tiny_run)
    big = max(shards.users("train"), key=lambda u: len(shards.user_texts("train", u)))
    a = task.client_data(big, np.random.default_rng([0, 1]))
    b = task.client_data(big, np.random.default_rng([0, 1]))
    c = task.client_data(big, np.random.default_rng([0, 2]))
    assert a.batches == b.batches and a.batches != c.batches
    assert a.n_examples == 8 and sum(len(x) for x in a.batches) == 8
    assert a.n_tokens == sum(len(s) - 1 for x in a.batches for s in x)
    two = KeyboardTask(task.shards, task.tok, task.template, 4, 8, 64, 2)
    d = two.client_data(big, np.random.default_rng([0, 1]))
    assert d.work_tokens == 2 * d.n_tokens and sum(len(x) for x in d.batches) == 16
    assert frame([5, 6], 64) == [BOS, 5, 6, 2]
