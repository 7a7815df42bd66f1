"""A SuperNode's share of a round: train its sampled users with fl_core and encode their updates.

The same steps, in the same order and with the same seeds, as the in-process engine
(`fl_core.simulation.Simulation.train` and the encode step of its round): each user's data is
`task.client_data(user, rng(seed, 7100, round, idx))`, users train with `fl_core.executors.run_clients`
and the configured executor,
FedPer parameters and top-k residuals stay in this node's `ClientStore`, and each delta is
encoded by `fl_core.compress.Codec` with the generator (seed, 7200, round, idx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fl_core.client import client_init
from fl_core.compress import Codec, seeded_generator
from fl_core.config import FLConfig
from fl_core.flower.wire import TrainIns, UserReport
from fl_core.executors import run_clients
from fl_core.lanes import LaneJob
from fl_core.params import ParamSpec
from fl_core.simulation import LOCAL, RESIDUAL
from fl_core.store import ClientStore

if TYPE_CHECKING:
    from fl_core.client import ClientTask


def train_users(task: ClientTask, spec: ParamSpec, cfg: FLConfig, codec: Codec, store: ClientStore,
                ins: TrainIns) -> list[UserReport]:
    """Train the users named in `ins` from its global parameters; one report per user, in `ins` order."""
    r, g = ins.round, ins.global_shared
    init_local = ins.init_local if spec.n_total > spec.n_shared else None
    data = [task.client_data(u, np.random.default_rng([cfg.seed, 7100, r, i])) for u, i in zip(ins.users, ins.idx)]
    jobs = []
    for u, d in zip(ins.users, data):
        local = store.get(u, LOCAL, r) if spec.n_total > spec.n_shared else None
        jobs.append(LaneJob(d, client_init(spec, g, local, init_local)))
    trained: dict[int, tuple[torch.Tensor, float]] = {}
    threads = torch.get_num_threads()
    if cfg.executor == "threads":  # one client alone falls back to the sequential path: give it the one core a
        torch.set_num_threads(1)   # threads worker has, so its result is the in-process engine's bit for bit
    try:
        for j, flat, loss in run_clients(task, spec, jobs, ins.client_lr, cfg.client_clip, cfg.executor, cfg.workers,
                                         cfg.lanes):
            trained[j] = (flat, loss)
    finally:
        torch.set_num_threads(threads)

    reports = []
    for j, (u, i, d) in enumerate(zip(ins.users, ins.idx, data)):
        flat, loss = trained[j]
        if spec.n_total > spec.n_shared:
            store.put(u, LOCAL, r, flat[spec.n_shared:].clone())
        delta = flat[:spec.n_shared] - g
        rep = UserReport(u, i, d.n_examples, d.n_tokens, d.work_tokens, loss, False)
        residual = store.get(u, RESIDUAL, r) if codec.uses_residual else None
        if cfg.sit_out_norm and float(delta.norm()) < cfg.sit_out_norm:
            rep.sat_out = True
            if codec.uses_residual:  # what was not sent is not forgotten
                store.put(u, RESIDUAL, r, (delta + (0 if residual is None else residual.float())).half())
        else:
            enc, rest = codec.encode(delta, seeded_generator(cfg.seed, 7200, r, i), residual)
            if rest is not None:
                store.put(u, RESIDUAL, r, rest.half())
            rep.update = enc
        reports.append(rep)
    return reports
