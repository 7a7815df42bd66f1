"""Which users a SuperNode holds, from its `--node-config` (and the run config as fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedkey.errors import FedkeyError

TRAIN_SPLIT = "train"


def node_data_dir(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path:
    """The prepared run directory this node reads: node-config `data`, else the run's `run-dir`."""
    where = node_config.get("data") or run_config.get("run-dir")
    if not where:
        raise FedkeyError("SuperNode has no data: start it with --node-config 'data=\"/path/to/runs/NAME\" ...'")
    return Path(str(where))


def node_users(node_config: Mapping[str, Any], all_users: list[str]) -> list[str]:
    """The users of this node: node-config `users="a,b"`, or slice `partition-id` of `num-partitions`.

    `all_users` is the prepared run's sorted training users. Slices are strided (users[i::n]) so every
    node gets a similar mix whatever order users were named in.
    """
    if "users" in node_config:
        users = [u.strip() for u in str(node_config["users"]).split(",") if u.strip()]
        unknown = sorted(set(users) - set(all_users))
        if unknown:
            raise FedkeyError(f"--node-config users: {', '.join(unknown[:5])} not training users of this run")
        return users
    if "partition-id" in node_config and "num-partitions" in node_config:
        i, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if not 0 <= i < n:
            raise FedkeyError(f"--node-config partition-id={i} must be in [0, num-partitions={n})")
        return all_users[i::n]
    raise FedkeyError("--node-config must name users=\"a,b,...\" or partition-id=I num-partitions=N")
