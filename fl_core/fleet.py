"""A simulated device fleet: who can train when, how fast, and what happens to a round.

Availability: a device is eligible only while charging on an unmetered network. Each device
has a nightly window (local start ~ 22:30 +- 1.5 h, length ~ night_hours +- 1.5 h, in its
own time zone) plus a small chance of being plugged in during any daytime hour. A round
selects `overselect` x N of the eligible devices; each then downloads the model, trains at
its own speed (log-normal tokens/s), and uploads at its own bandwidth; a device may drop out
mid-round. The server keeps the first N reports that arrive before the deadline; later ones
are cut off (aborted), and those past the deadline are late. Everything is a pure function
of (seed, round), so a resumed run sees the same fleet.

Outcomes are decided before any training: the simulator trains only the clients whose
updates will be used, so dropped, late and aborted clients cost no simulation time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fl_core.config import FleetConfig


@dataclass
class RoundPlan:
    """Who was selected and what became of them (indices into the population)."""

    eligible: int
    selected: list[int]
    used: list[int]
    dropped: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)
    duration_s: float = 0.0
    finish_s: dict[int, float] = field(default_factory=dict)


class Fleet:
    """Per-device traits drawn once from the seed; `eligible(t)` and `plan(...)` per round."""

    def __init__(self, n: int, cfg: FleetConfig, seed: int, tz_hours: np.ndarray | None = None,
                 weights: np.ndarray | None = None) -> None:
        self.n, self.cfg, self.seed = n, cfg, seed
        # selection odds per device (None: uniform); see FLConfig.client_sampling
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        rng = np.random.default_rng([seed, 7001])
        self.tz = np.asarray(tz_hours, dtype=np.float64) if tz_hours is not None else rng.uniform(-12, 12, n)
        self.night_start = (22.5 + 1.5 * rng.standard_normal(n)) % 24
        self.night_len = np.clip(cfg.night_hours + 1.5 * rng.standard_normal(n), 2.0, 14.0)
        self.speed = cfg.device_tokens_per_s * np.exp(cfg.speed_sigma * rng.standard_normal(n))
        self.up_bps = cfg.uplink_mbps * 1e6 / 8 * np.exp(cfg.bandwidth_sigma * rng.standard_normal(n))
        self.down_bps = cfg.downlink_mbps * 1e6 / 8 * np.exp(cfg.bandwidth_sigma * rng.standard_normal(n))

    def eligible(self, t_s: float) -> np.ndarray:
        """Indices of devices charging on unmetered network at simulated time t (seconds since 00:00 UTC)."""
        if not self.cfg.availability:
            return np.arange(self.n)
        local = (t_s / 3600.0 + self.tz) % 24
        into_night = (local - self.night_start) % 24
        night = into_night < self.night_len
        hour = int(t_s // 3600)
        plugged = np.random.default_rng([self.seed, 7002, hour]).random(self.n) < self.cfg.day_plug_prob
        return np.flatnonzero(night | plugged)

    def select(self, round_: int, t_s: float, n_target: int) -> tuple[int, list[int]]:
        """(number eligible, the over-selected cohort): ceil(overselect * N) eligible devices at random.

        With `weights`, eligible devices are drawn without replacement with odds proportional to them.
        """
        pool = self.eligible(t_s)
        want = min(len(pool), math.ceil(self.cfg.overselect * n_target))
        rng = np.random.default_rng([self.seed, 7003, round_])
        p = None
        if self.weights is not None and len(pool):
            w = self.weights[pool]
            p = w / w.sum()
        return len(pool), sorted(rng.choice(pool, size=want, replace=False, p=p).tolist())

    def plan(self, round_: int, eligible: int, selected: list[int], work_tokens: list[int], n_target: int,
             down_bytes: int, up_bytes: int) -> RoundPlan:
        """Decide dropouts, lateness and the first N reports; the round lasts until the N-th report or the deadline."""
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, 7004, round_])
        idx = np.asarray(selected, dtype=np.int64)
        drop_draw = rng.random(len(idx))
        finish = (down_bytes / self.down_bps[idx] + np.asarray(work_tokens, dtype=np.float64) / self.speed[idx]
                  + up_bytes / self.up_bps[idx]) if len(idx) else np.zeros(0)
        plan = RoundPlan(eligible, list(selected), [])
        reports = []
        for k, i in enumerate(selected):
            if drop_draw[k] < cfg.dropout:
                plan.dropped.append(i)
            elif finish[k] > cfg.deadline_s:
                plan.late.append(i)
            else:
                reports.append((float(finish[k]), i))
        reports.sort()
        plan.used = [i for _, i in reports[:n_target]]
        plan.aborted = [i for _, i in reports[n_target:]]
        plan.finish_s = {i: f for f, i in reports[:n_target]}
        if len(plan.used) == n_target:
            plan.duration_s = reports[n_target - 1][0]
        elif plan.dropped or plan.late:
            plan.duration_s = cfg.deadline_s  # the server cannot tell a dropped device from a slow one
        else:
            plan.duration_s = reports[-1][0] if reports else 0.0
        plan.used.sort()
        return plan
