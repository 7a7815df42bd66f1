"""The simulated fleet: availability, over-selection, dropouts, deadline and their accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkey.errors import FedkeyError
from fl_core.config import FleetConfig
from fl_core.fleet import Fleet


def _plan(fleet: Fleet, r: int, n: int, work: int = 1000, up: int = 10**6):
    eligible, sel = fleet.select(r, 3600.0 * r, n)
    return fleet.plan(r, eligible, sel, [work] * len(sel), n, 10**6, up)


def test_every_selected_client_is_accounted_for_exactly_once():
    fleet = Fleet(500, FleetConfig(dropout=0.3, overselect=1.3, deadline_s=60.0), seed=1)
    for r in range(20):
        p = _plan(fleet, r, 20)
        groups = [p.used, p.dropped, p.late, p.aborted]
        assert sorted(i for g in groups for i in g) == sorted(p.selected)
        assert len(p.selected) == math.ceil(1.3 * 20) or len(p.selected) == p.eligible
        assert len(p.used) <= 20
        assert all(p.finish_s[i] <= 60.0 for i in p.used)
        if len(p.used) == 20:  # the round closes at the N-th report: the rest are cut off, not used
            assert p.duration_s == max(p.finish_s.values())
        else:
            assert not p.aborted


def test_dropout_rate_and_over_selection_keep_rounds_full():
    fleet = Fleet(2000, FleetConfig(dropout=0.3, overselect=1.3, deadline_s=1e9, availability=False), seed=0)
    plans = [_plan(fleet, r, 50) for r in range(40)]
    drop = sum(len(p.dropped) for p in plans) / sum(len(p.selected) for p in plans)
    assert 0.25 < drop < 0.35
    # 1.3 x 0.7 = 0.91 of N reports on average: most rounds are a little short, none is empty
    assert all(30 <= len(p.used) <= 50 for p in plans)
    assert 43 < np.mean([len(p.used) for p in plans]) < 48


def test_deadline_makes_slow_clients_late():
    cfg = FleetConfig(deadline_s=30.0, availability=False, overselect=1.0)
    fleet = Fleet(300, cfg, seed=0)
    p = _plan(fleet, 0, 100, work=10_000)  # 10k tokens at ~300 tokens/s median: most devices are late
    assert len(p.late) > 50 and len(p.used) + len(p.late) == 100
    assert p.duration_s == 30.0
    fast = _plan(Fleet(300, FleetConfig(deadline_s=1e6, availability=False, overselect=1.0), seed=0), 0, 100, work=10_000)
    assert not fast.late and len(fast.used) == 100


def test_availability_follows_local_night():
    cfg = FleetConfig(availability=True, day_plug_prob=0.0, night_hours=8.0)
    tz = np.zeros(1000)
    fleet = Fleet(1000, cfg, seed=0, tz_hours=tz)
    night = len(fleet.eligible(2 * 3600.0))      # 02:00 local for everyone
    noon = len(fleet.eligible(13 * 3600.0))      # 13:00 local
    assert night > 600 and noon < 50
    # a US-like population (UTC-6) is asleep when a UTC+0 one is awake
    us = Fleet(1000, cfg, seed=0, tz_hours=tz - 6)
    assert len(us.eligible(13 * 3600.0 + 6 * 3600)) < 50 and len(us.eligible(8 * 3600.0)) > 600


def test_fleet_is_a_pure_function_of_seed_and_round():
    a = _plan(Fleet(400, FleetConfig(dropout=0.2), seed=3), 7, 30)
    b = _plan(Fleet(400, FleetConfig(dropout=0.2), seed=3), 7, 30)
    c = _plan(Fleet(400, FleetConfig(dropout=0.2), seed=4), 7, 30)
    assert (a.selected, a.used, a.dropped) == (b.selected, b.used, b.dropped)
    assert a.selected != c.selected


def test_bad_fleet_settings_are_one_line_errors():
    with pytest.raises(FedkeyError, match="overselect"):
        FleetConfig(overselect=0.5)
    with pytest.raises(FedkeyError, match="dropout"):
        FleetConfig(dropout=1.0)


def test_size_weighted_selection_follows_the_weights_and_is_seeded():
    cfg = FleetConfig(availability=False, overselect=1.0)
    weights = np.where(np.arange(200) < 20, 9.0, 1.0)  # a tenth of the devices hold half the weight
    heavy = [sum(i < 20 for i in Fleet(200, cfg, seed=0, weights=weights).select(r, 0.0, 10)[1]) for r in range(300)]
    light = [sum(i < 20 for i in Fleet(200, cfg, seed=0).select(r, 0.0, 10)[1]) for r in range(300)]
    assert 3.5 < np.mean(heavy) < 5.0 and 0.6 < np.mean(light) < 1.4  # without replacement: a little under 5 and 1
    a = Fleet(200, cfg, seed=3, weights=weights).select(7, 0.0, 10)
    assert a == Fleet(200, cfg, seed=3, weights=weights).select(7, 0.0, 10)
    assert len(set(a[1])) == 10
