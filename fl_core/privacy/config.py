"""Settings of the privacy and integrity options (section [privacy]); boolean switches are plain flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from fedkey.errors import FedkeyError
from fedkey.fields import option as _f


@dataclass
class PrivacyConfig:
    """Client-level DP-FedAvg, secure aggregation and robust aggregation."""

    SECTION = "privacy"
    dp: bool = _f(False, "client-level DP-FedAvg: clip every update, add Gaussian noise to the sum, account epsilon")
    noise_multiplier: float = _f(1.0, "z: std of the noise on the sum / clipping norm")
    clip: float = _f(0.1, "L2 norm C every client's update is clipped to (start value when adaptive)")
    adaptive_clip: bool = _f(False, "track a quantile of update norms with the clip (Andrew et al. 2021)")
    target_quantile: float = _f(0.5, "adaptive clipping: fraction of updates meant to be unclipped")
    clip_lr: float = _f(0.2, "adaptive clipping: geometric step of the clip per round")
    clip_count_stddev: float = _f(0.0, "adaptive clipping: noise std on the count of unclipped updates "
                                        "(0: expected clients per round / 20)")
    target_epsilon: float = _f(0.0, "stop before a round would take epsilon past this (0: no limit)")
    delta: float = _f(0.0, "delta of the (epsilon, delta) guarantee (0: population^-1.1)")
    accountant: str = _f("rdp", "rdp | pld (both dp-accounting; pld is tighter and slower)")
    dp_sampling: str = _f("auto", "client sampling the accountant assumes: auto (what the engine did) | poisson | "
                                  "uniform | none (no amplification)")
    noise_at: str = _f("server", "where DP noise is added: server (to the unmasked sum) | clients (each adds its "
                                 "share before masking, so the server never sees a noise-free sum)")
    noise_seed: int = _f(0, "seed of the DP noise, for reproducible runs; -1 draws it from the OS (deployments)")
    secagg: bool = _f(False, "secure aggregation: the server sees only masked updates and their sum")
    secagg_dropout: float = _f(1 / 3, "fraction of a round's clients that may drop out with the sum still recovered")
    secagg_neighbors: int = _f(0, "0: every client masks with every other (Bonawitz et al. 2017); K: only with K "
                                  "random peers (SecAgg+, Bell et al. 2020): cost grows with K, not the round size, "
                                  "and the dropout tolerance holds per neighbourhood")
    secagg_bits: int = _f(32, "ring size 2^bits of the fixed-point encoding: 32, or 16 (half the upload, coarser)")
    secagg_range: float = _f(0.0, "per-coordinate clamp of an encoded update (0: the DP clip, else --max-norm, "
                                  "else 1.0)")
    robust: bool = _f(False, "reject non-finite, mis-shaped or (with --max-norm) oversized updates, and log them")
    max_norm: float = _f(0.0, "robust: reject updates whose L2 norm exceeds this (0: no norm bound)")

    def __post_init__(self) -> None:
        choices = {"accountant": ("rdp", "pld"), "dp_sampling": ("auto", "poisson", "uniform", "none"),
                   "noise_at": ("server", "clients")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FedkeyError(f"[privacy].{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.dp and (self.noise_multiplier <= 0 or self.clip <= 0):
            raise FedkeyError("--noise-multiplier and --clip must be positive with --dp")
        if not 0 < self.target_quantile < 1:
            raise FedkeyError(f"--target-quantile must be in (0, 1), got {self.target_quantile}")
        if self.secagg_bits not in (16, 32):
            raise FedkeyError(f"--secagg-bits must be 16 or 32, got {self.secagg_bits}")
        if self.noise_at == "clients" and not self.secagg and self.dp:
            raise FedkeyError("--noise-at clients only makes sense with --secagg (without it the server sees every "
                              "noised update); use --noise-at server")

    @property
    def active(self) -> bool:
        """Whether any option changes how updates are aggregated."""
        return self.dp or self.secagg or self.robust


def add_privacy_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field: switches (--dp, --secagg, --robust, ...) take no value; the rest take one.

    A flag the parser already has is shared, not redefined: `fedkey train --secagg` means secure
    aggregation on every engine (this package's Bonawitz protocol locally, Flower's SecAgg+ on Flower).
    """
    group = parser.add_argument_group("privacy settings (also from --config TOML, table privacy)")
    for f in dataclasses.fields(PrivacyConfig):
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:
            continue
        help_ = f.metadata["help"]
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            group.add_argument(flag, dest=f.name, type=typ, default=None, help=f"{help_} (default: {f.default:.4g})"
                               if isinstance(f.default, float) else f"{help_} (default: {f.default})")
