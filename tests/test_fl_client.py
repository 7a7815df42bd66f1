"""Client updates: FedAvg with one full-batch step is centralized SGD; every executor trains clients identically."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from fl_core.aggregate import WeightedMean
from fl_core.client import ClientData, client_update, local_train, subnormals_flushed, vmap_lane_loss
from fl_core.config import FLConfig
from fl_core.executors import run_clients
from fl_core.lanes import LaneJob
from fl_core.params import ParamSpec
from fl_core.server import server_init, server_update
from fl_core.simulation import Simulation
from keyboard.batches import frame, pad_batch
from keyboard.train import lm_loss
from tests.test_fl_fixtures import TINY_MODEL, fl_cfg, fleet_cfg, one_torch_thread, tiny_run, tiny_task  # noqa: F401  (fixtures)


def _user_msgs(task, user: str) -> list[list[int]]:
    return [frame(ids, 64) for ids in task.tok.encode_batch(task.shards.user_texts("train", user))]


def _central_sgd_step(model, msgs, lr):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    x, y = pad_batch(msgs)
    loss, _ = lm_loss(m, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return m


def test_one_client_one_full_batch_step_through_the_engine_equals_central_sgd(tiny_run, tmp_path):
    task, model = tiny_task(tiny_run, batch_size=10**6, max_messages=10**6)
    spec = ParamSpec.of(model)
    user = task.shards.users("train")[0]
    cfg = fl_cfg(clients_per_round=1, max_rounds=1, client_clip=0.0, client_lr=0.3, batch_size=10**6,
                 max_messages=10**6, max_tokens=10**9)
    sim = Simulation(task, spec, [user], spec.flatten(dict(model.named_parameters())), cfg, fleet_cfg(), tmp_path)
    sim.run()
    central = _central_sgd_step(model, _user_msgs(task, user), lr=0.3 * _lr_factor(cfg))
    torch.testing.assert_close(sim.state.params, spec.flatten(dict(central.named_parameters())), rtol=1e-5, atol=1e-6)


def _lr_factor(cfg: FLConfig) -> float:
    from fl_core.simulation import client_lr

    return client_lr(cfg, 0) / cfg.client_lr  # the first round's learning rate (cosine schedule starts at 1)


def test_fedavg_of_full_batch_steps_with_token_weights_equals_central_full_batch_step(tiny_run):
    task, model = tiny_task(tiny_run)
    spec = ParamSpec.of(model)
    g = spec.flatten(dict(model.named_parameters()))
    users = task.shards.users("train")[:4]
    updates = []
    for u in users:
        msgs = _user_msgs(task, u)
        data = ClientData([msgs], len(msgs), sum(len(s) - 1 for s in msgs))
        updates.append(client_update(task, spec, g, u, data, lr=0.2, clip=0.0))
    agg = WeightedMean(spec.n_shared).aggregate([u.delta.numpy() for u in updates], [u.weight("tokens") for u in updates])
    cfg = FLConfig(server_opt="sgd", server_lr=1.0)
    new = server_update(server_init(g, cfg), torch.from_numpy(agg.mean), cfg).params
    central = _central_sgd_step(model, [s for u in users for s in _user_msgs(task, u)], lr=0.2)
    # the token-weighted mean of per-client mean gradients is the mean gradient over all tokens
    torch.testing.assert_close(new, spec.flatten(dict(central.named_parameters())), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("executor", ["threads", "lanes"])
def test_parallel_and_batched_executors_equal_clients_trained_one_by_one(tiny_run, executor):
    task, model = tiny_task(tiny_run, batch_size=3, max_messages=9)
    spec = ParamSpec.of(model)
    g = spec.flatten(dict(model.named_parameters()))
    users = task.shards.users("train")[:7]
    jobs = [LaneJob(task.client_data(u, np.random.default_rng([0, k])), g) for k, u in enumerate(users)]
    jobs.append(LaneJob(ClientData([], 0, 0), g))  # a client with nothing to train on sends a zero update
    assert len({len(j.data.batches) for j in jobs}) > 2  # clients of different lengths share the lanes
    one_by_one = [local_train(task, spec, j.start, j.data, 0.4, 1.0) for j in jobs]
    got = {j: (flat, loss) for j, flat, loss in run_clients(task, spec, jobs, 0.4, 1.0, executor, workers=2, lanes=3)}
    assert sorted(got) == list(range(len(jobs)))
    for j, (flat, loss) in enumerate(one_by_one):
        torch.testing.assert_close(got[j][0], flat, rtol=1e-4, atol=1e-6)
        assert got[j][1] == pytest.approx(loss, rel=1e-4)
    torch.testing.assert_close(got[len(jobs) - 1][0], g)


class _Regression:
    """A task that is not text: linear regression per client, batches are equal-shaped tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def loss(self, params, batch):
        x, y = batch
        return ((torch.func.functional_call(self.model, params, (x,)) - y) ** 2).mean()

    def lane_loss(self, params, batches):
        return vmap_lane_loss(self.loss)(params, batches)


def test_fl_core_trains_any_module_and_vmap_lanes_match():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    task = _Regression(model)
    spec = ParamSpec.of(model)
    g = spec.flatten(dict(model.named_parameters()))
    gen = torch.Generator().manual_seed(1)
    jobs = [LaneJob(ClientData([(torch.randn(6, 5, generator=gen), torch.randn(6, 1, generator=gen))
                                for _ in range(k)], 6 * k, 6 * k), g) for k in (1, 3, 2, 4)]
    seq = [local_train(task, spec, j.start, j.data, 0.1, 0.0)[0] for j in jobs]
    lanes = {j: flat for j, flat, _ in run_clients(task, spec, jobs, 0.1, 0.0, "lanes", lanes=2)}
    for j, flat in enumerate(seq):
        torch.testing.assert_close(lanes[j], flat, rtol=1e-5, atol=1e-6)
        assert not torch.equal(flat, g)


def test_public_pretraining_starts_from_a_model_that_knows_public_text_and_is_reproducible(tiny_run, tmp_path):
    from fedkey.fl_stage import build_simulation
    from fedkey.pipeline import PRETRAIN, load_prepared, public_seqs
    from keyboard.batches import pad_batch
    from keyboard.train import lm_loss

    run = tmp_path / "run"  # a copy of the prepared run, so no other test's pretraining is found
    for part in ("data", "tokenizer"):
        shutil.copytree(tiny_run / part, run / part)
    shards, tok = load_prepared(run)
    x, y = pad_batch(public_seqs(shards, tok, 64)[:200])

    def start(pretrain: float, out: str) -> torch.Tensor:
        _, model, _ = build_simulation(run, TINY_MODEL, fl_cfg(pretrain_epochs=pretrain), fleet_cfg(), tmp_path / out)
        with torch.no_grad():
            return lm_loss(model.eval(), x, y)[0]

    cold = start(0.0, "cold")
    warm = start(20.0, "warm")
    assert warm < cold - 0.3  # the server's start has learned from public users' text
    shutil.rmtree(run / PRETRAIN)
    assert start(20.0, "warm_again") == warm  # trained again: same seed, same start


def test_centralized_baseline_starts_from_the_federated_start_trained_once(tiny_run, tmp_path, monkeypatch):
    import keyboard.train
    from fedkey import config as C
    from fedkey.fl_stage import START, build_simulation
    from fedkey.pipeline import CENTRAL, PRETRAIN, central_stage
    from keyboard.checkpoint import load_model

    run = tmp_path / "run"
    for part in ("data", "tokenizer"):
        shutil.copytree(tiny_run / part, run / part)
    # no centralized tokens: the baseline's model is its start
    res = central_stage(run, TINY_MODEL, C.CentralConfig(max_tokens=0, pretrain_epochs=20.0), progress=False)
    assert res["pretrain_tokens"] > 0
    (state,) = (run / PRETRAIN).glob("*/train_state.pt")
    written = state.stat().st_mtime_ns
    steps = []
    monkeypatch.setattr(keyboard.train, "lm_loss", lambda *a: steps.append(1) or lm_loss(*a))
    _, model, _ = build_simulation(run, TINY_MODEL, fl_cfg(pretrain_epochs=20.0), fleet_cfg(), tmp_path / "fl")
    assert not steps  # the federated stage loaded the start the centralized one trained
    assert state.stat().st_mtime_ns == written  # and left its file as it was
    central, _, _ = load_model(run / CENTRAL)
    for name, p in model.state_dict().items():
        assert torch.equal(p, central.state_dict()[name]), name
    assert json.loads((tmp_path / "fl" / START).read_text())["tokens"] == res["pretrain_tokens"]
    # another number of passes is another start, trained beside the first
    build_simulation(run, TINY_MODEL, fl_cfg(pretrain_epochs=5.0), fleet_cfg(), tmp_path / "fl5")
    assert steps and len(list((run / PRETRAIN).iterdir())) == 2


def test_client_training_flushes_subnormal_floats_and_gives_the_mode_back(tiny_run):
    task, model = tiny_task(tiny_run, batch_size=3, max_messages=6)
    spec = ParamSpec.of(model)
    seen = []

    class Probe:
        """The real task, noting at each step whether a subnormal float reads as zero."""

        def loss(self, params, batch):
            seen.append(subnormals_flushed())
            return task.loss(params, batch)

    data = task.client_data(task.shards.users("train")[0], np.random.default_rng(0))
    local_train(Probe(), spec, spec.flatten(dict(model.named_parameters())), data, 0.1, 1.0)
    assert seen and all(seen)
    assert not subnormals_flushed()  # the caller's thread is as it was
