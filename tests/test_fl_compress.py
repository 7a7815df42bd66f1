"""Uplink compression: error bounds, unbiasedness, byte counts, error feedback."""

from __future__ import annotations

import torch

from fl_core.compress import Codec, decode, int8_encode, seeded_generator
from fl_core.params import ParamSpec


def _spec() -> ParamSpec:
    m = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    return ParamSpec.of(m)


def test_int8_error_below_one_step_per_tensor_and_4x_smaller():
    spec = _spec()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.n_shared, generator=g)
    x[:1200] *= 100.0  # tensors of very different scale each get their own step
    enc = int8_encode(x, spec.segments(), seeded_generator(0, 1))
    y = decode(enc)
    for (off, n), scale in zip(spec.segments(), enc.parts["scales"].tolist()):
        err = (y[off:off + n] - x[off:off + n]).abs()
        assert float(err.max()) < scale * (1 + 1e-5)
        assert abs(scale - float(x[off:off + n].abs().max()) / 127) < 1e-6 * scale + 1e-12
    assert enc.nbytes == spec.n_shared + 4 * len(spec.segments())
    assert 4 * spec.n_shared / enc.nbytes > 3.9


def test_int8_stochastic_rounding_is_unbiased():
    spec = _spec()
    x = torch.randn(spec.n_shared, generator=torch.Generator().manual_seed(1))
    mean = torch.zeros_like(x)
    n = 400
    for k in range(n):
        mean += decode(int8_encode(x, spec.segments(), seeded_generator(0, k))) / n
    step = float(x.abs().max()) / 127
    # each draw is off by < step with mean zero: the average of n draws is within a few step/sqrt(n)
    assert float((mean - x).abs().mean()) < 0.1 * step
    assert float((mean - x).abs().max()) < 5 * step / n ** 0.5


def test_int8_zero_tensor_and_determinism():
    spec = _spec()
    x = torch.zeros(spec.n_shared)
    assert torch.equal(decode(int8_encode(x, spec.segments(), seeded_generator(3))), x)
    y = torch.randn(spec.n_shared)
    a = decode(int8_encode(y, spec.segments(), seeded_generator(5, 2)))
    b = decode(int8_encode(y, spec.segments(), seeded_generator(5, 2)))
    c = decode(int8_encode(y, spec.segments(), seeded_generator(5, 3)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_topk_sends_largest_and_error_feedback_keeps_the_rest():
    spec = _spec()
    codec = Codec("topk", spec, topk_frac=0.05)
    x = torch.randn(spec.n_shared, generator=torch.Generator().manual_seed(2))
    enc, residual = codec.encode(x, seeded_generator(0))
    sent = decode(enc)
    assert enc.nbytes == 8 * codec.k == codec.wire_bytes()
    assert int((sent != 0).sum()) == codec.k
    assert float(sent.abs()[sent != 0].min()) >= float(x.abs()[sent == 0].max())
    torch.testing.assert_close(sent + residual, x)  # nothing is lost, only delayed
    # next participation: residual is added before choosing what to send
    x2 = torch.randn(spec.n_shared, generator=torch.Generator().manual_seed(3))
    enc2, residual2 = codec.encode(x2, seeded_generator(1), residual)
    torch.testing.assert_close(decode(enc2) + residual2, x2 + residual)


def test_wire_bytes_per_codec():
    spec = _spec()
    n = spec.n_shared
    assert Codec("none", spec).wire_bytes() == 4 * n
    assert Codec("int8", spec).wire_bytes() == n + 4 * len(spec.shared)
    x = torch.randn(n)
    for kind in ("none", "int8", "topk"):
        codec = Codec(kind, spec)
        enc, _ = codec.encode(x, seeded_generator(0))
        assert enc.nbytes == codec.wire_bytes()
