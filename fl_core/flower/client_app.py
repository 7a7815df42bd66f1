"""fedkey's Flower ClientApp: on each SuperNode, train the sampled users it holds with fl_core's client update.

Messages it answers:
- `query.users`: the users this node holds (from its --node-config, see fl_core.flower.partition);
- `train`: a TrainIns (global parameters, round, learning rate, users) -> one encoded update per user;
- `train` in Flower's legacy layout, wrapped by SecAgg+ (`secaggplus_mod`): the same training, replied
  as one FitRes whose parameters are the weighted mean of the node's user updates, which SecAgg+
  then masks and quantizes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedkey.errors import FedkeyError
from fl_core.compress import decode
from fl_core.flower.client_work import train_users
from fl_core.flower.job import Job, build_simulation
from fl_core.simulation import Simulation
from fl_core.flower.partition import TRAIN_SPLIT, node_data_dir, node_users
from fl_core.flower.wire import TIMING, TrainIns, reports_to_content
from fl_core.store import ClientStore

LEGACY_PARAMS = "fitins.parameters"

_cache: dict[Any, tuple[Job, Simulation]] = {}  # a simulation actor answers many messages; a deployed ClientApp one


def _setup(context: Context) -> tuple[Job, Simulation, Path]:
    job = Job.from_run_config(context.run_config)
    data_dir = node_data_dir(context.node_config, context.run_config)
    key = (str(data_dir), str(context.run_config.get("config")))
    if key not in _cache:
        if job.threads:
            torch.set_num_threads(job.threads)
        sim, _, _ = build_simulation(job, data_dir=data_dir)  # the task and parameter layout of the local engine
        _cache.clear()
        _cache[key] = (job, sim)
    job, sim = _cache[key]
    return job, sim, data_dir


def _held(context: Context, job: Job, sim: Simulation) -> list[str] | None:
    """The users this node may train; None when any user may be trained here (simulation slots)."""
    if job.placement == "any":
        return None
    return node_users(context.node_config, sim.task.shards.users(TRAIN_SPLIT))


def _store(context: Context, data_dir: Path) -> ClientStore:
    root = Path(str(context.node_config.get("state", data_dir / "flower_client_state")))
    return ClientStore("disk", root / f"run_{context.run_id}")


def _train(context: Context, ins: TrainIns) -> tuple[Job, Simulation, list]:
    job, sim, data_dir = _setup(context)
    held = _held(context, job, sim)
    if held is not None:
        foreign = sorted(set(ins.users) - set(held))
        if foreign:
            raise FedkeyError(f"asked to train users this SuperNode does not hold: {', '.join(foreign[:5])}")
    return job, sim, train_users(sim.task, sim.spec, job.fl, sim.codec, _store(context, data_dir), ins)


def maybe_secagg(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Route SecAgg+ protocol messages through Flower's secaggplus_mod; plain ones straight through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[maybe_secagg])


@app.query("users")
def users(msg: Message, context: Context) -> Message:
    """The users this node holds."""
    _, sim, _ = _setup(context)
    held = node_users(context.node_config, sim.task.shards.users(TRAIN_SPLIT))
    return Message(RecordDict({"users": ConfigRecord({"users": held})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's share of the round."""
    if LEGACY_PARAMS in msg.content.array_records:
        return _train_legacy(msg, context)
    t0 = time.perf_counter()
    _, _, reports = _train(context, TrainIns.from_content(msg.content))
    content = reports_to_content(reports)
    # where a round's time goes: training here vs. this process's life (Flower starts one per message when deployed)
    content[TIMING] = ConfigRecord({"train_s": time.perf_counter() - t0,
                                    "proc_s": time.time() - psutil.Process().create_time()})
    return Message(content, reply_to=msg)


def _train_legacy(msg: Message, context: Context) -> Message:
    """SecAgg+ path: the weighted mean of this node's user updates as one legacy FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    c = fitins.config
    arrays = [torch.from_numpy(a.copy()) for a in parameters_to_ndarrays(fitins.parameters)]
    ins = TrainIns(int(c["round"]), float(c["client_lr"]), json.loads(str(c["users"])), json.loads(str(c["idx"])),
                   arrays[0], arrays[1] if len(arrays) > 1 else None)
    job, sim, reports = _train(context, ins)
    total = np.zeros(sim.spec.n_shared, dtype=np.float64)
    weight = 0
    for rep in reports:
        if rep.sat_out:
            continue
        w = {"tokens": rep.n_tokens, "examples": rep.n_examples, "uniform": 1}[job.fl.weighting]
        total += w * decode(rep.update).numpy().astype(np.float64)
        weight += w
    mean = (total / max(weight, 1)).astype(np.float32)
    meta = [{"user": r.user, "idx": r.idx, "n_examples": r.n_examples, "n_tokens": r.n_tokens,
             "work_tokens": r.work_tokens, "loss": r.loss, "sat_out": r.sat_out,
             "nbytes": 0 if r.update is None else r.update.nbytes} for r in reports]
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([mean]), int(weight), {"reports": json.dumps(meta)})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
