"""The privacy options inside the real federated engine: tiny shards, tiny LSTM, a few rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkey.config import ModelConfig, PrepareConfig
from fedkey.errors import FedkeyError
from fl_core.config import FleetConfig, FLConfig
from fl_core.params import ParamSpec
from fl_core.privacy.config import PrivacyConfig
from fl_core.privacy.engine import PoissonFleet, attach, epsilon_line, sampling_for

PHRASES = ["how are you doing today", "see you at the park", "my favourite colour is blue", "thank you so much",
           "what time is the game", "i am going to the store now"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared shards of 24 users, a small tokenizer and a tiny KeyboardLM."""
    from data.prepare import prepare
    from data.shards import Shards
    from keyboard.model import KeyboardLM
    from keyboard.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("fl")
    rows = [{"user": f"u{u:02d}", "text": f"{PHRASES[(u + k) % len(PHRASES)]} {k}",
             "timestamp": f"2021-03-{1 + k:02d}T10:00:00Z"} for u in range(24) for k in range(12)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prepare(PrepareConfig(corpus=str(root / "chat.jsonl"), min_words=5, heldout_frac=0.0, public_frac=0.0),
            root / "data", progress=False)
    shards = Shards.load(root / "data")
    tok = train_tokenizer([r["text"] for r in rows], vocab_size=300, seed=0)
    tok.save(root / "tokenizer" / "tokenizer.model")  # root is a prepared run dir for the CLI test
    torch.manual_seed(0)
    return shards, tok, KeyboardLM(tok.vocab_size, ModelConfig(embed_dim=8, hidden=16)), root


def _sim(world, out: Path, privacy: PrivacyConfig, rounds: int = 2, **fleet):
    from fedkey.fl_task import KeyboardTask
    from fl_core.simulation import Simulation

    shards, tok, model, _ = world
    cfg = FLConfig(clients_per_round=6, max_rounds=rounds, eval_every=0, max_messages=8, lanes=4, server_opt="sgd",
                   server_lr=1.0, seed=1, threads=1)
    fleet_cfg = FleetConfig(**{"availability": False, "overselect": 1.0, **fleet})
    spec = ParamSpec.of(model)
    task = KeyboardTask(shards, tok, model, cfg.batch_size, cfg.max_messages, cfg.max_len, cfg.local_epochs)
    sim = Simulation(task, spec, shards.users("train"), spec.flatten(dict(model.named_parameters())), cfg,
                     fleet_cfg, out)
    return sim, attach(sim, privacy)


def test_dp_secagg_robust_rounds_run_in_the_engine_and_account_epsilon(world, tmp_path):
    pcfg = PrivacyConfig(dp=True, noise_multiplier=1.0, clip=0.5, dp_sampling="poisson", secagg=True, robust=True,
                         max_norm=100.0)
    sim, agg = _sim(world, tmp_path / "run", pcfg)
    assert isinstance(sim.fleet, PoissonFleet) and sim.aggregator is agg
    sim.run()
    eps = [h.get("epsilon") for h in sim.history]
    ran = [h for h in sim.history if not h["skipped"]]
    assert ran and all(h["secagg_clients"] >= 2 for h in ran)
    assert agg.rounds == len(ran) and agg.epsilon() == pytest.approx(agg.accountant.epsilon(len(ran)))
    assert [e for e in eps if e is not None] == sorted(e for e in eps if e is not None)
    assert "epsilon" in epsilon_line(agg) and "poisson" in epsilon_line(agg)
    # resuming restores the aggregator's state (noise generator, clip, rounds spent) with the model
    again, agg2 = _sim(world, tmp_path / "run", pcfg, rounds=2)
    assert again.restore() and agg2.rounds == agg.rounds and agg2.state_dict()["rng"] == agg.state_dict()["rng"]


def test_secure_aggregation_gives_the_plain_fedavg_model_to_the_fixed_point_step(world, tmp_path):
    plain, _ = _sim(world, tmp_path / "plain", PrivacyConfig(robust=True))
    secure, _ = _sim(world, tmp_path / "secure", PrivacyConfig(secagg=True))
    plain.run()
    secure.run()
    assert not torch.equal(plain.state.params, plain.init_params[:plain.spec.n_shared])
    assert torch.allclose(plain.state.params, secure.state.params, atol=1e-6)


def test_sampling_follows_the_fleet(world):
    pc = PrivacyConfig(dp=True)
    assert sampling_for(pc, 10, 100, FleetConfig()).kind == "none"  # availability + over-selection: no amplification
    assert sampling_for(pc, 10, 100, FleetConfig(availability=False, overselect=1.0)).kind == "uniform"
    with pytest.raises(FedkeyError, match="poisson needs every user eligible"):
        sampling_for(PrivacyConfig(dp=True, dp_sampling="poisson"), 10, 100, FleetConfig())


def test_secagg_refuses_lossy_compression(world, tmp_path):
    from fedkey.fl_task import KeyboardTask
    from fl_core.simulation import Simulation

    shards, tok, model, _ = world
    spec = ParamSpec.of(model)
    cfg = FLConfig(clients_per_round=4, max_rounds=1, compress="int8", eval_every=0)
    sim = Simulation(KeyboardTask(shards, tok, model, 16, 8, 64), spec, shards.users("train"),
                     spec.flatten(dict(model.named_parameters())), cfg, FleetConfig(), tmp_path)
    with pytest.raises(FedkeyError, match="do not compose with masking"):
        attach(sim, PrivacyConfig(secagg=True))


def test_fedkey_train_dp_prints_epsilon_each_round_and_stops_at_the_target(world, capsys):
    from fedkey.cli import main
    from fedkey.io import read_json
    from fl_core.privacy.accounting import PrivacyAccountant, Sampling

    root = world[3]
    target = PrivacyAccountant(1.0, Sampling("poisson", 24, 4)).epsilon(2) * 1.001  # room for exactly 2 rounds
    main(["train", "--run-dir", str(root), "--out", "dp", "--embed-dim", "8", "--hidden", "16", "--dp", "--secagg",
          "--noise-multiplier", "1", "--clip", "0.5", "--dp-sampling", "poisson", "--availability", "false",
          "--overselect", "1", "--clients-per-round", "4", "--max-rounds", "5", "--target-epsilon", str(target),
          "--max-messages", "8", "--threads", "1", "--eval-every", "0", "--no-final-eval", "--no-progress",
          "--json", str(root / "dp.json")])
    out = capsys.readouterr().out
    assert "round 1: epsilon" in out and "round 2: epsilon" in out and "round 3:" not in out
    assert "stopped: one more round would pass --target-epsilon" in out
    res = read_json(root / "dp.json")
    assert res["rounds"] == 2 and res["epsilon"] <= target and res["stopped_at_target_epsilon"]
    assert "[privacy]" in (root / "dp" / "config.toml").read_text()
