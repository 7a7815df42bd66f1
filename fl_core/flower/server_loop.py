"""The server half of fl_core's round with Flower SuperNodes as the clients' devices.

Per round, the same fl_core calls as the in-process engine (`fl_core.simulation.Simulation.run_round`):
`Fleet.select` draws the cohort (over-selection included) with the same seeds, `client_lr`/`server_lr`
give the learning rates, `fl_core.compress.decode` turns what arrived into dense deltas, the aggregator
averages them in the cohort's order and `server_update` steps the server optimizer. What differs is what a
real federation decides for itself instead of the simulated fleet: which devices are available (the nodes
that are online), who drops out (a node that errors or does not answer within the round timeout) and who
is late (only the first N reports are kept).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedkey.errors import FedkeyError
from fl_core.aggregate import RoundAbandoned
from fl_core.compress import decode
from fl_core.fleet import Fleet
from fl_core.flower.job import Job
from fl_core.flower.wire import TIMING, TrainIns, UserReport, content_to_reports
from fl_core.server import ServerState, server_update
from fl_core.simulation import Simulation, client_lr, server_lr

POLL_S = 0.1  # how often the ServerApp asks the SuperLink for replies (Flower's own loop waits 3 s)
BENCH_ROUNDS = 3  # a node that failed or missed a deadline sits out this many rounds before it is tried again
USERS_QUERY = "query.users"


def log(msg: str) -> None:
    """One line into the run's log (`flwr run --stream` / `flwr log` show it)."""
    print(f"[fedkey] {msg}", flush=True)


class LiveFleet(Fleet):
    """fl_core's Fleet whose eligible devices are the users on SuperNodes that are online now.

    Selection (`Fleet.select`: seeds, over-selection) is inherited unchanged; only availability
    comes from the federation instead of the simulated charging trace.
    """

    live: np.ndarray

    def eligible(self, t_s: float) -> np.ndarray:
        """Indices of users whose SuperNode is online."""
        return np.flatnonzero(self.live)


def wait_for_nodes(grid: Grid, expect: int, wait_s: float) -> list[int]:
    """Node ids once `expect` SuperNodes are connected (or `wait_s` passed); at least one is needed."""
    deadline = time.monotonic() + wait_s
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < max(1, expect) and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise FedkeyError(f"no SuperNode connected within {wait_s:.0f} s; start flower-supernode on the devices")
    if len(nodes) < expect:
        log(f"only {len(nodes)} of {expect} expected SuperNodes connected after {wait_s:.0f} s; going on with them")
    return nodes


@dataclass
class Exchange:
    """Replies of one round trip."""

    replies: dict[int, Message] = field(default_factory=dict)   # node -> reply (errors included)
    order: list[int] = field(default_factory=list)              # nodes in the order their replies arrived
    missing: list[int] = field(default_factory=list)            # nodes that had not answered at the deadline
    waited_s: float = 0.0


def exchange(grid: Grid, messages: list[Message], timeout_s: float,
             enough: Callable[[dict[int, Message]], bool] | None = None, straggler_factor: float = 0.0) -> Exchange:
    """Push messages and poll for replies until all answered, `enough(replies)` holds, or the deadline.

    The deadline is `timeout_s` after the push; with `straggler_factor` k > 0 it comes earlier once the first
    reply is in: at k times the first reply's latency (nodes slower than that are treated as gone).
    """
    t0 = time.monotonic()
    ids = dict(zip(grid.push_messages(messages), (m.metadata.dst_node_id for m in messages)))
    out, deadline = Exchange(), t0 + timeout_s
    pending = set(ids)
    while pending:
        for msg in grid.pull_messages(list(pending)):
            mid = msg.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                node = ids[mid]
                if not out.replies and straggler_factor > 0:
                    deadline = min(deadline, t0 + straggler_factor * (time.monotonic() - t0))
                out.replies[node] = msg
                out.order.append(node)
        if not pending or (enough and enough(out.replies)) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    out.missing = sorted(ids[m] for m in pending)
    out.waited_s = time.monotonic() - t0
    return out


def discover_users(grid: Grid, nodes: Iterable[int], timeout_s: float) -> dict[str, int]:
    """Ask every node which users it holds (a `query.users` message); user -> node id."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=USERS_QUERY) for n in nodes]
    ex = exchange(grid, msgs, timeout_s)
    where: dict[str, int] = {}
    for node, reply in ex.replies.items():
        if reply.has_error():
            log(f"SuperNode {node} could not list its users: {reply.error.reason}")
            continue
        for u in reply.content.config_records["users"]["users"]:
            if u in where:
                raise FedkeyError(f"user {u!r} is held by two SuperNodes ({where[u]} and {node}); "
                                  "give each node its own --node-config users/partition")
            where[str(u)] = node
    for node in ex.missing:
        log(f"SuperNode {node} did not list its users within {timeout_s:.0f} s; it takes no part")
    if not where:
        raise FedkeyError("no SuperNode reported any user; check their --node-config (data, users / partition-id)")
    return where


@dataclass
class RoundDriver:
    """One round of FedAvg over Flower nodes, on the global state of an in-process `Simulation` object.

    The Simulation (built exactly as `fedkey train --engine local` builds it) holds the server state, the
    token budget, the aggregator, the codec, the history and writes the checkpoints, so a Flower run stops,
    logs and checkpoints like the in-process engine; its own training loop is not used.
    """

    job: Job
    sim: Simulation

    def __post_init__(self) -> None:
        # the same selection odds as in-process (client_sampling), so a deployment reproduces its cohorts
        self.fleet = LiveFleet(len(self.sim.population), self.job.fleet, self.job.fl.seed,
                               weights=self.sim.fleet.weights)
        self.fleet.live = np.ones(len(self.sim.population), dtype=bool)
        self.benched: dict[int, int] = {}  # node -> first round it may take part in again

    @property
    def population(self) -> list[str]:
        """User ids; user i is population[i]."""
        return self.sim.population

    @property
    def round(self) -> int:
        """Rounds done so far."""
        return self.sim.state.round

    def select(self, live_users: np.ndarray) -> tuple[int, list[int]]:
        """This round's cohort (population indices) among users on live nodes."""
        self.fleet.live = live_users
        return self.fleet.select(self.round, 0.0, self.job.fl.clients_per_round)

    def instructions(self, selected: list[int], holder: Callable[[int], int]) -> dict[int, TrainIns]:
        """One TrainIns per node for the selected users it should train."""
        sim, cfg = self.sim, self.job.fl
        by_node: dict[int, list[int]] = {}
        for i in selected:
            by_node.setdefault(holder(i), []).append(i)
        local0 = sim.init_local if sim.spec.n_total > sim.spec.n_shared else None
        lr = client_lr(cfg, sim.tokens)
        return {n: TrainIns(self.round, lr, [self.population[i] for i in idx], idx, sim.state.params, local0)
                for n, idx in by_node.items()}

    def apply(self, selected: list[int], reports: list[UserReport], n_failed: int, seconds: float) -> dict[str, Any]:
        """Aggregate the kept reports (in population order, as the in-process engine does) and step."""
        sim, cfg, r = self.sim, self.job.fl, self.round
        used = sorted(reports, key=lambda rep: rep.idx)
        sent, weights, ids, sat_out, up = [], [], [], 0, 0
        for rep in used:
            if rep.sat_out:
                sat_out += 1
                continue
            up += rep.update.nbytes
            sent.append(decode(rep.update).numpy())
            weights.append({"tokens": float(rep.n_tokens), "examples": float(rep.n_examples), "uniform": 1.0}[cfg.weighting])
            ids.append(rep.user)
        skipped = len(sent) < max(1, self.job.fleet.min_clients)
        info: dict[str, Any] = {}
        mean = None
        if not skipped:
            try:  # as in the in-process engine: every selected user whose update is not here counts as dropped
                res = sim.aggregator.aggregate(sent, weights, ids, n_dropped=len(selected) - len(sent))
                info = {"rejected": len(res.rejected),
                        **{k: v for k, v in res.info.items() if isinstance(v, (int, float))}}
                mean = res.mean
            except RoundAbandoned as e:  # the aggregator released nothing (e.g. too few clients for it)
                info = {"abandoned": str(e)}
        return self._step(selected, used, mean, n_failed, sat_out, len(sent), up, seconds, info)

    def apply_mean(self, selected: list[int], reports: list[UserReport], mean: np.ndarray | None, n_failed: int,
                   seconds: float) -> dict[str, Any]:
        """Step with a mean computed elsewhere (Flower's SecAgg+ hands back only the aggregate)."""
        used = sorted(reports, key=lambda rep: rep.idx)
        up = sum(rep.info.get("nbytes", 0) for rep in used)
        sat_out = sum(rep.sat_out for rep in used)
        return self._step(selected, used, mean, n_failed, sat_out, len(used) - sat_out, up, seconds, {"secagg": 1})

    def _step(self, selected: list[int], used: list[UserReport], mean: np.ndarray | None, n_failed: int,
              sat_out: int, uploaded: int, up: int, seconds: float, info: dict[str, Any]) -> dict[str, Any]:
        sim, cfg, r = self.sim, self.job.fl, self.round
        if mean is not None:
            m = torch.from_numpy(np.asarray(mean, dtype=np.float32))
            sim.state = server_update(sim.state, m, cfg, server_lr(cfg, r))
            delta_norm = float(m.norm())
        else:  # nothing usable arrived: the model stays, the round counts (as in the in-process engine)
            sim.state = ServerState(sim.state.params, sim.state.slots, r + 1)
            delta_norm = 0.0
        tokens = sum(rep.work_tokens for rep in used)
        lr_c = client_lr(cfg, sim.tokens)
        sim.tokens += tokens
        down = 4 * sim.spec.n_shared
        sim.up_total += up
        sim.down_total += down * len(selected)
        wsum = sum(rep.n_tokens for rep in used) or 1
        entry = {"round": r + 1, "params_sha256": hashlib.sha256(sim.state.params.numpy().tobytes()).hexdigest(),
                 "selected": len(selected), "completed": len(used), "dropped": n_failed,
                 # over-selection: reports past the first N are cut off, as the in-process engine counts them
                 "late": 0, "aborted": len(selected) - len(used) - n_failed, "sat_out": sat_out,
                 "uploaded": uploaded, "skipped": mean is None, "tokens": tokens, "tokens_total": sim.tokens,
                 "loss": sum(rep.loss * rep.n_tokens for rep in used) / wsum, "client_lr": lr_c,
                 "server_lr": server_lr(cfg, r), "delta_norm": delta_norm, "down_bytes": down * len(selected),
                 "up_bytes": up, "down_total": sim.down_total, "up_total": sim.up_total, **info}
        if sim.evaluate and cfg.eval_every and (r + 1) % cfg.eval_every == 0 and not sim.done():
            entry["eval"] = sim.evaluate(r + 1, sim.full_params())
        entry["wall_s"] = seconds
        sim.history.append(entry)
        return entry


def run_rounds(grid: Grid, driver: RoundDriver, holder: Callable[[int], int] | None,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Rounds until the budget is spent. `holder(i)`: node holding user i (None: any live node may train anyone)."""
    job = driver.job
    while not driver.sim.done():
        t0 = time.perf_counter()
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise FedkeyError("every SuperNode is gone; training stops (the last global model is checkpointed)")
        r = driver.round
        live = {n for n in nodes if driver.benched.get(n, 0) <= r} or set(nodes)
        if holder is None:  # simulation: virtual nodes are execution slots that read the shared run directory
            live_users = np.ones(len(driver.population), dtype=bool)
            eligible, selected = driver.select(live_users)
            slots = sorted(live)
            slot = {i: slots[k % len(slots)] for k, i in enumerate(selected)}
            place = slot.__getitem__
        else:
            live_users = np.array([holder(i) in live for i in range(len(driver.population))])
            eligible, selected = driver.select(live_users)
            place = holder
        ins = driver.instructions(selected, place)
        msgs = [Message(i.to_content(), dst_node_id=n, message_type="train", group_id=str(r + 1))
                for n, i in ins.items()]
        need = job.fl.clients_per_round

        def enough(replies: dict[int, Message]) -> bool:  # over-selection: the first N reports close the round
            return sum(len(ins[n].users) for n, m in replies.items() if not m.has_error()) >= need

        ex = exchange(grid, msgs, job.round_timeout_s, enough, job.straggler_factor)
        reports: list[UserReport] = []
        failed, train_s, proc_s, errors = 0, [], [], []
        for node in ex.order:
            reply = ex.replies[node]
            if reply.has_error():
                errors.append(reply.error.reason.strip())
                failed += len(ins[node].users)
                driver.benched[node] = r + 1 + BENCH_ROUNDS
                log(f"round {r + 1}: SuperNode {node} failed ({reply.error.reason.strip()[:300]}); "
                    f"its {len(ins[node].users)} users are dropped from this round and it sits out {BENCH_ROUNDS} rounds")
                continue
            reports += content_to_reports(reply.content)
            if TIMING in reply.content.config_records:
                train_s.append(float(reply.content.config_records[TIMING]["train_s"]))
                proc_s.append(float(reply.content.config_records[TIMING]["proc_s"]))
        for node in ex.missing:
            if len(reports) >= need:
                break  # still running after the first N reports: late, not failed
            failed += len(ins[node].users)
            driver.benched[node] = r + 1 + BENCH_ROUNDS
            log(f"round {r + 1}: SuperNode {node} did not answer within {ex.waited_s:.0f} s; its "
                f"{len(ins[node].users)} users are dropped from this round and it sits out {BENCH_ROUNDS} rounds")
        if not reports and errors and not ex.missing:
            # every node answered with an exception: a bug or a broken set-up, not a flaky fleet
            raise FedkeyError(f"round {r + 1}: every SuperNode's ClientApp failed; the first said: {errors[0][:1500]}")
        reports = reports[:need]
        entry = driver.apply(selected, reports, failed, time.perf_counter() - t0)
        entry["eligible"] = int(eligible)
        entry.update(nodes=len(nodes), node_train_s=train_s, node_proc_s=proc_s, exchange_s=ex.waited_s,
                     wall_s=time.perf_counter() - t0)
        driver.sim.checkpoint()
        if on_round:
            on_round(entry)
