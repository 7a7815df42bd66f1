"""One secure-aggregation round run in process: real clients and server objects, with timing and byte counts.

Byte counts are protocol payloads (keys, ciphertexts, vectors, shares, 4-byte client ids),
without transport framing. Client time is the sum of that client's protocol calls; in a
real fleet the clients run in parallel, so a round's client-side latency is the max, while
this process (and a simulation of the fleet) pays the sum.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from fl_core.privacy.secagg.protocol import Observer, SecAggClient, SecAggError, SecAggServer, peer_graph

_ID = 4  # bytes of a client id on the wire


def threshold_for(n: int, dropout_tolerance: float = 1 / 3) -> int:
    """Shares needed to unmask: survives floor(tolerance * n) dropouts, never below a strict majority."""
    if not 0 <= dropout_tolerance < 1:
        raise SecAggError(f"secure aggregation: dropout tolerance must be in [0, 1), got {dropout_tolerance}")
    return min(n, max(n - math.floor(dropout_tolerance * n), n // 2 + 1))


@dataclass
class SecAggReport:
    """The unmasked ring sum and what the round cost."""

    total: np.ndarray
    survivors: list[int]  # 0-based indices of the clients whose inputs are in the sum
    threshold: int
    client_s: list[float]  # protocol compute per client (all rounds)
    server_s: float
    phase_s: dict[str, float] = field(default_factory=dict)  # clients' sum + server, per protocol round
    client_up_bytes: list[int] = field(default_factory=list)
    client_down_bytes: list[int] = field(default_factory=list)

    @property
    def server_in_bytes(self) -> int:
        """Everything the clients uploaded."""
        return sum(self.client_up_bytes)

    @property
    def server_out_bytes(self) -> int:
        """Everything the clients downloaded."""
        return sum(self.client_down_bytes)


def secure_sum(inputs: Sequence[np.ndarray], dropout_tolerance: float = 1 / 3,
               drop_after_shares: Collection[int] = (), drop_before_unmask: Collection[int] = (),
               observer: Observer | None = None, session: bytes | None = None, neighbors: int = 0) -> SecAggReport:
    """Run the protocol over n encoded inputs (ring vectors of one dtype); dropouts are 0-based client indices.

    `neighbors`: 0 masks and shares between every pair (Bonawitz et al. 2017); k > 0 only between
    the k peers of a random k-regular graph (SecAgg+), with the threshold taken over each
    client's k + 1 share holders, so the dropout tolerance holds per neighbourhood.

    `drop_after_shares`: the client completes key advertisement and sharing, then never sends its input.
    `drop_before_unmask`: the client sends its masked input but does not answer the unmasking request.
    Raises SecAggError when fewer than the threshold remain at any step.
    """
    n = len(inputs)
    if n < 2:
        raise SecAggError("secure aggregation needs at least 2 clients in a round")
    dim, dtype = inputs[0].shape[0], inputs[0].dtype
    session = session or os.urandom(16)
    peers = peer_graph(n, neighbors, session)
    t = threshold_for(len(peers[1]) + 1, dropout_tolerance)
    cids = range(1, n + 1)
    gone_2, gone_3 = {i + 1 for i in drop_after_shares}, {i + 1 for i in drop_before_unmask}
    c_time = dict.fromkeys(cids, 0.0)
    up = dict.fromkeys(cids, 0)
    down = dict.fromkeys(cids, 0)
    phase: dict[str, float] = {}
    s_time = 0.0

    def timed(name, who, fn, *args):
        nonlocal s_time
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        phase[name] = phase.get(name, 0.0) + dt
        if who is None:
            s_time += dt
        else:
            c_time[who] += dt
        return out

    server = SecAggServer(peers, t, dim, dtype, session, observer, min_survivors=threshold_for(n, dropout_tolerance))
    clients = {c: timed("keys", c, SecAggClient, c, peers, t, session) for c in cids}
    adverts = {c: timed("keys", c, clients[c].advertise_keys) for c in cids}
    for c in cids:
        up[c] += 64
    adverts = timed("keys", None, server.collect_keys, adverts)
    sent = {}
    for c in cids:
        down[c] += sum(1 for v in peers[c] if v in adverts) * (64 + _ID)
        sent[c] = timed("share", c, clients[c].share_keys, adverts)
        up[c] += sum(len(ct) + _ID for ct in sent[c].values())
    inbox = timed("share", None, server.route_shares, sent)
    for c in sorted(inbox):
        down[c] += sum(len(ct) + _ID for ct in inbox[c].values())
        if c in gone_2:
            continue
        y = timed("mask", c, clients[c].masked_input, inbox[c], inputs[c - 1])
        up[c] += y.nbytes
        timed("mask", None, server.receive_masked, c, y)
        del y
    survivors = timed("mask", None, server.survivors)
    responses = {}
    for c in survivors:
        down[c] += len(survivors) * _ID
        if c in gone_3:
            continue
        responses[c] = timed("unmask", c, clients[c].unmask, survivors)
        up[c] += sum(len(s) + _ID for s in responses[c].values())
    total = timed("unmask", None, server.unmask, responses)
    return SecAggReport(total=total, survivors=[c - 1 for c in survivors], threshold=t,
                        client_s=[c_time[c] for c in cids], server_s=s_time, phase_s=phase,
                        client_up_bytes=[up[c] for c in cids], client_down_bytes=[down[c] for c in cids])
