"""W8A8 FP8 products at prefill sizes: the Hopper FP8 GEMM (codegen/gemm.py fp8, runtime/quant.fp8_gemm)
in its three scalings (token: x per token, W per row, the tensor cores' own sums; k128: x per token and
128 k, sums promoted to f32 each 128 k; blocks: and W per 128 x 128 block, DeepSeek-V3's) beside
torch._scaled_mm (cuBLAS) on the same e4m3 operands: per-tensor scales (its fastest), with and without
use_fast_accum, and cuBLAS's blockwise-scaled recipe (the peer of k128 / blocks); and the layer (x in
bf16 quantised by our kernel, then the product) beside bf16 cuBLAS, at Llama-3-8B / 70B shapes.
CUDA-graph replays, same run. Gated rows (gate/up) run fused (act(gate) * up in our epilogue) against
the peers followed by the generated SwiGLU row kernel.

    python -m benchmarks.bench_fp8 [--only NAME] [--tokens 1024,4096,8192] [--scales token,k128,blocks]
                                   [--json out.json]

The quantisation kernel's row is its bytes (x read, q and scales written) against the copy ceiling
measured in the same run. At up to 16 tokens the token rows add the small-token e4m3 kernel over the same
per-token q (runtime/quant.fp8_gemv, codegen/gemv.py x_e4m3): its time, its W bytes against the copy
ceiling, and its layer (quantisation + that kernel: fp8_linear_per_token's route with
LAYERFORGE_FP8_QUANT_X_FIRST=1).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from layerforge.codegen.gemm import pick_bn
from layerforge.runtime.quant import (FP8_KERNEL_MAX_ROWS, _scaled_mm_blockwise, dequantize, dequantize_fp8_rows,
                                     fp8_gemm, fp8_gemv, pack_fp8, quantize_fp8, quantize_fp8_rows_cuda)

from .bench_gemm import SHAPES
from .bench_gemv import graph_time, swiglu_module
from .bench_rows import copy_ceiling


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="substring of the shape names")
    ap.add_argument("--tokens", default="128,1024,4096,8192")
    ap.add_argument("--scales", default="token,k128,blocks",
                    help="our kernels: token (x per token, W per row), k128 (x per token and 128 k), blocks (and W "
                         "per 128 x 128 block)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    modes = a.scales.split(",")
    if not set(modes) <= {"token", "k128", "blocks"}:
        ap.error(f"--scales takes token, k128, blocks, got {a.scales!r}")
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}; copy ceiling {ceiling / 1e12:.2f} TB/s")
    print("peers on the same e4m3 operands: sm = torch._scaled_mm (cuBLAS) with per-tensor scales (its fastest), its\n"
          "default accumulation (promoted to f32) and use_fast_accum (the tensor cores' own sums, as ours in token\n"
          "mode); blockwise = cuBLAS's 1 x 128 (x) by 128 x 128 (W; W per row given as 1 x 128 blocks) recipe, the\n"
          "peer of k128 / blocks. layer: x in bf16 quantised by our kernel, then the product. err: max |y - ref| /\n"
          "max |ref| against the f32 product of the dequantised operands; err peer: sm rowwise fast (token), blockwise;\n"
          "small: (token, <= 16 tokens) the small-token e4m3 kernel on the same q, its W bytes' share of copy, its layer")
    print(f"{'shape':12s} {'M':>5s} {'scales':>6s} {'bn':>4s} {'ours us':>8s} {'TFLOP/s':>7s} {'sm':>8s} {'sm fast':>8s} "
          f"{'blockwise':>9s} {'ours/sm':>7s} {'/fast':>6s} {'/blockw':>7s} | {'quant us':>8s} {'of copy':>7s} "
          f"{'layer us':>8s} {'bf16 cuBLAS':>11s} {'err':>7s} {'err peer':>8s} | {'small us':>8s} {'of copy':>7s} "
          f"{'layer':>7s} {'err':>7s}")
    rows = []
    one = torch.ones((), device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, n, k, gated in SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        qws = {"token": pack_fp8(*quantize_fp8(w), None, torch.bfloat16)}
        qws["k128"] = qws["token"]
        qws["blocks"] = pack_fp8(*quantize_fp8(w, 128), 128, torch.bfloat16)
        act = swiglu_module(n // 2) if gated else None
        n_out = n // 2 if gated else n
        for m in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            flop = 2 * m * n * k
            calls = max(2, min(20, int(4e11 // flop)))
            qt, st = quantize_fp8_rows_cuda(x, group=0)
            qb, sb = quantize_fp8_rows_cuda(x)
            wq = qws["token"].qweight

            def sm(fast=False):
                y = torch._scaled_mm(qt, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                     use_fast_accum=fast)
                return act(y) if gated else y

            def blockwise(qw):
                y = _scaled_mm_blockwise(qb, sb, qw, torch.bfloat16)
                return y if y is None or not gated else act(y)
            t_sm = graph_time(lambda: sm(), calls, 5)
            t_fast = graph_time(lambda: sm(True), calls, 5)
            t_bf16 = graph_time(lambda: act(F.linear(x, w)) if gated else F.linear(x, w), calls, 5)
            for mode in modes:
                qw = qws[mode]
                q, s = (qt, st) if mode == "token" else (qb, sb)
                group = k if mode == "token" else 128
                ref = dequantize_fp8_rows(q, s, group).float() @ dequantize(qw).float().T
                if gated:
                    gt, up = ref.chunk(2, -1)
                    ref = F.silu(gt) * up

                def rel(y):
                    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                ours = graph_time(lambda: fp8_gemm(q, s, qw, gated=gated), calls, 5)
                t_quant = graph_time(lambda: quantize_fp8_rows_cuda(x, group=0 if mode == "token" else 128), calls, 5)
                layer = graph_time(lambda: fp8_gemm(*quantize_fp8_rows_cuda(x, group=0 if mode == "token" else 128),
                                                    qw, gated=gated), calls, 5)
                peer = blockwise(qw) if mode != "token" else torch._scaled_mm(
                    qt, wq.t(), scale_a=st, scale_b=qw.wscale[None, :], out_dtype=torch.bfloat16, use_fast_accum=True)
                if gated and mode == "token":
                    peer = act(peer)
                t_bw = graph_time(lambda: blockwise(qw), calls, 5) if peer is not None and mode != "token" else float("nan")
                err, err_peer = rel(fp8_gemm(q, s, qw, gated=gated)), (rel(peer) if peer is not None else float("nan"))
                qbytes = m * k * 2 + m * k + 4 * m * (1 if mode == "token" else -(-k // 128))
                t_small = l_small = err_small = float("nan")
                if mode == "token" and m <= FP8_KERNEL_MAX_ROWS and k % 16 == 0:
                    t_small = graph_time(lambda: fp8_gemv(q, s, qw, gated=gated), calls, 5)
                    l_small = graph_time(lambda: fp8_gemv(*quantize_fp8_rows_cuda(x, group=0), qw, gated=gated),
                                         calls, 5)
                    err_small = rel(fp8_gemv(q, s, qw, gated=gated))
                b = pick_bn(m, n_out, bool(gated), sms) if mode == "token" else 128
                print(f"{name:12s} {m:5d} {mode:>6s} {b:4d} {ours * 1e6:8.1f} {flop / ours / 1e12:7.0f} {t_sm * 1e6:8.1f} "
                      f"{t_fast * 1e6:8.1f} {t_bw * 1e6:9.1f} {t_sm / ours:7.2f} {t_fast / ours:6.2f} {t_bw / ours:7.2f} | "
                      f"{t_quant * 1e6:8.1f} {qbytes / t_quant / ceiling:7.2f} {layer * 1e6:8.1f} {t_bf16 * 1e6:11.1f} "
                      f"{err:7.1e} {err_peer:8.1e} | {t_small * 1e6:8.1f} {n * k / t_small / ceiling:7.2f} "
                      f"{l_small * 1e6:7.1f} {err_small:7.1e}", flush=True)
                rows.append(dict(shape=name, m=m, scales=mode, bn=b, ours_us=ours * 1e6, scaled_mm_us=t_sm * 1e6,
                                 scaled_mm_fast_us=t_fast * 1e6, blockwise_us=t_bw * 1e6, quant_us=t_quant * 1e6,
                                 quant_of_copy=qbytes / t_quant / ceiling, layer_us=layer * 1e6,
                                 bf16_cublas_us=t_bf16 * 1e6, max_rel_err=err, peer_max_rel_err=err_peer,
                                 small_us=t_small * 1e6, small_of_copy=n * k / t_small / ceiling,
                                 small_layer_us=l_small * 1e6, small_max_rel_err=err_small))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": ceiling / 1e12, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
