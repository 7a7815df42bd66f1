"""The Flower app fedkey submits with `flwr run`: a pyproject.toml that names fedkey's ServerApp and ClientApp.

The app carries no code of its own: the apps import `fl_core`, which must be installed on every machine
(Flower's runtime dependency installation is switched off, see docs/flower.md). The run configuration
keys declared here are the only ones `flwr run --run-config` may override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fedkey.io import atomic_write_bytes

APP_NAME = "fedkey-flower"

# key -> default; every value the ServerApp or ClientApp reads from `context.run_config`
RUN_CONFIG: dict[str, Any] = {
    "run-dir": "",          # prepared run directory on the SuperLink machine (tokenizer, data)
    "out-dir": "",          # where the ServerApp writes the model, history and result (SuperLink machine)
    "config": "{}",         # JSON: every fedkey settings section, as `fedkey train` resolved them
    "expect-nodes": 0,      # wait for this many SuperNodes before the first round (0: take who is there)
    "wait-nodes-s": 300.0,  # ...for at most this long
    "round-timeout-s": 600.0,  # a round ends after this long with the replies that arrived
    "straggler-factor": 0.0,   # >0: ...or at this many times the first reply's latency (slower nodes count as gone)
    "secagg": False,        # Flower's SecAgg+ (legacy strategy workflow) instead of plain aggregation
    "secagg-clip": 8.0,     # SecAgg+ clipping range of the quantized node updates
    "threads": 0,           # torch threads in each ClientApp (0: leave torch's default)
    "resume": False,        # continue from the checkpoint in out-dir (server state; see docs/flower.md)
    "placement": "held",    # held: users live on the node that lists them | any: simulation slots, any node trains anyone
}


def write_app(dst: Path) -> Path:
    """Write the app folder (pyproject.toml only) and return it."""
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "description": "fedkey on Flower",
                    "license": "MIT", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedkey",
            "components": {"serverapp": "fl_core.flower.server_app:app",
                           "clientapp": "fl_core.flower.client_app:app"},
            "config": RUN_CONFIG,
        }}},
    }
    dst = Path(dst)
    atomic_write_bytes(dst / "pyproject.toml", tomli_w.dumps(doc).encode())
    return dst
