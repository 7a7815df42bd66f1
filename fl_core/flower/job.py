"""One federated training job as the Flower apps see it: settings from the run config, the task built from them.

`fedkey train --engine flower*` resolves every settings section exactly as `--engine local` does and
ships them as JSON in the run config; the ServerApp and each ClientApp rebuild the same objects
from it, so both engines train the same model on the same data with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from fedkey import config as C
from fedkey.errors import FedkeyError
from fl_core.config import FleetConfig, FLConfig

if TYPE_CHECKING:
    from fl_core.simulation import Simulation
    from keyboard.model import KeyboardLM
    from keyboard.tokenizer import Tokenizer


@dataclass
class Job:
    """Settings of one run on Flower (everything `context.run_config` carries)."""

    run_dir: Path
    out_dir: Path
    fl: FLConfig
    fleet: FleetConfig
    model: C.ModelConfig
    expect_nodes: int = 0
    wait_nodes_s: float = 300.0
    round_timeout_s: float = 600.0
    straggler_factor: float = 0.0
    secagg: bool = False
    secagg_clip: float = 8.0
    threads: int = 0
    placement: str = "held"
    resume: bool = False

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "Job":
        """Parse what `to_run_config` wrote (and Flower passed through)."""
        try:
            sections = json.loads(str(rc.get("config") or "{}"))
        except json.JSONDecodeError as e:
            raise FedkeyError(f"run config 'config' is not JSON ({e})") from None
        return cls(Path(str(rc.get("run-dir", ""))), Path(str(rc.get("out-dir", ""))),
                   _build(FLConfig, sections), _build(FleetConfig, sections), _build(C.ModelConfig, sections),
                   int(rc.get("expect-nodes", 0)), float(rc.get("wait-nodes-s", 300.0)),
                   float(rc.get("round-timeout-s", 600.0)), float(rc.get("straggler-factor", 0.0)),
                   bool(rc.get("secagg", False)),
                   float(rc.get("secagg-clip", 8.0)), int(rc.get("threads", 0)), str(rc.get("placement", "held")),
                   bool(rc.get("resume", False)))

    def to_run_config(self) -> dict[str, Any]:
        """The `flwr run --run-config` overrides for this job."""
        sections = {c.SECTION: C.to_dict(c) for c in (self.fl, self.fleet, self.model)}
        return {"run-dir": str(Path(self.run_dir).resolve()), "out-dir": str(Path(self.out_dir).resolve()),
                "config": json.dumps(sections, sort_keys=True), "expect-nodes": self.expect_nodes,
                "wait-nodes-s": float(self.wait_nodes_s), "round-timeout-s": float(self.round_timeout_s),
                "straggler-factor": float(self.straggler_factor),
                "secagg": bool(self.secagg), "secagg-clip": float(self.secagg_clip), "threads": self.threads,
                "placement": self.placement, "resume": bool(self.resume)}


def _build(cls: type, sections: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in sections.get(cls.SECTION, {}).items() if k in known}
    return cls(**values)


def build_simulation(job: Job, data_dir: Path | None = None, population: list[str] | None = None,
                     evaluate: bool = False) -> tuple[Simulation, KeyboardLM, Tokenizer]:
    """fedkey's in-process engine for this job (fedkey.fl_stage.build_simulation: same seed, model, task).

    The ServerApp keeps the global state in it (state, token count, history, checkpoints in fl_core's
    format); each ClientApp takes the task and parameter layout from it. `population` replaces the run's
    training users (the users the SuperNodes reported). Returns (simulation, model template, tokenizer).
    """
    import dataclasses

    from fedkey.fl_stage import QuickEval, build_simulation as stage_build, region_time_zones

    holder: dict[str, Any] = {}
    hook = (lambda r, flat: holder["eval"](r, flat, sim.spec)) if evaluate and job.fl.eval_every else None
    sim, model, tok = stage_build(Path(data_dir or job.run_dir), job.model, job.fl, job.fleet, job.out_dir,
                                  evaluate=hook)
    if population is not None and population != sim.population:
        tz = region_time_zones(sim.task.shards, population, job.fl.seed)
        sim = dataclasses.replace(sim, population=list(population), tz_hours=tz, history=[])
    if hook:
        holder["eval"] = QuickEval(Path(job.run_dir), model, tok, job.fl.eval_positions)
    return sim, model, tok
