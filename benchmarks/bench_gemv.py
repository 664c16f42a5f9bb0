"""Small-token products (decode): the generated kernel (runtime/linear.py) beside cuBLAS
(torch.nn.functional.linear) at Llama-3-8B and -70B shapes, GB/s on the weight bytes and the
copy ceiling, CUDA-graph replays (kernel time, launch cost out), same run.

    python -m benchmarks.bench_gemv [--sweep] [--json out.json]
    python -m benchmarks.bench_gemv --quant [--json out.json]

Gated rows (gate/up) run fused (act(gate) * up in the epilogue) against cuBLAS followed by
the generated SwiGLU row kernel. The "+norm" columns put the RMSNorm before the product, as a
decoder layer has it: ours fused in the prologue against the generated rms_norm row kernel
followed by cuBLAS (and the SwiGLU kernel). --sweep also times every work split (16-column
tiles per CTA, warps, ring stages) of each shape to choose the default. --quant times the
weight-only quantised kernels (u4 group 128, i8 per row) at Llama-3-8B and -70B shapes beside cuBLAS on
bf16 W and torch's int4 weight-only kernel (torch._weight_int4pack_mm, group 128), "of copy" on
the bytes each reads for W (packed weight and its scales); on sm_89+ also the fp8 W8A8 kernel
(f8e4m3, per-row and 128 x 128 block scales) beside torch._scaled_mm (e4m3 x already quantised, per-tensor
scales, M padded to 16), "of copy" on the fp8 bytes and scales: "f8" the layer's call as it runs by default
(runtime/quant.fp8_x_first_default: x quantised in the product's registers up to FP8_REGISTER_MAX_ROWS rows, past them
quantised first by the row kernel, then the product), "f8 reg" the same weights with x quantised in the product's
registers at every row count (LAYERFORGE_FP8_QUANT_X_FIRST=0), "f8 x1st" x quantised first at every count (=1),
"f8 cuBLAS" the layer's call with the small-token kernel
off (the same row quantiser, then cuBLAS's 1 x 128 / 128 x 128 blockwise-scaled e4m3 product: the peer with our
scales), same run.
"sized" (--quant, u4) is the time a device copy moving the same bytes takes at that size over the product's: a
12.6 MB product is 3 us at the large copy's ceiling, where launch, ramp and tail weigh as much as the bytes.
"f8 cp@size" is that copy's own fraction of the ceiling for the f8 product's bytes: the most "of copy" a product of
that size could show when moving its bytes costs what a copy of them does.
The main, --quant and their --sweep tables time each product on weights L2 does not hold: the timed graph cycles through
copies of the weights (3 x L2 of other bytes between two reads of one copy), as a model's step reads each
layer's weights once; --warm reads the same weights in every call (the way earlier tables were taken: W of
up to ~30 MB then partly comes from L2, and "of copy" can pass 1).
--stream times the decode-range Hopper GEMM (codegen/gemm_stream.py, sm_90) at 8-128 tokens beside
cuBLAS and the small-token kernel, on the 8B shapes and Mamba2-2.7B's in/out projections; with
--sweep every work split (row blocks, consumer warpgroups, stages, CTAs an SM) as well.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from layerforge.codegen.gemv import plan_gemv
from layerforge.runtime.linear import KERNEL_MAX_ROWS, gemv
from layerforge.runtime.tune import CANDIDATES, cold_copy_count, graph_time   # (the other benchmarks import graph_time from here)

from .bench_rows import copy_ceiling

SHAPES = [  # (name, N, K, gated)
    ("8B qkv", 6144, 4096, None), ("8B o", 4096, 4096, None), ("8B gate/up", 28672, 4096, "silu"),
    ("8B down", 4096, 14336, None), ("8B lm_head", 128256, 4096, None),
    ("70B qkv", 10240, 8192, None), ("70B o", 8192, 8192, None), ("70B gate/up", 57344, 8192, "silu"),
    ("70B down", 8192, 28672, None),
]
TOKENS = (1, 4, 8, 16, 32, 64)
SWEEP_TOKENS = (1, 8, 16, 64)
SPLITS = CANDIDATES[None]   # (16-column tiles, warps, stages): what `layerforge tune` times


def cold_copies(nbytes: int) -> int:
    """How many copies of a product's weights (`nbytes` each) a timed graph cycles through so that L2 holds
    none of a copy when it is read again (3 x L2 of other bytes between two reads of one copy), as in a
    model, where each layer's weights are read once a step; 1 with --warm."""
    return 1 if WARM else cold_copy_count(nbytes)


def copies(make, nbytes: int) -> list:
    """`make()` called cold_copies(nbytes) times: one weight copy each (the first is the bench's own)."""
    return [make() for _ in range(cold_copies(nbytes))]


def swiglu_module(f: int):
    from layerforge.dsl.program import Program
    from layerforge.runtime.layers import LayerModule
    return LayerModule(Program.stdlib().specialise("swiglu", F=f, dtype="bf16"))


def norm_module(k: int):
    from layerforge.dsl.program import Program
    from layerforge.runtime.layers import LayerModule
    return LayerModule(Program.stdlib().specialise("rms_norm", H=k, dtype="bf16"), eps=1e-5)


def normed(norm, x, gamma):
    return norm._forward_bound({"x": x, "w": gamma}, {"eps": 1e-5}, None)


def split_plan(n, k, m, gated, rt, warps, stages, arch, wtype=None, group=0):
    try:
        return plan_gemv("bf16", n=n, k=k, max_m=m, gated=gated, arch=arch, rt=rt, warps=warps, stages=stages,
                         wtype=wtype, group=group)
    except ValueError:   # more shared memory than a CTA has
        return None


def split_launcher(n, k, m, gated, rt, warps, stages, wtype=None, group=0):
    from layerforge.runtime.launch import device_arch
    plan = split_plan(n, k, m, gated, rt, warps, stages, device_arch(), wtype, group)
    return None if plan is None else unspilled_launcher(plan)


def unspilled_launcher(plan):
    """The plan's kernel loaded on the GPU, or None where it spills registers."""
    from layerforge.runtime.launch import compile_plan, load_kernels
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


STREAM_SHAPES = SHAPES[:4] + [("Mamba2 in", 10576, 2560, None), ("Mamba2 out", 2560, 5120, None)]
STREAM_TOKENS = (8, 16, 32, 64, 128)
STREAM_SPLITS = [dict(rb=rb, cw=cw, stages=st, ka=ka, packed=p) for rb, cw in ((1, 1), (1, 2), (2, 1))
                 for ka in (1, 2) for st in (3, 4, 6, 8) for p in (False, True)]


def stream_plans(n, k, m, gated, splits):
    """The decode-range GEMM's plans of a shape for the given splits (the ones that can exist)."""
    from layerforge.codegen.gemm_stream import plan_gemm_stream, token_tile
    plans = []
    for sp in splits:
        if gated and sp.get("rb") == 1:
            continue
        try:
            plans.append(plan_gemm_stream("bf16", n=n, k=k, mt=token_tile(m), gated=gated, **sp))
        except ValueError:   # shared memory or registers an SM does not have
            pass
    return plans


STREAM_U4_SPLITS = [dict(rb=rb, cw=cw) for rb in (1, 2) for cw in (1, 2)]


def main_stream_u4(a, ceiling):
    """--stream --quant: u4 (group 128) on the decode-range GEMM, each work split (row blocks a
    warpgroup, consumer warpgroups; stages to fit) beside the default plan and bf16 cuBLAS."""
    from layerforge.codegen.gemm_stream import plan_gemm_stream, token_tile
    from layerforge.runtime.launch import compile_plan, load_kernels
    from layerforge.runtime.linear import _StreamLauncher
    from layerforge.runtime.quant import QuantLinear, pack_stream_u4
    tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else (64, 128)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dev = torch.device("cuda")
    rows = []
    for name, n, k, gated in QUANT_SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        u4 = QuantLinear.from_float(w, 128, wtype="u4")
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = graph_time(lambda: u4(x, gated=gated))
            cublas = graph_time(lambda: F.linear(x, w))
            y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
            sweep = {}
            for sp in STREAM_U4_SPLITS:
                if gated and sp["rb"] == 1:
                    continue
                try:
                    plan = plan_gemm_stream("bf16", n=n, k=k, mt=token_tile(m), gated=gated, wtype="u4", group=128,
                                            **sp)
                except ValueError:
                    continue
                res = compile_plan(plan)
                if any(q.spill_stores or q.spill_loads for q in res.resources.values()):
                    continue
                launch = _StreamLauncher(plan, load_kernels(res.cubin, plan.kernels, dev)[plan.kernel_name], sms, dev)
                wp = pack_stream_u4(u4.qw, plan)
                sweep[plan.key.split("_")[-2]] = graph_time(lambda: launch(m, [x, wp, y, m]))
            best = min(sweep, key=sweep.get)
            print(f"{name:12s} {m:>3d} u4 default {base * 1e6:7.1f} us  best {best} {sweep[best] * 1e6:7.1f}  "
                  f"bf16 cuBLAS {cublas * 1e6:7.1f}  | " + " ".join(f"{s}:{t * 1e6:.1f}" for s, t in sweep.items()),
                  flush=True)
            rows.append(dict(shape=name, n=n, k=k, m=m, gated=gated, u4_s=base, cublas_s=cublas, sweep_s=sweep))
    return rows


def main_stream(a, ceiling):
    """--stream: the decode-range GEMM against cuBLAS (and the small-token kernel at <= 16 rows)."""
    if a.quant:
        return main_stream_u4(a, ceiling)
    from layerforge.runtime.linear import _StreamLauncher
    from layerforge.runtime.launch import compile_plan, load_kernels
    tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else STREAM_TOKENS
    shapes = [s for s in STREAM_SHAPES if not a.only or a.only in s[0]]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if a.sweep:
        precompile([p for _, n, k, g in shapes for m in tokens for p in stream_plans(n, k, m, g, STREAM_SPLITS)])
    print(f"{'shape':12s} {'M':>3s} {'stream us':>9s} {'of copy':>7s} {'cuBLAS us':>9s} {'of copy':>7s} "
          f"{'small us':>8s} {'stream/cuBLAS':>13s}")
    rows = []
    for name, n, k, gated in shapes:
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        act = swiglu_module(n // 2) if gated else None
        wbytes = n * k * 2
        ws = [w] + [w.clone() for _ in range(cold_copies(wbytes) - 1)]   # cycled through: none in L2 when read
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if a.once:   # for a profiler: the stream kernel and cuBLAS three times each, nothing timed
                for _ in range(3):
                    gemv(x, w, gated=gated, kernel="stream")
                    F.linear(x, w)
                torch.cuda.synchronize()
                continue
            ours = graph_time([lambda w=w: gemv(x, w, gated=gated, kernel="stream") for w in ws])
            cublas = graph_time([lambda w=w: act(F.linear(x, w)) if gated else F.linear(x, w) for w in ws])
            small = graph_time([lambda w=w: gemv(x, w, gated=gated) for w in ws]) if m <= KERNEL_MAX_ROWS \
                else float("nan")
            r = dict(shape=name, n=n, k=k, m=m, gated=gated, stream_s=ours, cublas_s=cublas, small_s=small,
                     weight_bytes=wbytes)
            line = (f"{name:12s} {m:>3d} {ours * 1e6:>9.1f} {wbytes / ours / ceiling:>7.2f} {cublas * 1e6:>9.1f} "
                    f"{wbytes / cublas / ceiling:>7.2f} {small * 1e6:>8.1f} {cublas / ours:>13.2f}")
            if a.sweep:
                sweep = {}
                y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
                from layerforge.codegen.gemm_stream import pack_weight
                packs = {}
                for plan in stream_plans(n, k, m, gated, STREAM_SPLITS):
                    wps = ws   # one per weight copy (cold, as above)
                    if plan.packed:
                        wps = packs.get((plan.bw, plan.ka))
                        if wps is None:
                            wps = packs[(plan.bw, plan.ka)] = [pack_weight(wi, plan) for wi in ws]
                    res = compile_plan(plan)
                    if any(q.spill_stores or q.spill_loads for q in res.resources.values()):
                        continue
                    launch = _StreamLauncher(plan, load_kernels(res.cubin, plan.kernels, torch.device("cuda"))[
                        plan.kernel_name], sms, torch.device("cuda"))
                    sweep[plan.key.split("_")[-2]] = graph_time([lambda wp=wp: launch(m, [x, wp, y, m]) for wp in wps])
                best = min(sweep, key=sweep.get)
                r["sweep_s"] = sweep
                line += f"  best {best} {sweep[best] * 1e6:.1f} | " + " ".join(
                    f"{s}:{t * 1e6:.1f}" for s, t in sorted(sweep.items(), key=lambda kv: kv[1])[:6])
            print(line, flush=True)
            rows.append(r)
    return rows


QUANT_SHAPES = SHAPES[:4] + SHAPES[5:]   # the 8B and 70B layers' products (--only 8B: the 8B ones)
QUANT_TOKENS = (1, 4, 8, 16)


def torch_int4(w: torch.Tensor, group: int):
    """torch's int4 weight-only product on W [N, K] (values irrelevant to the time), or None."""
    try:
        n, k = w.shape
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=w.device)
        packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(k // group, n, 2, device=w.device).to(torch.bfloat16)
        x = torch.randn(1, k, device=w.device, dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, packed, group, sz)
        return lambda x: torch._weight_int4pack_mm(x, packed, group, sz)
    except (AttributeError, RuntimeError, TypeError):
        return None


def torch_fp8(w: torch.Tensor, m: int):
    """torch._scaled_mm on W [N, K] in e4m3 and an e4m3 x of max(m, 16) rows (its kernels want
    multiples of 16), per-tensor scales, bf16 out; None where torch or the GPU has none."""
    try:
        wq = w.to(torch.float8_e4m3fn)
        xq = torch.randn(max(m, 16), w.shape[1], device=w.device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=w.device)
        torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (AttributeError, RuntimeError, TypeError):
        return None


QUANT_SPLITS = CANDIDATES["quant"]   # (16-column tiles, warps, stages)
QUANT_SWEEP = (("u4", 128), ("i8", 0))


def quant_sweep(a, ceiling):
    """The quantised kernels' work splits (rt, warps, stages) at 1, 8 and 16 tokens, each timed on
    the same weights as the default plan (runtime/quant's choice; both cycling through cold_copies of them),
    fraction of the copy ceiling on the packed bytes; compiled in parallel first, spilling plans skipped."""
    from layerforge.runtime.launch import device_arch
    from layerforge.runtime.quant import QuantLinear
    arch = device_arch()
    shapes = [s for s in QUANT_SHAPES if not a.only or a.only in s[0]]
    sweep_tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else (1, 8, 16)
    wtypes = [(wt, gr) for wt, gr in QUANT_SWEEP if not a.wtype or wt == a.wtype]
    precompile([p for name, n, k, g in shapes for wt, gr in wtypes for m in sweep_tokens
                for rt, wp, st in QUANT_SPLITS for p in [split_plan(n, k, m, g, rt, wp, st, arch, wt, gr)]
                if p is not None])
    for name, n, k, gated in shapes:
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        for wt, gr in wtypes:
            lins = copies(lambda: QuantLinear.from_float(w, gr, wtype=wt), n * k // (2 if wt == "u4" else 1))
            nbytes = lins[0].qw.nbytes()
            for m in sweep_tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                default = graph_time([lambda lin=lin: lin(x, gated=gated) for lin in lins])
                y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
                sweep = {}
                for rt, warps, stages in QUANT_SPLITS:
                    launch = split_launcher(n, k, m, gated, rt, warps, stages, wt, gr)
                    if launch is not None:
                        sweep[f"r{rt}w{warps}s{stages}"] = graph_time(
                            [lambda lin=lin: launch((), [x, *lin.qw.kernel_tensors, y, m]) for lin in lins])
                best = min(sweep, key=sweep.get)
                print(f"{name:12s} {wt}g{gr:<4d} {m:>3d} default {default * 1e6:6.1f} us {nbytes / default / ceiling:.2f} "
                      f"of copy | best {best} {sweep[best] * 1e6:6.1f} us {nbytes / sweep[best] / ceiling:.2f} | "
                      + " ".join(f"{s}:{t * 1e6:.1f}" for s, t in sorted(sweep.items(), key=lambda kv: kv[1])[:6]))


# (rt, warps, stages, min_blocks) of the shared-x layout (spilling plans are skipped)
# (4 stages: at 1-8 tokens a CTA's few chunks all in flight at once)
XSHARE_SPLITS = ((1, 4, 2, 4), (1, 4, 2, 3), (1, 4, 2, 1), (1, 4, 3, 4), (1, 4, 4, 4), (1, 8, 2, 2), (2, 4, 2, 2),
                 (2, 2, 2, 6), (1, 2, 2, 8), (1, 2, 2, 5))


def xshare_launcher(plan):
    """The shared-x plan's kernel with its workspace (runtime/linear._SplitGemvLauncher), or None where it spills."""
    from layerforge.runtime.linear import _SplitGemvLauncher
    launch = unspilled_launcher(plan)
    if launch is None or plan.xshare <= 1:
        return launch
    return _SplitGemvLauncher(plan, launch, torch.device("cuda"))


def xshare_sweep(a, ceiling):
    """u4 (g128) products in the shared-x layout (codegen/gemv.py xshare: x staged once a CTA, K over CTAs) beside
    the default plan, same weights, same run: each split (rt, warps, stages, min_blocks) at the default K split
    (codegen/gemv.xshare_split), half and twice it; us and fraction of copy on the packed bytes, and each plan's
    largest difference from the default's output (relative to its largest magnitude; NaN fails)."""
    from layerforge.codegen.gemv import xshare_split
    from layerforge.runtime.launch import device_arch
    from layerforge.runtime.quant import QuantLinear
    arch = device_arch()
    shapes = [s for s in QUANT_SHAPES if not a.only or a.only in s[0]]
    tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else (1, 8, 16)

    def plans(n, k, m, gated):
        out = {}
        for rt, warps, stages, blocks in XSHARE_SPLITS:
            auto = xshare_split(n, k, gated, rt, warps)
            for split in sorted({max(1, auto // 2), auto, auto * 2}):
                try:
                    p = plan_gemv("bf16", n=n, k=k, max_m=m, gated=gated, arch=arch, rt=rt, warps=warps,
                                  stages=stages, wtype="u4", group=128, xshare=split, min_blocks=blocks)
                except ValueError:
                    continue
                out[p.key.split("_")[-2]] = p
        return out
    precompile([p for name, n, k, g in shapes for m in tokens for p in plans(n, k, m, g).values()])
    for name, n, k, gated in shapes:
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        lin = QuantLinear.from_float(w, 128, wtype="u4")
        nbytes = lin.qw.nbytes()
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = lin(x, gated=gated).float()
            default = graph_time(lambda: lin(x, gated=gated))
            y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
            sweep, errs = {}, {}
            for label, plan in plans(n, k, m, gated).items():
                launch = xshare_launcher(plan)
                if launch is None:
                    continue
                y.fill_(float("nan"))
                launch((), [x, *lin.qw.kernel_tensors, y, m])
                err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                errs[label] = err if err == err else float("inf")
                sweep[label] = graph_time(lambda: launch((), [x, *lin.qw.kernel_tensors, y, m]))
            best = min(sweep, key=sweep.get)
            worst = max(errs.values())
            print(f"{name:12s} u4g128 {m:>3d} default {default * 1e6:6.1f} us {nbytes / default / ceiling:.2f} of copy | "
                  f"xshare best {best} {sweep[best] * 1e6:6.1f} us {nbytes / sweep[best] / ceiling:.2f} | largest "
                  f"difference {worst:.1e} | " + " ".join(f"{s}:{t * 1e6:.1f}" for s, t in
                                                         sorted(sweep.items(), key=lambda kv: kv[1])[:8]))


_SIZED_COPY: dict[int, float] = {}


def sized_copy_time(nbytes: int) -> float:
    """A device-to-device copy moving `nbytes` in all (nbytes / 2 read, as many written: the copy ceiling's
    accounting), timed by CUDA-graph replays as the products are: what moving these bytes costs at this size, launch,
    ramp and tail included. A small product (8B q/k/v in u4: 12.6 MB, 3 us at 4.25 TB/s) is measured against it
    beside the large copy's ceiling. Like the products, the copy cycles through cold_copies buffers, so its
    source comes from DRAM, not L2."""
    if nbytes not in _SIZED_COPY:
        pairs = copies(lambda: (torch.empty(max(64, nbytes // 4), dtype=torch.bfloat16, device="cuda"),
                                torch.empty(max(64, nbytes // 4), dtype=torch.bfloat16, device="cuda")), nbytes)
        _SIZED_COPY[nbytes] = graph_time([lambda d=d, s=s: d.copy_(s) for s, d in pairs])
    return _SIZED_COPY[nbytes]


def _blockwise_takes(x, qw) -> bool:
    """Whether cuBLAS takes the W8A8 product of x with qw blockwise-scaled (runtime/quant._scaled_mm_blockwise)."""
    from layerforge.runtime import quant
    q, s = quant.quantize_fp8_rows_cuda(x)
    return quant._scaled_mm_blockwise(q, s, qw, x.dtype) is not None


def main_quant(a, ceiling):
    from layerforge.runtime import quant
    from layerforge.runtime.quant import QuantLinear
    from .bench_attention import env_switch_set
    tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else QUANT_TOKENS
    if a.kernel_rows:
        quant.QUANT_KERNEL_MAX_ROWS = a.kernel_rows
    print(f"small-token kernel up to {quant.QUANT_KERNEL_MAX_ROWS} rows; u4 at {quant.STREAM_QUANT_ROWS[0]}-"
          f"{quant.STREAM_QUANT_ROWS[1]} rows on sm_90: the decode-range GEMM (u4 deq: W dequantised + cuBLAS, the "
          "route before it and of i8); past them W dequantised + cuBLAS")
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    if a.once:   # for a profiler: each shape's u4 and i8 products three times at each token count, nothing timed
        for name, n, k, gated in QUANT_SHAPES:
            if a.only and a.only not in name:
                continue
            w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
            u4, i8 = QuantLinear.from_float(w, 128, wtype="u4"), QuantLinear.from_float(w, 0, wtype="i8")
            for m in tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    u4(x, gated=gated)
                    i8(x, gated=gated)
        torch.cuda.synchronize()
        print("ran each u4 / i8 product three times (--once)")
        return []
    print("of copy: the bytes over the time at the large copy's ceiling; sized: the time of a copy moving the same "
          "bytes at this size (graph replays) over the product's; f8 cp@size: what such a copy of the f8 product's "
          "bytes reaches, as a fraction of the ceiling (the most a product of that size could show in 'of copy')")
    print(f"{'shape':12s} {'M':>3s} {'u4 us':>7s} {'of copy':>7s} {'sized':>5s} {'u4 deq us':>9s} {'i8 us':>7s} {'of copy':>7s} "
          f"{'cuBLAS us':>9s} "
          f"{'torch int4 us':>13s} {'u4/cuBLAS':>9s} {'f8 us':>7s} {'of copy':>7s} {'f8 reg us':>9s} "
          f"{'f8 x1st us':>10s} "
          f"{'f8blk us':>8s} "
          f"{'of copy':>7s} "
          f"{'scaled_mm us':>12s} {'f8 cuBLAS us':>12s} {'f8/cuBLAS':>9s} {'f8 cp@size':>10s}")
    rows = []
    for name, n, k, gated in QUANT_SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        # every product cycles through copies of its weights (cold_copies: none of them in L2 when read)
        u4s = copies(lambda: QuantLinear.from_float(w, 128, wtype="u4"), n * k // 2)
        i8s = copies(lambda: QuantLinear.from_float(w, 0, wtype="i8"), n * k)
        ws = [w] + [w.clone() for _ in range(cold_copies(2 * n * k) - 1)]
        t4s = [t for t in copies(lambda: torch_int4(w, 128), n * k // 2) if t]
        f8s = copies(lambda: QuantLinear.from_float(w, 0, wtype="f8e4m3"), n * k) if fp8 else []
        f8bs = copies(lambda: QuantLinear.from_float(w, 128, wtype="f8e4m3"), n * k) if fp8 else []
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ours4 = graph_time([lambda u4=u4: u4(x, gated=gated) for u4 in u4s])
            held, quant.STREAM_QUANT_ROWS = quant.STREAM_QUANT_ROWS, (1, 0)
            deq4 = graph_time([lambda u4=u4: u4(x, gated=gated) for u4 in u4s]) \
                if m > quant.QUANT_KERNEL_MAX_ROWS else float("nan")
            quant.STREAM_QUANT_ROWS = held
            ours8 = graph_time([lambda i8=i8: i8(x, gated=gated) for i8 in i8s])
            cublas = graph_time([lambda w=w: F.linear(x, w) for w in ws])
            theirs4 = graph_time([lambda t4=t4: t4(x) for t4 in t4s]) if t4s else float("nan")
            b4, b8 = u4s[0].qw.nbytes(), i8s[0].qw.nbytes()
            nan = float("nan")
            ours_f8 = graph_time([lambda f8=f8: f8(x, gated=gated) for f8 in f8s]) if fp8 else nan
            # the two x paths of the small-token kernel (past its rows no kernel reads the switch: nan)
            small = fp8 and m <= quant.FP8_KERNEL_MAX_ROWS
            with env_switch_set("LAYERFORGE_FP8_QUANT_X_FIRST", False if small else None):   # x in the registers
                ours_f8r = graph_time([lambda f8=f8: f8(x, gated=gated) for f8 in f8s]) if small else nan
            with env_switch_set("LAYERFORGE_FP8_QUANT_X_FIRST", True if small else None):    # x quantised first
                ours_f8x = graph_time([lambda f8=f8: f8(x, gated=gated) for f8 in f8s]) if small else nan
            ours_f8b = graph_time([lambda f8=f8: f8(x, gated=gated) for f8 in f8bs]) if fp8 else nan
            # the layer's call with the small-token kernel off: the same row quantiser (a token and 128 k), then
            # cuBLAS's blockwise-scaled e4m3 product (torch._scaled_mm; None where it has none: nan)
            held, quant.FP8_KERNEL_MAX_ROWS = quant.FP8_KERNEL_MAX_ROWS, 0
            try:
                cub_f8 = graph_time([lambda f8=f8: f8(x, gated=gated) for f8 in f8s]) \
                    if fp8 and _blockwise_takes(x, f8s[0].qw) else nan
            finally:
                quant.FP8_KERNEL_MAX_ROWS = held
            smms = [q for q in copies(lambda: torch_fp8(w, m), n * k) if q] if fp8 else []
            theirs_f8 = graph_time(smms) if smms else nan
            bf8, bf8b = (f8s[0].qw.nbytes(), f8bs[0].qw.nbytes()) if fp8 else (nan, nan)
            sized4 = sized_copy_time(b4)
            sized8 = sized_copy_time(bf8) if fp8 else nan
            r = dict(shape=name, n=n, k=k, m=m, gated=gated, u4_s=ours4, u4_dequant_s=deq4, i8_s=ours8, cublas_s=cublas,
                     torch_int4_s=theirs4, u4_bytes=b4, i8_bytes=b8, f8_s=ours_f8, f8_in_registers_s=ours_f8r,
                     f8_x_first_s=ours_f8x,
                     f8_block_s=ours_f8b,
                     scaled_mm_s=theirs_f8, f8_bytes=bf8, f8_block_bytes=bf8b, u4_sized_copy_s=sized4,
                     f8_sized_copy_s=sized8, f8_cublas_route_s=cub_f8)
            print(f"{name:12s} {m:>3d} {ours4 * 1e6:>7.1f} {b4 / ours4 / ceiling:>7.2f} {sized4 / ours4:>5.2f} "
                  f"{deq4 * 1e6:>9.1f} {ours8 * 1e6:>7.1f} "
                  f"{b8 / ours8 / ceiling:>7.2f} {cublas * 1e6:>9.1f} "
                  f"{theirs4 * 1e6 if t4s else nan:>13.1f} {cublas / ours4:>9.2f} {ours_f8 * 1e6:>7.1f} "
                  f"{bf8 / ours_f8 / ceiling:>7.2f} {ours_f8r * 1e6:>9.1f} {ours_f8x * 1e6:>10.1f} "
                  f"{ours_f8b * 1e6:>8.1f} "
                  f"{bf8b / ours_f8b / ceiling:>7.2f} "
                  f"{theirs_f8 * 1e6:>12.1f} {cub_f8 * 1e6:>12.1f} {cublas / ours_f8:>9.2f} "
                  f"{bf8 / sized8 / ceiling:>10.2f}")
            rows.append(r)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quant", action="store_true", help="the quantised kernels (u4, i8; f8e4m3 W8A8 on sm_89+)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="substring of the shape names")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,4,8,16,32,64; --quant "
                    "1,4,8,16; the rows --sweep sweeps: default 1,8,16,64, or 1,8,16 with --quant)")
    ap.add_argument("--wtype", default=None, choices=[wt for wt, _ in QUANT_SWEEP], help="--quant --sweep: u4 or i8 only")
    ap.add_argument("--stream", action="store_true", help="the decode-range Hopper GEMM (sm_90) at 8-128 tokens")
    ap.add_argument("--xshare", action="store_true",
                    help="u4's shared-x layout (x staged once a CTA, K over CTAs) beside the default, its splits "
                         "(--tokens, default 1,8,16; --only)")
    ap.add_argument("--once", action="store_true",
                    help="--quant (or --stream, bf16): the products three times each, nothing timed (for ncu: e.g. "
                         "ncu --set full -k regex:gemv --launch-skip 2 --launch-count 2 python -m benchmarks.bench_gemv "
                         "--quant --once --only '8B qkv' --tokens 16)")
    ap.add_argument("--kernel-rows", type=int, default=0,
                    help="--quant: rows the small-token kernel serves (runtime/quant.QUANT_KERNEL_MAX_ROWS)")
    ap.add_argument("--warm", action="store_true",
                    help="the main and --quant tables (and their sweeps): every timed call reads the same weights (small ones then come "
                         "partly from L2); by default each product cycles through enough weight copies that none is "
                         "in L2 when read, as in a model's step")
    a = ap.parse_args(argv)
    global WARM
    WARM = a.warm
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    if a.xshare:
        xshare_sweep(a, ceiling)
        return
    if a.quant and a.sweep and not a.stream:
        quant_sweep(a, ceiling)
        return
    if a.stream or a.quant:
        rows = main_stream(a, ceiling) if a.stream else main_quant(a, ceiling)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": ceiling / 1e12, "rows": rows}, f,
                          indent=1)
        return
    print(f"{'shape':12s} {'M':>3s} {'ours us':>8s} {'TB/s':>5s} {'cuBLAS us':>9s} {'TB/s':>5s} {'+act us':>8s} "
          f"{'ours/cuBLAS':>11s} {'of copy':>7s} {'+norm ours':>10s} {'norm+cuBLAS':>11s} {'ratio':>5s}")
    rows = []
    given = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else None
    tokens, sweep_tokens = given or TOKENS, given or SWEEP_TOKENS   # --tokens: the table's rows, all swept
    if a.sweep:
        from layerforge.runtime.launch import device_arch
        arch = device_arch()
        precompile([p for name, n, k, g in SHAPES if not a.only or a.only in name
                    for m in sweep_tokens for rt, wp, st in SPLITS
                    for p in [split_plan(n, k, m, g, rt, wp, st, arch)] if p is not None] +
                   [plan_gemv("bf16", n=n, k=k, max_m=m, gated=g, arch=arch)
                    for name, n, k, g in SHAPES if not a.only or a.only in name for m in tokens])
    for name, n, k, gated in SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        act = swiglu_module(n // 2) if gated else None
        norm = norm_module(k)
        gamma = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
        wbytes = n * k * 2
        ws = [w] + [w.clone() for _ in range(cold_copies(wbytes) - 1)]   # cycled through: none in L2 when read
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if m <= KERNEL_MAX_ROWS:
                ours = graph_time([lambda w=w: gemv(x, w, gated=gated) for w in ws])
            else:   # past the rows Linear sends to the kernel: the default plan, launched directly
                launch = split_launcher(n, k, m, gated, 1, None, None)
                y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
                ours = graph_time([lambda w=w: launch((), [x, w, y, m]) for w in ws]) if launch else float("nan")
            cublas = graph_time([lambda w=w: F.linear(x, w) for w in ws])
            both = graph_time([lambda w=w: act(F.linear(x, w)) for w in ws]) if gated else cublas
            ours_n = graph_time([lambda w=w: gemv(x, w, gated=gated, norm=(gamma, 1e-5)) for w in ws]) \
                if m <= KERNEL_MAX_ROWS else float("nan")
            if m > KERNEL_MAX_ROWS:
                theirs_n = float("nan")
            elif gated:
                theirs_n = graph_time([lambda w=w: act(F.linear(normed(norm, x, gamma), w)) for w in ws])
            else:
                theirs_n = graph_time([lambda w=w: F.linear(normed(norm, x, gamma), w) for w in ws])
            r = dict(shape=name, n=n, k=k, m=m, gated=gated, ours_s=ours, cublas_s=cublas, cublas_act_s=both,
                     ours_norm_s=ours_n, norm_cublas_s=theirs_n, weight_bytes=wbytes)
            line = (f"{name:12s} {m:>3d} {ours * 1e6:>8.1f} {wbytes / ours / 1e12:>5.2f} {cublas * 1e6:>9.1f} "
                    f"{wbytes / cublas / 1e12:>5.2f} {both * 1e6 if gated else float('nan'):>8.1f} "
                    f"{both / ours:>11.2f} {wbytes / ours / ceiling:>7.2f} {ours_n * 1e6:>10.1f} "
                    f"{theirs_n * 1e6:>11.1f} {theirs_n / ours_n:>5.2f}")
            if a.sweep and m in sweep_tokens:
                sweep = {}
                for rt, warps, stages in SPLITS:
                    launch = split_launcher(n, k, m, gated, rt, warps, stages)
                    if launch is None:   # spills or too much shared memory: not a candidate
                        continue
                    y = torch.empty(m, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
                    sweep[f"r{rt}w{warps}s{stages}"] = graph_time([lambda w=w: launch((), [x, w, y, m]) for w in ws])
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
