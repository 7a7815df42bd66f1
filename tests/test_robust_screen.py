"""Robust aggregation: a broken or oversized update is rejected and logged, and the aggregate is unchanged."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedkey.errors import FedkeyError
from fl_core.privacy.aggregator import PrivateAggregator
from fl_core.privacy.config import PrivacyConfig

D = 1000


def _good(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.01, D).astype(np.float32) for _ in range(n)]


BAD = {
    "nan": lambda: np.where(np.arange(D) == 3, np.nan, 0.0).astype(np.float32),
    "inf": lambda: np.full(D, np.inf, np.float32),
    "shape": lambda: np.zeros(D + 1, np.float32),
    "dtype": lambda: np.zeros(D, np.float64),
    "oversized": lambda: np.full(D, 10.0, np.float32),
    "not_array": lambda: [0.0] * D,
}


@pytest.mark.parametrize("secagg", [False, True])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_update_does_not_change_the_aggregate(kind, secagg, caplog):
    cfg = PrivacyConfig(robust=True, max_norm=5.0, secagg=secagg)
    good, w = _good(), [3.0, 1.0, 2.0, 5.0, 4.0]
    ref = PrivateAggregator(cfg, D).aggregate(good, w)
    with caplog.at_level(logging.WARNING, logger="fedkey.robust"):
        got = PrivateAggregator(cfg, D).aggregate(good[:2] + [BAD[kind]()] + good[2:], w[:2] + [100.0] + w[2:],
                                                  ids=["a", "b", "evil", "c", "d"])
    assert got.rejected and got.rejected[0][0] == 2 and got.n_used == 5
    assert "client evil" in caplog.text
    step = ref.info.get("secagg_step", 0.0) * 5 / 1.0
    assert np.abs(got.mean - ref.mean).max() <= step + 1e-7


def test_without_the_norm_bound_a_large_finite_update_is_kept():
    good = _good()
    got = PrivateAggregator(PrivacyConfig(robust=True), D).aggregate(good + [np.full(D, 10.0, np.float32)], [1.0] * 6)
    assert got.n_used == 6 and not got.rejected


def test_a_non_positive_weight_is_rejected_too():
    got = PrivateAggregator(PrivacyConfig(robust=True), D).aggregate(_good(3), [1.0, float("nan"), -2.0])
    assert got.n_used == 1 and [i for i, _ in got.rejected] == [1, 2]


def test_a_round_where_everything_is_rejected_is_a_clear_error():
    with pytest.raises(FedkeyError, match="every update was rejected.*non-finite"):
        PrivateAggregator(PrivacyConfig(robust=True), D).aggregate([BAD["nan"](), BAD["inf"]()], [1.0, 1.0])


def test_a_client_that_skips_the_clamp_under_secure_aggregation_is_caught_at_the_sum():
    from fl_core.privacy.robust import sum_out_of_range
    from fl_core.privacy.secagg import FixedPoint, secure_sum

    good = _good(6)
    fp = FixedPoint(0.05, 6)
    enc = [fp.encode(v)[0] for v in good]
    honest = fp.decode(secure_sum(enc).total)
    assert sum_out_of_range(honest, 6, max(np.linalg.norm(v) for v in good) + 1e-6) is None
    enc[2] = enc[2] + np.uint32(1 << 30)  # a hand-made ring vector: far outside what encode() ever emits
    forged = fp.decode(secure_sum(enc).total)
    assert "broke the clamp" in sum_out_of_range(forged, 6, max(np.linalg.norm(v) for v in good) + 1e-6)
