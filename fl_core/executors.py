"""How a round's clients are executed; the algorithm (fl_core.client) is the same for all of them.

- sequential: one client after another in the calling thread (what one Flower ClientApp does).
- threads: one worker thread per core, each training whole clients with one intra-op
  thread. Clients are independent, so the cores never wait on each other inside a step,
  which small per-client matmuls split across cores would (and under CPU contention an
  intra-op barrier waits for a descheduled thread). Longest clients go first.
- lanes: many clients stacked in one batched computation over a lane dimension
  (fl_core.lanes); the shape for accelerators, where one wide kernel beats many small ones.

Every executor yields (job index, trained flat parameters, mean loss); a client's result
does not depend on which worker or lane trained it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

import torch

from fl_core.client import ClientTask, local_train
from fl_core.lanes import LaneJob, train_lanes
from fl_core.params import ParamSpec

EXECUTORS = ("threads", "sequential", "lanes")


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_clients(task: ClientTask, spec: ParamSpec, jobs: Sequence[LaneJob], lr: float, clip: float,
                executor: str = "threads", workers: int = 0, lanes: int = 8) -> Iterator[tuple[int, torch.Tensor, float]]:
    """Train every job; yield (job index, trained flat parameters, mean loss) as clients finish."""
    if executor == "lanes":
        yield from train_lanes(task, spec, jobs, lr, clip, lanes)
        return
    workers = workers or default_workers()
    if executor == "sequential" or workers == 1 or len(jobs) <= 1:
        for j, job in enumerate(jobs):
            flat, loss = local_train(task, spec, job.start, job.data, lr, clip)
            yield j, flat, loss
        return
    yield from _threads(task, spec, jobs, lr, clip, workers)


def _threads(task: ClientTask, spec: ParamSpec, jobs: Sequence[LaneJob], lr: float, clip: float,
             workers: int) -> Iterator[tuple[int, torch.Tensor, float]]:
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for j in sorted(range(len(jobs)), key=lambda j: -jobs[j].data.work_tokens):
        todo.put(j)
    done: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while True:
            try:
                j = todo.get_nowait()
            except queue.Empty:
                return
            try:
                flat, loss = local_train(task, spec, jobs[j].start, jobs[j].data, lr, clip)
                done.put((j, flat, loss, None))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                done.put((j, None, 0.0, e))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker is one core; results do not depend on the worker
    pool = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(jobs)))]
    try:
        for t in pool:
            t.start()
        for _ in range(len(jobs)):
            j, flat, loss, err = done.get()
            if err is not None:
                raise err
            yield j, flat, loss
    finally:
        while not todo.empty():  # on an error, the other workers stop after their current client
            try:
                todo.get_nowait()
            except queue.Empty:
                break
        for t in pool:
            t.join()
        torch.set_num_threads(threads_before)
