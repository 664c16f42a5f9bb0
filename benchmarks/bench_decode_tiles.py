"""Tile shapes of the tensor-core decode kernel against SDPA, per (batch, context): each
candidate shape with the split-KV heuristic and with the best of a few forced part counts,
graph replays (launch cost out), Llama-3-8B heads (GQA 32/8, D 128, bf16, page 16).

    python -m benchmarks.bench_decode_tiles [--cases 64x512,8x4096] [--kv fp8] [--default-only]

"module" is PagedAttention as a model builds it (no forced tile: over an e4m3 cache, grids past the
default tile's one wave take codegen.attention_tc.many_ctas_tile); the first shape after it is the
default (codegen.attention_tc.tile_candidates). A shape with more CTAs
per SM (fewer stages, min_blocks 3-4) or more warps along keys changes how many key tiles are
in flight per SM; this sweep says which one each case wants.

--kv fp8: over an e4m3 cache (per-head scales), with shapes of their own: an e4m3 stage is half
a bf16 one's bytes, so a CTA holds twice the keys in flight for the same shared memory (the
registers, 159-175 a thread at D 128, bound it to 3 CTAs an SM). Beside SDPA on bf16 K/V it
prints the bf16 default's time and "x bf16" (that time over the fp8 cell's).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from layerforge.codegen.attention_tc import TileConfig, tile_candidates
from layerforge.dsl.program import Program
from layerforge.runtime.attention import PagedAttention

from .bench_rows import bench, copy_ceiling

CASES = ((64, 4096), (1, 4096), (8, 4096), (1, 32768), (16, 1024), (64, 512))
SHAPES = (   # (shared memory per CTA at D 128; CTAs per SM the 228 KB allow)
    dict(wm=1, wn=4, mt=1, bnw=16, stages=2, min_blocks=3),   # 70 KB, 3
    dict(wm=1, wn=4, mt=1, bnw=16, stages=2, min_blocks=2),   # 70 KB, 3 (registers for 2)
    dict(wm=1, wn=2, mt=1, bnw=16, stages=3, min_blocks=4),   # 53 KB, 4
    dict(wm=1, wn=2, mt=1, bnw=32, stages=2, min_blocks=3),   # 70 KB, 3
    dict(wm=1, wn=8, mt=1, bnw=16, stages=2, min_blocks=1),   # 135 KB, 1
    dict(wm=1, wn=4, mt=1, bnw=16, stages=5, min_blocks=1),   # 165 KB, 1: 4 tiles in flight
    dict(wm=1, wn=8, mt=1, bnw=16, stages=3, min_blocks=1),   # 200 KB, 1: 2 tiles of 128 keys in flight
    dict(wm=1, wn=4, mt=1, bnw=32, stages=3, min_blocks=1),   # 200 KB, 1
)
FP8_SHAPES = (   # e4m3 stages (shared memory a CTA; CTAs an SM by shared memory and registers, sm_90)
    dict(wm=1, wn=4, mt=1, bnw=16, stages=4, min_blocks=2),   # 68 KB, 3: 3 tiles in flight
    dict(wm=1, wn=4, mt=1, bnw=16, stages=6, min_blocks=2),   # 100 KB, 2: 5 tiles in flight
    dict(wm=1, wn=4, mt=1, bnw=16, stages=8, min_blocks=1),   # 132 KB, 1
    dict(wm=1, wn=4, mt=1, bnw=32, stages=3, min_blocks=2),   # 100 KB, 2: 128-key tiles
    dict(wm=1, wn=4, mt=1, bnw=32, stages=2, min_blocks=2),   # 68 KB, 2 (registers)
    dict(wm=1, wn=4, mt=1, bnw=32, stages=2, min_blocks=3),   # 68 KB, 3 (registers capped at 168: spill-free)
    dict(wm=1, wn=2, mt=1, bnw=16, stages=6, min_blocks=4),   # 52 KB, 4 (64 threads a CTA)
    dict(wm=1, wn=2, mt=1, bnw=16, stages=4, min_blocks=4),   # 36 KB, 6
    dict(wm=1, wn=8, mt=1, bnw=16, stages=3, min_blocks=1),   # 100 KB, 1 (registers)
)
FP8 = "fp8_e4m3"


def inputs(batch, ctx, hq=32, hkv=8, d=128, page=16, in_order=False, kv_dtype=None):
    """(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos) of one decode step over a paged bf16
    cache, its pages in random order (in_order: in order); kv_dtype "fp8_e4m3": an e4m3 cache of
    values about 16 times N(0, 1) (scales of 1/16: see fp8_scales)."""
    pages_per = -(-ctx // page)
    total = batch * pages_per
    kc = torch.randn(total, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    if kv_dtype == FP8:
        kc, vc = (16 * kc).to(torch.float8_e4m3fn), (16 * vc).to(torch.float8_e4m3fn)
    order = torch.arange(total, device="cuda") if in_order else torch.randperm(total, device="cuda")
    table = order.to(torch.int32).view(batch, pages_per)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    q_seq = torch.arange(batch, dtype=torch.int32, device="cuda")
    q_pos = torch.full((batch,), ctx - 1, dtype=torch.int32, device="cuda")
    return q, kc, vc, table, lens, q_seq, q_pos


def fp8_scales(hkv=8):
    """The per-KV-head scales of an `inputs(..., kv_dtype=FP8)` cache."""
    return dict(k_scale=torch.full((hkv,), 1 / 16, device="cuda"), v_scale=torch.full((hkv,), 1 / 16, device="cuda"))


def timed(attn, args, ctx, splits, **scales):
    out = torch.empty_like(args[0])
    run = lambda: attn(*args, max_kv_len=ctx, out=out, num_splits=splits, **scales)
    run()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return bench(g.replay) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=None, help="comma-separated BATCHxCTX, default: bench_attention's decode cases")
    ap.add_argument("--kv", choices=("bf16", "fp8"), default="bf16", help="the cache's storage (fp8: e4m3)")
    ap.add_argument("--default-only", action="store_true",
                    help="only the default shape (an A / B of a switch: run once with it and once without)")
    a = ap.parse_args(argv)
    cases = CASES if not a.cases else tuple(tuple(int(x) for x in c.split("x")) for c in a.cases.split(","))
    kv = FP8 if a.kv == "fp8" else None
    layer = Program.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    default = tile_candidates("decode", 128, 4, kv_dtype=kv)[0]
    shapes = [default] + ([] if a.default_only else [TileConfig(**s) for s in (FP8_SHAPES if kv else SHAPES)])
    shapes = list(dict.fromkeys(shapes))   # (the default may be one of the list)
    scales = fp8_scales() if kv else {}
    bf16 = PagedAttention(layer, page_size=16) if kv else None   # the bf16 default, for "x bf16"
    # the module as a model builds it (no forced tile): the default tile, or, for an e4m3 grid past its one wave,
    # the tile of more, smaller CTAs (codegen/attention_tc.many_ctas_tile)
    mods = {"module": PagedAttention(layer, page_size=16, kv_dtype=kv)}
    for c in shapes:
        try:
            attn = PagedAttention(layer, page_size=16, tiles={"decode": c}, kv_dtype=kv)
            mods[attn.tc_plan("decode").key.split("_tcdecode_")[1]] = attn
        except Exception as e:  # a shape that does not build for this block is reported, not timed
            print(f"# {c.label}: {type(e).__name__}: {e}")
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s; default {default.label}"
          f"{'; e4m3 cache (copy: its bytes)' if kv else ''}")
    print(f"{'batch x ctx':>12} {'SDPA':>7} {'copy':>7}{' bf16 us' if kv else ''}  shape: heuristic us / best forced "
          f"(splits){' x bf16' if kv else ''} ...")
    for batch, ctx in cases:
        args = inputs(batch, ctx, kv_dtype=kv)
        q = args[0]
        kk = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
        vv = torch.randn_like(kk)
        sdpa = bench(lambda: F.scaled_dot_product_attention(q.view(batch, 32, 1, 128), kk, vv, enable_gqa=True)) * 1e6
        floor = 2 * batch * ctx * 8 * 128 * (1 if kv else 2) / ceiling * 1e6
        base = timed(bf16, inputs(batch, ctx), ctx, None) if kv else None
        cells = []
        for label, attn in mods.items():
            auto = timed(attn, args, ctx, None, **scales)
            forced = {s: timed(attn, args, ctx, s, **scales) for s in (1, 2, 4, 8, 16) if s * 64 <= ctx}
            best = min(forced, key=forced.get)
            cells.append(f"{label}: {auto:.1f} / {forced[best]:.1f} ({best})"
                         + (f" {base / min(auto, forced[best]):.2f}x" if kv else ""))
        print(f"{batch:>5} x {ctx:<5} {sdpa:>7.1f} {floor:>7.1f}{f' {base:7.1f}' if kv else ''}  " + " | ".join(cells))


if __name__ == "__main__":
    main()
