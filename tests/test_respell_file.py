"""Spelling preferences stored as a way of spelling plus exceptions: exact round trips on the real pair list."""

from collections import Counter

import json

import pytest

from data.british import REGIONAL_PAIRS
from fedkey.errors import FedkeyError
from keyboard.respell_file import pack, unpack
from personalization.spelling import preferences


def own_map(counts: dict, locale: str | None) -> dict[str, str]:
    return {other: own for own, other in preferences(Counter(counts), REGIONAL_PAIRS, 2, locale)}


def test_preferences_pack_to_their_way_and_back_exactly():
    maps = {
        "gb-locale": own_map({"favourite": 3}, "GB"),
        "us-locale-typed-both": own_map({"color": 2, "colour": 1}, "US"),  # that pair stays out of the map
        "typed-one-no-locale": own_map({"colour": 1}, None),
        "nothing": {},
    }
    assert len(maps["gb-locale"]) == len(REGIONAL_PAIRS) and maps["typed-one-no-locale"] == {"color": "colour"}
    doc = json.loads(json.dumps(pack(maps, REGIONAL_PAIRS)))  # as written to and read from the bundle
    ways = {u: e["way"] for u, e in doc["users"].items()}
    assert ways == {"gb-locale": "GB", "us-locale-typed-both": "US", "typed-one-no-locale": None, "nothing": None}
    assert doc["users"]["us-locale-typed-both"]["drop"] == ["colour"]
    for user, m in maps.items():
        assert unpack(doc, user, "respell.json") == m, user
        assert len(json.dumps(doc["users"][user])) < 100
    assert unpack(doc, "someone-else", "respell.json") == {}
    # nobody following a way: no pair list shipped
    assert pack({"a": {"color": "colour"}}, REGIONAL_PAIRS)["pairs"] == {}


def test_bundles_of_the_earlier_format_still_load_and_bad_files_name_themselves():
    assert unpack({"u1": {"color": "colour"}}, "u1", "respell.json") == {"color": "colour"}
    assert unpack({"u1": {"color": "colour"}}, "u2", "respell.json") == {}
    for bad in ([], {"format": "fedkey-respell/9"}, {"format": "fedkey-respell/2", "users": {}},
                {"format": "fedkey-respell/2", "pairs": {}, "users": {"u1": {"way": "FR", "add": {}, "drop": []}}}):
        with pytest.raises(FedkeyError) as e:
            unpack(bad, "u1", "bundle/respell.json")
        assert str(e.value).startswith("bundle/respell.json: ") and "\n" not in str(e.value), bad
