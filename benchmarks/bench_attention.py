"""Decode attention over a paged KV cache beside SDPA on contiguous KV and the copy ceiling.

    python -m benchmarks.bench_attention [--json out.json]

Bytes are the K and V the step must read (each once); SDPA reads the same K/V laid out
contiguously ([B, Hkv, S, D], GQA through enable_gqa)."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

from .bench_rows import bench, copy_ceiling, write_results


def case(prog, batch, ctx, hq=32, hkv=8, d=128, page=16, vpl=1):
    layer = prog.specialise("llama_attn", Hq=hq, Hkv=hkv, D=d, dtype="bf16")
    attn = PagedAttention(layer, page_size=page, vectors_per_lane=vpl)
    pages_per = ctx // page
    total = batch * pages_per
    kc = torch.randn(total, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.randperm(total, device="cuda", dtype=torch.int64).to(torch.int32).view(batch, pages_per)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    q_seq = torch.arange(batch, dtype=torch.int32, device="cuda")
    q_pos = torch.full((batch,), ctx - 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ours = bench(lambda: attn(q, kc, vc, table, lens, q_seq, q_pos, max_kv_len=ctx, out=out))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        attn(q, kc, vc, table, lens, q_seq, q_pos, max_kv_len=ctx, out=out)
    graph = bench(g.replay)
    kk = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    qq = q.view(batch, hq, 1, d)
    sdpa = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True))
    nbytes = 2 * batch * ctx * hkv * d * 2
    return dict(batch=batch, ctx=ctx, vpl=vpl, ours_s=ours, graph_s=graph, sdpa_s=sdpa, bytes=nbytes)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    prog = lf.stdlib()
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    print(f"{'decode GQA 32/8 D128':22s} {'ours us':>8s} {'TB/s':>6s} {'graph us':>9s} {'SDPA us':>8s} "
          f"{'SDPA TB/s':>9s} {'ours/copy':>9s} {'ours/SDPA':>9s}")
    rows = []
    for batch, ctx, vpl in [(64, 4096, 1), (64, 4096, 2), (1, 4096, 1), (8, 4096, 1), (8, 4096, 2), (1, 32768, 1),
                            (16, 1024, 1), (64, 512, 1)]:
        r = case(prog, batch, ctx, vpl=vpl)
        best = min(r["ours_s"], r["graph_s"])
        r.update(ours_TBps=r["bytes"] / best / 1e12, sdpa_TBps=r["bytes"] / r["sdpa_s"] / 1e12,
                 ours_over_copy=r["bytes"] / best / ceiling, sdpa_over_ours=r["sdpa_s"] / best)
        rows.append(r)
        print(f"{f'{batch} seqs x {ctx}' + (f' vpl{vpl}' if vpl > 1 else ''):22s} {r['ours_s']*1e6:8.1f} {r['ours_TBps']:6.2f} {r['graph_s']*1e6:9.1f} "
              f"{r['sdpa_s']*1e6:8.1f} {r['sdpa_TBps']:9.2f} {r['ours_over_copy']:9.2f} {r['sdpa_over_ours']:9.2f}",
              flush=True)
        torch.cuda.empty_cache()
    if a.json:
        write_results(a.json, ceiling, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
