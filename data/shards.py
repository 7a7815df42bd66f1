"""On-disk shards (a DatasetDict plus manifest.json and users.json) and the read API every later stage uses."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets

from data.corpus import COLUMNS, quiet_datasets
from fedkey.errors import FedkeyError

FORMAT_VERSION = 1
SPLITS = ("public_train", "train", "test", "heldout_train", "heldout_test")
TRAIN_SPLITS = {"public": "public_train", "train": "train", "heldout": "heldout_train"}
TEST_SPLITS = {"train": "test", "heldout": "heldout_test"}  # public users' test part is discarded
MANIFEST, USERS = "manifest.json", "users.json"
FEATURES = datasets.Features({c: datasets.Value("string") for c in COLUMNS})


def read_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a shard folder, or None when there is no readable one."""
    try:
        return json.loads((Path(data_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_shards(
    out_dir: str | Path, splits: dict[str, dict[str, list[str]]], manifest: dict[str, Any], users: dict[str, Any]
) -> None:
    """Write all splits and JSON files into a temp folder beside `out_dir`, then swap it into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and read_manifest(out_dir) is None)):
        raise FedkeyError(f"{out_dir}: exists and is not a fedkey data folder; choose another output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes the user's ordinary data folder
        dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(splits[s], features=FEATURES) for s in SPLITS})
        with quiet_datasets():
            dd.save_to_disk(str(tmp))
        (tmp / USERS).write_text(json.dumps(users, indent=1, sort_keys=True), encoding="utf-8")
        # The manifest goes last: its presence marks a complete folder.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out_dir: Path) -> None:
    # A folder cannot be os.replace'd over a non-empty one: move the old aside, rename, then delete the old.
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, old / "data")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "data", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


class Shards:
    """Read access to prepared shards: memory-mapped splits and per-user row ranges."""

    SPLITS: tuple[str, ...] = SPLITS

    def __init__(self, data_dir: Path, manifest: dict[str, Any], users: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.manifest = manifest
        self._users = users
        self._datasets: dict[str, datasets.Dataset] = {}
        self._split_users = {s: sorted(u for u, info in users.items() if s in info["rows"]) for s in SPLITS}

    @classmethod
    def load(cls, data_dir: str | Path) -> "Shards":
        """Open a shard folder written by `prepare`; FedkeyError if it is missing or damaged."""
        data_dir = Path(data_dir)
        hint = "run `fedkey prepare` first"
        if not (data_dir / MANIFEST).is_file():
            raise FedkeyError(f"{data_dir}: no prepared data here; {hint}")
        manifest = read_manifest(data_dir)
        try:
            users = json.loads((data_dir / USERS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            users = None
        if manifest is None or users is None or not (data_dir / "dataset_dict.json").is_file():
            raise FedkeyError(f"{data_dir}: prepared data is damaged or incomplete; {hint}")
        if manifest.get("format") != FORMAT_VERSION:
            found = manifest.get("format")
            raise FedkeyError(f"{data_dir}: prepared with another fedkey version (format {found}); {hint}")
        return cls(data_dir, manifest, users)

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise FedkeyError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")

    def dataset(self, split: str) -> datasets.Dataset:
        """The split as a memory-mapped Dataset with columns user, text, timestamp, region."""
        self._check_split(split)
        if split not in self._datasets:
            try:
                self._datasets[split] = datasets.load_from_disk(str(self.data_dir / split))
            except Exception as e:  # noqa: BLE001 - a damaged Arrow folder raises many types
                msg = f"{self.data_dir / split}: cannot read split ({e}); run `fedkey prepare` again"
                raise FedkeyError(msg) from None
        return self._datasets[split]

    def users(self, split: str) -> list[str]:
        """Users with at least one row in `split`, sorted."""
        self._check_split(split)
        return list(self._split_users[split])

    def user_texts(self, split: str, user: str) -> list[str]:
        """The user's messages in `split`, in time order (empty if the user has none there)."""
        rows = self._info(user)["rows"].get(split)
        if rows is None:
            self._check_split(split)
            return []
        start, end = rows
        # Slicing the Arrow column reads only this user's rows from the memory map.
        return self.dataset(split).data.column("text").slice(start, end - start).to_pylist()

    def n_messages(self, split: str, user: str) -> int:
        """How many messages the user has in `split` (0 if none), without reading them."""
        self._check_split(split)
        rows = self._info(user)["rows"].get(split)
        return 0 if rows is None else rows[1] - rows[0]

    def region(self, user: str) -> str:
        """The user's region: "US" or "GB"."""
        return self._info(user)["region"]

    def role(self, user: str) -> str:
        """The user's role: "public", "train" or "heldout"."""
        return self._info(user)["role"]

    def all_users(self) -> list[str]:
        """Every kept user, sorted."""
        return sorted(self._users)

    def _info(self, user: str) -> dict[str, Any]:
        try:
            return self._users[user]
        except KeyError:
            raise FedkeyError(f"unknown user {user!r} in {self.data_dir}") from None
