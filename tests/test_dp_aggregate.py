"""DP-FedAvg aggregation: clipping bounds every contribution, the noise has the accounted scale, the clip adapts."""

from __future__ import annotations

import numpy as np
import pytest

from fl_core.privacy.accounting import Sampling
from fl_core.privacy.aggregator import PrivateAggregator
from fl_core.privacy.config import PrivacyConfig
from fl_core.privacy.dp import clip_updates, update_noise_multiplier


def _updates(n: int, d: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, scale, (n, d)) / np.sqrt(d)).astype(np.float32)


def test_clipping_bounds_each_update_and_leaves_small_ones_alone():
    x = _updates(20, 1000) * np.linspace(0.1, 5, 20, dtype=np.float32)[:, None]
    clipped, norms = clip_updates(x, 1.0)
    assert np.all(np.linalg.norm(clipped, axis=1) <= 1.0 + 1e-5)
    small = norms <= 1.0
    assert small.any() and (~small).any()
    assert np.array_equal(clipped[small], x[small])
    assert np.allclose(clipped[~small] / np.linalg.norm(clipped[~small], axis=1, keepdims=True),
                       x[~small] / norms[~small, None], atol=1e-6)  # direction kept


@pytest.mark.parametrize("secagg", [False, True])
def test_one_users_influence_on_the_released_mean_is_at_most_clip_over_expected_count(secagg):
    d, k, clip = 2000, 10, 0.5
    base = list(_updates(8, d, seed=1))
    evil = np.full(d, 1e3, np.float32)  # norm 4.5e4, a thousand times the clip
    cfg = PrivacyConfig(dp=True, clip=clip, noise_multiplier=1.0, noise_seed=7, secagg=secagg)
    sampling = Sampling("poisson", 100, k)
    without = PrivateAggregator(cfg, d, sampling).aggregate(base, [1.0] * 8).mean
    with_evil = PrivateAggregator(cfg, d, sampling).aggregate(base + [evil], [1.0] * 9).mean  # same noise draw
    moved = float(np.linalg.norm(with_evil.astype(np.float64) - without))
    assert moved <= clip / k * (1 + 1e-3)
    assert moved > 0.9 * clip / k  # the bound is tight: the clipped update does count


def test_noise_on_the_mean_has_std_z_clip_over_expected_count():
    d, k, z, clip = 40_000, 20, 1.3, 0.25
    agg = PrivateAggregator(PrivacyConfig(dp=True, clip=clip, noise_multiplier=z), d, Sampling("poisson", 500, k))
    r = agg.aggregate([np.zeros(d, np.float32)] * 15, [3.0] * 15)
    assert float(r.mean.std()) == pytest.approx(z * clip / k, rel=0.02)
    assert r.info["epsilon"] == pytest.approx(agg.accountant.epsilon(1)) and agg.rounds == 1


def test_dp_with_secure_aggregation_equals_dp_in_the_clear_to_the_fixed_point_step():
    d = 3000
    x = list(_updates(6, d, seed=2))
    cfg = dict(dp=True, clip=0.8, noise_multiplier=0.7, noise_seed=3)
    s = Sampling("poisson", 60, 6)
    clear = PrivateAggregator(PrivacyConfig(**cfg), d, s).aggregate(x, [1.0] * 6)
    secure = PrivateAggregator(PrivacyConfig(**cfg, secagg=True), d, s).aggregate(x, [1.0] * 6)
    assert np.abs(secure.mean - clear.mean).max() <= secure.info["secagg_step"] * 6 / 6 + 1e-6


def test_noise_added_by_clients_reaches_the_accounted_scale_when_the_round_completes():
    d, k = 30_000, 9
    cfg = PrivacyConfig(dp=True, clip=1.0, noise_multiplier=1.0, secagg=True, noise_at="clients", noise_seed=1)
    r = PrivateAggregator(cfg, d, Sampling("poisson", 90, k)).aggregate([np.zeros(d, np.float32)] * k, [1.0] * k)
    t = r.info["secagg_threshold"]
    # each of the k clients adds N(0, (zC)^2 / t): the sum carries at least the accounted noise
    assert float(r.mean.std()) == pytest.approx(1.0 / k * np.sqrt(k / t), rel=0.03)


def test_adaptive_clip_tracks_the_target_quantile_of_update_norms():
    d, k = 200, 100
    cfg = PrivacyConfig(dp=True, clip=1.0, adaptive_clip=True, target_quantile=0.5, clip_lr=0.2,
                        noise_multiplier=1.0, noise_seed=0)
    agg = PrivateAggregator(cfg, d, Sampling("none", 10_000, k))  # (cheapest to account; sampling plays no part)
    rng = np.random.default_rng(0)
    for r in range(40):
        norms = np.exp(rng.normal(np.log(0.2), 0.5, k))  # median 0.2
        u = rng.normal(size=(k, d))
        u = (u / np.linalg.norm(u, axis=1, keepdims=True) * norms[:, None]).astype(np.float32)
        agg.aggregate(u, [1.0] * k)
    assert agg.clip == pytest.approx(0.2, rel=0.2)
    # the count query spends privacy too, so the update noise is raised to keep the combined multiplier at z
    z_u = update_noise_multiplier(1.0, k / 20)
    assert z_u > 1.0 and z_u ** -2 + (2 * k / 20) ** -2 == pytest.approx(1.0)


def test_target_epsilon_stops_before_the_round_that_would_exceed_it():
    cfg = PrivacyConfig(dp=True, clip=1.0, noise_multiplier=3.0, target_epsilon=4.0)
    agg = PrivateAggregator(cfg, 10, Sampling("none", 1000, 50))
    ran = 0
    while agg.may_run_round() and ran < 1000:
        agg.aggregate([np.ones(10, np.float32)] * 3, [1.0] * 3)
        ran += 1
    assert 1 < ran < 1000 and agg.epsilon() <= 4.0 < agg.epsilon(ran + 1)


def test_state_dict_resumes_the_same_noise_and_clip():
    d = 500
    cfg = PrivacyConfig(dp=True, clip=1.0, adaptive_clip=True, noise_seed=5)
    s = Sampling("poisson", 1000, 40)
    x = list(_updates(40, d, seed=4))
    a = PrivateAggregator(cfg, d, s)
    a.aggregate(x, [1.0] * 40)
    b = PrivateAggregator(cfg, d, s)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.aggregate(x, [1.0] * 40).mean, b.aggregate(x, [1.0] * 40).mean)
    assert a.clip == b.clip and a.rounds == b.rounds == 2
