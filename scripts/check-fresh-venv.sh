#!/usr/bin/env bash
# A machine with only pip packages compiles layerforge's kernels: no CUDA toolkit is needed.
#   bash scripts/check-fresh-venv.sh [VENV_DIR]
# Makes a fresh venv (no system site packages; VENV_DIR is kept, a default temp one is removed),
# installs torch 2.13.0 (the CPU build where the index has it, as scripts/setup.sh does) and
# this checkout's `.[cuda]` (a wheel build, not editable), hides any system CUDA (CUDA_HOME,
# CUDA_PATH, LAYERFORGE_CUDA_INCLUDE, LD_LIBRARY_PATH unset; outside the checkout), checks
# that layerforge, libnvrtc and the CUDA headers all come from inside the venv, then compiles:
# one row kernel through the CLIs (`layerforge show` | NVRTC), then every kernel of the example
# model (`layerforge build`), into an empty kernel cache.
# Env: ARCH (default sm_90), CONFIG (default examples/llama-3-8b/config.json), PYTHON.
# Exit status: 0 when everything compiled, 3 when pip could not install, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
ARCH=${ARCH:-sm_90}
CONFIG=$ROOT/${CONFIG:-examples/llama-3-8b/config.json}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV=${1:-$WORK/venv}  # the default one goes with WORK

unset CUDA_HOME CUDA_PATH LAYERFORGE_CUDA_INCLUDE LD_LIBRARY_PATH PYTHONPATH
export PYTHONNOUSERSITE=1 LAYERFORGE_CACHE_DIR=$WORK/cache

echo "== venv $VENV"
"$PY" -m venv "$VENV"
VPY=$VENV/bin/python
"$VPY" -m pip install -q "torch==2.13.0" || exit 3
"$VPY" -m pip install -q "$ROOT[cuda]" || exit 3

cd "$WORK"  # the checkout's folders must not be importable from here
echo "== where NVRTC and the headers come from"
"$VPY" - <<'EOF'
import os, sys
import layerforge
from layerforge.runtime.nvrtc import find_cuda_include_dirs, nvrtc_library_path, nvrtc_version

venv = os.path.realpath(sys.prefix)
inside = lambda path: os.path.realpath(path).startswith(venv + os.sep)
library, includes = nvrtc_library_path(), find_cuda_include_dirs()
print("layerforge", layerforge.__file__)
print("nvrtc", ".".join(map(str, nvrtc_version())), library)
print("headers", *includes)
assert inside(layerforge.__file__), "layerforge was not imported from the venv"
assert library and inside(library), f"libnvrtc is not the venv's: {library}"
assert includes and all(map(inside, includes)), f"headers outside the venv: {includes}"
EOF

echo "== one row kernel ($ARCH)"
"$VENV/bin/layerforge" show rms_norm --config "$CONFIG" --dtype bf16 --arch "$ARCH" > rms_norm.cu
"$VPY" -m layerforge.runtime.nvrtc rms_norm.cu --arch "$ARCH" -o rms_norm.cubin 2>&1 | tail -1

echo "== every kernel of $(basename "$(dirname "$CONFIG")") ($ARCH)"
"$VENV/bin/layerforge" build --config "$CONFIG" --arch "$ARCH" -q -o pack
cubins=$(find pack -name '*.cubin' -printf '%f\n' | sort)
[ -n "$cubins" ] || { echo "no cubin was written" >&2; exit 1; }
echo "cubins:" $cubins
echo "ok: $(echo "$cubins" | wc -l) cubins compiled in a fresh venv without a CUDA toolkit"
