"""Users' whole-word spelling preferences, stored as a way of spelling plus that user's exceptions.

A user whose locale (or own words) decides every American/British pair has a map of ~1,700 entries
{other variant: own}, the same for every such user but for the pairs they typed themselves: 54 kB of JSON
each, more than their adapter and phrase cache together. Stored as the nearest way ("GB": every pair British,
"US": every pair American, None: no pair) plus the entries that differ from it, a user takes a few bytes and
the pair list is stored once, in the bundle's respell.json or (for gate.json) as this fedkey's pair list.
"""

from __future__ import annotations

from fedkey.errors import FedkeyError

FORMAT = "fedkey-respell/2"


def way_maps(pairs: dict[str, str]) -> dict[str | None, dict[str, str]]:
    """{other variant: own} of each way of spelling, from the American -> British pair list."""
    return {None: {}, "GB": dict(pairs), "US": {gb: us for us, gb in pairs.items()}}


def pack_one(respell: dict[str, str], ways: dict[str | None, dict[str, str]]) -> dict:
    """One user's map as {"way", "add", "drop"}: the way nearest to it, the entries it adds or changes, the keys
    it lacks (unpack_one gives the same map back)."""
    # any way gives the map back exactly; only the way most of a few of its entries follow is worth judging
    probe = list(respell.items())[:32]
    way = max((w for w in ways if w is not None), key=lambda w: sum(ways[w].get(k) == v for k, v in probe),
              default=None)
    if way is not None:
        base = ways[way]
        add = dict(respell.items() - base.items())  # set operations on the views: a locale user has ~1,700
        drop = base.keys() - respell.keys()
        if len(add) + len(drop) < len(respell):
            return {"way": way, "add": dict(sorted(add.items())), "drop": sorted(drop)}
    return {"way": None, "add": dict(sorted(respell.items())), "drop": []}


def unpack_one(entry: object, ways: dict[str | None, dict[str, str]], where: str) -> dict[str, str]:
    """The {other variant: own} map of one packed entry (a plain map, as older files hold, is taken as it is)."""
    if isinstance(entry, dict) and set(entry) == {"way", "add", "drop"}:
        way, add, drop = entry["way"], entry["add"], entry["drop"]
        if way in ways and isinstance(add, dict) and isinstance(drop, list):
            gone = set(drop)
            out = {k: v for k, v in ways[way].items() if k not in gone}
            out.update({str(k): str(v) for k, v in add.items()})
            return out
    elif isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()):
        return {str(k): v for k, v in entry.items()}
    raise FedkeyError(f"{where}: expected a spelling preference {{\"way\", \"add\", \"drop\"}}; "
                      f"re-run `fedkey personalize` or `fedkey export`")


def pack(maps: dict[str, dict[str, str]], pairs: dict[str, str]) -> dict:
    """The bundle's respell.json object for these users' maps: the pair list once (if any user follows a way)
    and each user packed against it."""
    ways = way_maps(pairs)
    users = {u: pack_one(m, ways) for u, m in sorted(maps.items())}
    used = any(e["way"] is not None for e in users.values())
    return {"format": FORMAT, "pairs": dict(sorted(pairs.items())) if used else {}, "users": users}


def unpack(doc: object, user: str, where: str) -> dict[str, str]:
    """One user's {other variant: own} from a respell.json object ({} for a user it does not hold); the
    format before this one ({user: map}) is read too."""
    if not isinstance(doc, dict):
        raise FedkeyError(f"{where}: expected a JSON object; re-run `fedkey export`")
    if doc.get("format") != FORMAT:
        if "format" in doc:
            raise FedkeyError(f"{where}: format {doc['format']!r} is not {FORMAT!r}; re-run `fedkey export` "
                              f"with this fedkey version")
        entry = doc.get(user, {})  # a bundle written before the packed format
        return unpack_one(entry, way_maps({}), where)
    pairs, users = doc.get("pairs"), doc.get("users")
    if not isinstance(pairs, dict) or not isinstance(users, dict):
        raise FedkeyError(f"{where}: expected \"pairs\" and \"users\" objects; re-run `fedkey export`")
    if user not in users:
        return {}
    return unpack_one(users[user], way_maps(pairs), where)
