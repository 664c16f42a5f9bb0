"""Row/pointwise kernels beside their peers, on one GPU, in one run.

    python -m benchmarks.bench_rows [--quick] [--json out.json] [--only swiglu] [--ab]

Per kernel and token count: our time and GB/s (fewest bytes the op must move), torch eager,
torch.compile, the library path where one exists (F.rms_norm), and the device-to-device
copy ceiling measured in the same run; ratios ours/compile and ours/copy. Medians of
triton.testing.do_bench; inputs rotate over several buffers when they would fit in L2.
With --ab, kernels whose rows are split over several blocks are also timed with
one block per row (the plan before the split), in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

import layerforge as lf
from layerforge.runtime.layers import LayerModule

TOKENS = [1, 16, 256, 4096, 32768]
MODELS = {"llama3-8b": dict(H=4096, F=14336), "llama3-70b": dict(H=8192, F=28672)}


def bench(fn, reps_ms=200):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=reps_ms, return_mode="median") * 1e-3  # seconds


def kernel_times(fn, calls: int = 10, warmup: int = 1) -> list[tuple[str, float, int]]:
    """(kernel name, microseconds a call, launches a call) of every kernel fn launches, the mean over
    `calls` calls after `warmup`, from the profiler's device records (CUPTI sees the driver API's
    launches too), slowest first; CUDA only."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / calls, e.count // calls) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def in_pieces(measure, most: int):
    """measure(pieces) for pieces = 1, 2, 4, ... until a run fits in the GPU's memory (a peer's
    torch path that materialises too much at once, timed over pieces of its work); (result,
    pieces). Past `most` pieces the out-of-memory error stands."""
    pieces = 1
    while True:
        try:
            return measure(pieces), pieces
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if pieces >= most:
                raise
            pieces *= 2


def copy_ceiling() -> float:
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), 300)
    return 2 * n * 2 / t


def write_results(path: str, ceiling: float, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": ceiling / 1e12, "rows": rows}, f, indent=1)


def row_per_block(layer, like: LayerModule) -> LayerModule | None:
    """`layer` as a module whose kernel has one block per row (RowPlan split=1), or None when
    its plan does not split rows: the A/B of --ab."""
    import functools
    from layerforge.codegen.plan import plan_layer
    from layerforge.runtime import layers as L
    if plan_layer(layer, "sm_90").lowered().split == 1:
        return None
    mod = LayerModule(layer, device="cuda")
    mod.load_state_dict(like.state_dict())
    mod._scalars.update(like._scalars)
    orig = L.plan_layer
    L.plan_layer = functools.partial(orig, split=1)
    try:   # loads the 16-byte aligned kernel now, with the patched plan; later calls reuse it
        mod._launch_for(torch.device("cuda", torch.cuda.current_device()), 16)
    finally:
        L.plan_layer = orig
    return mod


def rms_eager(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_eager(x, r, w, eps=1e-5):
    s = x + r
    return rms_eager(s, w, eps), s


def swiglu_eager(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def ln_eager(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def moe_eager(logits, k):
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, i = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), i.to(torch.int32)


def rope_eager(x, pos, theta=10000.0):
    """The stdlib `rope` layer's math (neox, all channels) in torch."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def cases(prog, quick):
    toks = [1, 256, 32768] if quick else TOKENS
    models = {"llama3-8b": MODELS["llama3-8b"]} if quick else MODELS
    for mname, dims in models.items():
        H, Fd = dims["H"], dims["F"]
        for n in toks:
            yield dict(kernel="rms_norm", model=mname, n=n, layer=prog.specialise("rms_norm", H=H, dtype="bf16"),
                       make=lambda n=n, H=H: [torch.randn(n, H, device="cuda", dtype=torch.bfloat16)],
                       bytes=lambda n=n, H=H: 2 * (2 * n * H + H), eager=rms_eager,
                       library=lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-5))
            yield dict(kernel="add_rms_norm", model=mname, n=n, layer=prog.specialise("add_rms_norm", H=H, dtype="bf16"),
                       make=lambda n=n, H=H: [torch.randn(n, H, device="cuda", dtype=torch.bfloat16) for _ in range(2)],
                       bytes=lambda n=n, H=H: 2 * (4 * n * H + H), eager=add_rms_eager, library=None)
            yield dict(kernel="layer_norm", model=mname, n=n, layer=prog.specialise("layer_norm", H=H, dtype="bf16"),
                       make=lambda n=n, H=H: [torch.randn(n, H, device="cuda", dtype=torch.bfloat16)],
                       bytes=lambda n=n, H=H: 2 * (2 * n * H + 2 * H), eager=ln_eager, library=None)
            yield dict(kernel="swiglu", model=mname, n=n, layer=prog.specialise("swiglu", F=Fd, dtype="bf16"),
                       make=lambda n=n, Fd=Fd: [torch.randn(n, 2 * Fd, device="cuda", dtype=torch.bfloat16)],
                       bytes=lambda n=n, Fd=Fd: 2 * 3 * n * Fd, eager=swiglu_eager, library=None)
    for n in (2048,) if quick else (2048, 32768):   # 32 heads x 128 (Llama-3-8B's q)
        yield dict(kernel="rope", model="llama3-8b", n=n, layer=prog.specialise("rope", D=128, dtype="bf16"),
                   make=lambda n=n: [torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16),
                                     torch.randint(0, 8192, (n,), device="cuda", dtype=torch.int32)],
                   bytes=lambda n=n: 2 * 2 * n * 32 * 128 + 4 * n, eager=rope_eager, library=None, weightless=True)
    for e in (8, 64, 128):
        for k in (2, 8):
            if k > e:
                continue
            n = 32768
            yield dict(kernel=f"moe_route_e{e}_top{k}", model="-", n=n,
                       layer=prog.specialise("moe_route", E=e, k=k, dtype="f32"),
                       make=lambda n=n, e=e: [torch.randn(n, e, device="cuda", dtype=torch.float32)],
                       bytes=lambda n=n, e=e, k=k: 4 * n * e + 8 * n * k, eager=lambda x, k=k: moe_eager(x, k),
                       library=None, weightless=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its cold compiles take minutes)")
    ap.add_argument("--only", default=None, help="run the kernels whose name contains this text")
    ap.add_argument("--ab", action="store_true", help="split rows: also time one block per row (split=1)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    prog = lf.stdlib()
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s (read + write)")
    hdr = f"{'kernel':22s} {'model':10s} {'tokens':>6s} {'ours us':>9s} {'TB/s':>6s} {'graph us':>9s} " \
          f"{'eager us':>9s} {'compile us':>10s} {'lib us':>8s} {'ours/compile':>12s} {'ours/copy':>9s} {'x eager':>8s}"
    print(hdr)
    rows = []
    # the shapes with speed targets first (TARGETS.md), so a cut-short run still has them
    ordered = sorted(cases(prog, a.quick), key=lambda c: (not (c["n"] == 32768 and c["model"] in ("llama3-8b", "-")),
                                                           c["model"] != "llama3-8b", c["n"]))
    for c in ordered:
        if a.only and a.only not in c["kernel"]:
            continue
        mod = LayerModule(c["layer"], device="cuda")
        if "eps" in mod._scalars:
            mod._scalars["eps"] = 1e-5
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_()
        nbytes = c["bytes"]()
        sets = max(1, min(8, math.ceil(200e6 / nbytes)))  # rotate inputs past the 50 MB L2
        inputs = [c["make"]() for _ in range(sets)]
        weights = [getattr(mod, a) for a in mod._weights.values()]
        it = {"i": 0}

        def nxt():
            it["i"] = (it["i"] + 1) % sets
            return inputs[it["i"]]

        ours = bench(lambda: mod(*nxt()))
        # CUDA graph of the same call: kernel time without host cost
        mod(*inputs[0])
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                mod(*inputs[0])
        graph = bench(g.replay) / 10
        eager_fn = c["eager"]
        eager = bench(lambda: eager_fn(*nxt(), *weights))
        comp = float("nan")
        if not a.no_compile:
            torch._dynamo.reset()  # a fresh compile per shape (no recompile limit, no fallback to eager)
            cf = torch.compile(eager_fn, dynamic=False)
            for s in inputs:
                cf(*s, *weights)
            comp = bench(lambda: cf(*nxt(), *weights))
        lib = bench(lambda: c["library"](*nxt(), *weights)) if c["library"] else float("nan")
        row = dict(kernel=c["kernel"], model=c["model"], tokens=c["n"], ours_s=ours, graph_s=graph, eager_s=eager,
                   compile_s=comp, library_s=lib, bytes=nbytes, ours_TBps=nbytes / ours / 1e12,
                   ceiling_TBps=ceiling / 1e12, ours_over_compile=comp / ours, ours_over_copy=(nbytes / ours) / ceiling,
                   speedup_vs_eager=eager / ours)
        rows.append(row)
        print(f"{c['kernel']:22s} {c['model']:10s} {c['n']:6d} {ours*1e6:9.1f} {row['ours_TBps']:6.2f} {graph*1e6:9.1f} "
              f"{eager*1e6:9.1f} {comp*1e6:10.1f} {lib*1e6:8.1f} {row['ours_over_compile']:12.2f} "
              f"{row['ours_over_copy']:9.2f} {row['speedup_vs_eager']:8.1f}", flush=True)
        one = row_per_block(c["layer"], mod) if a.ab else None
        if one is not None:
            t1 = bench(lambda: one(*nxt()))
            again = bench(lambda: mod(*nxt()))   # ours again, after: drift between the two
            row.update(row_per_block_s=t1, ours_again_s=again)
            print(f"{'  1 block per row':22s} {'':10s} {'':6s} {t1*1e6:9.1f} {nbytes / t1 / 1e12:6.2f}   "
                  f"(split again {again*1e6:.1f} us; split/1-per-row time {ours / t1:.3f}, {again / t1:.3f})",
                  flush=True)
            one = None
        inputs = g = None  # free the buffers before the next shape
        torch.cuda.empty_cache()
    if a.json:
        write_results(a.json, ceiling, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
