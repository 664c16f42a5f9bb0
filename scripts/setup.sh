#!/usr/bin/env bash
# Install layerforge and what its tests need into the current Python environment.
# torch: keep an installed build (a CUDA build on GPU machines); otherwise take the CPU
# build 2.13.0 rather than letting pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# the cuda extra: NVRTC and the CUDA headers as wheels (no CUDA toolkit needed; see README)
"$PY" -m pip install -q -e ".[cuda,test]"
