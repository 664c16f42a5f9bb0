"""Each decode launch's device time, ours beside SDPA's, per (batch, context): what `bench_attention --only
decode` times end to end (host, L2 flushed), split into its kernels (torch.profiler's device records, L2 warm).
Llama-3-8B heads (GQA 32/8, D 128, bf16), a paged cache of 16-token pages in random order; SDPA over
contiguous K/V (on an H200 torch picks cuDNN's flash kernel, plus its reduction where it splits).

    python -m benchmarks.bench_decode_kernels [--cases 1x4096,16x1024] [--pages]
    ncu -k "regex:tcdecode|fprop" --launch-skip 2 --launch-count 2 python -m benchmarks.bench_decode_kernels --once 16x1024

--pages: our kernel again over 16-token pages in order, 64-token pages, 256-token pages in order (the
paging's cost). --once: three calls of each and nothing timed, for a profiler. benchmarks/NOTES.md ("Decode
under cuDNN's kernel") reads these tables.
"""
from __future__ import annotations

import argparse
import sys

CASES = ((1, 4096), (1, 32768), (8, 4096), (16, 1024), (64, 512), (64, 4096))
HQ, HKV, D = 32, 8, 128


def _case(text: str) -> tuple[int, int]:
    try:
        batch, ctx = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxCONTEXT (e.g. 16x1024)") from None
    if batch < 1 or ctx < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and context must be positive")
    return batch, ctx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=lambda s: [_case(c) for c in s.split(",")], default=list(CASES),
                    help="comma-separated BATCHxCONTEXT (default: bench_attention's decode cases)")
    ap.add_argument("--pages", action="store_true", help="also over pages in order and of 64 / 256 tokens")
    ap.add_argument("--once", type=_case, default=None, metavar="BATCHxCONTEXT",
                    help="three calls of ours and SDPA at one case, nothing timed (for ncu)")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_decode_kernels: needs a CUDA device", file=sys.stderr)
        return 2
    import torch.nn.functional as F

    import layerforge as lf
    from layerforge.runtime.attention import PagedAttention

    from .bench_decode_tiles import inputs
    from .bench_rows import kernel_times
    layer = lf.stdlib().specialise("llama_attn", Hq=HQ, Hkv=HKV, D=D, dtype="bf16")

    def sdpa_call(q, batch, ctx):
        kk = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
        vv = torch.randn_like(kk)
        return lambda: F.scaled_dot_product_attention(q.view(batch, HQ, 1, D), kk, vv, enable_gqa=True)

    if a.once:
        batch, ctx = a.once
        attn = PagedAttention(layer, page_size=16)
        args = inputs(batch, ctx, HQ, HKV, D)
        out = torch.empty_like(args[0])
        sdpa = sdpa_call(args[0], batch, ctx)
        for _ in range(3):
            attn(*args, max_kv_len=ctx, out=out)
            sdpa()
        torch.cuda.synchronize()
        return 0
    print(f"device: {torch.cuda.get_device_name()}; us a call per kernel (torch.profiler, L2 warm)")
    layouts = [(16, False)] + ([(16, True), (64, False), (256, True)] if a.pages else [])
    for batch, ctx in a.cases:
        print(f"== {batch} x {ctx}")
        for page, in_order in layouts:
            attn = PagedAttention(layer, page_size=page)
            args = inputs(batch, ctx, HQ, HKV, D, page, in_order)
            out = torch.empty_like(args[0])
            rows = kernel_times(lambda: attn(*args, max_kv_len=ctx, out=out), calls=30, warmup=3)
            label = f"ours, page {page}{' in order' if in_order else ''}"
            print(f"  {label:22s} {sum(r[1] for r in rows):8.2f}  " + "  ".join(f"{us:.2f} {n}" for n, us, _ in rows))
        rows = kernel_times(sdpa_call(args[0], batch, ctx), calls=30, warmup=3)
        print(f"  {'SDPA':22s} {sum(r[1] for r in rows):8.2f}  " + "  ".join(f"{us:.2f} {n[:60]}" for n, us, _ in rows))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
