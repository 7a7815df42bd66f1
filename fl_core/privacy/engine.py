"""Plugging the privacy options into the federated engine (fl_core.simulation.Simulation) through its Aggregator hook.

`attach(sim, cfg)` installs a PrivateAggregator (and, for `--dp-sampling poisson`, Poisson
client selection) into a built Simulation; `epsilon_line(agg)` is what `fedkey train`
prints per round. The sampling the accountant assumes is the one the engine really uses:
- the engine's default fleet selects by availability, over-selects and keeps the first N
  reports: not a known random process, so `auto` accounts with no amplification ("none");
- with availability off, no over-selection and no dropouts it is a uniform sample of N
  (`uniform`);
- `poisson` replaces the fleet's selection: every user joins a round independently with
  probability N / population, and every sampled client's update is used (no first-N cut).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedkey.errors import FedkeyError
from fl_core.fleet import Fleet, RoundPlan
from fl_core.privacy.accounting import Sampling
from fl_core.privacy.aggregator import PrivateAggregator
from fl_core.privacy.config import PrivacyConfig


def sampling_for(cfg: PrivacyConfig, clients_per_round: int, population: int, fleet_cfg: Any) -> Sampling:
    """The client sampling to account for, given the fleet settings of the run."""
    kind = cfg.dp_sampling
    plain_uniform = (not fleet_cfg.availability and fleet_cfg.overselect <= 1.0 and fleet_cfg.dropout == 0)
    if kind == "auto":
        kind = "uniform" if plain_uniform else "none"
    if kind == "uniform" and not plain_uniform:
        raise FedkeyError("--dp-sampling uniform: the fleet does not select uniformly (turn off --availability, "
                          "set --overselect 1 and --dropout 0), or use --dp-sampling none or poisson")
    if kind == "poisson" and (fleet_cfg.availability or fleet_cfg.overselect > 1.0):
        raise FedkeyError("--dp-sampling poisson needs every user eligible every round: add --availability false "
                          "and --overselect 1")
    return Sampling(kind, population, min(clients_per_round, population))


class PoissonFleet(Fleet):
    """The engine's fleet (same device speeds and bandwidths), selecting each user independently with probability q."""

    def __init__(self, n: int, cfg: Any, seed: int, tz_hours: np.ndarray | None, q: float) -> None:
        super().__init__(n, cfg, seed, tz_hours)
        self.q = q

    def select(self, round_: int, t_s: float, n_target: int) -> tuple[int, list[int]]:
        """Everyone is eligible; each joins with probability q, independently of everything else."""
        rng = np.random.default_rng([self.seed, 7903, round_])
        return self.n, np.flatnonzero(rng.random(self.n) < self.q).tolist()

    def plan(self, round_: int, eligible: int, selected: list[int], work_tokens: list[int], n_target: int,
             down_bytes: int, up_bytes: int) -> RoundPlan:
        """Every sampled client is used: keeping only the first N reports would undo the Poisson sampling."""
        return super().plan(round_, eligible, selected, work_tokens, len(selected), down_bytes, up_bytes)


def attach(sim: Any, cfg: PrivacyConfig) -> PrivateAggregator | None:
    """Install the privacy aggregator into a Simulation (None, and nothing changed, when no option is on)."""
    if not cfg.active:
        return None
    if cfg.secagg and sim.cfg.compress != "none":
        raise FedkeyError(f"--secagg with --compress {sim.cfg.compress}: masked updates are dense ring vectors, so "
                          "int8/top-k uploads do not compose with masking; use --secagg-bits 16 to halve the upload")
    sampling = None
    if cfg.dp:
        sampling = sampling_for(cfg, sim.cfg.clients_per_round, len(sim.population), sim.fleet_cfg)
        if sampling.kind == "uniform":  # amplification by sampling assumes every user is equally likely
            sim.fleet.weights = None
        if sampling.kind == "poisson":
            sim.fleet = PoissonFleet(len(sim.population), sim.fleet_cfg, sim.cfg.seed, sim.tz_hours, sampling.q)
    agg = PrivateAggregator(cfg, sim.spec.n_shared, sampling)
    sim.aggregator = agg
    return agg


def epsilon_line(agg: PrivateAggregator | None) -> str:
    """'epsilon 1.23 (delta 1e-05, rdp, poisson q=0.05)' after the rounds so far, or '' without DP."""
    if agg is None or agg.accountant is None:
        return ""
    acc = agg.accountant
    s = acc.sampling
    return (f"epsilon {agg.epsilon():.3g} (delta {acc.delta:.2g}, {acc.method}, {s.kind} sampling "
            f"q={s.q:.3g}, z={acc.z:g}, clip {agg.clip:.3g})")
