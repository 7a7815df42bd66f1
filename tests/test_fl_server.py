"""Aggregation and server optimizers against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkey.errors import FedkeyError
from fl_core.aggregate import WeightedMean
from fl_core.config import FLConfig
from fl_core.server import server_init, server_update


def test_weighted_mean_matches_hand_computation():
    ups = [np.array([1.0, -2.0, 0.5], np.float32), np.array([3.0, 0.0, -1.5], np.float32),
           np.array([-1.0, 4.0, 2.0], np.float32)]
    w = [10, 30, 60]
    res = WeightedMean(3).aggregate(ups, w, ["a", "b", "c"])
    # (10*1 + 30*3 + 60*-1) / 100 = 0.4 ; (-20 + 0 + 240) / 100 = 2.2 ; (5 - 45 + 120) / 100 = 0.8
    np.testing.assert_allclose(res.mean, [0.4, 2.2, 0.8], rtol=1e-6)
    assert res.mean.dtype == np.float32 and res.n_used == 3 and res.info["weight_sum"] == 100


@pytest.mark.parametrize("ups, w, msg", [
    ([], [], "no update"),
    ([np.zeros(3, np.float32)], [0.0], "positive"),
    ([np.zeros(3, np.float32)], [float("nan")], "positive"),
    ([np.zeros(4, np.float32)], [1.0], "shape"),
    ([np.zeros(3, np.float32)], [1.0, 2.0], "weights"),
])
def test_weighted_mean_rejects_bad_input(ups, w, msg):
    with pytest.raises(FedkeyError, match=msg):
        WeightedMean(3).aggregate(ups, w)


def _cfg(**kw) -> FLConfig:
    return FLConfig(**kw)


X0 = torch.tensor([1.0, -1.0, 0.0])
D1 = torch.tensor([0.5, 0.1, -0.2])
D2 = torch.tensor([-0.3, 0.2, 0.4])


def test_fedavg_is_x_plus_lr_delta():
    cfg = _cfg(server_opt="sgd", server_lr=1.0)
    st = server_update(server_init(X0, cfg), D1, cfg)
    torch.testing.assert_close(st.params, X0 + D1)
    assert st.round == 1
    half = server_update(server_init(X0, cfg), D1, cfg, lr=0.5)
    torch.testing.assert_close(half.params, X0 + 0.5 * D1)


def test_server_momentum_by_hand():
    cfg = _cfg(server_opt="sgd", server_lr=0.7, server_momentum=0.9)
    st = server_update(server_update(server_init(X0, cfg), D1, cfg), D2, cfg)
    m1 = D1
    m2 = 0.9 * m1 + D2
    torch.testing.assert_close(st.params, X0 + 0.7 * m1 + 0.7 * m2)


def _adaptive_by_hand(kind: str, lr=0.1, b1=0.9, b2=0.99, tau=1e-3):
    x = X0.double().clone()
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.full((3,), tau ** 2, dtype=torch.float64)
    for d in (D1.double(), D2.double()):
        if kind == "adagrad":
            v = v + d * d
            step = d
        else:
            m = b1 * m + (1 - b1) * d
            if kind == "adam":
                v = b2 * v + (1 - b2) * d * d
            else:  # yogi, Reddi et al. 2021 Algorithm 2
                v = v - (1 - b2) * d * d * torch.sign(v - d * d)
            step = m
        x = x + lr * step / (v.sqrt() + tau)
    return x.float()


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_adaptive_server_optimizers_by_hand(kind):
    cfg = _cfg(server_opt=kind, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    st = server_init(X0, cfg)
    before = st.params.clone()
    st = server_update(server_update(st, D1, cfg), D2, cfg)
    torch.testing.assert_close(st.params, _adaptive_by_hand(kind), rtol=1e-5, atol=1e-6)
    assert st.round == 2
    torch.testing.assert_close(server_init(X0, cfg).params, before)  # pure: the input state is not changed


def test_yogi_differs_from_adam_when_deltas_grow():
    cfg_a, cfg_y = _cfg(server_opt="adam"), _cfg(server_opt="yogi")
    a, y = server_init(X0, cfg_a), server_init(X0, cfg_y)
    for k in range(3):
        d = D1 * (10 ** k)
        a, y = server_update(a, d, cfg_a), server_update(y, d, cfg_y)
    assert not torch.allclose(a.params, y.params)
    assert math.isfinite(float(y.params.sum()))
