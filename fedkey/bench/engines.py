"""The same federated workload in-process, on Flower's simulation runtime and on a loopback Flower deployment.

One run measures, side by side: seconds per round (median over rounds after the first), total wall time
from a cold start (processes, imports, Ray, SuperLink/SuperNodes) to the last round, and the peak
proportional memory (PSS) of each engine's whole process tree; plus the compute floor: the same number of
tokens trained centrally with the same batch size. The in-process engine runs in its own child process
so its memory is measured the same way as Flower's trees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkey import config as C
from fedkey.errors import FedkeyError
from fedkey.io import read_json, save_figure, write_json
from fedkey.tables import console

if TYPE_CHECKING:
    from fl_core.flower.job import Job

KEYS = ("local_round_s", "flower_sim_round_s", "flower_deploy_round_s", "compute_floor_round_s",
        "flower_sim_total_s", "local_total_s", "local_peak_mib", "flower_sim_peak_mib")


def add_flags(p: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    p.add_argument("--clients", type=int, default=50, help="clients per round")
    p.add_argument("--local-steps", type=int, default=2, help="local SGD steps per client (batches of --batch-size)")
    p.add_argument("--batch-size", type=int, default=16, help="messages per local step")
    p.add_argument("--rounds", type=int, default=4, help="rounds per engine (the first is reported apart: warm-up)")
    p.add_argument("--deploy-nodes", type=int, default=3, help="SuperNode processes of the loopback deployment")
    p.add_argument("--sim-slots", type=int, default=0, help="simulated SuperNodes (0: one per client of a round)")
    p.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per simulated ClientApp (Flower's default: 2)")
    p.add_argument("--engines", default="local,flower-sim,flower", help="which engines to run (comma-separated)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, sampling and batches")
    p.add_argument("--floor-steps", type=int, default=30, help="central SGD steps per timed repeat of the floor")
    C.add_flags(p, C.ModelConfig)


# ---- measuring process trees ------------------------------------------------------------------------------------

class TreeMemory:
    """Samples the PSS of process trees in a thread; `.peak` in MiB, `.procs` the most processes seen."""

    def __init__(self, roots: Callable[[], list[int]], period_s: float = 0.25) -> None:
        self.roots, self.period_s = roots, period_s
        self.peak, self.procs, self.samples = 0.0, 0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from fl_core.flower.cluster import tree_memory_mib

        while not self._stop.is_set():
            mib, n = 0.0, 0
            for pid in self.roots():
                m, k = tree_memory_mib(pid)
                mib, n = mib + m, n + k
            self.samples.append((time.perf_counter(), mib))
            self.peak, self.procs = max(self.peak, mib), max(self.procs, n)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "TreeMemory":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _round_stats(hist: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [h["wall_s"] for h in hist]
    steady = walls[1:] or walls
    out = {"round_s": statistics.median(steady), "first_round_s": walls[0] if walls else 0.0, "rounds": len(hist),
           "tokens_per_round": statistics.mean(h["tokens"] for h in hist) if hist else 0}
    if hist and "node_train_s" in hist[0]:
        out["clientapp_train_s"] = statistics.median(sum(h["node_train_s"]) for h in hist[1:] or hist)
        out["clientapp_proc_s"] = statistics.median(statistics.mean(h["node_proc_s"] or [0]) for h in hist[1:] or hist)
    return out


# ---- the engines ------------------------------------------------------------------------------------------------

def make_job(args: argparse.Namespace, out_dir: Path) -> Job:
    """The shared workload: every engine trains exactly this."""
    from fl_core.config import FleetConfig, FLConfig
    from fl_core.flower.job import Job

    fl = FLConfig(seed=args.seed, max_tokens=10**12, max_rounds=args.rounds, clients_per_round=args.clients,
                  batch_size=args.batch_size, max_messages=args.batch_size * args.local_steps, eval_every=0,
                  pretrain_epochs=0.0)
    fleet = FleetConfig(availability=False, overselect=1.0, dropout=0.0)
    return Job(Path(args.run_dir), out_dir, fl, fleet, C.from_args(C.ModelConfig, args), round_timeout_s=1800.0)


def run_local(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """fl_core's in-process engine in a child process (cold start included in the total)."""
    job = make_job(args, work / "local")
    spec = json.dumps({"run_config": job.to_run_config()})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fedkey.bench.engines", "--worker", spec])
    with TreeMemory(lambda: [proc.pid]) as mem:
        rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise FedkeyError(f"in-process engine worker failed (exit {rc})")
    res = read_json(job.out_dir / "worker.json")
    stats = _round_stats(res["history"])
    return {**stats, "total_s": total, "peak_mib": mem.peak, "procs": mem.procs,
            "mem_after_round_mib": res["mem_after_round_mib"]}


def _worker(spec_json: str) -> None:
    """Child process: run the in-process engine, record history and memory after each round."""
    import torch

    from fl_core.flower.cluster import tree_memory_mib
    from fl_core.flower.job import Job, build_simulation

    job = Job.from_run_config(json.loads(spec_json)["run_config"])
    sim, _, _ = build_simulation(job)  # what `fedkey train --engine local` builds (fedkey.fl_stage)
    mem: list[float] = []
    sim.run(on_round=lambda _: mem.append(tree_memory_mib(os.getpid())[0]))
    write_json(job.out_dir / "worker.json", {"history": sim.history, "mem_after_round_mib": mem,
                                             "threads": torch.get_num_threads()})


def run_flower(args: argparse.Namespace, work: Path, simulation: bool) -> dict[str, Any]:
    """fedkey's Flower apps on the simulation runtime or on a loopback deployment (TLS + node auth)."""
    from fl_core.flower.app_dir import write_app
    from fl_core.flower.cluster import Federation
    from fedkey.fl_stage import HISTORY

    name = "flower_sim" if simulation else "flower_deploy"
    job = make_job(args, work / name)
    if simulation:
        slots = args.sim_slots or args.clients
        job = replace(job, placement="any", expect_nodes=slots, threads=max(1, args.cpus_per_client))
        nodes, fed_cfg = [], {"num-supernodes": slots, "client-resources-num-cpus": args.cpus_per_client}
    else:
        n = args.deploy_nodes
        job = replace(job, expect_nodes=n, threads=1)
        nodes = [{"data": str(Path(args.run_dir).resolve()), "partition-id": i, "num-partitions": n} for i in range(n)]
        fed_cfg = None
    app = write_app(work / "app")
    t0 = time.perf_counter()
    fed = Federation(work / f"{name}_fed", node_configs=nodes, simulation=simulation, tls=not simulation,
                     auth=not simulation)
    with TreeMemory(fed.pids) as mem:
        with fed:
            res = fed.run(app, job.to_run_config(), fed_cfg, timeout_s=3600)
            total = time.perf_counter() - t0
    if res.returncode != 0:
        raise FedkeyError(f"{name} run failed (exit {res.returncode}); see {fed.logs}")
    hist = [json.loads(line) for line in (job.out_dir / HISTORY).read_text().splitlines()]
    short = [h["round"] for h in hist if h["completed"] < h["selected"]]
    if short:
        raise FedkeyError(f"{name}: rounds {short} lost clients, so they are not the same workload; see {fed.logs}")
    return {**_round_stats(hist), "total_s": total, "peak_mib": mem.peak, "procs": mem.procs}


def compute_floor(args: argparse.Namespace, steps: int = 30) -> dict[str, Any]:
    """Centralized training speed (real tokens/s): SGD on batches of the same size, one model."""
    import torch

    from fedkey import pipeline as P
    from keyboard.batches import iterate_epoch
    from keyboard.model import KeyboardLM
    from keyboard.train import lm_loss

    shards, tok = P.load_prepared(Path(args.run_dir))
    seqs = P.encode_split(shards, tok, "train", 64)
    torch.manual_seed(args.seed)
    model = KeyboardLM(tok.vocab_size, C.from_args(C.ModelConfig, args))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def batches():
        epoch = 0
        while True:  # a small run's train split may hold fewer batches than the measurement needs
            yield from iterate_epoch(seqs, args.batch_size, args.seed, epoch)
            epoch += 1

    it, best, threads = batches(), {}, torch.get_num_threads()
    # the floor is the best centralized training can do here: all cores in each op, or one core (small matmuls
    # split across loaded cores can be slower than one core alone)
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        rates = []
        for _ in range(4):  # one warm-up, then the median of three
            n, t0 = 0, time.perf_counter()
            for _ in range(steps):
                x, y = next(it)
                loss, k = lm_loss(model, x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                n += k
            rates.append(n / (time.perf_counter() - t0))
        best[n_threads] = statistics.median(rates[1:])
    torch.set_num_threads(threads)
    n_best = max(best, key=best.get)
    return {"central_tokens_per_s": best[n_best], "central_threads": n_best,
            "central_tokens_per_s_by_threads": {str(k): v for k, v in best.items()}}


def run(args: argparse.Namespace) -> None:
    """Run the engines one after another and print the table."""
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    work = Path(tempfile.mkdtemp(prefix="fedkey_engines_"))
    out: dict[str, Any] = {"clients": args.clients, "local_steps": args.local_steps, "rounds": args.rounds,
                           "batch_size": args.batch_size, "workdir": str(work)}
    res: dict[str, dict[str, Any]] = {}
    console.print("[bold]compute floor[/]: centralized SGD on batches of the same size ...")
    floor = compute_floor(args, args.floor_steps)
    for e in engines:
        console.print(f"[bold]{e}[/]: {args.rounds} rounds of {args.clients} clients x {args.local_steps} steps ...")
        if e == "local":
            res[e] = run_local(args, work)
        elif e in ("flower-sim", "flower"):
            res[e] = run_flower(args, work, simulation=e == "flower-sim")
        else:
            raise FedkeyError(f"--engines: unknown engine {e!r}; choose from local, flower-sim, flower")
        console.print(f"  {res[e]['round_s']:.2f} s/round, {res[e]['total_s']:.1f} s total, "
                      f"peak {res[e]['peak_mib']:.0f} MiB in {res[e]['procs']} processes")
    tokens = next((r["tokens_per_round"] for r in res.values()), 0)
    pick = {"local": "local", "flower-sim": "flower_sim", "flower": "flower_deploy"}
    for e, r in res.items():
        for k, v in r.items():
            out[f"{pick[e]}_{k}"] = v
    if tokens:  # the same real tokens a round trains, at the best centralized rate
        out["compute_floor_round_s"] = tokens / floor["central_tokens_per_s"]
    out.update(floor)
    if "local_mem_after_round_mib" in out:
        mem = out["local_mem_after_round_mib"]
        out["local_mem_growth_mib"] = mem[-1] - mem[0] if mem else 0.0
    for a, b, key in (("local_round_s", "compute_floor_round_s", "local_over_floor"),
                      ("local_round_s", "flower_sim_round_s", "local_over_flower_sim_round"),
                      ("local_peak_mib", "flower_sim_peak_mib", "local_over_flower_sim_peak")):
        if a in out and b in out and out[b]:
            out[key] = out[a] / out[b]
    table(out)
    if args.json:
        write_json(args.json, out)
        plot(out, Path(args.json).with_suffix(".png"))


def plot(out: dict[str, Any], path: Path) -> Path:
    """Seconds per round and peak memory per engine, side by side (PNG beside the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, out.get(f"{key}_round_s"), out.get(f"{key}_peak_mib")) for key, label in
            (("local", "in-process"), ("flower_sim", "Flower sim"), ("flower_deploy", "Flower deploy"),
             ("compute_floor", "compute floor"))]
    rows = [r for r in rows if r[1] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.bar([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
    a.set_ylabel("seconds per round")
    mem = [r for r in rows if r[2] is not None]
    b.bar([r[0] for r in mem], [r[2] for r in mem], color="tab:orange")
    b.set_ylabel("peak memory of the process tree (MiB)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{out['clients']} clients/round x {out['local_steps']} local steps")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def table(out: dict[str, Any]) -> None:
    """The figures side by side, with the ratios the targets are stated in."""
    from rich.table import Table

    t = Table(title=f"engines: {out['clients']} clients/round x {out['local_steps']} local steps")
    for col in ("engine", "s/round", "first round s", "total s", "peak MiB", "processes"):
        t.add_column(col, justify="right" if col != "engine" else "left")
    for key, label in (("local", "in-process (fl_core)"), ("flower_sim", "Flower simulation (Ray)"),
                       ("flower_deploy", "Flower deployment (loopback)")):
        if f"{key}_round_s" in out:
            t.add_row(label, f"{out[f'{key}_round_s']:.2f}", f"{out[f'{key}_first_round_s']:.2f}",
                      f"{out[f'{key}_total_s']:.1f}", f"{out[f'{key}_peak_mib']:.0f}", str(out[f"{key}_procs"]))
    if "compute_floor_round_s" in out:
        t.add_row("compute floor (central)", f"{out['compute_floor_round_s']:.2f}", "", "", "", "")
    console.print(t)
    if "local_round_s" in out and "compute_floor_round_s" in out:
        console.print(f"in-process / compute floor: {out['local_round_s'] / out['compute_floor_round_s']:.2f}x")
    if "local_round_s" in out and "flower_sim_round_s" in out:
        console.print(f"in-process / Flower simulation, per round: {out['local_round_s'] / out['flower_sim_round_s']:.2f}x; "
                      f"peak memory: {out['local_peak_mib'] / out['flower_sim_peak_mib']:.2f}x")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
