"""A/B of the block shapes and memory cache hints of a wide row kernel without reductions
(SwiGLU by default), against torch.compile, in one run on one GPU:

    python -m benchmarks.bench_row_shapes [--layer swiglu] [--widths 28672,14336] [--tokens 32768,4096,16]

Each variant is the generated kernel with a forced (threads per block, blocks per row) shape
(RowPlan tpr/split; split 1 is the row-per-block plan), or the planner's choice with the 16-byte
loads and stores given a cache hint (`__ldg`: the read-only path; `__ldcs` / `__stcs`: evict-first
streaming loads / stores). It is the measurement behind the planner's choice (benchmarks/NOTES.md).
"""
from __future__ import annotations

import argparse
import functools

import torch

from .bench_rows import bench, copy_ceiling, swiglu_eager

LOAD = "        r = *reinterpret_cast<const lf_vec<T, N>*>(p);"
STORE = "    *reinterpret_cast<lf_vec<T, N>*>(p) = v;"
HINTS = {   # name -> (load body, store body); 16-byte vectors only, others unchanged
    "ldg": ("        if constexpr (sizeof(lf_vec<T, N>) == 16) { int4 t = __ldg(reinterpret_cast<const int4*>(p)); "
            "r = *reinterpret_cast<lf_vec<T, N>*>(&t); } else r = *reinterpret_cast<const lf_vec<T, N>*>(p);", None),
    "ldcs": ("        if constexpr (sizeof(lf_vec<T, N>) == 16) { int4 t = __ldcs(reinterpret_cast<const int4*>(p)); "
             "r = *reinterpret_cast<lf_vec<T, N>*>(&t); } else r = *reinterpret_cast<const lf_vec<T, N>*>(p);", None),
    "stcs": (None, "    if constexpr (sizeof(lf_vec<T, N>) == 16) __stcs(reinterpret_cast<int4*>(p), "
                   "*reinterpret_cast<const int4*>(&v)); else *reinterpret_cast<lf_vec<T, N>*>(p) = v;"),
}
HINTS["ldcs+stcs"] = (HINTS["ldcs"][0], HINTS["stcs"][1])


def variant_module(layer, like, *, tpr=None, split=None, hint=None):
    """A module of `layer` whose 16-byte kernel is planned with tpr/split and its loads/stores hinted."""
    from layerforge.runtime import layers as L
    from layerforge.runtime.layers import LayerModule
    mod = LayerModule(layer, device="cuda")
    mod.load_state_dict(like.state_dict())
    orig_plan, orig_compile = L.plan_layer, None
    L.plan_layer = functools.partial(orig_plan, tpr=tpr, split=split)
    from layerforge.runtime import launch
    if hint:
        orig_compile = launch.compile_plan
        load, store = HINTS[hint]

        def hinted(plan, cache=None):
            from layerforge.runtime.cache import default_cache
            from layerforge.runtime.nvrtc import CompileOptions
            src = plan.source()
            if load:
                assert LOAD in src
                src = src.replace(LOAD, load)
            if store:
                assert STORE in src
                src = src.replace(STORE, store)
            return (cache or default_cache()).get_or_compile(src, plan.kernel_name, CompileOptions(plan.arch),
                                                             plan.key + "-" + hint)
        launch.compile_plan = hinted
    try:
        launch_ = mod._launch_for(torch.device("cuda", torch.cuda.current_device()), 16)
    finally:
        L.plan_layer = orig_plan
        if orig_compile:
            launch.compile_plan = orig_compile
    grid = launch_.kernel.abi.grid
    return mod, grid


def main() -> None:
    from layerforge.dsl.program import Program
    from layerforge.runtime.layers import LayerModule
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="swiglu")
    ap.add_argument("--widths", default="28672,14336")
    ap.add_argument("--tokens", default="32768,4096,16")
    ap.add_argument("--hints", action="store_true", help="also time the planner's shape with cache hints")
    ap.add_argument("--shapes", default="128x1,256x1,512x1,128x2,256x2,256x4",
                    help="threads x 16-byte chunks per thread (the row-per-block plan is always timed, as 'row')")
    a = ap.parse_args()
    ceiling = copy_ceiling()
    print(f"{torch.cuda.get_device_name()}  copy {ceiling / 1e12:.2f} TB/s")
    prog = Program.stdlib()
    for F in [int(x) for x in a.widths.split(",")]:
        layer = prog.specialise(a.layer, F=F, dtype="bf16")
        base = LayerModule(layer, device="cuda")
        chunks = F // 8
        for n in [int(x) for x in a.tokens.split(",")]:
            xs = [torch.randn(n, 2 * F, device="cuda", dtype=torch.bfloat16) for _ in range(2 if n >= 4096 else 8)]
            it = iter(range(1 << 62))
            nxt = lambda: xs[next(it) % len(xs)]
            nbytes = 3 * n * F * 2
            torch._dynamo.reset()
            cf = torch.compile(swiglu_eager, dynamic=False)
            for x in xs:
                cf(x)
            comp = bench(lambda: cf(nxt()))
            ours = bench(lambda: base(nxt()))
            print(f"F {F} x {n} tokens: torch.compile {comp * 1e6:.1f} us ({nbytes / comp / ceiling:.2f} of copy); "
                  f"planner {ours * 1e6:.1f} us ({comp / ours:.3f} x compile)", flush=True)
            for shape in ["row", *a.shapes.split(",")]:
                if shape == "row":
                    kw = dict(split=1)
                else:
                    t, c = (int(v) for v in shape.split("x"))
                    s = -(-chunks // (t * c))
                    if s * t * c != chunks and chunks % t:
                        continue   # partial last chunk slots: skip uneven shapes
                    kw = dict(tpr=t, split=s)
                mod, grid = variant_module(layer, base, **kw)
                t_ = bench(lambda: mod(nxt()))
                print(f"   {shape:>7} grid {str(grid):>22}  {t_ * 1e6:9.1f} us  {comp / t_:.3f} x compile", flush=True)
            for hint in HINTS if a.hints else ():
                mod, grid = variant_module(layer, base, hint=hint)
                t_ = bench(lambda: mod(nxt()))
                again = bench(lambda: base(nxt()))
                print(f"   {hint:>9} (planner shape) {t_ * 1e6:9.1f} us  {comp / t_:.3f} x compile "
                      f"(planner again {again * 1e6:.1f})", flush=True)
            xs = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
