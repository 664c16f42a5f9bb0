#!/usr/bin/env bash
# The main job: set up, check the standard library, and build the kernels of the example
# model (Llama-3-8B's config.json) into a pack; on a machine with a GPU, also run them
# against the reference and time them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-examples/llama-3-8b/config.json}
"$PY" -m layerforge check
ARCH=${ARCH:-$("$PY" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else 'sm_90')")}
"$PY" -m layerforge build --config "$CONFIG" --arch "$ARCH" -o "${OUT_DIR:-out/llama-3-8b}" "$@"
"$PY" scripts/run_example.py "$CONFIG"
