"""Flower's simulation runtime (Ray) behind a local SuperLink, running fedkey's ServerApp and ClientApp.

- plain aggregation: the global parameters after each round are bitwise those of fl_core's in-process engine;
- Flower's SecAgg+: the round completes through its four stages and lands within its quantization error
  of the plain result (SecAgg+ quantizes each node's update to 2^22 levels over [-8, 8]).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_core.flower.app_dir import write_app
from fl_core.flower.cluster import Federation
from fl_core.flower.job import build_task
from fl_core.flower.server_app import HISTORY, MODEL
from fl_core.simulation import Simulation
from tests.test_flower_deploy import make_run, tiny_job

SLOTS = 5  # simulated SuperNodes: execution slots that read the shared run directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("flower_sim") / "run")


def test_simulation_runtime_matches_in_process_engine_and_secagg_stays_close(run_dir, tmp_path):
    job = replace(tiny_job(run_dir, tmp_path / "plain", 2), placement="any", expect_nodes=SLOTS, straggler_factor=0.0)
    torch.set_num_threads(1)
    built, init = build_task(job.run_dir, job.fl, job.model, init=True)
    sim = Simulation(built.task, built.spec, built.task.shards.users("train"), init, job.fl, job.fleet,
                     tmp_path / "local")
    digests: list[str] = []
    sim.run(on_round=lambda _: digests.append(hashlib.sha256(sim.state.params.numpy().tobytes()).hexdigest()))
    local = sim.full_params()

    secure = replace(job, out_dir=tmp_path / "secagg", secagg=True)
    app = write_app(tmp_path / "app")
    sim_cfg = {"num-supernodes": SLOTS, "client-resources-num-cpus": 1}
    with Federation(tmp_path / "fed", simulation=True, tls=False) as fed:
        plain_res = fed.run(app, job.to_run_config(), sim_cfg, timeout_s=300, log_name="plain.log")
        secure_res = fed.run(app, secure.to_run_config(), sim_cfg, timeout_s=300, log_name="secagg.log")
    assert plain_res.returncode == 0, plain_res.log[-3000:]
    assert secure_res.returncode == 0, secure_res.log[-3000:]

    hist = [json.loads(line) for line in (job.out_dir / HISTORY).read_text().splitlines()]
    assert [h["params_sha256"] for h in hist] == digests
    assert torch.equal(torch.load(job.out_dir / MODEL)["params"], local)

    shist = [json.loads(line) for line in (secure.out_dir / HISTORY).read_text().splitlines()]
    assert [h["completed"] for h in shist] == [job.fl.clients_per_round] * 2 and all(h["secagg"] for h in shist)
    got = torch.load(secure.out_dir / MODEL)["params"]
    moved = (local - init).norm()
    assert not torch.equal(got, local)  # the masked, quantized sum is not the float sum...
    assert float((got - local).norm()) < 0.02 * float(moved)  # ...but within 2% of how far training moved
