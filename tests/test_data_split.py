"""Pure split decisions: roles, regions, temporal split, small-user drop."""

import pytest

from data.split import (
    assign_regions,
    assign_roles,
    check_fractions,
    drop_small_users,
    temporal_split,
    words_per_user,
)
from fedkey.errors import FedkeyError

USERS = [f"u{i:03d}" for i in range(200)]


def test_roles_fractions_and_determinism():
    roles = assign_roles(USERS, 0.1, 0.1, seed=0)
    assert set(roles) == set(USERS)
    counts = {r: sum(v == r for v in roles.values()) for r in ("public", "heldout", "train")}
    assert counts == {"public": 20, "heldout": 20, "train": 160}
    assert assign_roles(reversed(USERS), 0.1, 0.1, seed=0) == roles  # input order does not matter
    assert assign_roles(USERS, 0.1, 0.1, seed=1) != roles


def test_regions_seeded_and_given_kept():
    regions = assign_regions(USERS, 0.2, seed=0)
    assert sum(r == "GB" for r in regions.values()) == 40
    assert assign_regions(USERS, 0.2, seed=0) == regions
    assert assign_regions(USERS, 0.2, seed=1) != regions
    given = {u: "GB" for u in USERS[:10]}
    mixed = assign_regions(USERS, 0.0, seed=0, given=given)
    assert [u for u, r in mixed.items() if r == "GB"] == USERS[:10]


def test_temporal_split_orders_by_time():
    ts = ["2020-01-05", "2020-01-01", "2020-01-03", "2020-01-02", "2020-01-04"]
    train, test = temporal_split(ts, 0.2)
    assert [ts[i] for i in train] == ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04"]
    assert [ts[i] for i in test] == ["2020-01-05"]


def test_temporal_split_stable_without_timestamps_and_small_users():
    train, test = temporal_split([""] * 10, 0.2)
    assert train == list(range(8)) and test == [8, 9]
    assert temporal_split(["", ""], 0.2) == ([0], [1])  # 2 messages: at least one test message
    assert temporal_split([""], 0.2) == ([0], [])
    assert temporal_split(["", "", ""], 0.9) == ([0], [1, 2])  # always keeps one train message


def test_min_words_drop():
    counts = words_per_user(["a", "b", "a", "c"], ["one two", "x", "three four five", ""])
    assert counts == {"a": 5, "b": 1, "c": 0}
    assert drop_small_users(counts, 2) == (["a"], ["b", "c"])


@pytest.mark.parametrize("args", [(0.6, 0.5, 0.2, 0.2), (0.1, 0.1, 1.0, 0.2), (0.1, 0.1, 0.2, 1.5)])
def test_bad_fractions(args):
    with pytest.raises(FedkeyError):
        check_fractions(*args)
