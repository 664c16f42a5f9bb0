# Sourced by the GPU scripts (gpu-check.sh, ab-switches.sh, profile-products.sh, profile-u4-tokens.sh) from the repository root, with PY set:
# wheels in .whl/ (lark, for a machine without network) installed into a private folder, the checkout importable,
# unbuffered output and a kernel cache folder of its own unless one is set.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf-site .whl/*.whl
    export PYTHONPATH=/tmp/lf-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LAYERFORGE_CACHE_DIR=${LAYERFORGE_CACHE_DIR:-/tmp/lf-cache}
