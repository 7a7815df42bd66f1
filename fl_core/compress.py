"""Uplink compression of client updates, with exact byte counts of what would go on the wire.

- none: float32, 4 bytes per coordinate.
- int8: per tensor, scale = max|x| / 127 and q = floor(x / scale + u), u ~ U[0, 1): stochastic
  rounding, so the decoded update is unbiased and each coordinate is off by less than one
  step (scale). 1 byte per coordinate + 4 per tensor.
- topk: the k largest-magnitude coordinates of (update + residual) as int32 index + float32
  value; what was not sent stays in the client's residual and is added next time it
  participates (error feedback, Stich et al. 2018 / Karimireddy et al. 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fl_core.params import ParamSpec


@dataclass
class Encoded:
    """An update as sent: its kind, its payload tensors and its size in bytes."""

    kind: str
    parts: dict[str, torch.Tensor]
    nbytes: int


def float_encode(x: torch.Tensor) -> Encoded:
    """No compression."""
    return Encoded("none", {"x": x.float()}, 4 * x.numel())


def int8_encode(x: torch.Tensor, segments: list[tuple[int, int]], gen: torch.Generator) -> Encoded:
    """Per-tensor int8 with stochastic rounding; `segments` are (offset, numel) of each tensor."""
    q = torch.empty(x.numel(), dtype=torch.int8)
    scales = torch.empty(len(segments), dtype=torch.float32)
    u = torch.rand(x.numel(), generator=gen)
    for i, (off, n) in enumerate(segments):
        seg = x[off:off + n]
        m = float(seg.abs().max()) if n else 0.0
        scale = m / 127.0 if m > 0 else 1.0
        scales[i] = scale if m > 0 else 0.0
        q[off:off + n] = torch.floor(seg / scale + u[off:off + n]).clamp_(-127, 127).to(torch.int8)
    return Encoded("int8", {"q": q, "scales": scales, "segments": torch.tensor(segments, dtype=torch.int64)},
                   q.numel() + 4 * len(segments))


def int8_decode(enc: Encoded) -> torch.Tensor:
    """Dequantize."""
    out = enc.parts["q"].to(torch.float32)
    for (off, n), s in zip(enc.parts["segments"].tolist(), enc.parts["scales"].tolist()):
        out[off:off + n] *= s
    return out


def topk_encode(x: torch.Tensor, k: int) -> Encoded:
    """The k largest-magnitude coordinates."""
    k = max(1, min(k, x.numel()))
    idx = torch.topk(x.abs(), k, sorted=False).indices.to(torch.int32)
    return Encoded("topk", {"idx": idx, "val": x[idx.long()].float(), "dim": torch.tensor(x.numel())}, 8 * k)


def topk_decode(enc: Encoded) -> torch.Tensor:
    """Scatter the sent coordinates into zeros."""
    out = torch.zeros(int(enc.parts["dim"]), dtype=torch.float32)
    out[enc.parts["idx"].long()] = enc.parts["val"]
    return out


def decode(enc: Encoded) -> torch.Tensor:
    """Any encoded update back to a dense float32 vector."""
    if enc.kind == "int8":
        return int8_decode(enc)
    if enc.kind == "topk":
        return topk_decode(enc)
    return enc.parts["x"]


def seeded_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints (seed, round, client, ...)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Codec:
    """The configured compressor for one model: encode on the client, decode on the server."""

    def __init__(self, kind: str, spec: ParamSpec, topk_frac: float = 0.01) -> None:
        self.kind, self.spec = kind, spec
        self.k = max(1, math.ceil(topk_frac * spec.n_shared))

    @property
    def uses_residual(self) -> bool:
        """Whether clients keep an error-feedback residual between participations."""
        return self.kind == "topk"

    def wire_bytes(self) -> int:
        """Bytes one update takes on the uplink (the same for every client)."""
        n = self.spec.n_shared
        return {"none": 4 * n, "int8": n + 4 * len(self.spec.shared), "topk": 8 * self.k}[self.kind]

    def encode(self, delta: torch.Tensor, gen: torch.Generator,
               residual: torch.Tensor | None = None) -> tuple[Encoded, torch.Tensor | None]:
        """Encode a delta; returns the message and (topk) the residual to keep on the device."""
        if self.kind == "int8":
            return int8_encode(delta, self.spec.segments(), gen), None
        if self.kind == "topk":
            v = delta if residual is None else delta + residual.float()
            enc = topk_encode(v, self.k)
            rest = v.clone()
            rest[enc.parts["idx"].long()] = 0.0
            return enc, rest
        return float_encode(delta), None
