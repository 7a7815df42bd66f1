"""What travels in Flower messages: the global model down, each user's encoded update up.

Arrays go as numpy arrays in ArrayRecords (raw bytes, no float conversion), so what the server
decodes is bit for bit what the client encoded. One train message per SuperNode names the
sampled users it holds; its reply carries one encoded update per user that reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fl_core.compress import Encoded

GLOBAL, INIT_LOCAL, ROUND, META, TIMING = "global", "init_local", "round", "meta", "timing"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


@dataclass
class TrainIns:
    """The server's instruction to one node for one round."""

    round: int
    client_lr: float
    users: list[str]
    idx: list[int]                # each user's index in the run's population (seeds its data sample)
    global_shared: torch.Tensor
    init_local: torch.Tensor | None = None  # FedPer: starting values of client-local parameters

    def to_content(self) -> RecordDict:
        """As message content."""
        rd = RecordDict({GLOBAL: ArrayRecord([_np(self.global_shared)]),
                         ROUND: ConfigRecord({"round": self.round, "client_lr": float(self.client_lr),
                                              "users": list(self.users), "idx": [int(i) for i in self.idx]})})
        if self.init_local is not None and self.init_local.numel():
            rd[INIT_LOCAL] = ArrayRecord([_np(self.init_local)])
        return rd

    @classmethod
    def from_content(cls, rd: RecordDict) -> "TrainIns":
        """Parse `to_content`."""
        cfg = rd.config_records[ROUND]
        shared = torch.from_numpy(rd.array_records[GLOBAL].to_numpy_ndarrays()[0].copy())
        init_local = None
        if INIT_LOCAL in rd.array_records:
            init_local = torch.from_numpy(rd.array_records[INIT_LOCAL].to_numpy_ndarrays()[0].copy())
        return cls(int(cfg["round"]), float(cfg["client_lr"]), [str(u) for u in cfg["users"]],
                   [int(i) for i in cfg["idx"]], shared, init_local)


@dataclass
class UserReport:
    """One user's result as it arrives at the server."""

    user: str
    idx: int
    n_examples: int
    n_tokens: int
    work_tokens: int
    loss: float
    sat_out: bool
    update: Encoded | None = None   # None when the user sat out (nothing uploaded)
    info: dict[str, Any] = field(default_factory=dict)


def reports_to_content(reports: list[UserReport]) -> RecordDict:
    """A node's reply: a meta record with per-user lists, one ArrayRecord per uploaded update."""
    rd = RecordDict()
    meta: dict[str, Any] = {"users": [r.user for r in reports], "idx": [r.idx for r in reports],
                            "n_examples": [r.n_examples for r in reports], "n_tokens": [r.n_tokens for r in reports],
                            "work_tokens": [r.work_tokens for r in reports], "loss": [float(r.loss) for r in reports],
                            "sat_out": [bool(r.sat_out) for r in reports],
                            "kind": [r.update.kind if r.update else "" for r in reports],
                            "nbytes": [r.update.nbytes if r.update else 0 for r in reports]}
    rd[META] = ConfigRecord(meta)
    for k, r in enumerate(reports):
        if r.update is not None:
            rd[f"u{k}"] = ArrayRecord(torch_state_dict={n: t.detach().cpu().contiguous()
                                                        for n, t in r.update.parts.items()})
    return rd


def content_to_reports(rd: RecordDict) -> list[UserReport]:
    """Parse a node's reply."""
    m = rd.config_records[META]
    out = []
    for k, user in enumerate(m["users"]):
        enc = None
        if f"u{k}" in rd.array_records:
            parts = {n: t.clone() for n, t in rd.array_records[f"u{k}"].to_torch_state_dict().items()}
            enc = Encoded(str(m["kind"][k]), parts, int(m["nbytes"][k]))
        out.append(UserReport(str(user), int(m["idx"][k]), int(m["n_examples"][k]), int(m["n_tokens"][k]),
                              int(m["work_tokens"][k]), float(m["loss"][k]), bool(m["sat_out"][k]), enc))
    return out
