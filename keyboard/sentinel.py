"""The cache's sentinel: a shared per-word check on each change the phrase cache makes to the top suggestion.

Where a user's phrase cache turns the model's top piece into another, the cache was right at 69-74% of the
changes that decided a word, and users with a few changes each were hurt by the unlucky ones. A logistic
model, shared by every user (like the pointer-sentinel gate of Merity et al. 2017), reads the LSTM's output and
how sure the model and the cache are, and lets the change through only where it is likely right; elsewhere
the row keeps the model's distribution. Its ~110 weights are fitted on users' validation slices, the same
data the per-user gate reads. NumPy only, so the on-device runtime applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkey.errors import FedkeyError
from keyboard.adapter_file import read_headed_npz, write_headed_npz

N_EXTRA = 10  # features beyond the LSTM output, see `features`


def features(f: np.ndarray, lp: np.ndarray, lq: np.ndarray, stats: tuple[int, float, float],
             starts: np.ndarray) -> np.ndarray:
    """One changed row's features: LSTM output f (d,), the model's and the mixed log-probabilities (vocab,),
    the cache's longest seen context (length, continuations, top share), and which pieces start a word."""
    new, old = int(lq.argmax()), int(lp.argmax())
    top2 = np.partition(lp, -2)[-2:]
    k, tot, share = stats
    extra = [float(top2.max()), float(top2.min()), float(lp[new]), float(lq[new]), float(lq[old]),
             float(k), math.log1p(tot), float(share), float(starts[new]), float(new == 0)]
    return np.concatenate([np.asarray(f, np.float64), np.array(extra)])


@dataclass
class Sentinel:
    """Standardized logistic weights and the probability a change needs to pass."""

    w: np.ndarray
    b: float
    mu: np.ndarray
    sd: np.ndarray
    threshold: float
    starts: np.ndarray  # (vocab,) bool: pieces that begin a word

    def passes(self, x: np.ndarray) -> bool:
        """Whether a change with features x (see `features`) is let through."""
        z = float(((x - self.mu) / self.sd) @ self.w + self.b)
        return 1.0 / (1.0 + math.exp(-z)) >= self.threshold

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, threshold: float, starts: np.ndarray, l2: float = 1e-3,
            iters: int = 300) -> "Sentinel":
        """Fit on changes X (n, F) labelled y (1: the cache's new top piece was the right one, 0: the old one)."""
        import torch

        mu, sd = X.mean(0), X.std(0) + 1e-6
        xt = torch.tensor((X - mu) / sd, dtype=torch.float64)
        yt = torch.tensor(y, dtype=torch.float64)
        w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return cls(w.detach().numpy(), float(b.item()), mu, sd, threshold, np.asarray(starts, bool))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for a file."""
        return {"w": self.w, "b": np.array([self.b, self.threshold]), "mu": self.mu, "sd": self.sd,
                "starts": self.starts}


def save_sentinel(path: str | Path, s: Sentinel, base_id: str) -> int:
    """Write the sentinel (one small .npz naming the base model); returns its size in bytes."""
    return write_headed_npz(path, {"base_id": base_id}, s.to_arrays())


def load_sentinel(path: str | Path, expect_base_id: str | None = None, data: bytes | None = None) -> Sentinel:
    """Read a sentinel; refuse a corrupt file or one fitted on another base model."""
    _, z = read_headed_npz(path, "cache sentinel", expect_base_id, data)
    try:
        b, thr = z["b"].tolist()
        return Sentinel(z["w"], b, z["mu"], z["sd"], thr, z["starts"].astype(bool))
    except Exception as e:
        raise FedkeyError(f"{path}: not a fedkey cache sentinel ({type(e).__name__}); re-run `fedkey personalize`") from None
