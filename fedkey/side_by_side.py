"""Stages that do not depend on each other, run side by side in child processes, each on its share of the cores.

The centralized baseline and the federated model both start from the prepared data and never read each
other. This model's small batches use a second core poorly (centralized training: 4,800 tokens/s on two
threads against 3,600 on one, and far less when two multi-threaded jobs share two cores), so on a 2-core
machine two one-core lanes finish sooner than the same stages one after another on both cores. Each lane is
`fedkey run --only <its stages>` in a child pinned to its cores with that many torch threads, so a lane's
results do not depend on what runs beside it. Children draw no bars: they write their state to a file
that the parent draws, and their output to RUN_DIR/logs/<lane>.log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedkey.errors import FedkeyError
from fedkey.progress import PROGRESS_FILE_ENV, read_file_bar
from fedkey.tables import console

# stage names by lane; stages of different lanes never read each other's outputs
LANES: dict[str, tuple[str, ...]] = {
    "centralized": ("centralized baseline", "evaluate centralized"),
    "federated": ("federated training", "evaluate federated"),
}
LANE_FLAG = "--lane-child"  # hidden flag of `fedkey run`: this process is a lane (no report, dies with its parent)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning, so no lanes
        return []


def split_cpus(cpus: list[int], n: int) -> list[list[int]]:
    """n contiguous, nearly equal shares of the CPUs (the first lanes get the extra ones)."""
    size, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(cpus[start:end])
        start = end
    return out


@dataclass
class Lane:
    """One child process running some stages of the job."""

    name: str
    stages: list[str]
    cpus: list[int]
    log: Path
    progress: Path
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    def start(self, argv: list[str]) -> None:
        """Launch `fedkey run --only <stages>` pinned to this lane's CPUs."""
        env = {**os.environ, PROGRESS_FILE_ENV: str(self.progress)}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(len(self.cpus))
        cpus = set(self.cpus)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.progress.unlink(missing_ok=True)
        with open(self.log, "w", encoding="utf-8") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedkey.cli", "run", *argv, "--only", *self.stages,
                                          LANE_FLAG], stdout=out, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.started = time.perf_counter()

    def poll(self) -> int | None:
        """The exit code once the child has ended."""
        code = self.proc.poll() if self.proc else None
        if code is not None and self.ended is None:
            self.ended = time.perf_counter()
        return code

    def stop(self) -> None:
        """End the child (it keeps its checkpoints, as after Ctrl-C)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def error(self) -> str:
        """The child's one-line error, else its last line of output."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        errors = [ln.split(": error: ", 1)[1] for ln in lines if ln.startswith("fedkey ") and ": error: " in ln]
        return (errors or lines or ["no output"])[-1]


def run_lanes(lanes: list[Lane], argv: list[str], progress: bool) -> None:
    """Run the lanes to the end, drawing each one's bar; the first lane to fail stops the others."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    for lane in lanes:
        lane.start(argv)
        cores = ", ".join(map(str, lane.cpus))
        console.print(f"[bold]{lane.name}[/] lane: {', '.join(lane.stages)} on core{'s' if len(lane.cpus) > 1 else ''} "
                      f"{cores} (log: {lane.log})")
    failed: Lane | None = None
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
    try:
        with Progress(*cols, disable=not progress, transient=False) as prog:
            tasks = {lane.name: prog.add_task(lane.name, total=None, count="", status="starting") for lane in lanes}
            while failed is None and any(lane.poll() is None for lane in lanes):
                for lane in lanes:
                    _draw(prog, tasks[lane.name], lane)
                failed = next((lane for lane in lanes if lane.poll() not in (None, 0)), None)
                time.sleep(0.5)
            for lane in lanes:
                _draw(prog, tasks[lane.name], lane)
            failed = failed or next((lane for lane in lanes if lane.poll() not in (None, 0)), None)
    finally:
        for lane in lanes:  # Ctrl-C, or one lane failed: the others stop at their last checkpoint
            lane.stop()
    if failed is not None:
        raise FedkeyError(f"the {failed.name} lane ({', '.join(failed.stages)}) failed: {failed.error()} "
                          f"(whole output: {failed.log})")
    for lane in lanes:
        console.print(f"[bold]{lane.name}[/] lane finished in {lane.ended - lane.started:.0f} s")


def _draw(prog, task, lane: Lane) -> None:
    state = read_file_bar(lane.progress) or {}
    code = lane.poll()
    desc = state.get("description", "")
    if code is not None:
        status = "done" if code == 0 else f"[red]failed (exit {code})[/]"
    else:
        status = state.get("status", "")
    done, total = state.get("completed") or 0, state.get("total")
    count = f"{done:,.0f}/{total:,.0f} {state.get('unit', '')}".strip() if total else ""
    prog.update(task, description=f"{lane.name}: {desc}" if desc else lane.name, total=total, completed=done,
                count=count, status=status)


def watch_parent() -> None:
    """In a lane: exit when the parent `fedkey run` is gone, so a killed run leaves no trainer behind."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
