"""(epsilon, delta) of DP-FedAvg rounds, computed by Google's dp-accounting (RDP or PLD), never by hand.

The event depends on how the round's clients were chosen, so the sampling must be the one
the engine actually used:
- "poisson": every user joins a round independently with probability q, and the noised sum
  is divided by the expected count qN: add/remove-one-user sensitivity C, Poisson-subsampled
  Gaussian (the setting of McMahan et al. 2018).
- "uniform": a fixed-size uniform sample of K of N users. dp-accounting covers it only for
  replace-one neighbours, where the sensitivity of the sum is 2C, so the Gaussian's
  multiplier is z/2 (RDP accountant; Wang, Balle, Kasiviswanathan 2019). Much weaker.
- "none": no amplification by sampling (e.g. clients picked by availability, deadlines or
  over-selection, which are not uniform random): every round is a full Gaussian mechanism
  on the user's data. The safe choice when the selection is not a known random process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedkey.errors import FedkeyError

if TYPE_CHECKING:
    from dp_accounting.dp_event import DpEvent

SAMPLINGS = ("poisson", "uniform", "none")
METHODS = ("rdp", "pld")


@dataclass(frozen=True)
class Sampling:
    """How clients enter a round: kind, population size N and (expected) clients per round K."""

    kind: str
    population: int
    per_round: float

    def __post_init__(self) -> None:
        if self.kind not in SAMPLINGS:
            raise FedkeyError(f"DP sampling must be one of {', '.join(SAMPLINGS)}, got {self.kind!r}")
        if self.population < 1 or not 0 < self.per_round <= self.population:
            raise FedkeyError(f"DP sampling: need 0 < clients per round ({self.per_round}) <= population "
                              f"({self.population})")

    @property
    def q(self) -> float:
        """Sampling probability (fraction of the population in a round)."""
        return self.per_round / self.population


def default_delta(population: int) -> float:
    """delta = N^-1.1: below 1/N, so no outcome can expose a whole user with real probability."""
    return float(population) ** -1.1


class PrivacyAccountant:
    """Epsilon after a number of rounds of DP-FedAvg with noise multiplier z under a sampling scheme."""

    def __init__(self, noise_multiplier: float, sampling: Sampling, delta: float | None = None,
                 method: str = "rdp", orders: list[float] | None = None) -> None:
        if noise_multiplier <= 0:
            raise FedkeyError(f"DP: the noise multiplier must be positive, got {noise_multiplier}")
        if method not in METHODS:
            raise FedkeyError(f"DP accountant must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "pld" and sampling.kind == "uniform":
            raise FedkeyError("DP: the PLD accountant has no fixed-size sampling event; use --accountant rdp "
                              "or Poisson sampling")
        self.z, self.sampling, self.method, self.orders = noise_multiplier, sampling, method, orders
        self.delta = default_delta(sampling.population) if not delta else delta
        if not 0 < self.delta < 1:
            raise FedkeyError(f"DP: delta must be in (0, 1), got {self.delta}")

    def event(self, rounds: int) -> DpEvent:
        """The dp-accounting event of `rounds` rounds."""
        from dp_accounting import dp_event as E

        s = self.sampling
        if s.kind == "poisson":
            one = E.PoissonSampledDpEvent(s.q, E.GaussianDpEvent(self.z))
        elif s.kind == "uniform":
            one = E.SampledWithoutReplacementDpEvent(s.population, int(s.per_round), E.GaussianDpEvent(self.z / 2))
        else:
            one = E.GaussianDpEvent(self.z)
        return E.SelfComposedDpEvent(one, rounds)

    def _accountant(self):
        from absl import logging as absl_logging

        # the RDP code logs a warning for every order whose series does not converge; it drops those orders itself
        absl_logging.set_verbosity(absl_logging.ERROR)
        if self.method == "pld":
            from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

            # the library discretizes pessimistically (epsilon stays an upper bound); 1e-3 in privacy loss is
            # 10x faster than its 1e-4 default and moves epsilon by under 1e-5 on its own test example
            return PLDAccountant(value_discretization_interval=1e-3)
        from dp_accounting.rdp.rdp_privacy_accountant import NeighborRel, RdpAccountant

        rel = NeighborRel.REPLACE_ONE if self.sampling.kind == "uniform" else NeighborRel.ADD_OR_REMOVE_ONE
        return RdpAccountant(orders=self.orders, neighboring_relation=rel)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at self.delta after `rounds` rounds (0 for no rounds)."""
        if rounds <= 0:
            return 0.0
        acc = self._accountant()
        acc.compose(self.event(rounds))
        return float(acc.get_epsilon(self.delta))

    def max_rounds(self, target_epsilon: float, limit: int = 100_000) -> int:
        """Most rounds whose epsilon stays within target (binary search; epsilon grows with rounds)."""
        lo, hi = 0, 1
        while hi <= limit and self.epsilon(hi) <= target_epsilon:
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= target_epsilon else (lo, mid)
        return lo
