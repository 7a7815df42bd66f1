"""Many clients trained at once: each lane holds one client's parameters; every step is one batched computation.

A round's clients are queued longest-first and fed into a fixed number of lanes; when a
client finishes, its lane is reloaded with the next one (like continuous batching in LLM
serving), so lanes never wait for the slowest client of a group. Once the queue is empty,
finished lanes are compacted away, so the last steps compute only the clients still running.
Parameters are kept stacked per name, (lanes, *shape), each contiguous, so the task's
`lane_loss` can use batched matmuls over the lane dimension without copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fl_core.client import ClientData, ClientTask, clip_scale
from fl_core.params import ParamSpec


@dataclass
class LaneJob:
    """One client to train: its data and the flat parameters it starts from."""

    data: ClientData
    start: torch.Tensor  # (n_total,) flat


def train_lanes(task: ClientTask, spec: ParamSpec, jobs: Sequence[LaneJob], lr: float, clip: float,
                lanes: int) -> Iterator[tuple[int, torch.Tensor, float]]:
    """Train every job by SGD; yield (job index, trained flat parameters, mean loss) as each one finishes."""
    order = sorted((j for j in range(len(jobs)) if jobs[j].data.batches), key=lambda j: -len(jobs[j].data.batches))
    for j in range(len(jobs)):  # a client with no batch returns its start unchanged
        if not jobs[j].data.batches:
            yield j, jobs[j].start.clone(), 0.0
    if not order:
        return
    queue = deque(order)
    n_lanes = min(lanes, len(order))
    stack = {e.name: torch.empty(n_lanes, *e.shape) for e in spec.entries}
    slot_job: list[int] = []
    slot_step: list[int] = []
    slot_loss: list[float] = []

    def load(slot: int, j: int) -> None:
        for name, v in spec.views(jobs[j].start).items():
            stack[name][slot].copy_(v)

    def refill() -> None:
        while queue and len(slot_job) < n_lanes:
            j = queue.popleft()
            load(len(slot_job), j)
            slot_job.append(j)
            slot_step.append(0)
            slot_loss.append(0.0)

    refill()
    while slot_job:
        n = len(slot_job)
        params = {name: s[:n].detach().requires_grad_() for name, s in stack.items()}
        batches = [jobs[j].data.batches[s] for j, s in zip(slot_job, slot_step)]
        losses = task.lane_loss(params, batches)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():
            sq = sum(g.reshape(n, -1).pow(2).sum(1, dtype=torch.float64) for g in grads).float()
            step = clip_scale(sq, clip) * lr
            for name, g in zip(params, grads):
                stack[name][:n].sub_(g * step.view(n, *[1] * (g.dim() - 1)))
        lv = losses.detach().tolist()
        finished = []
        for s in range(n):
            slot_loss[s] += lv[s]
            slot_step[s] += 1
            if slot_step[s] == len(jobs[slot_job[s]].data.batches):
                finished.append(s)
        for s in finished:
            j = slot_job[s]
            flat = torch.cat([stack[e.name][s].reshape(-1) for e in spec.entries])
            yield j, flat, slot_loss[s] / slot_step[s]
        # finished lanes take the next queued client; once the queue is empty, the last running lanes move down
        for s in sorted(finished, reverse=True):
            if queue:
                j = queue.popleft()
                load(s, j)
                slot_job[s], slot_step[s], slot_loss[s] = j, 0, 0.0
                continue
            last = len(slot_job) - 1
            if s != last:
                for v in stack.values():
                    v[s].copy_(v[last])
                slot_job[s], slot_step[s], slot_loss[s] = slot_job[last], slot_step[last], slot_loss[last]
            slot_job.pop(), slot_step.pop(), slot_loss.pop()
