"""Small-token products (decode): the generated kernel (runtime/linear.py) beside cuBLAS
(torch.nn.functional.linear) at Llama-3-8B and -70B shapes, GB/s on the weight bytes and the
copy ceiling, CUDA-graph replays (kernel time, launch cost out), same run.

    python -m benchmarks.bench_gemv [--sweep] [--json out.json]

Gated rows (gate/up) run fused (act(gate) * up in the epilogue) against cuBLAS followed by
the generated SwiGLU row kernel; --sweep also times every work split (16-column tiles per CTA,
warps, K chunks in flight) of each shape to choose the default.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from layerforge.codegen.gemv import plan_gemv
from layerforge.runtime.linear import gemv

from .bench_rows import copy_ceiling

SHAPES = [  # (name, N, K, gated)
    ("8B qkv", 6144, 4096, None), ("8B o", 4096, 4096, None), ("8B gate/up", 28672, 4096, "silu"),
    ("8B down", 4096, 14336, None), ("8B lm_head", 128256, 4096, None),
    ("70B qkv", 10240, 8192, None), ("70B o", 8192, 8192, None), ("70B gate/up", 57344, 8192, "silu"),
    ("70B down", 8192, 28672, None),
]
TOKENS = (1, 4, 8, 16)
SPLITS = tuple(itertools.product((1,), (4, 8), (1, 2, 4)))   # (16-column tiles, warps, unroll)


def graph_time(fn, calls: int = 20) -> float:
    """Seconds per call of `fn`, from replays of a graph of `calls` calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def swiglu_module(f: int):
    from layerforge.dsl.program import Program
    from layerforge.runtime.layers import LayerModule
    return LayerModule(Program.stdlib().specialise("swiglu", F=f, dtype="bf16"))


def split_launcher(n, k, m, gated, rt, warps, unroll):
    from layerforge.runtime.launch import compile_plan, device_arch, load_kernels
    plan = plan_gemv("bf16", n=n, k=k, max_m=m, gated=gated, arch=device_arch(), rt=rt, warps=warps, unroll=unroll)
    res = compile_plan(plan)
    if any(r.spill_stores or r.spill_loads for r in res.resources.values()):
        return None
    return load_kernels(res.cubin, plan.kernels, torch.device("cuda"))[plan.kernel_name]


def _compile(plan):
    from layerforge.runtime.launch import compile_plan
    compile_plan(plan)


def precompile(plans) -> None:
    """Fill the kernel cache from a process per core (the sweep's plans are many)."""
    import concurrent.futures as cf
    import os
    with cf.ProcessPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
        list(ex.map(_compile, plans))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="substring of the shape names")
    a = ap.parse_args(argv)
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    print(f"{'shape':12s} {'M':>3s} {'ours us':>8s} {'TB/s':>5s} {'cuBLAS us':>9s} {'TB/s':>5s} {'+act us':>8s} "
          f"{'ours/cuBLAS':>11s} {'of copy':>7s}")
    rows = []
    if a.sweep:
        from layerforge.runtime.launch import device_arch
        arch = device_arch()
        precompile([plan_gemv("bf16", n=n, k=k, max_m=m, gated=g, arch=arch, rt=rt, warps=wp, unroll=u)
                    for name, n, k, g in SHAPES if not a.only or a.only in name
                    for m in (1, 16) for rt, wp, u in SPLITS] +
                   [plan_gemv("bf16", n=n, k=k, max_m=m, gated=g, arch=arch)
                    for name, n, k, g in SHAPES if not a.only or a.only in name for m in (1, 16)])
    for name, n, k, gated in SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        act = swiglu_module(n // 2) if gated else None
        wbytes = n * k * 2
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ours = graph_time(lambda: gemv(x, w, gated=gated))
            cublas = graph_time(lambda: F.linear(x, w))
            both = graph_time(lambda: act(F.linear(x, w))) if gated else cublas
            r = dict(shape=name, n=n, k=k, m=m, gated=gated, ours_s=ours, cublas_s=cublas, cublas_act_s=both,
                     weight_bytes=wbytes)
            line = (f"{name:12s} {m:>3d} {ours * 1e6:>8.1f} {wbytes / ours / 1e12:>5.2f} {cublas * 1e6:>9.1f} "
                    f"{wbytes / cublas / 1e12:>5.2f} {both * 1e6 if gated else float('nan'):>8.1f} "
                    f"{both / ours:>11.2f} {wbytes / ours / ceiling:>7.2f}")
            if a.sweep and m in (1, 16):
                sweep = {}
                for rt, warps, unroll in SPLITS:
                    launch = split_launcher(n, k, m, gated, rt, warps, unroll)
                    if launch is None:   # spills: not a candidate
                        continue
                    y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
                    sweep[f"r{rt}w{warps}u{unroll}"] = graph_time(lambda: launch((), [x, w, y, m]))
                best = min(sweep, key=sweep.get)
                r["sweep_s"] = sweep
                line += f"  best {best} {sweep[best] * 1e6:.1f} | " + " ".join(
                    f"{s}:{t * 1e6:.1f}" for s, t in sweep.items())
            print(line)
            rows.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": ceiling / 1e12, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
