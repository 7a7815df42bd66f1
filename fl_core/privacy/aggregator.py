"""The privacy-aware aggregation step: screen -> clip -> (secure) sum -> noise -> divide, one call per round.

Input is what a FedAvg server receives: one flat float32 update per reporting client and its
weight (e.g. example count). Output is the vector the server optimizer applies as the
averaged update. Without DP it is the weighted mean; with DP (McMahan et al. 2018) weights
are uniform, every update is clipped to C, and the noised sum is divided by the expected
number of clients per round, a fixed denominator, so one user moves it by at most C / K.

Secure aggregation sums, per client, [w x / W, w / W, within-clip bit] in a 2^bits ring; W is
the round's largest weight, announced to every client so they share one fixed-point scale
(the only per-round statistic the server learns besides the sum). DP noise is added either
by the server to the unmasked sum (default: the server is trusted with the noise-free sum)
or by the clients before masking, each adding N(0, sigma^2 / t) with t the secure-aggregation
threshold, so that any round that completes carries at least the accounted noise and the
server never sees a noise-free sum (continuous noise rounded to the fixed-point grid, an
approximation of the distributed discrete Gaussian of Kairouz et al. 2021).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedkey.errors import FedkeyError
from fl_core.aggregate import AggregateResult, RoundAbandoned
from fl_core.privacy.accounting import PrivacyAccountant, Sampling
from fl_core.privacy.config import PrivacyConfig
from fl_core.privacy.dp import AdaptiveClip, clip_updates, gaussian, update_noise_multiplier
from fl_core.privacy.robust import screen, sum_out_of_range
from fl_core.privacy.secagg import FixedPoint, SecAggError, secure_sum, threshold_for

log = logging.getLogger("fedkey.privacy")


class PrivateAggregator:
    """Stateful across rounds: the adaptive clip, the noise generator and the rounds spent for the accountant."""

    def __init__(self, cfg: PrivacyConfig, dim: int, sampling: Sampling | None = None) -> None:
        self.cfg, self.dim = cfg, dim
        self.rounds = 0
        self.accountant = None
        self.clipper = AdaptiveClip(cfg.clip, cfg.target_quantile, cfg.clip_lr)
        self.count_std = 0.0
        self.z_update = cfg.noise_multiplier
        if cfg.dp:
            if sampling is None:
                raise FedkeyError("DP needs the client sampling (population and clients per round) for accounting")
            self.accountant = PrivacyAccountant(cfg.noise_multiplier, sampling, cfg.delta or None, cfg.accountant)
            if cfg.adaptive_clip:
                self.count_std = cfg.clip_count_stddev or sampling.per_round / 20
                self.z_update = update_noise_multiplier(cfg.noise_multiplier, self.count_std)
        self.expected = sampling.per_round if sampling else None
        seed = None if cfg.noise_seed < 0 else cfg.noise_seed
        self.rng = np.random.default_rng(seed)

    @property
    def clip(self) -> float:
        """The clipping norm the next round uses."""
        return self.clipper.clip

    def epsilon(self, rounds: int | None = None) -> float | None:
        """Epsilon spent after `rounds` (default: the rounds aggregated so far); None without DP."""
        return None if self.accountant is None else self.accountant.epsilon(self.rounds if rounds is None else rounds)

    def may_run_round(self) -> bool:
        """False when one more round would take epsilon past the target."""
        if self.accountant is None or self.cfg.target_epsilon <= 0:
            return True
        return self.accountant.epsilon(self.rounds + 1) <= self.cfg.target_epsilon

    def aggregate(self, updates: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float],
                  ids: Sequence[str] | None = None, n_dropped: int = 0) -> AggregateResult:
        """Aggregate one round. `n_dropped`: clients that joined the round's secure aggregation but never reported.

        A round in which secure aggregation cannot recover the sum raises SecAggError and
        spends no privacy budget (nothing was released).
        """
        cfg = self.cfg
        scr = screen(updates, weights, self.dim, cfg.max_norm if cfg.robust else 0.0, ids)
        n = len(scr.kept)
        info: dict[str, Any] = {"rejected": len(scr.rejected)}
        if n == 0 and not cfg.dp:
            raise RoundAbandoned("no acceptable update this round: every update was rejected "
                              f"({'; '.join(why for _, why in scr.rejected) or 'none sent'})")
        if cfg.dp:
            x, norms = clip_updates(scr.updates, self.clip)
            within = (norms <= self.clip).astype(np.float64)
            w = np.ones(n)
            info.update(clip=self.clip, clipped=int(n - within.sum()), norm_median=float(np.median(norms)) if n else 0.0)
        else:
            x, w, within = scr.updates, scr.weights, np.zeros(n)
        noise_std = self.z_update * self.clip if cfg.dp else 0.0
        if cfg.secagg:
            total, total_w, n_within = self._secure_sum(x, w, within, n_dropped, noise_std, info)
        else:
            total = np.einsum("i,ij->j", w, x, dtype=np.float64) if n else np.zeros(self.dim)
            total_w, n_within = float(w.sum()), float(within.sum())
        if cfg.dp:
            if not (cfg.secagg and cfg.noise_at == "clients"):
                total += gaussian(self.rng, self.dim, noise_std)
            mean = total / self.expected
            if cfg.adaptive_clip:
                if not (cfg.secagg and cfg.noise_at == "clients"):
                    n_within += float(gaussian(self.rng, 1, self.count_std)[0])
                frac = n_within / self.expected
                self.clipper.update(frac)
            info.update(noise_std=noise_std, next_clip=self.clip)
            self.rounds += 1
            info["epsilon"] = self.epsilon()
        else:
            mean = total / total_w
        return AggregateResult(mean.astype(np.float32), n, scr.rejected, info)

    def _secure_sum(self, x: np.ndarray, w: np.ndarray, within: np.ndarray, n_dropped: int, noise_std: float,
                    info: dict[str, Any]) -> tuple[np.ndarray, float, float]:
        cfg = self.cfg
        n = len(w) + n_dropped
        t = threshold_for(n, cfg.secagg_dropout)
        at_clients = cfg.dp and cfg.noise_at == "clients"
        client_noise = noise_std / np.sqrt(t) if at_clients else 0.0
        count_noise = self.count_std / np.sqrt(t) if at_clients else 0.0
        bound = cfg.secagg_range or (self.clip if cfg.dp else cfg.max_norm) or 1.0
        # the weight and within-clip slots hold values in [0, 1] (plus the clients' count noise)
        bound = max(bound + 6 * client_noise, 1.0 + 6 * count_noise)
        fp = FixedPoint(bound, n, cfg.secagg_bits)
        scale_w = float(w.max()) if len(w) else 1.0
        rounding = self.rng if cfg.secagg_bits == 16 else None  # 16 bits is coarser than the signal: round unbiased
        t0 = time.perf_counter()
        encoded, clamped = [], 0
        for i in range(len(w)):
            e = np.empty(self.dim + 2, fp.dtype)
            xi = x[i] + gaussian(self.rng, self.dim, client_noise).astype(np.float32) if client_noise else x[i]
            _, c = fp.encode(xi, rounding, factor=w[i] / scale_w, out=e[:self.dim])
            extra = (w[i] / scale_w, within[i] + (self.rng.normal(0, count_noise) if count_noise else 0.0))
            fp.encode(np.array(extra), rounding, out=e[self.dim:])
            encoded.append(e)
            clamped += c
        encode_s = time.perf_counter() - t0
        encoded += [np.zeros(self.dim + 2, fp.dtype)] * n_dropped  # dropped clients' inputs are never sent
        rep = secure_sum(encoded, cfg.secagg_dropout, drop_after_shares=range(len(w), n),
                         neighbors=cfg.secagg_neighbors)
        s = fp.decode(rep.total)
        if cfg.robust:  # the server cannot screen masked inputs one by one; it can check the sum's range
            norm_bound = (self.clip if cfg.dp else cfg.max_norm or bound * np.sqrt(self.dim)) + \
                2 * client_noise * np.sqrt(self.dim)
            why = (sum_out_of_range(s[:self.dim], len(w), norm_bound, len(w) * fp.step * np.sqrt(self.dim))
                   or sum_out_of_range(s[self.dim:], len(w), np.sqrt(2) * (1 + 6 * count_noise)))
            if why:
                raise SecAggError(f"secure aggregation: round discarded, {why}")
        if clamped:
            log.warning("secure aggregation clamped %d coordinates to +-%.3g", clamped, bound)
        info.update(secagg_clients=n, secagg_threshold=rep.threshold, secagg_step=fp.step, secagg_clamped=clamped,
                    secagg_encode_s=encode_s, secagg_client_s=sum(rep.client_s), secagg_client_s_max=max(rep.client_s),
                    secagg_server_s=rep.server_s, secagg_phase_s=rep.phase_s, secagg_up_bytes=rep.server_in_bytes,
                    secagg_down_bytes=rep.server_out_bytes, secagg_client_up_bytes=max(rep.client_up_bytes),
                    secagg_client_down_bytes=max(rep.client_down_bytes))
        return s[:self.dim] * scale_w, float(s[self.dim] * scale_w), float(s[self.dim + 1])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep so a resumed run continues identically."""
        return {"rounds": self.rounds, "clip": self.clipper.clip, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from state_dict()."""
        self.rounds, self.clipper.clip = int(state["rounds"]), float(state["clip"])
        self.rng.bit_generator.state = state["rng"]
