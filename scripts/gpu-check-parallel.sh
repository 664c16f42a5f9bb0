#!/usr/bin/env bash
# Tensor and pipeline parallelism on a machine with 2 (or more) CUDA GPUs, in one go:
#   bash scripts/gpu-check-parallel.sh [OUT_DIR]
# 1. the 2-GPU tests (tests/parallel/test_parallel_gpu.py: TP = 2 and PP = 2 against one GPU,
#    float32 tiny llama / qwen2, bf16 Llama-3-8B-shaped 4 layers, CUDA-graph decode under TP = 2),
#    and the CPU (gloo) tests of the same code;
# 2. benchmarks/bench_parallel.py under torchrun: a Llama-3-70B-shaped 4-layer model, decode
#    (batch 1 and 64, context 2048) and prefill (1 x 4096) at TP = 2 beside one GPU, the
#    all-reduce's share of the step and its bandwidth beside torch.distributed.all_reduce alone.
# NVLink multicast (NVLS) stays off. Logs and the benchmark JSON go to OUT_DIR (default
# out/gpu-check-parallel). Env: PYTHON, SKIP_TESTS, SKIP_BENCH, BENCH_ARGS (extra bench flags).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-out/gpu-check-parallel}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
export LAYERFORGE_CACHE_DIR=${LAYERFORGE_CACHE_DIR:-/tmp/lf-cache}
"$PY" -c "import torch; n = torch.cuda.device_count(); assert n >= 2, f'needs 2 CUDA GPUs, found {n}'; print(n, 'x', torch.cuda.get_device_name(), torch.__version__)" || exit 1
nvidia-smi topo -m 2>/dev/null | tee "$OUT_DIR/topo.txt"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== parallel tests (2 GPUs, then gloo)"
    "$PY" -m pytest -q -p no:cacheprovider tests/parallel 2>&1 | tee "$OUT_DIR/pytest-parallel.log" | tail -25
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    echo "== bench_parallel (torchrun, 2 ranks)"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.bench_parallel \
        --json "$OUT_DIR/bench-parallel.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/bench-parallel.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
