#!/usr/bin/env bash
# The products at decode-batch rows (issues 12 and 14) on a CUDA GPU: cuBLAS's ways (probe_products_64), the
# decode-range GEMM on cold weights (bench_gemv --stream, --quant at 64 / 128 rows), then Nsight Compute's
# throughput / memory / warp-state sections of the u4 8B o product and of Mamba2's in_proj (ours and cuBLAS's)
# at 64 rows into OUT_DIR.
#   bash scripts/profile-products.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-out/profile-products}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
. scripts/gpu-env.sh   # wheels from .whl/, PYTHONPATH, the kernel cache folder
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout -s KILL 90 "$PY" -m benchmarks.probe_products_64 --rows 32,64,128
timeout -s KILL 150 "$PY" -m benchmarks.bench_gemv --stream --tokens 64 --only Mamba2
timeout -s KILL 150 "$PY" -m benchmarks.bench_gemv --quant --tokens 64,128 --only 8B
command -v ncu >/dev/null 2>&1 || { echo "no ncu: profiles skipped"; exit 0; }
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
prof() {   # NAME KERNEL_REGEX ARGS...
    local name=$1 regex=$2
    shift 2
    echo "== ncu $name"
    timeout -s KILL 120 ncu --clock-control none $S -k "regex:$regex" --launch-skip 2 --launch-count 1 \
        "$PY" -m benchmarks.bench_gemv "$@" > "$OUT_DIR/ncu_$name.txt" 2>&1
    grep -E "Duration|DRAM Throughput|L2 Cache Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issued Warp|No Eligible|Stall" "$OUT_DIR/ncu_$name.txt" | head -30
}
prof u4_o64 gemm_stream --quant --once --only "8B o" --tokens 64
prof in64 gemm_stream --stream --once --only "Mamba2 in" --tokens 64
prof in64_cublas nvjet --stream --once --only "Mamba2 in" --tokens 64
