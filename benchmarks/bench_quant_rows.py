"""The fused per-token FP8 row kernels (dsl/stdlib/quant.lf rms_norm_fp8_per_token, swiglu_fp8_per_token) beside
the two-kernel path they replace (the stdlib rms_norm / swiglu kernel writing bf16, then
runtime/quant.quantize_fp8_rows_cuda(group=0) reading it back) and torch (eager; compiled unless --no-compile),
on one GPU, in one run. CUDA-graph replays; per case the fewest bytes the fused op must move (x read, e4m3
codes and f32 scales written, gamma) against the copy ceiling measured in the same run.

    python -m benchmarks.bench_quant_rows [--tokens 1,16,128,1024,8192] [--only swiglu] [--no-compile]
"""
from __future__ import annotations

import argparse

import torch

import layerforge as lf
from layerforge.runtime.layers import LayerModule
from layerforge.runtime.quant import quantize_fp8_rows_cuda

from .bench_gemv import graph_time
from .bench_rows import copy_ceiling

CASES = [("rms_norm_fp8_per_token", "rms_norm", "H", 4096), ("rms_norm_fp8_per_token", "rms_norm", "H", 8192),
         ("swiglu_fp8_per_token", "swiglu", "F", 14336)]


def torch_fused(name, eps=1e-6):
    """The op in torch: f32 row math, one scale a token (amax / 448), e4m3 codes."""
    def quant(v):
        amax = v.abs().amax(-1, keepdim=True)
        s = amax * (1.0 / 448.0)
        q = torch.where(amax > 0, v * (448.0 / amax), torch.zeros_like(v)).clamp(-448, 448)
        return q.to(torch.float8_e4m3fn), s.squeeze(-1)

    if name.startswith("rms"):
        def f(x, g):
            xf = x.float()
            return quant(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * g.float())
    else:
        def f(gu):
            g, u = gu.float().chunk(2, -1)
            return quant(torch.nn.functional.silu(g) * u)
    return f


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,16,128,1024,8192")
    ap.add_argument("--only", default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    prog = lf.stdlib()
    ceiling = copy_ceiling()
    print(f"{torch.cuda.get_device_name()}  copy ceiling {ceiling / 1e12:.2f} TB/s")
    print(f"{'kernel':24s} {'dim':>6s} {'rows':>5s} {'fused us':>9s} {'2 kernels':>9s} {'eager':>8s} {'compile':>8s} "
          f"{'2k/fused':>8s} {'cmp/fused':>9s} {'of copy':>7s}")
    for name, plain, dim, w in CASES:
        if args.only and args.only not in name:
            continue
        fused = LayerModule(prog.specialise(name, dtype="bf16", **{dim: w}), device="cuda")
        first = LayerModule(prog.specialise(plain, dtype="bf16", **{dim: w}), device="cuda")
        assert fused.kernel_reason is None and first.kernel_reason is None, (fused.kernel_reason, first.kernel_reason)
        ref = torch_fused(name)
        comp = None if args.no_compile else torch.compile(ref, dynamic=True)
        for rows in [int(t) for t in args.tokens.split(",")]:
            cols = 2 * w if dim == "F" else w
            x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            q = torch.empty(rows, w, device="cuda", dtype=torch.float8_e4m3fn)
            s = torch.empty(rows, device="cuda", dtype=torch.float32)
            mid = torch.empty(rows, w, device="cuda", dtype=torch.bfloat16)
            if dim == "H":
                g = getattr(fused, fused._weights["gamma"])
                with torch.no_grad():
                    getattr(first, first._weights["w"]).copy_(g)
                run_fused = lambda: fused(x, out=(q, s))                                   # noqa: E731
                run_two = lambda: quantize_fp8_rows_cuda(first(x, out=(mid,)), group=0)        # noqa: E731
                args_t = (x, g)
            else:
                run_fused = lambda: fused(x, out=(q, s))                                   # noqa: E731
                run_two = lambda: quantize_fp8_rows_cuda(first(x, out=(mid,)), group=0)        # noqa: E731
                args_t = (x,)
            # the same codes from both paths (the two-kernel one rounds the normed value to bf16 first:
            # codes may differ by one step where that rounding crosses a midpoint)
            qf, sf = fused(x)
            q2, s2 = run_two()
            assert torch.allclose(sf, s2.view(-1), rtol=1e-2), (sf, s2)
            t_f = graph_time(run_fused)
            t_2 = graph_time(run_two)
            t_e = graph_time(lambda: ref(*args_t))
            t_c = float("nan")
            if comp is not None:
                comp(*args_t)
                t_c = graph_time(lambda: comp(*args_t))
            moved = rows * cols * 2 + rows * w + rows * 4 + (w * 2 if dim == "H" else 0)
            print(f"{name:24s} {w:6d} {rows:5d} {t_f * 1e6:9.1f} {t_2 * 1e6:9.1f} {t_e * 1e6:8.1f} {t_c * 1e6:8.1f} "
                  f"{t_2 / t_f:7.2f}x {t_c / t_f:8.2f}x {moved / t_f / ceiling:7.2f}")


if __name__ == "__main__":
    main()
