"""The round loop: determinism, bitwise resume after a kill, corrupt checkpoints, accounting, FedPer, compression."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fedkey.errors import FedkeyError
from fl_core.aggregate import WeightedMean
from fl_core.checkpoint import NAME, PREV, read_checkpoint
from fl_core.params import ParamSpec
from fl_core.simulation import LOCAL, RESIDUAL, Simulation, client_lr, server_lr
from tests.test_fl_fixtures import fl_cfg, fleet_cfg, one_torch_thread, tiny_run, tiny_task  # noqa: F401  (fixtures)


class Recording(WeightedMean):
    """The default aggregator, remembering exactly what reached the server."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.seen: list[tuple[list[str], list[np.ndarray], int]] = []

    def aggregate(self, updates, weights, ids=None, n_dropped=0):
        self.seen.append((list(ids), [u.copy() for u in updates], n_dropped))
        return super().aggregate(updates, weights, ids, n_dropped)


class KilledAt:
    """A task that dies (as from Ctrl-C or SIGKILL of the process) at its n-th training step."""

    def __init__(self, task, at: int) -> None:
        self.task, self.at, self.calls = task, at, 0

    def client_data(self, client, rng):
        return self.task.client_data(client, rng)

    def client_size(self, client):
        return self.task.client_size(client)

    def loss(self, params, batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.task.loss(params, batch)

    def lane_loss(self, params, batches):
        return self.task.lane_loss(params, batches)


def make_sim(run, out, cfg, fleet=None, aggregator=None, wrap=None) -> Simulation:
    task, model = tiny_task(run, batch_size=cfg.batch_size, max_messages=cfg.max_messages)
    spec = ParamSpec.of(model, cfg.local_patterns())
    users = task.shards.users("train")
    return Simulation(wrap(task) if wrap else task, spec, users, spec.flatten(dict(model.named_parameters())), cfg,
                      fleet or fleet_cfg(), out, aggregator)


def _strip(history):
    timing = {"wall_s", "train_s"}
    return [{k: v for k, v in h.items() if k not in timing} for h in history]


def test_same_seed_same_model_other_seed_other_model(tiny_run, tmp_path):
    cfg = fl_cfg(compress="int8", server_opt="adam", server_lr=0.05)
    fleet = fleet_cfg(dropout=0.3, overselect=1.3, availability=True)
    a, b = make_sim(tiny_run, tmp_path / "a", cfg, fleet), make_sim(tiny_run, tmp_path / "b", cfg, fleet)
    a.run()
    b.run()
    assert torch.equal(a.state.params, b.state.params)
    assert _strip(a.history) == _strip(b.history)
    c = make_sim(tiny_run, tmp_path / "c", fl_cfg(compress="int8", server_opt="adam", server_lr=0.05, seed=1), fleet)
    c.run()
    assert not torch.equal(a.state.params, c.state.params)


def test_resume_after_a_kill_mid_round_is_bitwise_identical(tiny_run, tmp_path):
    # every kind of state a resume must restore: server moments, FedPer parameters and error-feedback
    # residuals on "devices" (disk store), the fleet's clock
    cfg = fl_cfg(max_rounds=4, server_opt="adam", server_lr=0.05, local_params="out_bias", client_store="disk",
                 compress="topk", topk_frac=0.2, checkpoint_every_s=0)
    fleet = fleet_cfg(dropout=0.2, overselect=1.5, availability=True)
    whole = make_sim(tiny_run, tmp_path / "whole", cfg, fleet)
    whole.run()

    killed = make_sim(tiny_run, tmp_path / "killed", cfg, fleet, wrap=lambda t: KilledAt(t, at=40))
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    done_rounds = read_checkpoint(tmp_path / "killed" / NAME)["round"]
    assert 0 < done_rounds < 4  # it died in the middle of the run, after some device state was written

    resumed = make_sim(tiny_run, tmp_path / "killed", cfg, fleet)
    resumed.run(resume=True)
    assert torch.equal(resumed.state.params, whole.state.params)
    for k, v in whole.state.slots.items():
        assert torch.equal(resumed.state.slots[k], v)
    assert _strip(resumed.history) == _strip(whole.history)
    for u in whole.population:
        for key in (LOCAL, RESIDUAL):
            x, y = whole.store.get(u, key, 10**9), resumed.store.get(u, key, 10**9)
            assert (x is None and y is None) or torch.equal(x, y)


def test_resume_from_a_checkpoint_rounds_behind_replays_them_bitwise(tiny_run, tmp_path):
    # checkpoints are written by time, so a kill can come many rounds after the last one; the rounds
    # since are replayed, reading the device state (FedPer parameters, residuals) they read the first time
    cfg = fl_cfg(max_rounds=12, server_opt="adam", server_lr=0.05, local_params="out_bias",
                 client_store="disk", compress="topk", topk_frac=0.2, checkpoint_every_s=1e9)
    whole = make_sim(tiny_run, tmp_path / "whole", cfg)
    whole.run()
    assert read_checkpoint(tmp_path / "whole" / NAME)["round"] == 12  # the last round is always checkpointed

    first = make_sim(tiny_run, tmp_path / "killed", cfg)
    first.checkpoint()
    for _ in range(3):
        first.run_round()
        assert not first.maybe_checkpoint()  # not yet due
    first.checkpoint()
    for _ in range(8):  # rounds 4-11 run, write device state, and die before any checkpoint
        first.run_round()
    assert read_checkpoint(tmp_path / "killed" / NAME)["round"] == 3
    stored = [len(first.store._versions(u, LOCAL)) for u in first.population]
    assert max(stored) >= 4  # a device written in several rounds since keeps all of them and the one before

    resumed = make_sim(tiny_run, tmp_path / "killed", cfg)
    resumed.run(resume=True)
    assert torch.equal(resumed.state.params, whole.state.params)
    for k, v in whole.state.slots.items():
        assert torch.equal(resumed.state.slots[k], v)
    assert _strip(resumed.history) == _strip(whole.history)


def test_resume_from_the_previous_checkpoint_keeps_device_state_bitwise(tiny_run, tmp_path):
    # the corrupt-checkpoint recovery (move checkpoint.prev.pt over) replays from one checkpoint further
    # back: the devices (disk store) must still hold the versions those rounds read
    cfg = fl_cfg(max_rounds=8, clients_per_round=8, local_params="out_bias", client_store="disk", checkpoint_every_s=0)
    whole = make_sim(tiny_run, tmp_path / "whole", cfg)
    whole.run()
    first = make_sim(tiny_run, tmp_path / "run", cfg)
    first.checkpoint()
    for _ in range(6):
        first.run_round()
        first.maybe_checkpoint()
    first.run_round()  # round 7 writes device state, then the process dies and checkpoint.pt (round 6) is lost
    shutil.move(tmp_path / "run" / PREV, tmp_path / "run" / NAME)
    assert read_checkpoint(tmp_path / "run" / NAME)["round"] == 5
    resumed = make_sim(tiny_run, tmp_path / "run", cfg)
    resumed.run(resume=True)
    assert torch.equal(resumed.state.params, whole.state.params)
    assert _strip(resumed.history) == _strip(whole.history)


def test_corrupt_checkpoint_is_a_clear_error_and_the_previous_one_is_kept(tiny_run, tmp_path):
    cfg = fl_cfg(max_rounds=3, checkpoint_every_s=0)
    sim = make_sim(tiny_run, tmp_path / "run", cfg)
    sim.run()
    ck = tmp_path / "run" / NAME
    prev_bytes = (tmp_path / "run" / PREV).read_bytes()
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ck.write_bytes(bytes(raw))
    with pytest.raises(FedkeyError, match=r"corrupt checkpoint.*previous good checkpoint \(after round 2\).*checkpoint.prev.pt"):
        make_sim(tiny_run, tmp_path / "run", cfg).run(resume=True)
    assert (tmp_path / "run" / PREV).read_bytes() == prev_bytes
    shutil.move(tmp_path / "run" / PREV, ck)  # what the message says to do
    again = make_sim(tiny_run, tmp_path / "run", cfg)
    again.run(resume=True)
    assert torch.equal(again.state.params, sim.state.params)


def test_resume_refuses_other_settings(tiny_run, tmp_path):
    make_sim(tiny_run, tmp_path / "run", fl_cfg(max_rounds=1)).run()
    with pytest.raises(FedkeyError, match="client_lr") as err:
        make_sim(tiny_run, tmp_path / "run", fl_cfg(max_rounds=2, client_lr=0.1)).run(resume=True)
    # `fedkey run` always resumes, so the way out it names is the folder, not a flag the user never passed
    assert f"delete {tmp_path / 'run'}" in str(err.value) and "--resume" not in str(err.value)


def test_every_round_accounts_for_selected_dropped_late_and_cut_off_clients(tiny_run, tmp_path):
    cfg = fl_cfg(max_rounds=5, clients_per_round=5)
    agg = Recording(ParamSpec.of(tiny_task(tiny_run)[1]).n_shared)
    sim = make_sim(tiny_run, tmp_path / "run", cfg, fleet_cfg(dropout=0.3, overselect=1.3, deadline_s=30.0,
                                                               device_tokens_per_s=2.0), agg)
    sim.run()
    assert len(sim.history) == 5
    seen = iter(agg.seen)
    for h in sim.history:
        assert h["selected"] == h["completed"] + h["dropped"] + h["late"] + h["aborted"]
        assert h["completed"] <= cfg.clients_per_round
        assert h["uploaded"] == h["completed"] - h["sat_out"]
        if h["skipped"]:  # nobody reported in time: the model stays as it was
            assert h["uploaded"] < 1 and h["delta_norm"] == 0.0
            continue
        ids, ups, n_dropped = next(seen)
        assert len(ids) == len(ups) == h["uploaded"]
        assert n_dropped == h["selected"] - h["uploaded"]  # everyone selected joined the round
        assert h["up_bytes"] == h["uploaded"] * 4 * sim.spec.n_shared
        assert h["down_bytes"] == h["selected"] * 4 * sim.spec.n_shared
    assert sum(h["dropped"] for h in sim.history) > 0 and sum(h["late"] for h in sim.history) > 0


def test_fedper_local_parameters_never_leave_the_client(tiny_run, tmp_path):
    cfg = fl_cfg(max_rounds=4, clients_per_round=6, local_params="out_bias", client_lr=1.0)
    task, model = tiny_task(tiny_run)
    spec = ParamSpec.of(model, cfg.local_patterns())
    assert [e.name for e in spec.local] == ["out_bias"] and spec.n_shared == spec.n_total - model.vocab_size
    agg = Recording(spec.n_shared)
    sim = make_sim(tiny_run, tmp_path / "run", cfg, aggregator=agg)
    init = sim.init_params.clone()
    sim.run()
    assert all(u.shape == (spec.n_shared,) for _, ups, _ in agg.seen for u in ups)  # only shared parameters travel
    assert torch.equal(sim.full_params()[spec.n_shared:], init[spec.n_shared:])  # the server never learns them
    trained = [u for u in sim.population if sim.store.get(u, LOCAL, 10**9) is not None]
    assert trained and sim.store.clients(LOCAL) == len(trained)
    locals_ = [sim.store.get(u, LOCAL, 10**9) for u in trained]
    assert all(not torch.equal(v, init[spec.n_shared:]) for v in locals_)
    assert not torch.equal(locals_[0], locals_[1])  # each device has its own
    # a client that comes back continues from its own local parameters
    counts = {}
    for ids, _, _ in agg.seen:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    again = next(u for u, n in counts.items() if n > 1)
    rounds = [r for r, (ids, _, _) in enumerate(agg.seen) if again in ids]
    assert not torch.equal(sim.store.get(again, LOCAL, rounds[1]), init[spec.n_shared:])
    with pytest.raises(FedkeyError, match="matches no parameter"):
        ParamSpec.of(model, ["no_such_param"])


def test_int8_uplink_bytes_and_sit_out(tiny_run, tmp_path):
    sim = make_sim(tiny_run, tmp_path / "int8", fl_cfg(max_rounds=2, compress="int8"))
    sim.run()
    per_upload = sim.spec.n_shared + 4 * len(sim.spec.shared)
    assert all(h["up_bytes"] == h["uploaded"] * per_upload for h in sim.history)
    quiet = make_sim(tiny_run, tmp_path / "quiet", fl_cfg(max_rounds=2, sit_out_norm=1e9))
    before = quiet.state.params.clone()
    quiet.run()
    assert all(h["sat_out"] == h["completed"] and h["up_bytes"] == 0 and h["skipped"] for h in quiet.history)
    assert torch.equal(quiet.state.params, before)


def test_size_sampling_weighs_clients_by_their_messages_beyond_the_cap(tiny_run, tmp_path):
    sim = make_sim(tiny_run, tmp_path / "s", fl_cfg(client_sampling="size", max_messages=8))
    sizes = np.array([sim.task.shards.n_messages("train", u) for u in sim.population])
    assert sizes.max() > 8 and sizes.min() < 8  # the tiny corpus has clients on both sides of the cap
    np.testing.assert_array_equal(sim.fleet.weights, np.maximum(sizes, 8))
    assert make_sim(tiny_run, tmp_path / "u", fl_cfg(client_sampling="uniform")).fleet.weights is None
    with pytest.raises(FedkeyError, match="client_sampling"):
        fl_cfg(client_sampling="biggest")


def test_learning_rates_follow_a_cosine_from_their_start_to_the_floor():
    cfg = fl_cfg(max_tokens=1000, lr_floor=0.02, server_opt="adam", server_lr=0.01, client_lr=0.5)
    assert client_lr(cfg, 0) == pytest.approx(0.5)
    assert client_lr(cfg, 500) == pytest.approx(0.5 * (0.02 + 0.98 * 0.5))
    assert client_lr(cfg, 1000) == pytest.approx(0.5 * 0.02) == client_lr(cfg, 5000)
    assert server_lr(cfg, 7, 1000) == pytest.approx(0.01 * 0.02)
    # plain SGD's server step already shrinks with the client's, so its lr stays put
    assert server_lr(fl_cfg(max_tokens=1000, lr_floor=0.02, server_opt="sgd", server_lr=1.0), 7, 1000) == 1.0
    with pytest.raises(FedkeyError, match="lr_floor"):
        fl_cfg(lr_floor=1.5)
