#!/usr/bin/env bash
# The kernel switches that are off until measured (README, "Hopper prefill" and the product / row notes), on a
# CUDA GPU: their GPU tests, then each benchmark with the switch off and on, side by side (same run, same card).
#   bash scripts/ab-switches.sh [OUT_DIR] [PART ...]
# PARTs (each fits one 10-minute call of a borrowed GPU on its own; the default list is below):
#   defaults   the GPU tests of default paths changed without a GPU run (small-token products, Hopper GEMMs, the FP8
#              activation quantiser's PDL trigger on sm_90)
#   tests      the switches' GPU tests (and the block-scaled W8A8 layer)
#   attention  stdlib blocks beside Flex (WGMMA_FOLD + WGMMA_ROPE_STEP off, then on: the default since measured),
#              the document mask (TC_FOLD), decode (FP8_KV_CVT)
#   products   W8A8 at 1-16 rows (FP8_QUANT_X_FIRST, the default: off against on), the FP8 row quantisers at few
#              rows (ROW_CLUSTER=0 against the default, clusters from 12288 columns, and =1, clusters from 4096)
#   fold       the Hopper attention GPU tests with WGMMA_FOLD and WGMMA_ROPE_STEP both on (the default since 470
#              passed on an H200); every test's result is written to OUT_DIR/pytest_fold.log as it ends, so a run
#              cut short by a time limit still names them
#   rings      the wgmma prefill's K / V rings (LAYERFORGE_WGMMA_KV_RINGS, the default at two stages: off against on)
#              and K's deeper ring (LAYERFORGE_WGMMA_DEEP_K, off: measured no faster), bench_attention's prefill rows
#   consumers  D64's three consumer warpgroups (LAYERFORGE_WGMMA_THREE_CONSUMERS, the default since measured): the Hopper
#              attention GPU tests at D64 with it on, then bench_attention's D64 rows off against on
#   lpt        the wgmma prefill's sectioned launch order (LAYERFORGE_WGMMA_LPT, the default since measured): its GPU
#              tests, then bench_attention's prefill rows and the short prompts (probe_short_prefill) off against on
#   persist    the persistent wgmma prefill over a work queue (LAYERFORGE_WGMMA_PERSIST, off until this runs): its GPU
#              tests (cut at 300 s), then, if they passed, compute-sanitizer memcheck / racecheck / synccheck over its
#              cases (scripts/sanitize_cases.py persist), bench_attention's prefill rows and the short prompts
#              (probe_short_prefill) off against on, and the document mask on the persistent wgmma kernel beside
#              the mma.sync default (bench_masks --only document --wgmma)
#   pairs      the same for two row blocks a wgmma prefill CTA (LAYERFORGE_WGMMA_PAIRS), with q's rotation with its
#              reads batched (LAYERFORGE_WGMMA_ROPE_BATCH: its tests, then the GQA / D64 prefill rows off against on)
#   fp8kv      the e4m3 decode's widenings: the pipe rates (probe_fp8_widen), then bench_decode_tiles --kv fp8
#              (the default shape) with the integer widening (the default), V by the hardware's cvt
#              (LAYERFORGE_FP8_KV_VCVT), K by it (LAYERFORGE_FP8_KV_KCVT) and K as words (+ LAYERFORGE_FP8_KV_KWORDS),
#              the last also over every e4m3 shape; then the GPU tests of the fp8 cache (cut at 200 s)
#   toprows    decode's rows 8-15 skipped where no query row lies there (LAYERFORGE_DECODE_TOP_ROWS, off until
#              this runs): bench_decode_tiles (bf16, default shape) and --kv fp8 off against on, then the decode
#              GPU tests of test_paged_attention with it on (cut at 150 s)
#   decode     both of the above in one call, the e4m3 decode on 128-key tiles (LAYERFORGE_FP8_DECODE_WIDE=1, off
#              until this runs): the pipe rates, the e4m3 decode (default shape) with each widening and
#              with K as words + TOP_ROWS, the bf16 decode with TOP_ROWS off and on; then the GPU tests of the fp8
#              cache and the decode tests of test_paged_attention with KCVT + KWORDS + TOP_ROWS all on (cut at 150 s), and
#              the default e4m3 decode's (cut at 60 s)
#   decodetma  the decode over an e4m3 cache by TMA (LAYERFORGE_DECODE_TMA, off until this runs): its GPU test (every
#              widening, 64- and 128-key tiles, pages 16 / 64 / 256; cut at 200 s), then, if it passed,
#              compute-sanitizer memcheck / racecheck / synccheck over its cases (sanitize_cases.py decodetma) and the e4m3
#              decode (bench_decode_tiles --kv fp8, default shape) on 128-key tiles without and with TMA, for the
#              integer widening and for KCVT + KWORDS + TOP_ROWS, and TMA on the 64-key tiles
#   u4wide     u4 weights wider than 4096 x 4096 on the decode-range GEMM from 17 / 25 rows (LAYERFORGE_U4_STREAM_WIDE, the
#              default since measured on an H100): its GPU test (tests/gpu/test_gemm_stream.py -k from_17), then, if
#              it passed, bench_gemv --quant --tokens 16,20,25,32 off against on
#   xshare     u4's shared-x layout at 9-16 rows (LAYERFORGE_GEMV_XSHARE, off: measured slower on an H100): bench_gemv --xshare (each
#              split beside the default, 8B shapes at 16 / 8 / 1 tokens), its GPU test, then, if it passed,
#              compute-sanitizer memcheck / racecheck / synccheck over its cases (sanitize_cases.py xshare) and
#              bench_gemv --quant --tokens 9,16 with the switch off and on
#   many       decode grids past one wave of the default tile on smaller CTAs: the GPU tests of the e4m3 cache's (the
#              default) and the bf16 cache's (LAYERFORGE_DECODE_MANY_BF16, the default since measured on an H100), compute-sanitizer over
#              both (sanitize_cases.py many), then bench_decode_tiles --default-only (bf16) with the switch off and on
#   tune       `layerforge tune` (runtime/tune.py, not yet run on a GPU): its GPU test, then the Llama-3-8B products (bf16 and
#              u4 at 1 / 8 / 16 tokens; u4 on the decode-range GEMM at 32 / 64 / 128 rows) into OUT_DIR/products.json (copy its entries into codegen/tables/products.json
#              to make them the packaged table), each split beside the rules' plan in OUT_DIR/tune.txt
#   ssd        Mamba2's chunked scan with the scores once per group (LAYERFORGE_SSD_CB, the default since
#              measured): its GPU test, then bench_ssd's prefill cases off and on
#   seesaw     the MLA decode's seesaw schedule (LAYERFORGE_MLA_SEESAW, off: measured no faster on an H100): its GPU
#              tests (cut at 200 s), then, if they passed, compute-sanitizer over the MLA cases (the seesaw ones among
#              them) and bench_mla (its "wg-ss" rows beside the default's, same run)
#   mlasync    the MLA decode's hand-offs synced on both sides at one barrier instruction (LAYERFORGE_MLA_SYNC_HANDOFF,
#              off: 6 % slower at 64 x 4096 on an H100): its GPU tests, compute-sanitizer over the MLA cases (racecheck
#              and synccheck report none in the synced kernels), bench_mla (its "wg-sh" rows beside the default's);
#              `python -m benchmarks.bench_mla --handoff-ab 5` times the two in turns
#   tailsplit  the GEMM with its last round's tiles split along K (the wgmma_split variant, off until this runs) and
#              with its second consumer warpgroup skewed 2 slices behind the first (wgmma_skew, both: wgmma_split_skew):
#              their GPU tests (tests/gpu/test_gemm.py: the split tail's, every variant's graph capture, both switches
#              against float64 and at each tile width), compute-sanitizer memcheck over the split
#              tail's cases (sanitize_cases.py tailsplit), then bench_gemm's persistent GEMM beside the split tail
#              (8B, 128 / 1024 / 4096 rows), five interleaved rounds, medians (the skew measured no change: not timed)
#   mambaprod  Mamba2-2.7B's decode products at 64 / 128 rows on the Hopper GEMM with its tail split in 8 and 16 parts
#              (wgmma_split, wgmma_split16) beside the persistent GEMM and cuBLAS (bench_gemm, three interleaved rounds,
#              tile widths 128 and 256) and the decode-range GEMM (bench_gemv --stream); the split variants' GPU tests and memcheck first
#   gemmtune   `layerforge tune --gemm-rows`: its GPU test (a "gemm" entry's route), then the Hopper GEMM against cuBLAS
#              for Mamba2-2.7B's in / out projections at 64 rows and the Llama-3-8B products at 64 / 1024 / 4096 rows
#              (a table of this run's), then the Mamba2 decode step with that table off and on (bench_mamba --ab-switch)
#   gemmmodel  `layerforge tune --gemm-rows` over every row bucket (32-8192) of the Llama-3-8B products (a table of this
#              run's), then bench_model (8 layers: prefill 1 x 2048 / 8 x 512, decode batch 64) without and with it
#   mlaevict   the MLA decode's GPU tests, whole (staged_out, the CTA pair and, unpaired, the L2 evict_first hints
#              the defaults; results as they end: pytest_mla.log), the default beside the unpaired kernel with and
#              without the hints and the cut variants (probe_mla_bound), compute-sanitizer memcheck over the MLA
#              cases, then bench_mla (its "wg-up" and "wg-ne" rows beside the default's, same run)
#   clusters   the CTA pairs with their stages handed back by a CTA-scope arrive (no GPU-scope fence a stage any more):
#              the GPU tests of the cluster GEMM and of the MLA decode's pair schedule, compute-sanitizer over
#              sanitize_cases.py mlapair, then bench_gemm's persistent GEMM beside its clusters (8B, 4096 rows) and
#              probe_mla_bound's unpaired kernel beside the pair (the default since it ran; isolated and back to back)
#   streamfence the decode-range GEMM's split tiles counted in by thread 0's acquire-release fences
#              (LAYERFORGE_STREAM_ACQREL, off: no change on an H100; every thread's __threadfence is a sequentially
#              consistent GPU fence): its GPU tests with it on, then bench_gemv --quant (8B) at 32 / 64 / 128 rows off
#              and on, twice
#   prefetch   Mamba2's decode step with out_proj's weight prefetched into L2 under the norm (LAYERFORGE_MAMBA_PREFETCH,
#              off: 2-8 % slower on an H100): the prefetch's GPU tests and the Mamba GPU tests with it on,
#              compute-sanitizer memcheck over its cases (sanitize_cases.py prefetch), then bench_mamba's decode step
#              at batch 64 (and 1) with the switch off and on in turns
#   f8tune     the W8A8 small-token product over x quantised first (the layer's default path: tune's f8 / f8b now, the
#              gemv_x8 table family): tune's fp8 GPU tests, `layerforge tune --weights f8,f8b` over Llama-3-8B at
#              1 / 8 / 16 tokens and the 70B products at 8 / 16 into OUT_DIR/products.json, then bench_gemv --quant
#              at 8 / 16 tokens with the tables off (LAYERFORGE_TUNING=0) and with OUT_DIR's table (same run)
#   xfirst     the W8A8 layer's two paths under the tuned rules: bench_gemv --quant at 1 / 8 / 16 tokens (8B and 70B),
#              whose "f8 us" column is x quantised first (LAYERFORGE_FP8_QUANT_X_FIRST, the default) and "f8 reg us" x
#              quantised in the product's registers, same run, same weights
#   maskbits   document masks tested once a tile as bits (their key-side table reads once per key; the default, mma.sync
#              and wgmma): the block-mask GPU tests (bits and per score; the wgmma ones again with its key terms staged
#              in shared memory, LAYERFORGE_WGMMA_KEY_STAGE=1, the default since), compute-sanitizer memcheck over
#              sanitize_cases.py documents, probe_doc_bound (each prefill beside its all-tiles-full copy), then
#              bench_masks --only document --wgmma with the bits off and on
#   docwgmma   documents on the wgmma prefill by default (its key terms staged): the block-mask GPU tests, then
#              bench_masks --only document --wgmma at D64 / 128 / 256 (the mma.sync kernel's line beside the default),
#              then bench_masks over every mask at D128 beside Flex
#   persistlocal  the persistent wgmma prefill for short local masks (NATTEN; LAYERFORGE_WGMMA_PERSIST_LOCAL, off
#              until this runs): the block-sparse Hopper GPU tests with it on, then bench_masks --only natten / sinks
#              with it off and on, two rounds
#   keysplit   a mask's kv_pos // 2^j and % 2^j split over the wgmma kernel's key tile, |x| <= c as one unsigned
#              compare (LAYERFORGE_WGMMA_KEY_SPLIT, on): the split masks' and block-sparse masks' GPU tests (wgmma and
#              mma.sync), then bench_masks --only natten --ab-switch KEY_SPLIT,PERSIST_LOCAL at D128 (KEY_SPLIT alone
#              at D64 / D256) and --only sinks --ab-switch PERSIST_LOCAL (three rounds in turns each)
#   polyexp    a row's first key groups' 2^x as a polynomial on the FMA pipe (LAYERFORGE_WGMMA_POLY_EXP=N, 0 until this
#              runs): its GPU tests, then bench_attention's D64 and D128 causal rows with N = 0, 2, 4, 0
#   chains     a row's max and sum over LAYERFORGE_WGMMA_CHAINS partial values (1 until this runs): its GPU tests, then
#              bench_attention's D64, D128 and D256 causal rows with 1, 4, 8 chains, two rounds in turns
#   latepack   the overlap schedule with one P buffer where the two-buffer one spills (D64's three consumers;
#              LAYERFORGE_WGMMA_LATE_PACK, the default since measured): the Hopper prefill's D64 GPU tests with it
#              on, then
#              bench_attention's D64 row with it 0 / 1, two rounds in turns
#   stagedout  O out through Q's buffer in 16-byte stores (LAYERFORGE_WGMMA_STAGED_OUT, on since this ran on an H100):
#              its GPU tests and the misaligned-view guards, then bench_attention's prefill rows with it 0 / 1, two rounds
#   ropeprofile  ncu's source counters of GQA 32/8 D128 without RoPE and with it (1.01 against 1.08 ms on an H100), by
#              span (ncu_source_top --phases), the reports and CSVs kept in OUT_DIR
#   roperegs   q's rotated columns read into registers and rotated there (LAYERFORGE_WGMMA_ROPE_REGS, off until this
#              runs): its GPU tests (test_rope_batch, smem and regs; the RoPE cases of the Hopper file and the models
#              with it on), then bench_attention's llama GQA and headline rows with it 0 / 1, three rounds in turns
#   tilebranch the full-tile branch around both rows' softmax (LAYERFORGE_WGMMA_TILE_BRANCH, off until this runs: the
#              P V's wait kept after the softmax's exponentials): its GPU tests, the Hopper and block-mask files with it
#              on, then bench_attention's prefill main set with it 0 / 1, three rounds in turns
#   overlapped the choices measured while the overlap schedule did not overlap (before its mend), again:
#              bench_attention's prefill rows with LAYERFORGE_WGMMA_PERSIST 0 / 1, LAYERFORGE_WGMMA_CHAINS 1 / 2 and
#              LAYERFORGE_WGMMA_POLY_EXP 0 / 2, two rounds each in turns (ran on an H100: none gained, all stay off)
#   pending    the GPU tests of the runtime's guards that had not run (the gated fallback's zero-row / autograd / no-JIT
#              cases, the packaged "gemm" entries at their buckets' rows), then bench_attention's prefill rows at their
#              default tiles (GQA 32/8 with and without RoPE, cuDNN with q rotated first beside llama / mistral)
#   retime     tune's GPU tests, the small-token products timed warm
#              (bench_gemv --quant at 1 / 8 / 16 tokens), then `layerforge tune`
#              over Llama-3-8B (bf16, u4, f8, f8b; the decode-range GEMM at 32-128 rows) and the 70B products (u4, i8, bf16)
#              into OUT_DIR/products.json, a copy of the packaged table: this card's entries beside the other cards'
#              (per card: codegen/tuning.py), the file to copy into codegen/tables/ on another card than the H100
# (fp8kv, toprows, decode: WIDE, KCVT, KWORDS and TOP_ROWS are defaults since measured on an H200; their "=1" runs
#  are the default path now, "NONE" / "=0" the old one. decodetma: TMA measured no faster on top of them, off.)
# (default PARTs: fold ssd products tests attention; defaults ran clean on an H200 and stays for the next
#  default-path edit)
# SANITIZE=0 skips the compute-sanitizer passes (a call short of time; run them in a call of their own); SANITIZE_TOOLS
# names the tools to run (default: memcheck racecheck synccheck).
# Wheels in .whl/ (lark, for a machine without network) are installed into a private folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-out/ab-switches}
shift || true
PARTS=${*:-fold ssd products tests attention}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
. scripts/gpu-env.sh   # wheels from .whl/, PYTHONPATH, the kernel cache folder
FLEX_NOISE="deprecat\|create_block_mask\|return lambda"
status=0
# compute-sanitizer memcheck / racecheck / synccheck over scripts/sanitize_cases.py CASES (where it is installed), each cut
# at LIMIT seconds; a report or a cut sets status
sanitize() {   # CASES LIMIT WHAT
    command -v compute-sanitizer >/dev/null 2>&1 || return 0
    [ "${SANITIZE:-1}" = 0 ] && { echo "== sanitizer skipped (SANITIZE=0): $3"; return 0; }
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
        echo "== compute-sanitizer $tool: $3"
        timeout -s KILL "$2" compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 3 \
            "$PY" scripts/sanitize_cases.py "$1" 2>&1 | tee "$OUT_DIR/sanitizer_${1}_$tool.log" | tail -3
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
}
# the split-tail GEMM's GPU tests (tests/gpu/test_gemm.py -k K, cut at LIMIT seconds, to OUT_DIR/LOG), then memcheck
# over sanitize_cases.py tailsplit where they passed; fails (and sets status) where the tests did
split_tail_checks() {   # LIMIT K LOG
    local xdist
    xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL "$1" "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $xdist tests/gpu/test_gemm.py -k "$2" \
        2>&1 | tee "$OUT_DIR/$3" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || { status=1; return 1; }
    SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck} sanitize tailsplit 90 "the GEMM's split tail"
    return 0
}
# a softmax variant of the wgmma prefill: its GPU tests (test_softmax_variants -k KEY), then bench_attention's causal
# rows ROWS with the switch's SETTING (NAME=V,V...) in turn, to OUT_DIR/pytest_LOG.log and bench_attention_LOG.txt
softmax_ab() {   # WHAT KEY SETTING ROWS LOG
    echo "== $1 (${3%%=*}): GPU tests, bench_attention"
    local xdist
    xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $xdist tests/gpu/test_attention_hopper.py \
        -k "softmax_variants and $2" 2>&1 | tee "$OUT_DIR/pytest_$5.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 300 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --prefill-only "$4" \
        --ab-switch "$3" 2>&1 | grep -v "$FLEX_NOISE" | tee "$OUT_DIR/bench_attention_$5.txt" | tail -22
}
for part in $PARTS; do
case $part in
defaults)
    echo "== GPU tests of default paths changed without a GPU run (small-token product copies, GEMM tile count)"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")   # (a machine without pytest-xdist: one process)
    "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_gemv.py tests/gpu/test_gemv_quant.py \
        tests/gpu/test_gemv_fp8.py tests/gpu/test_moe_gpu.py tests/gpu/test_gemm.py tests/gpu/test_fp8_gemm.py \
        tests/gpu/test_grouped_gemm.py tests/gpu/test_quant_rows.py 2>&1 | tee "$OUT_DIR/pytest_defaults.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
tests)
    echo "== GPU tests of the switches (and the block-scaled W8A8 layer)"
    "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_attention_hopper.py tests/gpu/test_kv_fp8.py \
        tests/gpu/test_block_mask.py tests/gpu/test_fp8_linear_dsl.py tests/gpu/test_gemv_fp8.py \
        tests/gpu/test_row_cluster.py -k "rope_by_steps or scale_folded or hardware_conversion or tc_scale_folded or \
block_layer or small_token_kernel or x_quantised_first or cluster" 2>&1 | tee "$OUT_DIR/pytest.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
consumers)
    echo "== GPU tests at D64 with LAYERFORGE_WGMMA_THREE_CONSUMERS=1"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    LAYERFORGE_WGMMA_THREE_CONSUMERS=1 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_attention_hopper.py \
        tests/gpu/test_attention_wgmma_tma.py tests/gpu/test_paged_attention.py -k "64 and not 640" 2>&1 \
        | tee "$OUT_DIR/pytest_consumers.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --prefill-only D64 \
        --ab-switch LAYERFORGE_WGMMA_THREE_CONSUMERS 2>&1 | grep -v -i "$FLEX_NOISE" | tail -4
    ;;
lpt)
    echo "== GPU tests of the sectioned launch order"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_attention_wgmma_tma.py -k lpt 2>&1 \
        | tee "$OUT_DIR/pytest_lpt.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --ab-switch LAYERFORGE_WGMMA_LPT 2>&1 \
        | grep -v -i "$FLEX_NOISE" | tee "$OUT_DIR/prefill_lpt.txt" | tail -16
    "$PY" -m benchmarks.probe_short_prefill --ab-switch LAYERFORGE_WGMMA_LPT 2>&1 | tee "$OUT_DIR/short_lpt.txt"
    ;;
persist|pairs)
    # the kernels of several row blocks a CTA have never run on a GPU: a hang (a barrier's count off) is cut by
    # `timeout` so that the call goes on, and a part's benchmarks run only where its tests passed
    if [ "$part" = persist ]; then
        keys="persist"; switches="LAYERFORGE_WGMMA_PERSIST"
    else
        keys="pairs or rope_batch"; switches="LAYERFORGE_WGMMA_PAIRS"
    fi
    echo "== GPU tests: -k \"$keys\""
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    files="tests/gpu/test_attention_wgmma_tma.py"
    [ "$part" = persist ] && files="$files tests/gpu/test_block_mask.py"
    timeout -s KILL 300 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST $files \
        -k "$keys" 2>&1 | tee "$OUT_DIR/pytest_$part.log" | tail -5
    rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
        status=1
        echo "== $part: tests failed or timed out (exit $rc); its benchmarks are skipped"
        continue
    fi
    [ "$part" = persist ] && sanitize persist 150 "the persistent prefill's cases"
    for sw in $switches; do
        timeout -s KILL 240 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --ab-switch $sw 2>&1 \
            | grep -v -i "$FLEX_NOISE" | tee "$OUT_DIR/prefill_$sw.txt" | tail -16
        timeout -s KILL 120 "$PY" -m benchmarks.probe_short_prefill --ab-switch $sw 2>&1 | tee "$OUT_DIR/short_$sw.txt"
    done
    if [ "$part" = persist ]; then   # packed documents: the mma.sync default's line, then the wgmma kernel's
        echo "== document mask: the default (mma.sync), and the wgmma kernel over its lists, persistent"
        LAYERFORGE_WGMMA_PERSIST=1 timeout -s KILL 180 "$PY" -m benchmarks.bench_masks --only document --wgmma 2>&1 \
            | grep -v -i "$FLEX_NOISE" | tee "$OUT_DIR/masks_document_persist.txt" | tail -4
    fi
    if [ "$part" = pairs ]; then
        timeout -s KILL 120 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --prefill-only "H32/8,D64" \
            --ab-switch LAYERFORGE_WGMMA_ROPE_BATCH 2>&1 | grep -v -i "$FLEX_NOISE" | tee "$OUT_DIR/prefill_rope_batch.txt" | tail -6
    fi
    ;;
rings)
    for sw in LAYERFORGE_WGMMA_KV_RINGS LAYERFORGE_WGMMA_DEEP_K; do
        echo "== prefill rows with $sw=0, then =1"
        "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --ab-switch $sw 2>&1 \
            | grep -v -i "$FLEX_NOISE" | tee "$OUT_DIR/prefill_$sw.txt" | tail -16
    done
    ;;
attention)
    echo "== stdlib blocks beside Flex: WGMMA_FOLD + WGMMA_ROPE_STEP off, then on (the default)"
    LAYERFORGE_WGMMA_FOLD=0 LAYERFORGE_WGMMA_ROPE_STEP=0 "$PY" -m benchmarks.bench_masks --variants --only none 2>&1 | grep -v -i "$FLEX_NOISE" \
        | tee "$OUT_DIR/masks_default.txt" | tail -8
    LAYERFORGE_WGMMA_FOLD=1 LAYERFORGE_WGMMA_ROPE_STEP=1 "$PY" -m benchmarks.bench_masks --variants --only none 2>&1 \
        | grep -v -i "$FLEX_NOISE" | tee "$OUT_DIR/masks_switches.txt" | tail -8
    echo "== document mask: default, then TC_FOLD"
    "$PY" -m benchmarks.bench_masks --only document 2>&1 | grep -v -i "$FLEX_NOISE" | tail -1
    LAYERFORGE_TC_FOLD=1 "$PY" -m benchmarks.bench_masks --only document 2>&1 | grep -v -i "$FLEX_NOISE" | tail -1
    echo "== decode: default, then FP8_KV_CVT"
    "$PY" -m benchmarks.bench_attention --only decode 2>&1 | tee "$OUT_DIR/decode_default.txt" \
        | grep -i "fp8\|seqs" | tail -14
    LAYERFORGE_FP8_KV_CVT=1 "$PY" -m benchmarks.bench_attention --only decode 2>&1 \
        | tee "$OUT_DIR/decode_cvt.txt" | grep -i "fp8" | tail -8
    ;;
products)
    echo "== W8A8 per token at 1-16 rows: the FP8 GEMM beside the small-token kernel over per-token q"
    "$PY" -m benchmarks.bench_fp8 --scales token --tokens 1,4,16 --only 8B 2>&1 | tee "$OUT_DIR/fp8_small.txt" \
        | tail -13
    echo "== W8A8 small-token layers (x by 1 x 128): x quantised in registers (FP8_QUANT_X_FIRST=0), then x first"
    LAYERFORGE_FP8_QUANT_X_FIRST=0 "$PY" -m benchmarks.bench_gemv --quant --only 8B 2>&1 \
        | tee "$OUT_DIR/gemv_quant_default.txt" | tail -17
    LAYERFORGE_FP8_QUANT_X_FIRST=1 "$PY" -m benchmarks.bench_gemv --quant --only 8B 2>&1 \
        | tee "$OUT_DIR/gemv_quant_xfirst.txt" | tail -16
    echo "== per-token FP8 row quantisers at few rows: one CTA a row (ROW_CLUSTER=0), the default (a row over a" \
         "cluster from 12288 columns), then ROW_CLUSTER=1 (from 4096)"
    LAYERFORGE_ROW_CLUSTER=0 "$PY" -m benchmarks.bench_quant_rows --tokens 1,4,16,32 --no-compile 2>&1 \
        | tee "$OUT_DIR/quant_rows_one_cta.txt" | tail -13
    "$PY" -m benchmarks.bench_quant_rows --tokens 1,4,16,32 --no-compile 2>&1 \
        | tee "$OUT_DIR/quant_rows_default.txt" | tail -13
    LAYERFORGE_ROW_CLUSTER=1 "$PY" -m benchmarks.bench_quant_rows --tokens 1,4,16,32 --no-compile 2>&1 \
        | tee "$OUT_DIR/quant_rows_cluster.txt" | tail -12
    ;;
fold)
    echo "== Hopper attention GPU tests with WGMMA_FOLD=1 WGMMA_ROPE_STEP=1 (results as they end: pytest_fold.log)"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    LAYERFORGE_WGMMA_FOLD=1 LAYERFORGE_WGMMA_ROPE_STEP=1 "$PY" -m pytest -v -rfE --tb=short -m gpu \
        -p no:cacheprovider $XDIST tests/gpu/test_attention_hopper.py tests/gpu/test_attention_wgmma_dims.py \
        tests/gpu/test_attention_wgmma_tma.py tests/gpu/test_attention_wgmma_overlap.py tests/gpu/test_block_mask.py \
        > "$OUT_DIR/pytest_fold.log" 2>&1
    [ $? = 0 ] || status=1
    grep -E "FAILED|ERROR" "$OUT_DIR/pytest_fold.log" | sort | uniq | head -40
    tail -1 "$OUT_DIR/pytest_fold.log"
    ;;
fp8kv)
    echo "== e4m3 widening: pipe rates, then the decode with each widening (default shape), same card"
    "$PY" -m benchmarks.probe_fp8_widen 2>&1 | tee "$OUT_DIR/fp8_widen.txt"
    CASES=64x4096,1x4096,8x4096,1x32768,16x1024,64x512
    for sw in NONE LAYERFORGE_FP8_KV_VCVT LAYERFORGE_FP8_KV_KCVT "LAYERFORGE_FP8_KV_KCVT=1 LAYERFORGE_FP8_KV_KWORDS"; do
        env $sw=1 "$PY" -m benchmarks.bench_decode_tiles --kv fp8 --default-only --cases $CASES 2>&1 | tail -7 \
            | tee -a "$OUT_DIR/fp8_widenings.txt"
    done
    LAYERFORGE_FP8_KV_KCVT=1 LAYERFORGE_FP8_KV_KWORDS=1 "$PY" -m benchmarks.bench_decode_tiles --kv fp8 \
        --cases 64x4096,16x1024,64x512 2>&1 | tail -4 | tee "$OUT_DIR/fp8_kwords_shapes.txt"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_kv_fp8.py \
        tests/models/test_kv_fp8_model.py 2>&1 | tee "$OUT_DIR/pytest_fp8kv.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
toprows)
    echo "== decode's rows 8-15 skipped (LAYERFORGE_DECODE_TOP_ROWS) off against on, same card"
    for on in 0 1; do
        LAYERFORGE_DECODE_TOP_ROWS=$on "$PY" -m benchmarks.bench_decode_tiles --default-only 2>&1 | tail -7 \
            | tee -a "$OUT_DIR/toprows.txt"
        LAYERFORGE_DECODE_TOP_ROWS=$on "$PY" -m benchmarks.bench_decode_tiles --kv fp8 --default-only \
            --cases 64x4096,16x1024,64x512 2>&1 | tail -4 | tee -a "$OUT_DIR/toprows.txt"
    done
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    LAYERFORGE_DECODE_TOP_ROWS=1 timeout -s KILL 150 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_paged_attention.py -k "decode or gqa or sinks or identity or padding or t5 or f16" 2>&1 \
        | tee "$OUT_DIR/pytest_toprows.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
decode)
    echo "== the decode switches in one call: e4m3 widenings, K as words, TOP_ROWS (bf16 and e4m3), same card"
    "$PY" -m benchmarks.probe_fp8_widen 2>&1 | tee "$OUT_DIR/fp8_widen.txt"
    CASES=64x4096,1x32768,16x1024,64x512
    for sw in NONE LAYERFORGE_FP8_KV_VCVT LAYERFORGE_FP8_KV_KCVT "LAYERFORGE_FP8_KV_KCVT=1 LAYERFORGE_FP8_KV_KWORDS" \
              "LAYERFORGE_FP8_KV_KCVT=1 LAYERFORGE_FP8_KV_KWORDS=1 LAYERFORGE_DECODE_TOP_ROWS" LAYERFORGE_DECODE_TOP_ROWS; do
        echo "-- $sw"
        LAYERFORGE_FP8_DECODE_WIDE=1 env $sw=1 "$PY" -m benchmarks.bench_decode_tiles --kv fp8 --default-only --cases $CASES 2>&1 | tail -5 \
            | tee -a "$OUT_DIR/decode_fp8.txt"
    done
    for on in 0 1; do
        echo "-- LAYERFORGE_DECODE_TOP_ROWS=$on (bf16)"
        LAYERFORGE_DECODE_TOP_ROWS=$on "$PY" -m benchmarks.bench_decode_tiles --default-only --cases $CASES 2>&1 \
            | tail -5 | tee -a "$OUT_DIR/decode_bf16.txt"
    done
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    echo "-- GPU tests, KCVT + KWORDS + TOP_ROWS on"
    LAYERFORGE_FP8_DECODE_WIDE=1 LAYERFORGE_FP8_KV_KCVT=1 LAYERFORGE_FP8_KV_KWORDS=1 LAYERFORGE_DECODE_TOP_ROWS=1 \
        timeout -s KILL 150 "$PY" -m pytest \
        -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_kv_fp8.py tests/models/test_kv_fp8_model.py \
        tests/gpu/test_paged_attention.py -k "fp8 or decode or gqa or sinks or identity or padding or t5 or f16 or variants or split" \
        --junitxml="$OUT_DIR/pytest_decode_on.xml" 2>&1 | tee "$OUT_DIR/pytest_decode.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    echo "-- GPU tests of the e4m3 decode's 128-key tiles with the integer widening (LAYERFORGE_FP8_DECODE_WIDE=1)"
    LAYERFORGE_FP8_DECODE_WIDE=1 timeout -s KILL 60 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_kv_fp8.py \
        -k "decode_over or split_kv or subnormal or sinks" --junitxml="$OUT_DIR/pytest_decode_default.xml" 2>&1 \
        | tee "$OUT_DIR/pytest_decode_default.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
xshare)
    echo "== u4's shared-x layout (LAYERFORGE_GEMV_XSHARE): its splits beside the default, GPU test, sanitizers, off / on"
    timeout -s KILL 150 "$PY" -m benchmarks.bench_gemv --xshare --only 8B --tokens 16,8,1 2>&1 | tail -12 \
        | tee "$OUT_DIR/xshare_sweep.txt"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_gemv_xshare.py \
        --junitxml="$OUT_DIR/pytest_xshare.xml" 2>&1 | tee "$OUT_DIR/pytest_xshare.log" | tail -5
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        sanitize xshare 60 "u4's shared-x cases"
        for on in 0 1; do
            echo "-- LAYERFORGE_GEMV_XSHARE=$on"
            LAYERFORGE_GEMV_XSHARE=$on "$PY" -m benchmarks.bench_gemv --quant --tokens 9,16 2>&1 | tail -18 \
                | tee -a "$OUT_DIR/xshare.txt"
        done
    else
        status=1
    fi
    ;;
many)
    echo "== decode grids past one wave on smaller CTAs: bf16 (LAYERFORGE_DECODE_MANY_BF16, on) GPU tests, sanitizers, off / on"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
    timeout -s KILL 240 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_paged_attention.py \
        tests/gpu/test_kv_fp8.py -k many_ctas --junitxml="$OUT_DIR/pytest_many.xml" 2>&1 \
        | tee "$OUT_DIR/pytest_many.log" | tail -5
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        LAYERFORGE_DECODE_MANY_BF16=1 sanitize many 90 "the many-CTA decode cases (e4m3 and bf16)"
        for on in 0 1; do
            echo "-- LAYERFORGE_DECODE_MANY_BF16=$on (the module column)"
            LAYERFORGE_DECODE_MANY_BF16=$on timeout -s KILL 120 "$PY" -m benchmarks.bench_decode_tiles --default-only \
                --cases 64x512,64x4096,48x2048,40x1024,32x4096,16x1024 2>&1 | tail -8 | tee -a "$OUT_DIR/many.txt"
        done
    else
        status=1
    fi
    ;;
tune)
    echo "== layerforge tune: its GPU test, then the Llama-3-8B products (bf16, u4; 1 / 8 / 16 tokens)"
    timeout -s KILL 180 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_tune_gpu.py 2>&1 \
        | tee "$OUT_DIR/pytest_tune.log" | tail -5
    if [ "${PIPESTATUS[0]}" = 0 ]; then   # (entries are written as each problem is measured: a cut run keeps them)
        timeout -s KILL 360 "$PY" -m layerforge tune --config examples/llama-3-8b/config.json --weights bf16,u4 \
            --tokens 1,8,16 --stream-rows 32,64,128 --table "$OUT_DIR/products.json" 2>&1 | tee "$OUT_DIR/tune.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    else
        status=1
    fi
    ;;
decodetma)
    echo "== the e4m3 decode by TMA (LAYERFORGE_DECODE_TMA): GPU test, then the decode without / with it, same card"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_kv_fp8.py -k tma \
        --junitxml="$OUT_DIR/pytest_decode_tma.xml" 2>&1 | tee "$OUT_DIR/pytest_decode_tma.log" | tail -5
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        sanitize decodetma 90 "the TMA decode's cases"
        CASES=64x4096,1x32768,16x1024,64x512,8x4096
        KW="LAYERFORGE_FP8_KV_KCVT=1 LAYERFORGE_FP8_KV_KWORDS=1 LAYERFORGE_DECODE_TOP_ROWS=1"
        for run in "LAYERFORGE_FP8_DECODE_WIDE=1 LAYERFORGE_DECODE_TMA=0" "LAYERFORGE_FP8_DECODE_WIDE=1 LAYERFORGE_DECODE_TMA=1" \
                   "LAYERFORGE_FP8_DECODE_WIDE=1 $KW LAYERFORGE_DECODE_TMA=0" "LAYERFORGE_FP8_DECODE_WIDE=1 $KW LAYERFORGE_DECODE_TMA=1" \
                   "LAYERFORGE_FP8_DECODE_WIDE=0 LAYERFORGE_DECODE_TMA=0" "LAYERFORGE_FP8_DECODE_WIDE=0 LAYERFORGE_DECODE_TMA=1"; do
            echo "-- $run"
            env $run "$PY" -m benchmarks.bench_decode_tiles --kv fp8 --default-only --cases $CASES 2>&1 | tail -6 \
                | tee -a "$OUT_DIR/decode_tma.txt"
        done
    else
        status=1
    fi
    ;;
u4wide)
    echo "== u4 on the decode-range GEMM from 17 / 25 rows (LAYERFORGE_U4_STREAM_WIDE): GPU test, then off / on"
    "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_gemm_stream.py -k from_17 \
        --junitxml="$OUT_DIR/pytest_u4wide.xml" 2>&1 | tee "$OUT_DIR/pytest_u4wide.log" | tail -3
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        for on in 0 1; do
            echo "-- LAYERFORGE_U4_STREAM_WIDE=$on"
            LAYERFORGE_U4_STREAM_WIDE=$on "$PY" -m benchmarks.bench_gemv --quant --tokens 16,20,25,32 2>&1 | tail -36 \
                | tee -a "$OUT_DIR/u4wide.txt"
        done
    else
        status=1
    fi
    ;;
ssd)
    echo "== SSD chunk scan reading the scores' table (LAYERFORGE_SSD_CB): GPU test, then prefill off / on"
    "$PY" -m pytest -v -rfE -m gpu -p no:cacheprovider tests/gpu/test_ssd_gpu.py -k score_table \
        > "$OUT_DIR/pytest_ssd.log" 2>&1
    [ $? = 0 ] || status=1
    tail -3 "$OUT_DIR/pytest_ssd.log"
    LAYERFORGE_SSD_CB=0 "$PY" -m benchmarks.bench_ssd --cases prefill:1x8192,prefill:8x2048 --no-transformers 2>&1 \
        | tee "$OUT_DIR/ssd_default.txt" | tail -4
    LAYERFORGE_SSD_CB=1 "$PY" -m benchmarks.bench_ssd --cases prefill:1x8192,prefill:8x2048 --no-transformers 2>&1 \
        | tee "$OUT_DIR/ssd_cb.txt" | tail -3
    ;;
maskbits)
    echo "== document masks as bits: GPU tests, memcheck, bench_masks (bits off / on, twice)"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_block_mask.py 2>&1 \
        | tee "$OUT_DIR/pytest_maskbits.log" | tail -4
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    echo "-- the same with the wgmma kernel's key terms staged in shared memory (LAYERFORGE_WGMMA_KEY_STAGE=1)"
    LAYERFORGE_WGMMA_KEY_STAGE=1 timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_block_mask.py -k wgmma 2>&1 | tee "$OUT_DIR/pytest_keystage.log" | tail -4
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck} sanitize documents 90 "the document masks' prefills (bits)"
    LAYERFORGE_WGMMA_KEY_STAGE=1 SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck} sanitize documents 90 "the same, keys staged"
    timeout -s KILL 200 "$PY" -m benchmarks.probe_doc_bound 2>&1 | grep -v "$FLEX_NOISE" \
        | tee "$OUT_DIR/probe_doc_bound.txt" | tail -7
    for v in 0 1; do
        echo "-- LAYERFORGE_WGMMA_MASK_BITS=$v LAYERFORGE_TC_MASK_BITS=$v"
        LAYERFORGE_WGMMA_MASK_BITS=$v LAYERFORGE_TC_MASK_BITS=$v timeout -s KILL 120 "$PY" -m benchmarks.bench_masks \
            --only document --wgmma 2>&1 | grep -v "$FLEX_NOISE" | tee -a "$OUT_DIR/bench_masks_bits_$v.txt" | tail -3
    done
    ;;
docwgmma)
    echo "== documents on the wgmma prefill (key terms staged): GPU tests, bench_masks at D64 / 128 / 256, every mask"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
    timeout -s KILL 240 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_block_mask.py 2>&1 \
        | tee "$OUT_DIR/pytest_docwgmma.log" | tail -4
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    for d in 64 128 256; do
        timeout -s KILL 120 "$PY" -m benchmarks.bench_masks --only document --wgmma --head-dim $d 2>&1 \
            | grep -v "$FLEX_NOISE" | tee -a "$OUT_DIR/bench_masks_doc_d$d.txt" | tail -3
    done
    timeout -s KILL 240 "$PY" -m benchmarks.bench_masks 2>&1 | grep -v "$FLEX_NOISE" \
        | tee "$OUT_DIR/bench_masks_all.txt" | tail -10
    ;;
persistlocal)
    echo "== persist for short local masks (LAYERFORGE_WGMMA_PERSIST_LOCAL): GPU tests, bench_masks natten / sinks"
    LAYERFORGE_WGMMA_PERSIST=1 timeout -s KILL 120 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider \
        tests/gpu/test_attention_hopper.py -k block_sparse_masks 2>&1 | tee "$OUT_DIR/pytest_persistlocal.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    for r in 1 2; do for v in 0 1; do for m in natten sinks; do
        echo "-- LAYERFORGE_WGMMA_PERSIST_LOCAL=$v $m (round $r)"
        LAYERFORGE_WGMMA_PERSIST_LOCAL=$v timeout -s KILL 90 "$PY" -m benchmarks.bench_masks --only $m 2>&1 \
            | grep -v "$FLEX_NOISE" | tee -a "$OUT_DIR/bench_masks_persistlocal.txt" | tail -1
    done; done; done
    ;;
keysplit)
    echo "== the mask's key terms split over the key tile (LAYERFORGE_WGMMA_KEY_SPLIT): GPU tests, bench_masks A/B"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 300 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_attention_hopper.py \
        tests/gpu/test_paged_attention.py -k "split_over_the_key_tile or block_sparse_masks" 2>&1 \
        | tee "$OUT_DIR/pytest_keysplit.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 200 "$PY" -m benchmarks.bench_masks --only natten \
        --ab-switch LAYERFORGE_WGMMA_KEY_SPLIT,LAYERFORGE_WGMMA_PERSIST_LOCAL 2>&1 | grep -v "$FLEX_NOISE" \
        | tee "$OUT_DIR/bench_masks_keysplit.txt" | tail -6
    for d in 64 256; do
        timeout -s KILL 150 "$PY" -m benchmarks.bench_masks --only natten --head-dim $d \
            --ab-switch LAYERFORGE_WGMMA_KEY_SPLIT 2>&1 | grep -v "$FLEX_NOISE" \
            | tee -a "$OUT_DIR/bench_masks_keysplit.txt" | tail -3
    done
    timeout -s KILL 150 "$PY" -m benchmarks.bench_masks --only sinks --ab-switch LAYERFORGE_WGMMA_PERSIST_LOCAL 2>&1 \
        | grep -v "$FLEX_NOISE" | tee -a "$OUT_DIR/bench_masks_keysplit.txt" | tail -3
    ;;
polyexp)
    softmax_ab "2^x on the FMA pipe for a row's first key groups" POLY LAYERFORGE_WGMMA_POLY_EXP=0,2,4,0 \
        "D64,H32/32 S4096 D128" polyexp
    ;;
chains)
    softmax_ab "a row's max and sum over partial values joined as a tree" CHAINS LAYERFORGE_WGMMA_CHAINS=1,4,8,1,4,8 \
        "D64,H32/32 S4096 D128,D256" chains
    ;;
latepack)
    echo "== the overlap schedule with one P buffer (LAYERFORGE_WGMMA_LATE_PACK): GPU tests at D64, bench_attention"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    LAYERFORGE_WGMMA_LATE_PACK=1 timeout -s KILL 240 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_attention_hopper.py -k "64 or LATE_PACK" 2>&1 | tee "$OUT_DIR/pytest_latepack.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 200 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main --prefill-only "D64" \
        --ab-switch LAYERFORGE_WGMMA_LATE_PACK=0,1,0,1 2>&1 | grep -v "$FLEX_NOISE" \
        | tee "$OUT_DIR/bench_attention_latepack.txt" | tail -6
    ;;
stagedout)
    echo "== O through Q's buffer (LAYERFORGE_WGMMA_STAGED_OUT): GPU tests, then bench_attention's prefill rows"
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $("$PY" -c "import xdist" 2>/dev/null \
        && echo "-n 8") tests/gpu/test_attention_hopper.py tests/gpu/test_paged_attention.py \
        tests/gpu/test_gemv_quant.py \
        -k "staged_out or bad_inputs or misaligned" 2>&1 | tee "$OUT_DIR/pytest_stagedout.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 300 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main \
        --prefill-only "H32/32 S4096 D128,H32/8 S4096 D128,D64,D256" --ab-switch LAYERFORGE_WGMMA_STAGED_OUT=0,1,0,1 \
        2>&1 | grep -v "$FLEX_NOISE" | tee "$OUT_DIR/bench_attention_stagedout.txt" | grep wgmma
    ;;
roperegs)
    echo "== q rotated in registers (LAYERFORGE_WGMMA_ROPE_REGS): GPU tests, then bench_attention's prefill rows"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_attention_wgmma_tma.py -k rope_batch 2>&1 | tee "$OUT_DIR/pytest_roperegs.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    LAYERFORGE_WGMMA_ROPE_REGS=1 timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_attention_hopper.py tests/gpu/test_models_gpu.py tests/gpu/test_paged_attention.py \
        -k "rope or llama or mistral or qwen" 2>&1 | tee -a "$OUT_DIR/pytest_roperegs.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 300 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main \
        --prefill-only "H32/32 S4096 D128,llama_attn B4 H32/8" --ab-switch LAYERFORGE_WGMMA_ROPE_REGS=0,1,0,1,0,1 \
        2>&1 | grep -v "$FLEX_NOISE" | tee "$OUT_DIR/bench_attention_roperegs.txt" | grep "wgmma\|cuDNN"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
tilebranch)
    echo "== the full-tile branch around the softmax (LAYERFORGE_WGMMA_TILE_BRANCH): GPU tests, bench_attention"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")
    LAYERFORGE_WGMMA_TILE_BRANCH=1 timeout -s KILL 240 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_attention_hopper.py tests/gpu/test_block_mask.py 2>&1 | tee "$OUT_DIR/pytest_tilebranch.log" \
        | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 330 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main \
        --ab-switch LAYERFORGE_WGMMA_TILE_BRANCH=0,1,0,1,0,1 2>&1 | grep -v "$FLEX_NOISE" \
        | tee "$OUT_DIR/bench_attention_tilebranch.txt" | grep "wgmma\|cuDNN"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
overlapped)
    echo "== persist, chains, poly again on the mended overlap schedule: bench_attention's prefill rows"
    # one process: the peers timed once a shape, each switch's settings in turn
    timeout -s KILL 420 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main \
        --prefill-only "H32/32 S4096 D128,llama_attn B4 H32/8,D64,D256" --ab-switch LAYERFORGE_WGMMA_PERSIST=0,1,0,1 \
        --ab-switch LAYERFORGE_WGMMA_CHAINS=1,2,1,2 --ab-switch LAYERFORGE_WGMMA_POLY_EXP=0,2,0,2 2>&1 \
        | grep -v "$FLEX_NOISE" | tee "$OUT_DIR/bench_attention_overlapped.txt" | grep "wgmma\|cuDNN"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
ropeprofile)
    echo "== ncu source counters of the GQA 32/8 D128 prefill without RoPE (gpt2_attn) and with it (llama_attn),"
    echo "   summarised by span (before the first wgmma, the tile loop, after): where the RoPE case's extra time goes"
    NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
    for row in "gpt2_attn B4 H32/8" "llama_attn B4 H32/8"; do
        name=${row%%_*}
        timeout -s KILL 200 "$NCU" --clock-control none --section WarpStateStats --section SourceCounters \
            -k "regex:wgprefill.*sm90a$" --launch-skip 3 -c 1 -f -o "$OUT_DIR/ncu_$name" \
            "$PY" -m benchmarks.bench_attention \
            --only prefill --prefill-set main --prefill-only "$row" --no-peers > "$OUT_DIR/ncu_$name.log" 2>&1
        [ $? = 0 ] || { status=1; tail -5 "$OUT_DIR/ncu_$name.log"; continue; }
        "$NCU" -i "$OUT_DIR/ncu_$name.ncu-rep" --page source --csv --print-source sass > "$OUT_DIR/sass_$name.csv"
        "$NCU" -i "$OUT_DIR/ncu_$name.ncu-rep" --page details --csv > "$OUT_DIR/details_$name.csv"
        echo "-- $row"
        grep -E 'Duration|Warp Cycles Per Issued' "$OUT_DIR/details_$name.csv" | cut -d, -f12- | head -4
        "$PY" -m benchmarks.ncu_source_top "$OUT_DIR/sass_$name.csv" --phases --top 12 | tee "$OUT_DIR/top_$name.txt"
    done
    ;;
pending)
    echo "== the guards' GPU tests, then bench_attention's prefill rows (default tiles)"
    timeout -s KILL 150 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_gemv.py \
        tests/gpu/test_tune_gpu.py -k "gated or (packaged and gemm-None)" 2>&1 | tee "$OUT_DIR/pytest_pending.log" | tail -4
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 300 "$PY" -m benchmarks.bench_attention --only prefill --prefill-set main 2>&1 | grep -v "$FLEX_NOISE" \
        | tee "$OUT_DIR/bench_attention_main.txt" | tail -16
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
retime)
    echo "== the products timed warm (graph_time's 50 ms of untimed replays first): bench_gemv --quant, then layerforge tune"
    echo "   over Llama-3-8B and the 70B products into OUT_DIR/products.json, a copy of the packaged table: this card's"
    echo "   entries written beside the other cards' (codegen/tuning.py), so the file is the packaged table to ship"
    cp codegen/tables/products.json "$OUT_DIR/products.json"
    timeout -s KILL 180 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_tune_gpu.py 2>&1 \
        | tee "$OUT_DIR/pytest_tune.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 200 "$PY" -m benchmarks.bench_gemv --quant --tokens 1,8,16 2>&1 | grep -v Warning \
        | tee "$OUT_DIR/bench_gemv_quant.txt" | tail -28
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 300 "$PY" -m layerforge tune --config examples/llama-3-8b/config.json --weights bf16,u4,f8,f8b --tokens 1,8,16 \
        --stream-rows 32,64,128 --table "$OUT_DIR/products.json" 2>&1 | tee "$OUT_DIR/tune8.txt" | tail -45
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 150 "$PY" -m layerforge tune --products 10240:8192,8192:8192,57344:8192:silu,8192:28672 \
        --weights u4,i8,bf16 --tokens 1,8,16 --table "$OUT_DIR/products.json" 2>&1 | tee "$OUT_DIR/tune70.txt" | tail -30
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
xfirst)
    echo "== the W8A8 layer's call: x quantised first (f8 us) and in the product's registers (f8 reg us), same run"
    timeout -s KILL 200 "$PY" -m benchmarks.bench_gemv --quant --tokens 1,8,16 2>&1 | grep -v Warning \
        | tee "$OUT_DIR/bench_gemv_quant_xfirst.txt" | tail -26
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
f8tune)
    echo "== W8A8 over x quantised first: tune's fp8 tests, tune f8,f8b (8B, 70B), bench_gemv --quant tables off / on"
    timeout -s KILL 150 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_tune_gpu.py -k fp8 2>&1 \
        | tee "$OUT_DIR/pytest_tune_fp8.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 150 "$PY" -m layerforge tune --config examples/llama-3-8b/config.json --weights f8,f8b --tokens 1,8,16 \
        --table "$OUT_DIR/products.json" 2>&1 | tee "$OUT_DIR/tune8_f8.txt" | tail -31
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 100 "$PY" -m layerforge tune --products 10240:8192,8192:8192,57344:8192:silu,8192:28672 \
        --weights f8,f8b --tokens 8,16 --table "$OUT_DIR/products.json" 2>&1 | tee "$OUT_DIR/tune70_f8.txt" | tail -17
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    for t in off on; do
        echo "-- bench_gemv --quant, tuning tables $t"
        if [ $t = off ]; then env=LAYERFORGE_TUNING=0; else env=LAYERFORGE_TUNING_TABLE=$OUT_DIR/products.json; fi
        timeout -s KILL 150 env $env "$PY" -m benchmarks.bench_gemv --quant --tokens 8,16 2>&1 | grep -v Warning \
            | tee "$OUT_DIR/bench_gemv_quant_$t.txt" | tail -18
    done
    ;;
mlasync)
    echo "== MLA decode with bar.sync on both sides of the consumers' hand-offs (LAYERFORGE_MLA_SYNC_HANDOFF): GPU tests,"
    echo "   sanitizers (racecheck: its synced kernels, names ending wgsh_, should show no hazard), bench_mla (wg-sh rows)"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_mla_gpu.py -k "sync" \
        --junitxml="$OUT_DIR/pytest_mlasync.xml" 2>&1 | tee "$OUT_DIR/pytest_mlasync.log" | tail -5
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        sanitize mla 120 "the MLA decode cases (the synced ones among them)"
        echo "racecheck hazards in the synced kernels: $(grep -c 'wgsh_sm90a' "$OUT_DIR/sanitizer_mla_racecheck.log" 2>/dev/null)"
        timeout -s KILL 200 "$PY" -m benchmarks.bench_mla 2>&1 | tee "$OUT_DIR/bench_mla.txt" | tail -24
    else
        status=1
    fi
    ;;
clusters)
    echo "== CTA pairs, stages back by a CTA-scope arrive: GPU tests, sanitizers, the GEMM and the MLA decode timed"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_gemm.py \
        tests/gpu/test_grouped_gemm.py tests/gpu/test_mla_gpu.py -k "cluster or pair" 2>&1 \
        | tee "$OUT_DIR/pytest_clusters.log" | tail -3
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        sanitize mlapair 120 "the MLA decode's pair schedule (synced hand-offs)"
        timeout -s KILL 120 "$PY" -m benchmarks.bench_gemm --only 8B --tokens 4096 \
            --variant wgmma_persistent,wgmma_cluster 2>&1 | tee "$OUT_DIR/bench_gemm_clusters.txt" | tail -10
        timeout -s KILL 100 "$PY" -m benchmarks.probe_mla_bound --variants unpaired,pair,unpaired,pair --sustain 3 \
            2>&1 | tee "$OUT_DIR/probe_mla_pair.txt" | tail -9
    else
        status=1
    fi
    ;;
streamfence)
    echo "== the decode-range GEMM with acquire-release counts: GPU tests (it on), bench_gemv --quant off / on"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    LAYERFORGE_STREAM_ACQREL=1 timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_gemm_stream.py 2>&1 | tee "$OUT_DIR/pytest_streamfence.log" | tail -3
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        for v in 0 1 0 1; do
            echo "-- LAYERFORGE_STREAM_ACQREL=$v"
            LAYERFORGE_STREAM_ACQREL=$v timeout -s KILL 100 "$PY" -m benchmarks.bench_gemv --quant --only 8B \
                --tokens 32,64,128 \
                2>&1 | grep -v Warning | tee -a "$OUT_DIR/bench_streamfence_$v.txt" | tail -12
        done
    else
        status=1
    fi
    ;;
prefetch)
    echo "== the L2 prefetch: its GPU tests, the Mamba GPU tests with it on, memcheck, bench_mamba's decode off / on"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
    timeout -s KILL 100 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_prefetch_gpu.py 2>&1 \
        | tee "$OUT_DIR/pytest_prefetch.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    LAYERFORGE_MAMBA_PREFETCH=1 timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST \
        tests/gpu/test_mamba_gpu.py 2>&1 | tee "$OUT_DIR/pytest_mamba_prefetch.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    SANITIZE_TOOLS=memcheck sanitize prefetch 90 "the L2 prefetch and a Mamba2 step with it"
    timeout -s KILL 200 "$PY" -m benchmarks.bench_mamba --prefill "" --decode 64,1 --no-hf \
        --ab-switch LAYERFORGE_MAMBA_PREFETCH 2>&1 | tee "$OUT_DIR/bench_mamba_prefetch.txt" | tail -6
    ;;
tailsplit)
    echo "== the GEMM's split tail (wgmma_split): GPU tests, memcheck, bench_gemm beside the persistent GEMM"
    if split_tail_checks 150 "split_tail or graph_capture or (wgmma_split_skew and (float64 or tile_widths))" \
            pytest_tailsplit.log; then
        timeout -s KILL 200 "$PY" -m benchmarks.bench_gemm --only 8B --tokens 128,1024,4096 --rounds 5 \
            --variant wgmma_persistent,wgmma_split 2>&1 | tee "$OUT_DIR/bench_gemm_tailsplit.txt" | grep -E "median"
    fi
    ;;
mambaprod)
    echo "== Mamba2's decode products on the split-tail GEMM: wgmma_split16's GPU tests, then bench_gemm / bench_gemv"
    split_tail_checks 120 "wgmma_split and (float64 or graph_capture or tile_widths or epilogues)" pytest_mambaprod.log
    timeout -s KILL 150 "$PY" -m benchmarks.bench_gemm --only Mamba2 --tokens 64,128 --rounds 3 --bn 128,256 \
        --variant wgmma_persistent,wgmma_split,wgmma_split16 2>&1 | tee "$OUT_DIR/bench_gemm_mamba.txt" | grep -E "median|device"
    timeout -s KILL 60 "$PY" -m benchmarks.bench_gemv --stream --only Mamba2 --tokens 64,128 2>&1 \
        | tee "$OUT_DIR/bench_gemv_mamba.txt" | tail -8
    ;;
gemmtune)
    echo "== tune --gemm-rows: its GPU test, the Mamba2 / 8B products against cuBLAS, the Mamba2 step with the table"
    timeout -s KILL 120 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_tune_gpu.py -k gemm_entry \
        2>&1 | tee "$OUT_DIR/pytest_gemmtune.log" | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    timeout -s KILL 150 "$PY" -m layerforge tune --products 10576:2560,2560:5120 --tokens "" --gemm-rows 64 \
        --table "$OUT_DIR/gemm_table.json" 2>&1 | tee "$OUT_DIR/tune_gemm_mamba.txt" | grep -v "^table"
    LAYERFORGE_TUNING_TABLE="$OUT_DIR/gemm_table.json" timeout -s KILL 120 "$PY" -m benchmarks.bench_mamba --no-hf \
        --prefill "" --decode 64 --ab-switch LAYERFORGE_TUNING 2>&1 | tee "$OUT_DIR/bench_mamba_gemmtune.txt" | tail -4
    timeout -s KILL 200 "$PY" -m layerforge tune --config examples/llama-3-8b/config.json --tokens "" \
        --gemm-rows 64,1024,4096 --table "$OUT_DIR/gemm_table.json" 2>&1 | tee "$OUT_DIR/tune_gemm_8b.txt" | grep -v "^table"
    ;;
gemmmodel)
    echo "== tune --gemm-rows over every bucket (8B), then bench_model without / with the table"
    timeout -s KILL 120 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider tests/gpu/test_gemv.py \
        tests/gpu/test_tune_gpu.py -k "gated_calls or gemm_entry or route_entry" 2>&1 | tail -3
    timeout -s KILL 240 "$PY" -m layerforge tune --config examples/llama-3-8b/config.json --tokens "" \
        --gemm-rows 32,64,128,256,512,1024,2048,4096,8192 --table "$OUT_DIR/gemm_8b.json" 2>&1 \
        | tee "$OUT_DIR/tune_gemm_8b_all.txt" | grep -v "^table"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    for run in without with; do
        echo "-- bench_model, the table $run"
        if [ $run = with ]; then export LAYERFORGE_TUNING_TABLE="$OUT_DIR/gemm_8b.json"; fi
        timeout -s KILL 150 "$PY" -m benchmarks.bench_model --no-hf --batches 64 --steps 20 2>&1 \
            | tee "$OUT_DIR/bench_model_gemm_$run.txt" | tail -6
        unset LAYERFORGE_TUNING_TABLE
    done
    ;;
mlaevict)
    echo "== MLA decode GPU tests, whole (results as they end: pytest_mla.log)"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -v -rfE --tb=short -m gpu -p no:cacheprovider $XDIST tests/gpu/test_mla_gpu.py \
        > "$OUT_DIR/pytest_mla.log" 2>&1
    [ $? = 0 ] || status=1
    grep -E "FAILED|ERROR" "$OUT_DIR/pytest_mla.log" | sort | uniq | head -20
    tail -1 "$OUT_DIR/pytest_mla.log"
    echo "== probe_mla_bound: the default (the CTA pair) beside the unpaired kernel (hinted copies) and the unhinted"
    echo "   one, the default and the unpaired with the copies cut (noload)"
    timeout -s KILL 150 "$PY" -m benchmarks.probe_mla_bound \
        --variants default,unpaired,noevict,noload,unpaired+noload,unstaged,default,unpaired 2>&1 \
        | tee "$OUT_DIR/probe_mla.txt"
    SANITIZE_TOOLS=memcheck sanitize mla 120 "the MLA decode cases (hinted copies)"
    timeout -s KILL 200 "$PY" -m benchmarks.bench_mla 2>&1 | tee "$OUT_DIR/bench_mla.txt" | tail -26
    ;;
seesaw)
    echo "== MLA decode, the consumers taking turns (LAYERFORGE_MLA_SEESAW): GPU tests, sanitizers, bench_mla"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s KILL 200 "$PY" -m pytest -q -rfE -m gpu -p no:cacheprovider $XDIST tests/gpu/test_mla_gpu.py \
        --junitxml="$OUT_DIR/pytest_seesaw.xml" 2>&1 | tee "$OUT_DIR/pytest_seesaw.log" | tail -5
    if [ "${PIPESTATUS[0]}" = 0 ]; then
        sanitize mla 120 "the MLA decode cases (the seesaw schedule's among them)"
        timeout -s KILL 200 "$PY" -m benchmarks.bench_mla 2>&1 | tee "$OUT_DIR/bench_mla.txt" | tail -22
    else
        status=1
    fi
    ;;
*)
    echo "unknown part '$part' (see the list at the top)" >&2
    exit 2
    ;;
esac
done
exit $status
