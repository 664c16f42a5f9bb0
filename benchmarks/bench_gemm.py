"""Prefill-sized products: the Hopper GEMM (codegen/gemm.py, wgmma) beside cuBLAS
(torch.nn.functional.linear) at Llama-3-8B / 70B shapes, TFLOP/s, CUDA-graph replays, same run.

    python -m benchmarks.bench_gemm [--only NAME] [--tokens 128,1024,4096,8192] [--json out.json]
                                    [--variant wgmma,wgmma_tma,wgmma_persistent,wgmma_split] [--tma-store on,off]

--variant times each named GEMM variant (runtime/linear.GEMM_KERNELS: the cp.async kernel, TMA
loads, TMA + the persistent schedule, the same with its last round's tiles split along K) beside
cuBLAS in the same run, one row each; --tma-store
on,off times the persistent variant's epilogue both ways (TMA stores from a shared staging tile,
`+st`, or stores from the registers; runtime/linear.GEMM_TMA_STORE).

Gated rows (gate/up) run fused (act(gate) * up in the epilogue) against cuBLAS followed by the
generated SwiGLU row kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from layerforge.codegen.gemm import pick_bn
from layerforge.runtime import linear
from layerforge.runtime.linear import GEMM_KERNELS, gemv

from .bench_gemv import graph_time, swiglu_module

SHAPES = [  # (name, N, K, gated)
    ("8B qkv", 6144, 4096, None), ("8B o", 4096, 4096, None), ("8B gate/up", 28672, 4096, "silu"),
    ("8B down", 4096, 14336, None), ("70B gate/up", 57344, 8192, "silu"), ("70B down", 8192, 28672, None),
    # Mamba2-2.7B's in / out projections (its decode step's products at batch 64; bench_gemv.STREAM_SHAPES)
    ("Mamba2 in", 10576, 2560, None), ("Mamba2 out", 2560, 5120, None),
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="substring of the shape names")
    ap.add_argument("--tokens", default="128,1024,4096,8192")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", default="wgmma", help=f"comma-separated, of {sorted(GEMM_KERNELS)}")
    ap.add_argument("--bn", default="auto", help="comma-separated tile widths (128, 256) or auto (codegen/gemm.pick_bn)")
    ap.add_argument("--tma-store", default="on", help="on, off or on,off: the persistent GEMM's epilogue by TMA stores")
    ap.add_argument("--rounds", type=int, default=1, help="time cuBLAS and every variant this many times in turn "
                    "(interleaved: a card's clocks drift between calls), then print each one's medians")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds takes 1 or more, got {a.rounds}")
    if not set(a.tma_store.split(",")) <= {"on", "off"}:
        ap.error(f"--tma-store takes on, off or on,off, got {a.tma_store!r}")
    stores = [s == "on" for s in a.tma_store.split(",")]
    default_store = linear.GEMM_TMA_STORE
    variants = a.variant.split(",")
    bns = [None if b == "auto" else int(b) for b in a.bn.split(",")]
    unknown = sorted(set(variants) - set(GEMM_KERNELS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(GEMM_KERNELS)}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'shape':12s} {'variant':16s} {'bn':>4s} {'M':>5s} {'ours us':>9s} {'TFLOP/s':>7s} {'cuBLAS us':>9s} {'TFLOP/s':>7s} {'+act us':>9s} "
          f"{'ours/cuBLAS':>11s} {'max err':>8s}")
    rows = []
    for name, n, k, gated in SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        act = swiglu_module(n // 2) if gated else None
        for m in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            flop = 2 * m * n * k
            calls = max(2, min(20, int(2e11 // flop)))
            ref = F.linear(x, w).float()
            if gated:
                gt, up = ref.chunk(2, -1)
                ref = F.silu(gt) * up
            seen = []
            runs = [(v, b, st) for v in variants for b in bns
                    for st in (stores if v in linear.TMA_STORE_VARIANTS else [None])]
            for _ in range(a.rounds):
                cublas = graph_time(lambda: F.linear(x, w), calls, 5)
                both = graph_time(lambda: act(F.linear(x, w)), calls, 5) if gated else cublas
                for variant, bn, st in runs:
                    linear.GEMM_BN = bn
                    if st is not None:
                        linear.GEMM_TMA_STORE = st
                    bn = bn or pick_bn(m, n // 2 if gated else n, bool(gated), sms)
                    ours = graph_time(lambda v=variant: gemv(x, w, gated=gated, kernel=v), calls, 5)
                    y = gemv(x, w, gated=gated, kernel=variant).float()
                    linear.GEMM_BN, linear.GEMM_TMA_STORE = None, default_store
                    st = bool(st) and (n // 2 if gated else n) % 8 == 0
                    variant += "+st" if st else ""
                    err = ((y - ref).norm() / ref.norm()).item()
                    r = dict(shape=name, variant=variant, bn=bn, n=n, k=k, m=m, gated=gated, ours_s=ours,
                             cublas_s=cublas, cublas_act_s=both, rel_err=err)
                    rows.append(r)
                    seen.append(r)
                    print(f"{name:12s} {variant:16s} {bn:>4d} {m:>5d} {ours * 1e6:>9.1f} {flop / ours / 1e12:>7.0f} "
                          f"{cublas * 1e6:>9.1f} "
                          f"{flop / cublas / 1e12:>7.0f} {both * 1e6 if gated else float('nan'):>9.1f} "
                          f"{both / ours:>11.2f} {err:>8.1e}")
            if a.rounds > 1:   # each variant's medians over the rounds (cuBLAS's over the same rounds)
                for v, b in dict.fromkeys((r["variant"], r["bn"]) for r in seen):   # (a variant at each width)
                    mine = [r for r in seen if (r["variant"], r["bn"]) == (v, b)]
                    ours, cublas, both = (statistics.median(r[f] for r in mine)
                                          for f in ("ours_s", "cublas_s", "cublas_act_s"))
                    print(f"{name:12s} {v:16s} {mine[0]['bn']:>4d} {m:>5d} {ours * 1e6:>9.1f} "
                          f"{flop / ours / 1e12:>7.0f} {cublas * 1e6:>9.1f} {flop / cublas / 1e12:>7.0f} "
                          f"{both * 1e6 if gated else float('nan'):>9.1f} {both / ours:>11.2f}  median of {a.rounds}")
        w = act = None   # free the weight before the next shape's
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
