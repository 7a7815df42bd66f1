"""The in-process federated round loop: select -> plan the round on the fleet -> train -> compress -> aggregate -> server step.

One round, in order:
1. the fleet's eligible devices at the simulated clock; over-select ceil(overselect * N);
2. each selected client's data for the round (task.client_data, seeded by (seed, round, client));
3. the fleet decides dropouts, deadline and the first N reports before any compute is spent;
4. the reporting clients train at once in lanes (fl_core.lanes) from the global model
   (plus their own FedPer parameters, kept in the ClientStore and never uploaded);
5. each update is encoded as it would be sent (int8 / topk with error feedback / float32,
   or not at all when its norm is under the sit-out threshold), then decoded on the server;
6. the aggregator (default: weighted mean; any `fl_core.aggregate.Aggregator`) averages them
   and the server optimizer steps; 7. evaluate every K rounds.
After a round, `run` checkpoints atomically once `checkpoint_every_s` has passed (and after the last).

Every random draw is a pure function of (seed, round, client), so `resume=True` after a kill
replays the rounds since the last checkpoint and reaches bitwise the parameters of an
uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkey.config import to_dict
from fedkey.errors import FedkeyError
from fl_core.aggregate import Aggregator, RoundAbandoned, WeightedMean
from fl_core.checkpoint import load_latest, save_checkpoint
from fl_core.client import ClientData, ClientTask, ClientUpdate, client_init
from fl_core.compress import Codec, decode, seeded_generator
from fl_core.config import FleetConfig, FLConfig
from fl_core.fleet import Fleet
from fl_core.executors import run_clients
from fl_core.lanes import LaneJob
from fl_core.params import ParamSpec
from fl_core.server import ServerState, server_init, server_update
from fl_core.store import ClientStore

LOCAL, RESIDUAL = "local", "residual"
# settings that may change between a run and its resumption without changing its result
RESUMABLE = {"threads", "eval_every", "eval_positions", "workers", "checkpoint_every_s"}


def decay(cfg: FLConfig, tokens: int) -> float:
    """Cosine decay from 1 to cfg.lr_floor over the token budget (the central baseline's schedule)."""
    frac = min(1.0, tokens / max(1, cfg.max_tokens))
    return cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac))


def client_lr(cfg: FLConfig, tokens: int) -> float:
    """The client learning rate after `tokens` trained tokens."""
    return cfg.client_lr * decay(cfg, tokens)


def server_lr(cfg: FLConfig, round_: int, tokens: int = 0) -> float:
    """The server learning rate: linear warm-up; adaptive optimizers also decay it.

    An adaptive server step is normalized by the deltas' running scale, so a smaller client
    learning rate alone would not shrink it; plain SGD's step shrinks with the client's.
    """
    lr = cfg.server_lr * (decay(cfg, tokens) if cfg.server_opt != "sgd" else 1.0)
    if cfg.warmup_rounds > 0:
        lr *= min(1.0, (round_ + 1) / cfg.warmup_rounds)
    return lr


@dataclass
class Simulation:
    """A federated training run over `population` (client ids) of `task`, checkpointed in `out_dir`."""

    task: ClientTask
    spec: ParamSpec
    population: list[str]
    init_params: torch.Tensor                       # (n_total,) flat: shared then local
    cfg: FLConfig
    fleet_cfg: FleetConfig
    out_dir: Path
    aggregator: Aggregator | None = None
    tz_hours: np.ndarray | None = None
    evaluate: Callable[[int, torch.Tensor], dict[str, Any]] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not self.population:
            raise FedkeyError("federated training needs at least one client")
        self.fleet = Fleet(len(self.population), self.fleet_cfg, self.cfg.seed, self.tz_hours, self.selection_weights())
        self.codec = Codec(self.cfg.compress, self.spec, self.cfg.topk_frac)
        self.store = ClientStore(self.cfg.client_store, self.out_dir / "client_state")
        self.aggregator = self.aggregator or WeightedMean(self.spec.n_shared)
        self.init_local = self.init_params[self.spec.n_shared:].clone()
        self.state = server_init(self.init_params[:self.spec.n_shared], self.cfg)
        self.tokens, self.clock_s, self.up_total, self.down_total = 0, 0.0, 0, 0
        self._last_checkpoint_s = time.perf_counter()
        self._checkpoint_round = 0

    def selection_weights(self) -> np.ndarray | None:
        """Per-client selection odds: None (uniform), or max(messages, cap) so a client's every message is equally likely to be trained."""
        if self.cfg.client_sampling == "uniform":
            return None
        size = getattr(self.task, "client_size", None)
        if size is None:
            raise FedkeyError("client_sampling 'size' needs a task that tells each client's size; use uniform")
        return np.maximum(np.array([size(c) for c in self.population], dtype=np.float64), self.cfg.max_messages)

    # ---- state -------------------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"fl": {k: v for k, v in to_dict(self.cfg).items() if k not in RESUMABLE},
                "fleet": to_dict(self.fleet_cfg), "params": self.spec.names, "population": len(self.population)}

    def checkpoint(self) -> None:
        """Save everything a resumed run needs after the current round."""
        save_checkpoint(self.out_dir, {
            "round": self.state.round, "server": self.state.state_dict(), "aggregator": self.aggregator.state_dict(),
            "store": self.store.state_dict(), "history": self.history, "tokens": self.tokens, "clock_s": self.clock_s,
            "up_total": self.up_total, "down_total": self.down_total, "config": self._config()})
        # device versions are kept back to the checkpoint before this one: resuming from checkpoint.prev.pt
        # (when the newest is corrupt) replays from there and needs them too
        self.store.floor, self._checkpoint_round = self._checkpoint_round, self.state.round
        self._last_checkpoint_s = time.perf_counter()

    def maybe_checkpoint(self) -> bool:
        """Checkpoint if `checkpoint_every_s` has passed since the last one or the budget is spent; True if it did."""
        every = self.cfg.checkpoint_every_s
        if every > 0 and time.perf_counter() - self._last_checkpoint_s < every and not self.done():
            return False
        self.checkpoint()
        return True

    def restore(self) -> bool:
        """Continue from the newest checkpoint in out_dir; False if there is none."""
        ck = load_latest(self.out_dir)
        if ck is None:
            return False
        if ck["config"] != self._config():
            changed = [k for k in ck["config"]["fl"] if ck["config"]["fl"].get(k) != self._config()["fl"].get(k)]
            raise FedkeyError(f"{self.out_dir}: checkpoint was made with other settings ({', '.join(changed) or 'fleet/model'}); "
                              f"use the same ones, another --run-dir, or delete {self.out_dir} to start over")
        self.state = ServerState.from_state_dict(ck["server"])
        self.aggregator.load_state_dict(ck["aggregator"])
        self.store.load_state_dict(ck["store"])
        self.history = list(ck["history"])
        self.tokens, self.clock_s = int(ck["tokens"]), float(ck["clock_s"])
        self.up_total, self.down_total = int(ck["up_total"]), int(ck["down_total"])
        self._checkpoint_round = self.state.round  # the store's floor stays 0 until the next checkpoint moves it
        return True

    def full_params(self) -> torch.Tensor:
        """The global model as one flat vector (FedPer local parameters at their initial values)."""
        return torch.cat([self.state.params, self.init_local])

    def done(self) -> bool:
        """Whether the token (or round) budget is spent."""
        cfg = self.cfg
        if self.tokens >= cfg.max_tokens or bool(cfg.max_rounds and self.state.round >= cfg.max_rounds):
            return True
        # an aggregator with a budget of its own (DP: a target epsilon) can end training before the next round
        return not getattr(self.aggregator, "may_run_round", lambda: True)()

    # ---- one round ---------------------------------------------------------------------------------------------
    def client_data(self, round_: int, idx: int) -> ClientData:
        """Client `idx`'s work in `round_` (a pure function of seed, round and client)."""
        return self.task.client_data(self.population[idx], np.random.default_rng([self.cfg.seed, 7100, round_, idx]))

    def run_round(self) -> dict[str, Any]:
        """Run the next round, update the state, and return its log line."""
        cfg, r, t0 = self.cfg, self.state.round, time.perf_counter()
        eligible, selected = self.fleet.select(r, self.clock_s, cfg.clients_per_round)
        data = {i: self.client_data(r, i) for i in selected}
        down = 4 * self.spec.n_shared
        plan = self.fleet.plan(r, eligible, selected, [data[i].work_tokens for i in selected], cfg.clients_per_round,
                               down, self.codec.wire_bytes())
        lr_c, lr_s = client_lr(cfg, self.tokens), server_lr(cfg, r, self.tokens)
        updates = self.train(r, plan.used, data, lr_c)
        t_train = time.perf_counter() - t0

        sent, weights, ids, sat_out, up = [], [], [], 0, 0
        for u in updates:
            idx = u.info["idx"]
            residual = self.store.get(u.client, RESIDUAL, r) if self.codec.uses_residual else None
            if cfg.sit_out_norm and float(u.delta.norm()) < cfg.sit_out_norm:
                sat_out += 1
                if self.codec.uses_residual:  # what was not sent is not forgotten
                    self.store.put(u.client, RESIDUAL, r, (u.delta + (0 if residual is None else residual.float())).half())
                continue
            enc, rest = self.codec.encode(u.delta, seeded_generator(cfg.seed, 7200, r, idx), residual)
            if rest is not None:
                self.store.put(u.client, RESIDUAL, r, rest.half())
            up += enc.nbytes
            sent.append(decode(enc).numpy())
            weights.append(u.weight(cfg.weighting))
            ids.append(u.client)
        skipped = len(sent) < max(1, self.fleet_cfg.min_clients)
        info: dict[str, Any] = {}
        res = None
        if not skipped:
            try:  # every selected client joined the round, so those whose update is not in `sent` count as dropped
                res = self.aggregator.aggregate(sent, weights, ids, n_dropped=len(selected) - len(sent))
            except RoundAbandoned as e:  # e.g. secure aggregation lost too many clients: nothing released or changed
                skipped, info = True, {"abandoned": str(e)}
        if res is not None:
            info = {"rejected": len(res.rejected), **{k: v for k, v in res.info.items() if isinstance(v, (int, float))}}
            mean = torch.from_numpy(np.asarray(res.mean, dtype=np.float32))
            self.state = server_update(self.state, mean, cfg, lr_s)
            delta_norm = float(mean.norm())
        else:
            self.state = ServerState(self.state.params, self.state.slots, r + 1)
            delta_norm = 0.0
        tokens = sum(data[i].work_tokens for i in plan.used)
        self.tokens += tokens
        self.clock_s += plan.duration_s
        self.up_total += up
        self.down_total += down * len(selected)
        wsum = sum(u.n_tokens for u in updates) or 1
        log = {"round": r + 1, "eligible": eligible, "selected": len(selected), "completed": len(plan.used),
               "dropped": len(plan.dropped), "late": len(plan.late), "aborted": len(plan.aborted),
               "sat_out": sat_out, "uploaded": len(sent), "skipped": skipped,
               "tokens": tokens, "tokens_total": self.tokens,
               "loss": sum(u.loss * u.n_tokens for u in updates) / wsum, "client_lr": lr_c,
               "server_lr": lr_s, "delta_norm": delta_norm,
               "down_bytes": down * len(selected), "up_bytes": up, "down_total": self.down_total,
               "up_total": self.up_total, "sim_round_s": plan.duration_s, "sim_clock_s": self.clock_s,
               "train_s": t_train, **info}
        if self.evaluate and cfg.eval_every and (r + 1) % cfg.eval_every == 0 and not self.done():
            log["eval"] = self.evaluate(r + 1, self.full_params())
        log["wall_s"] = time.perf_counter() - t0
        self.history.append(log)
        return log

    def train(self, round_: int, used: list[int], data: dict[int, ClientData], lr: float) -> list[ClientUpdate]:
        """Train the reporting clients in lanes; their FedPer parameters go back to the store, never to the server."""
        spec, g = self.spec, self.state.params
        jobs = []
        for i in used:
            local = self.store.get(self.population[i], LOCAL, round_) if spec.n_total > spec.n_shared else None
            jobs.append(LaneJob(data[i], client_init(spec, g, local, self.init_local)))
        out: list[ClientUpdate | None] = [None] * len(used)
        for j, flat, loss in run_clients(self.task, spec, jobs, lr, self.cfg.client_clip, self.cfg.executor,
                                         self.cfg.workers, self.cfg.lanes):
            i, d = used[j], data[used[j]]
            local = flat[spec.n_shared:].clone() if spec.n_total > spec.n_shared else None
            if local is not None:
                self.store.put(self.population[i], LOCAL, round_, local)
            out[j] = ClientUpdate(self.population[i], flat[:spec.n_shared] - g, d.n_examples, d.n_tokens, loss,
                                  local, {"idx": i})
        return [u for u in out if u is not None]

    def run(self, resume: bool = False, on_round: Callable[[dict[str, Any]], None] | None = None,
            on_checkpoint: Callable[[], None] | None = None) -> ServerState:
        """Run rounds until the budget is spent (continuing from a checkpoint with resume).

        `on_checkpoint` runs after each checkpoint, e.g. to write logs that must agree with it."""
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if not (resume and self.restore()):
            shutil.rmtree(self.out_dir / "client_state", ignore_errors=True)  # a fresh run forgets old devices
            self.checkpoint()  # round 0: a kill before the first round resumes from the initial model
        while not self.done():
            log = self.run_round()
            saved = self.maybe_checkpoint()
            if on_round:
                on_round(log)
            if saved and on_checkpoint:
                on_checkpoint()
        return self.state
