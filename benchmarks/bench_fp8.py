"""W8A8 FP8 products at prefill sizes: the Hopper FP8 GEMM (codegen/gemm.py fp8, runtime/quant.fp8_gemm)
beside torch._scaled_mm (cuBLAS) on the same e4m3 operands, with per-tensor scales (its fastest) and
rowwise scales (per token x per channel: the same scaling as ours), at Llama-3-8B / 70B shapes; and the
layer (x in bf16: the per-token quantisation kernel, then the product) beside the quantisation and
_scaled_mm rowwise, and bf16 cuBLAS. CUDA-graph replays, same run. Gated rows (gate/up) run fused
(act(gate) * up in our epilogue) against _scaled_mm followed by the generated SwiGLU row kernel.

    python -m benchmarks.bench_fp8 [--only NAME] [--tokens 1024,4096,8192] [--json out.json]

The quantisation kernel's row is its bytes (x read, q and scales written) against the copy ceiling
measured in the same run.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from layerforge.codegen.gemm import pick_bn
from layerforge.runtime.quant import fp8_gemm, pack_fp8, quantize_fp8, quantize_fp8_rows_cuda

from .bench_gemm import SHAPES
from .bench_gemv import graph_time, swiglu_module
from .bench_rows import copy_ceiling


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="substring of the shape names")
    ap.add_argument("--tokens", default="128,1024,4096,8192")
    ap.add_argument("--bn", default="auto", help="comma-separated tile widths (128, 192, 256) or auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ceiling = copy_ceiling()
    bns = [None if b == "auto" else int(b) for b in a.bn.split(",")]
    print(f"device: {torch.cuda.get_device_name()}; copy ceiling {ceiling / 1e12:.2f} TB/s")
    print("sm: torch._scaled_mm (cuBLAS) on the same e4m3 operands, per-tensor or rowwise scales, its default\n"
          "accumulation (promoted to f32) or use_fast_accum (the tensor cores' own sums, as ours); err: max |y - ref|\n"
          "/ max |ref| against the f32 product of the dequantised operands (ours, sm row, sm row fast)")
    print(f"{'shape':12s} {'M':>5s} {'bn':>4s} {'ours us':>8s} {'TFLOP/s':>7s} {'sm tensor':>9s} {'sm row':>8s} "
          f"{'tens fast':>9s} {'row fast':>8s} {'ours/tensor':>11s} {'ours/row':>8s} {'/t fast':>7s} {'/r fast':>7s} | "
          f"{'quant us':>8s} {'of copy':>7s} {'layer us':>8s} {'q+sm row':>8s} {'bf16 cuBLAS':>11s} "
          f"{'err':>7s} {'err row':>7s} {'err fast':>8s}")
    rows = []
    one = torch.ones((), device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, n, k, gated in SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        qw = pack_fp8(*quantize_fp8(w), None, torch.bfloat16)
        wq, ws = qw.qweight, qw.wscale
        act = swiglu_module(n // 2) if gated else None
        n_out = n // 2 if gated else n
        for m in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s = quantize_fp8_rows_cuda(x, group=0)
            flop = 2 * m * n * k
            calls = max(2, min(20, int(4e11 // flop)))

            def sm(scale_a, scale_b, fast=False):
                y = torch._scaled_mm(q, wq.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                     use_fast_accum=fast)
                return act(y) if gated else y
            t_tensor = graph_time(lambda: sm(one, one), calls, 5)
            t_row = graph_time(lambda: sm(s, ws[None, :]), calls, 5)
            t_tensor_fast = graph_time(lambda: sm(one, one, True), calls, 5)
            t_row_fast = graph_time(lambda: sm(s, ws[None, :], True), calls, 5)
            t_quant = graph_time(lambda: quantize_fp8_rows_cuda(x, group=0), calls, 5)
            t_layer_sm = graph_time(lambda: sm(quantize_fp8_rows_cuda(x, group=0)[1], ws[None, :]), calls, 5)
            t_bf16 = graph_time(lambda: act(F.linear(x, w)) if gated else F.linear(x, w), calls, 5)
            ref = (q.float() * s) @ (wq.float() * ws[:, None]).T
            if gated:
                gt, up = ref.chunk(2, -1)
                ref = F.silu(gt) * up

            def rel(y):
                return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            err_row, err_row_fast = rel(sm(s, ws[None, :])), rel(sm(s, ws[None, :], True))
            for bn in bns:
                ours = graph_time(lambda: fp8_gemm(q, s, qw, gated=gated, bn=bn), calls, 5)
                layer = graph_time(lambda: fp8_gemm(*quantize_fp8_rows_cuda(x, group=0), qw, gated=gated, bn=bn),
                                   calls, 5)
                y = fp8_gemm(q, s, qw, gated=gated, bn=bn).float()
                err = rel(y)
                qbytes = m * k * 2 + m * k + 4 * m
                b = bn or pick_bn(m, n_out, bool(gated), sms)
                print(f"{name:12s} {m:5d} {b:4d} {ours * 1e6:8.1f} {flop / ours / 1e12:7.0f} {t_tensor * 1e6:9.1f} "
                      f"{t_row * 1e6:8.1f} {t_tensor_fast * 1e6:9.1f} {t_row_fast * 1e6:8.1f} {t_tensor / ours:11.2f} "
                      f"{t_row / ours:8.2f} {t_tensor_fast / ours:7.2f} {t_row_fast / ours:7.2f} | {t_quant * 1e6:8.1f} "
                      f"{qbytes / t_quant / ceiling:7.2f} {layer * 1e6:8.1f} {t_layer_sm * 1e6:8.1f} "
                      f"{t_bf16 * 1e6:11.1f} {err:7.1e} {err_row:7.1e} {err_row_fast:8.1e}", flush=True)
                rows.append(dict(shape=name, m=m, bn=b, ours_us=ours * 1e6, scaled_mm_tensor_us=t_tensor * 1e6,
                                 scaled_mm_row_us=t_row * 1e6, scaled_mm_tensor_fast_us=t_tensor_fast * 1e6,
                                 scaled_mm_row_fast_us=t_row_fast * 1e6, err_scaled_mm_row=err_row,
                                 err_scaled_mm_row_fast=err_row_fast, quant_us=t_quant * 1e6,
                                 quant_of_copy=qbytes / t_quant / ceiling, layer_us=layer * 1e6,
                                 quant_scaled_mm_row_us=t_layer_sm * 1e6, bf16_cublas_us=t_bf16 * 1e6, max_rel_err=err))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": ceiling / 1e12, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
