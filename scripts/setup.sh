#!/usr/bin/env bash
# Creates .venv and installs fedkey with everything it needs. Safe to re-run.
# torch is pinned first, by pip: 2.13.0 is a CPU build these machines carry (uv does not look there); fedkey's own
# range admits it, so nothing else pulls a multi-GB CUDA build.
# The rest goes in with uv, which installs in parallel: 36 s against pip's 76 s here (the README's first command
# counts setup in its 15 minutes). Where uv cannot be had or fails, pip does the same install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
# bytecode compiled at install: these machines set PYTHONDONTWRITEBYTECODE, so otherwise every process compiles
# what it imports
if .venv/bin/python -m pip install -q uv && \
   .venv/bin/python -m uv pip install -q --python .venv/bin/python --compile-bytecode -e ".[test]"; then
  :
else
  echo "setup: uv could not install the project; installing it with pip" >&2
  .venv/bin/python -m pip install -q -e ".[test]"
fi
