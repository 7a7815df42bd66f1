"""Fitting the cache's sentinel (keyboard/sentinel.py) on the changes users' phrase caches make on their own
validation slices.

Each user's cache is judged as the per-user gate judges it: built from the messages before the slice and
learning each slice message once sent. A change counts where it decides a one-piece word (the new top piece or
the old one is the word typed). The fit is a convex problem over all users' changes; on devices its gradient
is a sum over users, which the federated engine's aggregation sums as it sums model updates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from keyboard.model import KeyboardLM
from keyboard.phrase_cache import histories, mix_logp
from keyboard.sentinel import Sentinel, features
from keyboard.words import one_piece_word
from personalization.batched import base_features, gate_cache
from personalization.config import PersonalConfig
from personalization.data import UserData


def user_changes(base: KeyboardLM, u: UserData, cfg: PersonalConfig, starts: np.ndarray,
                 cont: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """The decisive changes of one user's cache on their whole validation slice (every message of it, where the
    gate reads the latest max_val_tokens pieces): features and whether the new piece was right."""
    X: list[np.ndarray] = []
    y: list[int] = []
    nv = u.n_val_messages
    if not nv or cfg.cache_order < 2:
        return X, y
    val = u.history[len(u.history) - nv:]
    cache = gate_cache(u, cfg, val)
    E, ob = base.embed.weight.detach(), base.out_bias.detach()
    for b, (s, f) in enumerate(zip(val, base_features(base, val))):
        with torch.inference_mode():
            lp = torch.log_softmax(f @ E.t() + ob, -1).double().numpy()
        rows = [(b, t) for t in range(len(s) - 1)]
        hist = histories(val, rows, cfg.cache_order - 1)
        mixed = mix_logp(lp, [cache] * len(rows), hist, np.full(len(rows), b))
        for t in range(len(s) - 1):
            target, new, old = s[t + 1], int(mixed[t].argmax()), int(lp[t].argmax())
            if new == old or target not in (new, old) or not one_piece_word(s, t, starts, cont):
                continue
            h = [int(x) for x in hist[t] if x >= 0]
            X.append(features(f[t].numpy(), lp[t], mixed[t], cache.longest(h, b), starts))
            y.append(int(new == target))
    return X, y


def fit_sentinel(base: KeyboardLM, users: list[UserData], cfg: PersonalConfig, starts: np.ndarray,
                 cont: np.ndarray, progress: Callable[[int, int], None] | None = None) -> tuple[Sentinel | None, dict]:
    """The sentinel fitted on every user's validation changes (None if they hold too few), and its figures."""
    X: list[np.ndarray] = []
    y: list[int] = []
    for i, u in enumerate(users):
        xs, ys = user_changes(base, u, cfg, starts, cont)
        X += xs
        y += ys
        if progress:
            progress(1, i + 1)
    info = {"changes": len(y), "new_right": int(sum(y))}
    if len(y) < cfg.sentinel_min_changes or len(set(y)) < 2:
        return None, info
    s = Sentinel.fit(np.stack(X), np.array(y, dtype=np.float64), cfg.cache_sentinel, starts)
    info["passed"] = int(sum(s.passes(x) for x in X))
    return s, info
