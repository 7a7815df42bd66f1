"""The accountant reproduces dp-accounting's own published examples for the same parameters."""

from __future__ import annotations

import math

import pytest

from fedkey.errors import FedkeyError
from fl_core.privacy.accounting import PrivacyAccountant, Sampling, default_delta


def test_poisson_sampled_rounds_match_the_pld_library_example():
    # dp_accounting/pld/pld_privacy_accountant_test.py::test_self_composed_subsampled_gaussian:
    # PoissonSampled(0.2, Gaussian(0.5)) composed 3 times gives epsilon 1 at delta 0.15594
    acc = PrivacyAccountant(0.5, Sampling("poisson", population=5, per_round=1), delta=0.15594, method="pld")
    assert acc.epsilon(3) == pytest.approx(1.0, abs=1e-3)


def test_rounds_without_sampling_match_the_pld_gaussian_example():
    # test_gaussian_basic: Gaussian(sqrt(3)) three times: epsilon 1 at delta 0.126936
    acc = PrivacyAccountant(math.sqrt(3), Sampling("none", population=10, per_round=10), delta=0.126936, method="pld")
    assert acc.epsilon(3) == pytest.approx(1.0, abs=1e-3)


def test_rdp_epsilon_matches_the_library_rdp_table():
    # rdp_privacy_accountant_test.py::test_compute_rdp_poisson_sampled_gaussian: q 0.01, z 2.5, 50 steps
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders = [1.5, 2.5, 5, 50, 100]
    table = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    expect = compute_epsilon(orders, table, 1e-5)[0]
    acc = PrivacyAccountant(2.5, Sampling("poisson", population=100, per_round=1), delta=1e-5, orders=orders)
    assert acc.epsilon(50) == pytest.approx(expect, rel=1e-3)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    s = Sampling("poisson", 1000, 50)
    a, b = PrivacyAccountant(1.0, s), PrivacyAccountant(2.0, s)
    assert 0 == a.epsilon(0) < a.epsilon(10) < a.epsilon(100)
    assert b.epsilon(100) < a.epsilon(100)
    assert a.epsilon(100) < PrivacyAccountant(1.0, Sampling("none", 1000, 50)).epsilon(100)
    assert a.delta == pytest.approx(default_delta(1000))


def test_max_rounds_is_the_last_round_within_the_target():
    acc = PrivacyAccountant(5.0, Sampling("none", 1000, 50))
    r = acc.max_rounds(3.0)
    assert acc.epsilon(r) <= 3.0 < acc.epsilon(r + 1)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(FedkeyError, match="clients per round"):
        Sampling("poisson", 10, 20)
    with pytest.raises(FedkeyError, match="PLD accountant has no fixed-size"):
        PrivacyAccountant(1.0, Sampling("uniform", 100, 10), method="pld")
