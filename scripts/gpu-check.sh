#!/usr/bin/env bash
# Build, test and benchmark on a machine with a CUDA GPU, in one go.
#   bash scripts/gpu-check.sh [--quick] [OUT_DIR]
# Uses the python that has a CUDA build of torch. Wheels found in .whl/ (e.g. lark, for a
# machine without network) are installed into a private folder first. Logs and the benchmark
# JSON go to OUT_DIR (default out/gpu-check).
# Env knobs: PYTEST_ARGS (test paths, default "tests/gpu tests/runtime tests/trt tests/models"; add e.g. "-n 8" with pytest-xdist), PYTEST_K (pytest -k),
# SKIP_SANITIZER, SKIP_BENCH (all benchmarks), SKIP_ATTENTION (bench_attention only), SKIP_MODEL (bench_model only),
# SKIP_DECODER (bench_decoder only), AB_SWITCHES (also the off-by-default kernel switches), SKIP_SSM (bench_scan / bench_ssd / bench_mamba), SKIP_MOE (bench_moe / bench_lora), SKIP_ROWS (bench_rows only), BENCH_ONLY (bench_rows --only
# TEXT), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""
if [ "${1:-}" = "--quick" ]; then QUICK="--quick"; shift; fi
OUT_DIR=${1:-${OUT:-out/gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
. scripts/gpu-env.sh   # wheels from .whl/, PYTHONPATH, the kernel cache folder
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null | tee "$OUT_DIR/nvidia-smi.txt"
status=0
echo "== GPU tests"
"$PY" -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-tests/gpu tests/runtime tests/trt tests/models} 2>&1 | tee "$OUT_DIR/pytest-gpu.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if command -v compute-sanitizer >/dev/null 2>&1 && [ -z "${SKIP_SANITIZER:-}" ]; then
    echo "== compute-sanitizer memcheck (row kernel, paged decode and chunked prefill, KV append)"
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$PY" scripts/sanitize_cases.py 2>&1 \
        | tee "$OUT_DIR/sanitizer.log" | tail -4
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # the MLA decode's synced schedule (LAYERFORGE_MLA_SYNC_HANDOFF): no report from any of the three tools (the default
    # schedule's bar.arrive hand-offs are ordered, but racecheck reports them: benchmarks/probe_racecheck.py)
    for tool in racecheck synccheck; do
        echo "== compute-sanitizer $tool (the MLA decode's synced schedule: no report expected)"
        compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 3 "$PY" scripts/sanitize_cases.py mlasync \
            2>&1 | tee "$OUT_DIR/sanitizer_mlasync_$tool.log" | tail -3
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
fi
echo "== benchmarks"
if [ -z "${SKIP_BENCH:-}" ]; then
    if [ -z "${SKIP_ATTENTION:-}" ]; then
        "$PY" -m benchmarks.bench_attention --json "$OUT_DIR/bench_attention.json" 2>&1 | tee "$OUT_DIR/bench_attention.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # sparse masks (block sparsity) and the stdlib blocks beside FlexAttention
        "$PY" -m benchmarks.bench_masks --variants 2>&1 | tee "$OUT_DIR/bench_masks.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # each decode launch beside SDPA's kernels (where the end-to-end gap sits)
        "$PY" -m benchmarks.bench_decode_kernels 2>&1 | tee "$OUT_DIR/bench_decode_kernels.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # the split-KV choice against a sweep of forced part counts
        "$PY" -m benchmarks.bench_splits 2>&1 | tee "$OUT_DIR/bench_splits.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # MLA decode over the paged latent cache beside torch (eager and compiled)
        "$PY" -m benchmarks.bench_mla --json "$OUT_DIR/bench_mla.json" 2>&1 | tee "$OUT_DIR/bench_mla.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    fi
    [ -n "${SKIP_DECODER:-}" ] || "$PY" -m benchmarks.bench_decoder --no-compile --json "$OUT_DIR/bench_decoder.json" 2>&1 | tee "$OUT_DIR/bench_decoder.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$PY" -m benchmarks.bench_host 2>&1 | tee "$OUT_DIR/bench_host.txt"
    # whole model (Llama-3-8B shape, 8 layers) beside transformers eager and compiled
    [ -n "${SKIP_MODEL:-}" ] || "$PY" -m benchmarks.bench_model ${QUICK:+--no-compile} --json "$OUT_DIR/bench_model.json" 2>&1 | tee "$OUT_DIR/bench_model.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # small-token products (decode GEMV) beside cuBLAS, and the weight-only quantised ones beside
    # cuBLAS and torch's int4 kernel
    "$PY" -m benchmarks.bench_gemv --json "$OUT_DIR/bench_gemv.json" 2>&1 | tee "$OUT_DIR/bench_gemv.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$PY" -m benchmarks.bench_gemv --quant --tokens 1,8,16,32,128,1024 --json "$OUT_DIR/bench_gemv_quant.json" 2>&1 \
        | tee "$OUT_DIR/bench_gemv_quant.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # the quantised kernels' work splits beside their defaults
    "$PY" -m benchmarks.bench_gemv --quant --sweep --only 8B 2>&1 | tee "$OUT_DIR/bench_gemv_quant_sweep.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # attention at head dims 80-192 (padded tensor-core kernels) beside SDPA
    "$PY" -m benchmarks.bench_head_dims --mla 2>&1 | tee "$OUT_DIR/bench_head_dims.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    # prefill-sized products: the Hopper GEMM beside cuBLAS (sm_90 only)
    if "$PY" -c "import torch, sys; sys.exit(torch.cuda.get_device_capability() != (9, 0))"; then
        "$PY" -m benchmarks.bench_gemm --variant wgmma_persistent --bn auto,128,256 --json "$OUT_DIR/bench_gemm.json" 2>&1 \
            | tee "$OUT_DIR/bench_gemm.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # W8A8 FP8 products: the Hopper FP8 GEMM (token / k128 / 128 x 128 block scales) beside _scaled_mm and
        # cuBLAS's blockwise recipe; an FP8 model beside the bf16 one
        "$PY" -m benchmarks.bench_fp8 --json "$OUT_DIR/bench_fp8.json" 2>&1 | tee "$OUT_DIR/bench_fp8.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        [ -n "${SKIP_MODEL:-}" ] || "$PY" -m benchmarks.bench_model --no-hf --no-compile --weights f8e4m3 2>&1 \
            | tee "$OUT_DIR/bench_model_fp8.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # decode-range products (8-128 rows): the stream-K GEMM beside cuBLAS and the small-token kernel
        "$PY" -m benchmarks.bench_gemv --stream --json "$OUT_DIR/bench_gemv_stream.json" 2>&1 | tee "$OUT_DIR/bench_gemv_stream.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        # the model's prefill with its products on the generated GEMM (cuBLAS is the default route)
        "$PY" -m benchmarks.bench_model --no-hf --batches 1 --gemm wgmma 2>&1 | tee "$OUT_DIR/bench_model_gemm.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    fi
    # state-space layers: Mamba's scan kernels, Mamba2's SSD kernels and mixer, beside torch / transformers
    if [ -z "${SKIP_SSM:-}" ]; then
        "$PY" -m benchmarks.bench_scan --json "$OUT_DIR/bench_scan.json" 2>&1 | tee "$OUT_DIR/bench_scan.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        "$PY" -m benchmarks.bench_ssd --kernels --json "$OUT_DIR/bench_ssd.json" 2>&1 | tee "$OUT_DIR/bench_ssd.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        "$PY" -m benchmarks.bench_mamba --json "$OUT_DIR/bench_mamba.json" 2>&1 | tee "$OUT_DIR/bench_mamba.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    fi
    # mixture-of-experts blocks beside transformers and torch's grouped-GEMM pipeline; multi-LoRA beside the base
    # products, a PEFT-style torch peer, and whole models' decode and prefill with and without adapters (issue 13)
    if [ -z "${SKIP_MOE:-}" ]; then
        "$PY" -m benchmarks.bench_moe --json "$OUT_DIR/bench_moe.json" 2>&1 | tee "$OUT_DIR/bench_moe.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        "$PY" -m benchmarks.bench_lora --cases decode:64,prefill:4096,engine:64,engine-prefill:4096 --layers 8 \
            --context 2048 --steps 16 --json "$OUT_DIR/bench_lora.json" 2>&1 | tee "$OUT_DIR/bench_lora.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    fi
    # the kernel switches that are off until measured (README, Hopper prefill): the same benchmarks with them on,
    # beside the default lines printed above (AB_SWITCHES=1)
    if [ -n "${AB_SWITCHES:-}" ]; then
        LAYERFORGE_TC_FOLD=1 "$PY" -m benchmarks.bench_masks --variants 2>&1 | tee "$OUT_DIR/bench_masks_switches.txt"
        LAYERFORGE_FP8_KV_CVT=1 "$PY" -m benchmarks.bench_attention --only decode 2>&1 \
            | tee "$OUT_DIR/bench_attention_fp8_cvt.txt"
    fi
    # the fused per-token FP8 quantisers beside the two-kernel path
    "$PY" -m benchmarks.bench_quant_rows 2>&1 | tee "$OUT_DIR/bench_quant_rows.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    [ -n "${SKIP_ROWS:-}" ] || "$PY" -m benchmarks.bench_rows $QUICK ${BENCH_ONLY:+--only "$BENCH_ONLY"} --json "$OUT_DIR/bench_rows.json" 2>&1 | tee "$OUT_DIR/bench_rows.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
