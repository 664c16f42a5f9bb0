#!/usr/bin/env bash
# The main job: set up, then check the standard library and specialise it for the example
# model (Llama-3-8B's config.json). Later stages (kernel build, GPU runs) hang off this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
${PYTHON:-python3} -m layerforge check
${PYTHON:-python3} -m layerforge build --config examples/llama-3-8b/config.json -o "${OUT_DIR:-out/llama-3-8b}" "$@"
