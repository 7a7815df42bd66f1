"""The aggregation hook: a round's client updates in, the one averaged update the server applies out.

An aggregator is any object with

    aggregate(updates, weights, ids=None, n_dropped=0) -> result with .mean, .n_used, .rejected, .info
    state_dict() -> dict          # what a checkpoint keeps so a resumed run continues identically
    load_state_dict(state) -> None

`updates` are flat float32 numpy vectors over the shared parameters (`ParamSpec.n_shared`
long), one per reporting client, already decoded from their wire format; `weights` are the
clients' weights (token counts by default); `ids` the client ids; `n_dropped` the clients
selected this round whose update is not among `updates` (dropped mid-round, late, cut off
or sat out; secure aggregation needs it). `.mean` is a float32
vector of the same length: the server optimizer treats it as the round's pseudo-gradient
(x_new = x + server_lr * mean under plain FedAvg). DP clipping and noise, secure aggregation
and robust filtering live in their own aggregators (fl_core.privacy) with this signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedkey.errors import FedkeyError


@dataclass
class AggregateResult:
    """The averaged update and what happened on the way."""

    mean: np.ndarray
    n_used: int
    rejected: list[tuple[int, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class RoundAbandoned(FedkeyError):
    """An aggregator cannot produce this round's update (e.g. secure aggregation lost too many clients): skip it."""


class Aggregator(Protocol):
    """What the round loop calls; see the module docstring."""

    def aggregate(self, updates: Sequence[np.ndarray], weights: Sequence[float],
                  ids: Sequence[str] | None = None, n_dropped: int = 0) -> AggregateResult:
        """The one averaged update the server applies, from a round's client updates (see the module docstring)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Whatever the aggregator carries across rounds, for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (resuming a run)."""
        ...


class WeightedMean:
    """FedAvg's aggregation: sum_i w_i x_i / sum_i w_i, accumulated in float64 (stateless)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def aggregate(self, updates: Sequence[np.ndarray], weights: Sequence[float],
                  ids: Sequence[str] | None = None, n_dropped: int = 0) -> AggregateResult:
        """The weighted mean of the updates."""
        if len(updates) != len(weights):
            raise FedkeyError(f"aggregate: {len(updates)} updates but {len(weights)} weights")
        if not updates:
            raise FedkeyError("aggregate: no update to average this round")
        w = np.asarray(weights, dtype=np.float64)
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise FedkeyError(f"aggregate: weights must be positive numbers, got {w.tolist()}")
        total = np.zeros(self.dim, dtype=np.float64)
        for u, wi in zip(updates, w):
            if u.shape != (self.dim,):
                raise FedkeyError(f"aggregate: update of shape {u.shape}, expected ({self.dim},)")
            total += wi * u
        return AggregateResult((total / w.sum()).astype(np.float32), len(updates),
                               info={"weight_sum": float(w.sum())})

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
