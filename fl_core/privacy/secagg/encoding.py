"""Fixed-point encoding of float updates into the ring Z_{2^bits}, where masks add and cancel exactly.

Overflow bound: every client's coordinates are clamped to [-R, R] and mapped to integers in
[-L, L] with L = floor((2^(bits-1) - 1) / n) (scale = L / R), so the sum of n encoded values
lies in [-(2^(bits-1) - 1), 2^(bits-1) - 1] and decodes unambiguously as a signed integer.
At 32 bits and 100 clients L = 21,474,836: the step R / L is 4.7e-8 R. The decoded sum is off
from the float sum of the clamped values by at most n * step / 2 per coordinate (round to
nearest), or is unbiased with |error| < n * step (stochastic rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkey.errors import FedkeyError

_DTYPES = {16: (np.uint16, np.int16), 32: (np.uint32, np.int32)}  # (ring element, its signed reading)


@dataclass(frozen=True)
class FixedPoint:
    """Public encoding parameters every client and the server agree on before a round."""

    bound: float  # R: per-coordinate clamp of one client's (weighted) value
    n_clients: int  # most clients whose values are summed
    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in _DTYPES:
            raise FedkeyError(f"secure aggregation: bits must be 16 or 32, got {self.bits}")
        if not (self.bound > 0 and np.isfinite(self.bound)):
            raise FedkeyError(f"secure aggregation: the clamp range must be a positive number, got {self.bound}")
        if self.n_clients < 1 or self.levels < 1:
            raise FedkeyError(f"secure aggregation: {self.n_clients} clients x range {self.bound} do not fit "
                              f"{self.bits}-bit fixed point; lower the range or use 32 bits")

    @property
    def dtype(self) -> type:
        """Unsigned ring element type (arithmetic wraps modulo 2^bits)."""
        return _DTYPES[self.bits][0]

    @property
    def levels(self) -> int:
        """Largest integer one client may contribute: n * levels never exceeds the signed range."""
        return ((1 << (self.bits - 1)) - 1) // self.n_clients

    @property
    def scale(self) -> float:
        """Integer units per 1.0 (R maps to `levels`)."""
        return self.levels / self.bound

    @property
    def step(self) -> float:
        """Resolution of one encoded value."""
        return 1.0 / self.scale

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None, factor: float = 1.0,
               out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Clamp factor * x to [-R, R], scale and round (stochastically when rng is given) into `out` or a new
        ring vector; returns (ring vector, number of clamped coordinates)."""
        x = np.asarray(x)
        if not np.isfinite(x).all():
            raise FedkeyError("secure aggregation: cannot encode a non-finite update (reject it before encoding)")
        q = x.astype(np.float64)  # float32 cannot hold 2^31 / n distinct levels
        q *= factor * self.scale
        n_clamped = int(np.count_nonzero(np.abs(q) > self.levels))
        if rng is None:
            np.rint(q, out=q)
        else:  # unbiased: round up with probability equal to the fractional part
            q += rng.random(q.shape)
            np.floor(q, out=q)
        np.clip(q, -self.levels, self.levels, out=q)  # the clamp, in integer units: n * levels cannot wrap
        signed, unsigned = _DTYPES[self.bits][1], _DTYPES[self.bits][0]
        if out is None:
            return q.astype(signed).view(unsigned), n_clamped  # two's complement = the residue mod 2^bits
        out.view(signed)[...] = q
        return out, n_clamped

    def decode(self, total: np.ndarray) -> np.ndarray:
        """Ring sum -> float64 sum (valid when at most n_clients clamped values were summed)."""
        return total.view(_DTYPES[self.bits][1]).astype(np.float64) / self.scale
