"""Robust aggregation: an update that is non-finite, mis-shaped, of the wrong dtype or (optionally) too large is
rejected before it can reach the aggregate; the round goes on with the rest and the rejection is logged.

This guards against buggy devices and against crude malice (a single NaN or 1e30 would
otherwise poison every parameter). It does not stop a careful attacker who sends a
well-formed update of bounded norm chosen to steer the model; see docs/threat_model.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("fedkey.robust")


def rejection_reason(update: object, dim: int, max_norm: float = 0.0) -> str | None:
    """Why this update must not be aggregated, or None if it is acceptable."""
    if not isinstance(update, np.ndarray):
        return f"not an array ({type(update).__name__})"
    if update.dtype != np.float32:
        return f"dtype {update.dtype}, expected float32"
    if update.shape != (dim,):
        return f"shape {update.shape}, expected ({dim},)"
    if not np.isfinite(update).all():
        return f"{int(np.count_nonzero(~np.isfinite(update)))} non-finite values"
    if max_norm > 0:
        norm = float(np.sqrt(np.dot(update.astype(np.float64), update.astype(np.float64))))
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


@dataclass
class Screened:
    """Accepted updates (stacked) with their weights and original positions, and what was rejected and why."""

    updates: np.ndarray
    weights: np.ndarray
    kept: list[int]
    rejected: list[tuple[int, str]] = field(default_factory=list)


def screen(updates: Sequence[object], weights: Sequence[float], dim: int, max_norm: float = 0.0,
           ids: Sequence[str] | None = None) -> Screened:
    """Keep the acceptable updates (a bad weight is a rejection too) and log every rejection."""
    kept, rejected = [], []
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        why = rejection_reason(u, dim, max_norm)
        if why is None and not (np.isfinite(w) and w > 0):
            why = f"weight {w!r} is not a positive number"
        if why is None:
            kept.append(i)
        else:
            rejected.append((i, why))
            log.warning("rejected update from client %s: %s", ids[i] if ids else i, why)
    stacked = np.stack([updates[i] for i in kept]) if kept else np.zeros((0, dim), np.float32)
    return Screened(stacked, np.asarray([weights[i] for i in kept], dtype=np.float64), kept, rejected)


def sum_out_of_range(total: np.ndarray, n_clients: int, norm_bound: float, tol: float = 0.0) -> str | None:
    """Why an unmasked secure sum cannot have come from n well-formed inputs, or None.

    Under secure aggregation the server cannot screen single updates; what it can check is
    that the sum respects the bound every honest input obeys (triangle inequality), which
    catches a client that skipped the clamp with a gross value. A value inside the bound can
    still be malicious: stopping that needs zero-knowledge range proofs (not built).
    """
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm > n_clients * norm_bound + tol:
        return f"sum norm {norm:.4g} exceeds {n_clients} x {norm_bound:.4g}: an input broke the clamp"
    return None
