#!/usr/bin/env bash
# What bounds the u4 small-token product as tokens grow (issue 12): Nsight Compute's throughput, memory
# (L2, shared memory and its bank conflicts), warp-state and occupancy sections of the u4 (g128) product at
# 8 and 16 tokens, 8B q/k/v and 70B gate/up, into OUT_DIR, each kernel's key lines printed.
#   bash scripts/profile-u4-tokens.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-out/profile-u4-tokens}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
. scripts/gpu-env.sh   # wheels from .whl/, PYTHONPATH, the kernel cache folder
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
command -v ncu >/dev/null 2>&1 || { echo "no ncu: profiles skipped"; exit 0; }
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
for shape in "8B qkv" "70B gate/up"; do
    for t in 8 16; do
        name=$(echo "$shape" | tr -c 'A-Za-z0-9\n' '_')_$t
        echo "== ncu u4 $shape at $t tokens"
        # --once runs each shape's u4 then i8 product three times: the second u4 launch is profiled
        timeout -s KILL 150 ncu --clock-control none $S -k "regex:gemv.*u4" --launch-skip 1 --launch-count 1 \
            "$PY" -m benchmarks.bench_gemv --quant --once --only "$shape" --tokens "$t" > "$OUT_DIR/ncu_$name.txt" 2>&1
        grep -E "gemv|Duration|DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Dynamic Shared|Issued Warp|No Eligible|Bank|Shared Load|Shared Store|L1/TEX Hit|L2 Hit|Mem Pipes|Executed Ipc|Block Limit" "$OUT_DIR/ncu_$name.txt" | head -40
    done
done
