"""One federated training job as the Flower apps see it: settings from the run config, the task built from them.

`fedkey train --engine flower*` resolves every settings section exactly as `--engine local` does and
ships them as JSON in the run config; the ServerApp and each ClientApp rebuild the same objects
from it, so both engines train the same model on the same data with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from fedkey import config as C
from fedkey.errors import FedkeyError
from fl_core.config import FleetConfig, FLConfig
from fl_core.params import ParamSpec


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
                   float(rc.get("secagg-clip", 8.0)), int(rc.get("threads", 0)), str(rc.get("placement", "held")))

    def to_run_config(self) -> dict[str, Any]:
        """The `flwr run --run-config` overrides for this job."""
        sections = {c.SECTION: C.to_dict(c) for c in (self.fl, self.fleet, self.model)}
        return {"run-dir": str(Path(self.run_dir).resolve()), "out-dir": str(Path(self.out_dir).resolve()),
                "config": json.dumps(sections, sort_keys=True), "expect-nodes": self.expect_nodes,
                "wait-nodes-s": float(self.wait_nodes_s), "round-timeout-s": float(self.round_timeout_s),
                "straggler-factor": float(self.straggler_factor),
                "secagg": bool(self.secagg), "secagg-clip": float(self.secagg_clip), "threads": self.threads,
                "placement": self.placement}


def _build(cls: type, sections: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in sections.get(cls.SECTION, {}).items() if k in known}
    return cls(**values)


@dataclass
class Built:
    """The task and parameter layout both sides of a Flower run need."""

    task: Any
    spec: ParamSpec
    vocab_size: int


def build_task(data_dir: Path, fl: FLConfig, mcfg: C.ModelConfig, init: bool = False) -> tuple[Built, torch.Tensor | None]:
    """KeyboardTask over a prepared run's shards; with `init`, also the seeded initial flat parameters.

    Mirrors the in-process stage: the same seed, the same model and output-bias initialisation.
    """
    from fedkey import pipeline as P
    from fedkey.fl_task import KeyboardTask
    from keyboard.model import KeyboardLM

    shards, tok = P.load_prepared(Path(data_dir))
    torch.manual_seed(fl.seed)
    model = KeyboardLM(tok.vocab_size, mcfg)
    flat = None
    if init:
        model.init_output_bias(P.encode_split(shards, tok, "public_train", fl.max_len))
    task = KeyboardTask(shards, tok, model, fl.batch_size, fl.max_messages, fl.max_len, fl.local_epochs)
    spec = ParamSpec.of(model, fl.local_patterns())
    if init:
        flat = spec.flatten(dict(model.named_parameters()))
    return Built(task, spec, tok.vocab_size), flat
