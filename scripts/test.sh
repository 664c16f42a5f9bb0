#!/usr/bin/env bash
# Set up and run the test suite. GPU tests run where a CUDA GPU is present, and skip with
# a stated reason elsewhere.
# Without a GPU the tests run on one pytest-xdist worker per core (most of their time is NVRTC
# compiling kernels, one core each); with a GPU in one process (the GPU tests share the device).
# TEST_WORKERS overrides the worker count (1: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
WORKERS=${TEST_WORKERS:-}
if [ -z "$WORKERS" ]; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        WORKERS=1
    else
        WORKERS=auto
    fi
fi
# --durations: the slowest tests at the end of the log (CI's time limit is 90 minutes)
if [ "$WORKERS" = 1 ]; then
    "$PY" -m pytest -q --durations=25 "$@"
else
    "$PY" -m pytest -q --durations=25 -n "$WORKERS" "$@"
fi
