#!/usr/bin/env bash
# Set up and run the test suite. GPU tests run where a CUDA GPU is present, and skip with
# a stated reason elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
${PYTHON:-python3} -m pytest -q "$@"
