"""prepare() end to end: shard invariants, idempotence, bad inputs, atomic writes, the Shards read API."""

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import corpus
from data.prepare import prepare, stats_rows
from data.shards import SPLITS, Shards
from fedkey.config import PrepareConfig
from fedkey.errors import FedkeyError

N_USERS, N_MSGS = 40, 10


def make_rows(n_users: int = N_USERS, n_msgs: int = N_MSGS, seed: int = 0) -> list[dict]:
    """Rows with unique texts and timestamps written out of order, plus one user too small to keep."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        for k in range(n_msgs):
            ts = f"2021-03-{1 + k:02d}T10:00:00Z"
            text = f"msg {k} of user{u:02d}: my favorite color is gray"
            rows.append({"user": f"user{u:02d}", "text": text, "timestamp": ts})
    rows.append({"user": "tiny", "text": "hi", "timestamp": "2021-03-01T10:00:00Z"})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(path: Path, **kw) -> PrepareConfig:
    return PrepareConfig(corpus=str(path), min_words=5, **kw)


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def small(tmp_path):
    """A small JSONL corpus prepared into tmp_path/out; returns (config, result, shards)."""
    cfg = cfg_for(write_jsonl(tmp_path / "chat.jsonl", make_rows()))
    result = prepare(cfg, tmp_path / "out", progress=False)
    return cfg, result, Shards.load(tmp_path / "out")


def test_shard_invariants(small):
    cfg, result, shards = small
    assert not result.skipped
    assert result.skips["few_words_users"] == 1 and result.skips["few_words_messages"] == 1
    roles = {}
    for split in SPLITS:
        ds = shards.dataset(split)
        assert ds.column_names == ["user", "text", "timestamp", "region"]
        keys = list(zip(ds["user"], ds["timestamp"]))
        assert keys == sorted(keys), f"{split} not sorted by user then time"
        for u in shards.users(split):
            roles.setdefault(u, set()).add(shards.role(u))
    assert all(len(r) == 1 for r in roles.values()), "a user has two roles"
    assert "tiny" not in roles
    by_role = {r: {u for u, rs in roles.items() if r in rs} for r in ("public", "train", "heldout")}
    assert len(by_role["public"]) == 4 and len(by_role["heldout"]) == 4 and len(by_role["train"]) == 32
    assert set(shards.users("public_train")) == by_role["public"]
    assert set(shards.users("heldout_test")) == by_role["heldout"]

    heldout_text = set(shards.dataset("heldout_train")["text"]) | set(shards.dataset("heldout_test")["text"])
    for split in ("public_train", "train", "test"):
        assert heldout_text.isdisjoint(shards.dataset(split)["text"])

    for u in shards.users("train"):
        texts = shards.user_texts("train", u)
        test = shards.user_texts("test", u)
        assert len(texts) == 8 and len(test) == 2
        # Temporal order: message numbers increase and every test message is later than every train one.
        nums = [int(t.split()[1]) for t in texts + test]
        assert nums == list(range(N_MSGS))
        british = shards.region(u) == "GB"
        assert all(("favourite colour is grey" in t) == british for t in texts + test)


def test_stats_table(small):
    _, result, shards = small
    rows = stats_rows(result)
    assert {(r["split"], r["region"]) for r in rows} == {(s, g) for s in SPLITS for g in ("US", "GB")}
    for split in SPLITS:
        ds = shards.dataset(split)
        assert sum(r["messages"] for r in rows if r["split"] == split) == len(ds)
        assert sum(r["words"] for r in rows if r["split"] == split) == sum(len(t.split()) for t in ds["text"])
    assert sum(r["users"] for r in rows if r["split"] == "train" and r["region"] == "GB") > 0


def test_same_seed_same_result_other_seed_other_roles(tmp_path, small):
    cfg, _, shards = small
    again = Shards.load(prepare(cfg, tmp_path / "again", progress=False).out_dir)
    assert (tmp_path / "again" / "users.json").read_bytes() == (tmp_path / "out" / "users.json").read_bytes()
    assert again.dataset("train")["text"] == shards.dataset("train")["text"]
    other = Shards.load(prepare(replace(cfg, seed=1), tmp_path / "other", progress=False).out_dir)
    assert {u: other.role(u) for u in other.all_users()} != {u: shards.role(u) for u in shards.all_users()}


def test_prepare_twice_is_a_no_op(tmp_path, small):
    cfg, first, _ = small
    before = tree_digest(tmp_path / "out")
    second = prepare(cfg, tmp_path / "out", progress=False)
    assert second.skipped and second.stats == first.stats and second.skips == first.skips
    assert tree_digest(tmp_path / "out") == before
    third = prepare(replace(cfg, test_frac=0.3), tmp_path / "out", progress=False)
    assert not third.skipped and Shards.load(tmp_path / "out").manifest["config"]["test_frac"] == 0.3


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (corpus file, substrings the one-line error must contain)."""
    good = [json.dumps(r) for r in make_rows(5, 4)]
    cases = {}
    p = tmp_path / "nocol.jsonl"
    p.write_text("".join(json.dumps({"author": "a", "text": "t"}) + "\n" for _ in range(3)), encoding="utf-8")
    cases["missing column"] = (p, [str(p), "user", "author"])
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(("\n".join(good[:2]) + "\n").encode() + '{"user": "a", "text": "caf\xe9"}\n'.encode("latin-1"))
    cases["non-utf8"] = (p, [f"{p}:3", "UTF-8"])
    p = tmp_path / "broken.jsonl"
    p.write_text("\n".join(good[:3] + ['{"user": "a", "text": "oops"', *good[3:]]) + "\n", encoding="utf-8")
    cases["malformed jsonl"] = (p, [f"{p}:4", "JSON"])
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    cases["empty file"] = (p, [str(p), "empty"])
    p = tmp_path / "blank.csv"
    p.write_text("\n\n", encoding="utf-8")
    cases["blank csv"] = (p, [str(p), "empty"])
    p = tmp_path / "nocol.csv"
    p.write_text("name,text\na,hello there\n", encoding="utf-8")
    cases["csv missing column"] = (p, [str(p), "user", "name"])
    cases["missing file"] = (tmp_path / "nope.jsonl", ["nope.jsonl", "not found"])
    cases["unknown format"] = (tmp_path / "chat.txt", ["chat.txt", ".jsonl"])
    return cases


@pytest.mark.parametrize(
    "case", ["missing column", "non-utf8", "malformed jsonl", "empty file", "blank csv", "csv missing column",
             "missing file", "unknown format"]
)
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    path, needles = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(FedkeyError) as err:
        prepare(cfg_for(path), out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temp folder left behind"


def test_failed_prepare_leaves_existing_shards_unchanged(tmp_path, small):
    cfg, _, _ = small
    before = tree_digest(tmp_path / "out")
    src = Path(cfg.corpus)
    src.write_text(src.read_text(encoding="utf-8") + '{"user": "x", "text": \n', encoding="utf-8")
    with pytest.raises(FedkeyError, match=rf"chat.jsonl:{N_USERS * N_MSGS + 2}:"):
        prepare(cfg, tmp_path / "out", progress=False)
    assert tree_digest(tmp_path / "out") == before


def test_counted_skips_empty_user_empty_text_huge_message(tmp_path):
    rows = make_rows(5, 4)
    rows += [{"user": "", "text": "no author here at all"}, {"user": "user00", "text": "   "},
             {"user": "user01", "text": "x" * 1_000_000}, {"user": None, "text": "null author"}]
    res = prepare(cfg_for(write_jsonl(tmp_path / "c.jsonl", rows)), tmp_path / "out", progress=False)
    assert res.skips["empty_user"] == 2 and res.skips["empty_text"] == 1 and res.skips["too_long"] == 1
    shards = Shards.load(tmp_path / "out")
    assert all(len(t) < 1000 for s in SPLITS for t in shards.dataset(s)["text"])


def test_csv_and_parquet_with_region_and_numeric_time(tmp_path):
    rows = [r for r in make_rows(10, 4) if r["user"] != "tiny"]
    for r in rows:
        r["region"] = "UK" if r["user"] == "user03" else ""
        r["timestamp"] = 1_600_000_000 + int(r["text"].split()[1]) * 60
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    res = prepare(cfg_for(tmp_path / "c.parquet", gb_frac=0.0), tmp_path / "out", progress=False)
    shards = Shards.load(res.out_dir)
    assert shards.region("user03") == "GB" and shards.region("user04") == "US"
    # A region given by the corpus describes real text, so it is not converted.
    texts = shards.user_texts(_train_split(shards, "user03"), "user03")
    assert all("favorite" in t for t in texts)
    assert [int(t.split()[1]) for t in texts] == [0, 1, 2]  # numeric times were sorted as times
    csv = tmp_path / "c.csv"
    csv.write_text("user,text\n" + "".join(f"{r['user']},{r['text']}\n" for r in rows), encoding="utf-8")
    assert not prepare(cfg_for(csv), tmp_path / "out_csv", progress=False).skipped


def _train_split(shards: Shards, user: str) -> str:
    return {"public": "public_train", "train": "train", "heldout": "heldout_train"}[shards.role(user)]


def test_hub_unreachable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(corpus.datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(FedkeyError, match=r"hub:someone/chats: could not reach .*local") as err:
        prepare(PrepareConfig(corpus="hub:someone/chats"), tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", make_rows(5, 4)))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FedkeyError, match="not a fedkey data folder"):
        prepare(cfg, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_shards_load_errors(tmp_path, small):
    with pytest.raises(FedkeyError, match="fedkey prepare"):
        Shards.load(tmp_path / "missing")
    (tmp_path / "out" / "users.json").write_text("{broken")
    with pytest.raises(FedkeyError, match="fedkey prepare"):
        Shards.load(tmp_path / "out")


def test_chitchat_end_to_end(tmp_path):
    result = prepare(PrepareConfig(), tmp_path / "cc", progress=False)
    shards = Shards.load(tmp_path / "cc")
    counts = shards.manifest["counts"]
    assert all(counts[s] > 0 for s in SPLITS)
    assert sum(counts.values()) > 240_000
    assert 1_000 < len(shards.all_users()) <= 1_315
    assert result.skips["few_words_users"] > 0
    roles = {s: set(shards.users(s)) for s in SPLITS}
    assert roles["public_train"].isdisjoint(roles["train"] | roles["heldout_train"])
    assert roles["train"].isdisjoint(roles["heldout_train"]) and roles["test"] <= roles["train"]
    for split in ("train", "test"):
        ds = shards.dataset(split).with_format("arrow")
        keys = list(zip(ds["user"].to_pylist(), ds["timestamp"].to_pylist()))
        assert keys == sorted(keys)
    gb = next(u for u in shards.users("train") if shards.region(u) == "GB")
    assert shards.user_texts("train", gb) and shards.user_texts("test", gb)
