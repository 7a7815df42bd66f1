#!/usr/bin/env bash
# Creates .venv and installs fedkey with everything it needs. Safe to re-run.
# torch is pinned first: 2.13.0 is a CPU build these machines carry; fedkey's own range admits it,
# so nothing else pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
