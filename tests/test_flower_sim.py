"""Flower's simulation runtime (Ray) behind a local SuperLink, running fedkey's ServerApp and ClientApp.

- plain aggregation: after each round the global parameters are bitwise those of `fedkey train --engine local`;
- Flower's SecAgg+: the rounds complete through its four stages and land within its quantization error
  of the plain result (SecAgg+ quantizes each node's update to 2^22 levels over [-8, 8]).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedkey.config import EvalConfig
from fedkey.fl_stage import fl_stage
from fl_core.flower.app_dir import write_app
from fl_core.flower.cluster import Federation
from fl_core.flower.job import build_simulation
from keyboard.checkpoint import load_model
from tests.test_flower_deploy import make_run, tiny_job

SLOTS = 5  # simulated SuperNodes: execution slots that read the shared run directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("flower_sim") / "run")


def flat(model_dir: Path, spec) -> torch.Tensor:
    """A saved model's parameters as one flat vector."""
    model, _, _ = load_model(model_dir)
    return spec.flatten(dict(model.named_parameters()))


def test_simulation_runtime_matches_in_process_engine_and_secagg_stays_close(run_dir, tmp_path):
    job = replace(tiny_job(run_dir, tmp_path / "plain", 2), placement="any", expect_nodes=SLOTS, straggler_factor=0.0)
    fl_stage(run_dir, job.model, job.fl, job.fleet, EvalConfig(), progress=False, out_name="local_sim_test",
             final_eval=False)
    sim, _, _ = build_simulation(job)
    local, init = flat(run_dir / "local_sim_test", sim.spec), sim.init_params

    secure = replace(job, out_dir=tmp_path / "secagg", secagg=True)
    app = write_app(tmp_path / "app")
    sim_cfg = {"num-supernodes": SLOTS, "client-resources-num-cpus": 1}
    with Federation(tmp_path / "fed", simulation=True, tls=False) as fed:
        plain_res = fed.run(app, job.to_run_config(), sim_cfg, timeout_s=300, log_name="plain.log")
        secure_res = fed.run(app, secure.to_run_config(), sim_cfg, timeout_s=300, log_name="secagg.log")
    assert plain_res.returncode == 0, plain_res.log[-3000:]
    assert secure_res.returncode == 0, secure_res.log[-3000:]

    assert torch.equal(flat(job.out_dir, sim.spec), local)

    hist = [json.loads(line) for line in (secure.out_dir / "history.jsonl").read_text().splitlines()]
    assert [h["completed"] for h in hist] == [job.fl.clients_per_round] * 2 and all(h["secagg"] for h in hist)
    got = flat(secure.out_dir, sim.spec)
    assert not torch.equal(got, local)  # the masked, quantized sum is not the float sum...
    assert float((got - local).norm()) < 0.02 * float((local - init).norm())  # ...but close to it
