"""Per-client state that stays on the device between rounds: FedPer local parameters, error-feedback residuals.

Only clients that have participated have an entry. Each entry keeps its versions stamped with
the round that wrote them: every version since the run's `floor` (the round of the checkpoint
before the last, which a resume may have to start from) and the newest one before it. A read
during round r sees the newest version from before r, so rounds re-run after a crash read
exactly what the first attempt read, and resumed runs stay bitwise identical however many
rounds a checkpoint is apart.

`memory` keeps entries in RAM (saved inside the run checkpoint); `disk` keeps one small file
per client and key (written atomically), so RAM does not grow with the population.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from fedkey.io import load_torch, save_torch


def _versions_before(versions: list[tuple[int, torch.Tensor]], round_: int) -> torch.Tensor | None:
    older = [(r, v) for r, v in versions if r < round_]
    return max(older, key=lambda rv: rv[0])[1] if older else None


def _with(versions: list[tuple[int, torch.Tensor]], round_: int, value: torch.Tensor,
          floor: int) -> list[tuple[int, torch.Tensor]]:
    kept = sorted([(r, v) for r, v in versions if r != round_] + [(round_, value)], key=lambda rv: rv[0])
    # a resume replays rounds from `floor` on: they need the newest version before it and nothing older
    before = [rv for rv in kept if rv[0] < floor]
    return before[-1:] + [rv for rv in kept if rv[0] >= floor]


class ClientStore:
    """get(client, key, round) / put(client, key, round, value); see the module docstring."""

    def __init__(self, kind: str = "memory", root: str | Path | None = None) -> None:
        if kind == "disk" and root is None:
            raise ValueError("a disk client store needs a folder")
        self.kind = kind
        self.root = Path(root) if root is not None else None
        self._mem: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
        self.floor = 0  # the earliest round a resume may start from (set by the round loop)

    def _path(self, client: str, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", client)[:64]
        digest = hashlib.sha1(client.encode()).hexdigest()[:10]
        return self.root / key / f"{safe}-{digest}.pt"

    def _versions(self, client: str, key: str) -> list[tuple[int, torch.Tensor]]:
        if self.kind == "memory":
            return self._mem.get((client, key), [])
        path = self._path(client, key)
        return load_torch(path)["versions"] if path.is_file() else []

    def get(self, client: str, key: str, round_: int) -> torch.Tensor | None:
        """The client's value as of the start of `round_` (None if it never stored one)."""
        return _versions_before(self._versions(client, key), round_)

    def put(self, client: str, key: str, round_: int, value: torch.Tensor) -> None:
        """Store the client's value written during `round_`."""
        versions = _with(self._versions(client, key), round_, value.detach().clone(), self.floor)
        if self.kind == "memory":
            self._mem[(client, key)] = versions
        else:
            save_torch(self._path(client, key), {"client": client, "key": key, "versions": versions})

    def clients(self, key: str) -> int:
        """How many clients hold a value under `key`."""
        if self.kind == "memory":
            return sum(1 for _, k in self._mem if k == key)
        return len(list((self.root / key).glob("*.pt"))) if (self.root / key).is_dir() else 0

    def state_dict(self) -> dict[str, Any]:
        """What the run checkpoint keeps (the entries themselves only for the memory store)."""
        return {"kind": self.kind, "mem": dict(self._mem) if self.kind == "memory" else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from state_dict()."""
        self._mem = dict(state.get("mem", {}))
