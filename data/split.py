"""Pure, seeded decisions about users: who is kept, their role, their region, and their train/test messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedkey.errors import FedkeyError

ROLES = ("public", "heldout", "train")
REGIONS = ("US", "GB")
_REGION_ALIASES = {
    "US": "US", "USA": "US", "EN-US": "US", "EN_US": "US", "AMERICAN": "US",
    "GB": "GB", "UK": "GB", "EN-GB": "GB", "EN_GB": "GB", "BRITISH": "GB",
}
# Separate random streams per decision, so changing gb_frac never reshuffles roles and vice versa.
_ROLE_STREAM, _REGION_STREAM = 0, 1


def check_fractions(public_frac: float, heldout_frac: float, test_frac: float, gb_frac: float) -> None:
    """Raise FedkeyError unless the fractions describe a usable split."""
    for name, v in (("public-frac", public_frac), ("heldout-frac", heldout_frac), ("gb-frac", gb_frac)):
        if not 0.0 <= v <= 1.0:
            raise FedkeyError(f"--{name} must be between 0 and 1, got {v}")
    if public_frac + heldout_frac >= 1.0:
        total = public_frac + heldout_frac
        raise FedkeyError(f"--public-frac + --heldout-frac must be below 1 (got {total}); no user would train")
    if not 0.0 <= test_frac < 1.0:
        raise FedkeyError(f"--test-frac must be in [0, 1), got {test_frac}")


def words_per_user(users: Sequence[str], texts: Sequence[str]) -> dict[str, int]:
    """Total whitespace-separated words each user wrote."""
    counts: dict[str, int] = {}
    for u, t in zip(users, texts):
        counts[u] = counts.get(u, 0) + len(t.split())
    return counts


def drop_small_users(word_counts: Mapping[str, int], min_words: int) -> tuple[list[str], list[str]]:
    """Split users into (kept, dropped), both sorted; dropped wrote fewer than `min_words` words."""
    kept = sorted(u for u, n in word_counts.items() if n >= min_words)
    dropped = sorted(u for u, n in word_counts.items() if n < min_words)
    return kept, dropped


def _permuted(users: Iterable[str], seed: int, stream: int) -> list[str]:
    ordered = sorted(users)
    order = np.random.default_rng([seed, stream]).permutation(len(ordered))
    return [ordered[i] for i in order]


def _count(n: int, frac: float) -> int:
    return int(n * frac + 0.5)


def assign_roles(users: Iterable[str], public_frac: float, heldout_frac: float, seed: int) -> dict[str, str]:
    """Map each user to public / heldout / train; depends only on the seed and the set of users."""
    shuffled = _permuted(users, seed, _ROLE_STREAM)
    n_public, n_heldout = _count(len(shuffled), public_frac), _count(len(shuffled), heldout_frac)
    roles = {}
    for i, u in enumerate(shuffled):
        roles[u] = "public" if i < n_public else "heldout" if i < n_public + n_heldout else "train"
    return roles


def normalize_region(value: str, user: str) -> str:
    """A corpus region value as US / GB, or "" when absent."""
    v = value.strip().upper()
    if not v:
        return ""
    if v not in _REGION_ALIASES:
        raise FedkeyError(f"user {user!r} has region {value!r}; the region column must be US or GB (or empty)")
    return _REGION_ALIASES[v]


def assign_regions(
    users: Iterable[str], gb_frac: float, seed: int, given: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Map each user to US / GB: the corpus's own region where given, else GB for a seeded `gb_frac` of the rest."""
    given = given or {}
    users = sorted(users)
    regions = {u: given[u] for u in users if given.get(u)}
    rest = _permuted((u for u in users if u not in regions), seed, _REGION_STREAM)
    n_gb = _count(len(rest), gb_frac)
    for i, u in enumerate(rest):
        regions[u] = "GB" if i < n_gb else "US"
    return regions


def temporal_split(timestamps: Sequence[str], test_frac: float) -> tuple[list[int], list[int]]:
    """Indices of (train, test): earliest messages train, latest test, by ISO timestamp (stable for ties/empties)."""
    n = len(timestamps)
    # Python's sort is stable: equal or all-empty timestamps keep the corpus order.
    order = sorted(range(n), key=lambda i: timestamps[i])
    n_test = _count(n, test_frac)
    if test_frac > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)  # every user with 2+ messages is tested and also trains
    elif n < 2:
        n_test = 0
    return order[: n - n_test], order[n - n_test :]
