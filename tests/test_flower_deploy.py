"""A real Flower deployment on loopback: SuperLink + 3 SuperNode processes with TLS and node authentication.

One run of 4 rounds checks, in order:
- parity: after round 2 the global parameters are bitwise those `fedkey train --engine local` ends with
  (same seed and settings; both engines train each client alone with fl_core's executor, see docs/flower.md);
- a fault: the SuperNode holding most of round 3's users is killed when its round-3 message arrives;
  round 3 ends at the round timeout with the other nodes' users and says so, round 4 goes on without it;
and, beside it, that a SuperNode whose key was never registered is refused.
Every process is killed (whole trees) when the test ends, whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkey import pipeline as P
from fedkey.config import EvalConfig, ModelConfig, PrepareConfig
from fl_core.config import FleetConfig, FLConfig
from fl_core.flower.app_dir import write_app
from fl_core.flower.cluster import Federation
from fl_core.flower.job import Job, build_simulation
from fl_core.flower.partition import node_users

PHRASES = ["how are you doing today", "i like the color blue", "what is your favorite color",
           "see you tomorrow at the park", "thank you so much for the help", "i am going to the store",
           "do you want to play a game", "my favorite food is pizza", "the weather is nice today",
           "good morning how was your night"]
NODES, KILL_ROUND, ROUNDS, TIMEOUT_S, STRAGGLER = 3, 3, 4, 180.0, 3.0


def make_run(run_dir: Path, n_users: int = 24, n_msgs: int = 12, seed: int = 0) -> Path:
    """A tiny prepared run: shards of `n_users` chat users and a 300-piece tokenizer."""
    rng = random.Random(seed)
    rows = [{"user": f"user{u:02d}", "text": f"{rng.choice(PHRASES)} {rng.choice(PHRASES)}",
             "timestamp": f"2021-03-{1 + k:02d}T10:00:00Z"} for u in range(n_users) for k in range(n_msgs)]
    run_dir.mkdir(parents=True, exist_ok=True)
    src = run_dir / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    P.prepare_stage(run_dir, PrepareConfig(corpus=str(src), min_words=5, vocab_size=300, public_frac=0.2),
                    progress=False)
    return run_dir


def tiny_job(run_dir: Path, out_dir: Path, rounds: int) -> Job:
    """Seeded settings both engines share (the default executor: each client trained alone on one core)."""
    fl = FLConfig(seed=3, max_tokens=10**9, max_rounds=rounds, clients_per_round=5, batch_size=4, max_messages=8,
                  max_len=16, eval_every=0)
    fleet = FleetConfig(availability=False, overselect=1.0, dropout=0.0)
    return Job(run_dir, out_dir, fl, fleet, ModelConfig(embed_dim=16, hidden=32), expect_nodes=NODES,
               wait_nodes_s=120.0, round_timeout_s=TIMEOUT_S, straggler_factor=STRAGGLER)


def in_process(job: Job, run_dir: Path, out_name: str) -> str:
    """sha256 of the global shared parameters `fedkey train --engine local` ends with (fedkey.fl_stage)."""
    from fedkey.fl_stage import fl_stage
    from keyboard.checkpoint import load_model

    fl_stage(run_dir, job.model, job.fl, job.fleet, EvalConfig(), progress=False, out_name=out_name, final_eval=False)
    model, _, _ = load_model(run_dir / out_name)
    sim, _, _ = build_simulation(job)
    shared = sim.spec.flatten(dict(model.named_parameters()))[:sim.spec.n_shared]
    return hashlib.sha256(shared.numpy().tobytes()).hexdigest()


def node_of_most_users(job: Job, round_index: int) -> tuple[int, int]:
    """(node, how many of its users) holding most of the cohort the engine draws in `round_index` (0-based)."""
    from fl_core.fleet import Fleet

    users = P.load_prepared(job.run_dir)[0].users("train")
    weights = build_simulation(job)[0].fleet.weights
    _, cohort = Fleet(len(users), job.fleet, job.fl.seed, weights=weights).select(round_index, 0.0, job.fl.clients_per_round)
    held = [set(node_users({"partition-id": i, "num-partitions": NODES}, users)) for i in range(NODES)]
    counts = [sum(users[c] in h for c in cohort) for h in held]
    return int(np.argmax(counts)), max(counts)


def kill_when_round_arrives(fed: Federation, node: int, round_: int, stop: threading.Event) -> threading.Thread:
    """Kill SuperNode `node` as soon as it receives its train message of round `round_`."""
    log = fed.logs / f"supernode_{node}.log"

    def watch() -> None:
        while not stop.is_set():
            text = log.read_text(errors="replace") if log.exists() else ""
            tail = text.split(f"ROUND {round_}]", 1)
            if len(tail) == 2 and "Receiving: train message" in tail[1]:
                fed.kill_node(node)
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("flower") / "run")


def test_deployment_matches_in_process_engine_and_survives_a_killed_node(run_dir, tmp_path):
    job = tiny_job(run_dir, tmp_path / "flower_out", ROUNDS)
    local = in_process(replace(job, fl=replace(job.fl, max_rounds=2)), run_dir, "local_deploy_test")
    victim, victim_users = node_of_most_users(job, KILL_ROUND - 1)
    assert victim_users > 0  # the scenario needs the victim in round 3's cohort

    configs = [{"data": str(run_dir), "partition-id": i, "num-partitions": NODES} for i in range(NODES)]
    stop = threading.Event()
    with Federation(tmp_path / "fed", node_configs=configs, tls=True, auth=True, spare_keys=1) as fed:
        assert "https://127.0.0.1" in (fed.logs / "superlink.log").read_text()  # TLS is on
        intruder = fed.start_unregistered_node({"data": str(run_dir), "partition-id": 0, "num-partitions": NODES})
        killer = kill_when_round_arrives(fed, victim, KILL_ROUND, stop)
        try:
            res = fed.run(write_app(tmp_path / "app"), job.to_run_config(), timeout_s=400)
        finally:
            stop.set()
        killer.join(timeout=1)
        intruder_log = (fed.logs / f"supernode_{NODES}.log").read_text(errors="replace")
    assert res.returncode == 0, res.log[-3000:]

    hist = [json.loads(line) for line in (job.out_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in hist] == list(range(1, ROUNDS + 1))
    # parity: the deployment's first two rounds reproduce the in-process engine bit for bit
    assert hist[1]["params_sha256"] == local
    assert all(h["completed"] == h["selected"] == job.fl.clients_per_round for h in hist[:2])
    # the fault: round 3 timed out on the killed node and finished with the others' users...
    r3 = hist[KILL_ROUND - 1]
    assert r3["dropped"] == victim_users and r3["completed"] == r3["selected"] - victim_users > 0
    # (either our deadline passed first, or Flower had already marked the node unavailable: both name it)
    assert f"{victim_users} users are dropped from this round" in res.log
    # ...and training went on without it
    r4 = hist[KILL_ROUND]
    assert r4["dropped"] == 0 and r4["completed"] == job.fl.clients_per_round
    assert r4["params_sha256"] != r3["params_sha256"] and np.isfinite(r4["loss"])
    # node authentication: the unregistered SuperNode never got a node id
    assert "SuperNode ID:" not in intruder_log, intruder_log[-2000:]
