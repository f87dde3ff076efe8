#!/usr/bin/env bash
# The project's first-GPU check: one table of throughput, memory and CPU/CUDA agreement (bench/gpu_check.py).
#   bash bench/gpu_check.sh           # full sizes when CUDA is present, toy sizes on CPU
#   bash bench/gpu_check.sh --small   # toy sizes anywhere (what CI runs)
# Uses .venv when present (make venv), else the python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" bench/gpu_check.py "$@"
