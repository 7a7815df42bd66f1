"""DP-FedAvg (McMahan et al. 2018): clip each client's update, sum, add Gaussian noise, divide by the expected count.

With adaptive clipping (Andrew et al. 2021) every client also reports one bit, "my update
norm was within the clip"; the noised fraction of such bits moves the clip geometrically
towards the target quantile of update norms. The bit sum is a second Gaussian query, so the
update noise is raised to keep the combined noise multiplier at z (their Theorem 1):
z_update = (z^-2 - (2 sigma_b)^-2)^-1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedkey.errors import FedkeyError


def clip_updates(updates: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row to L2 norm at most `clip`; returns (clipped rows float32, original norms)."""
    if clip <= 0:
        raise FedkeyError(f"DP: the clipping norm must be positive, got {clip}")
    norms = np.sqrt(np.einsum("ij,ij->i", updates, updates, dtype=np.float64))
    factor = np.minimum(1.0, clip / np.maximum(norms, 1e-30))
    return (updates * factor[:, None].astype(np.float32)).astype(np.float32, copy=False), norms


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """Noise multiplier left for the update sum when the clipped-count query also spends privacy."""
    if count_stddev <= 0:
        return z
    inv = z ** -2 - (2 * count_stddev) ** -2
    if inv <= 0:
        raise FedkeyError(f"DP: clipped-count noise {count_stddev} is too small for noise multiplier {z}; "
                          f"it must exceed {1 / (2 * z):.3g} (raise --clip-count-stddev or the noise multiplier)")
    return inv ** -0.5


@dataclass
class AdaptiveClip:
    """Geometric quantile tracking of the clipping norm (Andrew et al. 2021, Algorithm 1)."""

    clip: float
    target_quantile: float = 0.5
    lr: float = 0.2

    def update(self, noised_fraction_within: float) -> float:
        """C <- C * exp(-lr * (b - gamma)), b = noised fraction of clients whose norm was <= C."""
        self.clip *= math.exp(-self.lr * (noised_fraction_within - self.target_quantile))
        return self.clip


def gaussian(rng: np.random.Generator, shape: int | tuple[int, ...], std: float) -> np.ndarray:
    """float64 Gaussian noise (added in float64 so small std survives next to large sums)."""
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape)
