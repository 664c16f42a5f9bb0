"""MLA decode (DeepSeek-V2/V3 absorbed form) over a paged latent cache, beside torch, in one run.

    python -m benchmarks.bench_mla [--heads 128] [--page 64] [--json out.json] [--no-compile]

Per (batch, context): ours (runtime/mla_decode.py; eager launch and CUDA-graph replay) beside
the same absorbed decode in torch on a contiguous latent [B, S, 576]: matmuls + softmax
(eager and torch.compile) and SDPA (one latent "head", enable_gqa; the backend that takes
Dqk 576 != Dv 512). Bytes: the latent rows the step must read once, B * S * 576 * 2. FLOPs:
B * H * S * (576 + 512) * 2. At 128 heads a row is worth 128 * 1088 * 2 / 1152 = 242 FLOP per
byte, past an H200's ~700 TFLOP/s / 4.25 TB/s = 165: the step is bound by the tensor cores,
not memory; the `bound` column is the larger of bytes / copy ceiling and FLOPs / --peak.
"ours us" and "graph us" are triton's do_bench medians (an L2 clear between calls) of an eager call and of a
one-call graph, and the copy / bound columns take the better; "b2b us" is the step back to back (runtime/tune's
graph_time: a graph of 20 calls, the median of its replays, as the product benchmarks time), with its own
fraction of copy: at 128 heads the kernel holds an H100 at its 700 W power cap when run back to back, and the two
ways of timing differ by up to 10 % (benchmarks/NOTES.md, "The MLA decode's TMA copies hinted")."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from layerforge.codegen.mla import pair_serves
from layerforge.runtime.mla_decode import MLADecode
from layerforge.runtime.tune import graph_time

from .bench_rows import bench, copy_ceiling, write_results

L, R = 512, 64


def absorbed_torch(q, kv, scale):
    """q [B, H, L + R], kv [B, S, L + R] -> [B, H, L]."""
    s = torch.matmul(q, kv.transpose(1, 2)).float() * scale
    return torch.matmul(torch.softmax(s, dim=-1).to(kv.dtype), kv[..., :L])


def decode_inputs(batch, ctx, heads, page):
    """A decode step's tensors on the GPU: a paged latent cache of `batch` sequences of `ctx` rows (pages in a random
    order), their page table, lengths and q_seq, q [batch, heads, L + R] and out [batch, heads, L]."""
    per = -(-ctx // page)
    cache = torch.randn(batch * per, page, L + R, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(batch * per, device="cuda").to(torch.int32).view(batch, per)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q_seq = torch.arange(batch, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, L + R, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(batch, heads, L, device="cuda", dtype=torch.bfloat16)
    return cache, table, lens, q_seq, q, out


def case(batch, ctx, heads, page, compiled, keys=None, kernel=None, overlap=False):
    """overlap: False, True (the wgmma kernel's overlap schedule, "-ov"), "seesaw" (its seesaw schedule, "-ss"),
    "sync" (its default schedule with bar.sync on both sides of the consumers' hand-offs, "-sh"), "unpaired" (a CTA
    a head block, each copying every key tile, hinted L2 evict_first: "-up") or "noevict" (that without the hints,
    "-ne"); "-ns": O not staged. The default pairs a token's two head blocks where its splits are long enough
    (MLADecode.plan_for)."""
    unpaired = overlap == "unpaired"
    seesaw, sync, noevict, overlap = overlap == "seesaw", overlap == "sync", overlap == "noevict", overlap is True
    scale = 192 ** -0.5
    per = -(-ctx // page)
    cache, table, lens, q_seq, q, out = decode_inputs(batch, ctx, heads, page)
    dec = MLADecode(num_heads=heads, latent_dim=L, rope_dim=R, page_size=page, keys=keys, kernel=kernel,
                    overlap=overlap, seesaw=seesaw or None, sync_handoff=True if sync else None,
                    evict=False if noevict else None, pair=False if unpaired else None)
    run = lambda: dec(q, cache, table, lens, q_seq, scale=scale, max_kv_len=ctx, out=out)  # noqa: E731
    run()
    splits = dec.splits(q.device, batch, ctx)
    ours = bench(run)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    graph = bench(g.replay)
    b2b = graph_time(run)
    kv = cache[table.long()].view(batch, per * page, L + R)[:, :ctx].contiguous()
    run()
    torch.testing.assert_close(out.float(), absorbed_torch(q, kv, scale).float(), rtol=2e-2, atol=2e-2)
    plan = dec.plan_for(ctx, splits)   # the plan the calls ran
    r = dict(batch=batch, ctx=ctx, heads=heads, page=page, keys=plan.keys,
             kernel=plan.kernel + ("-ov" if overlap else "-ss" if plan.seesaw else "")
             + ("-sh" if plan.sync_handoff else "") + ("-ne" if plan.tma and not plan.pair and not plan.evict else "")
             + ("-up" if plan.evict and pair_serves(plan.kernel, plan.overlap, plan.seesaw, plan.fine, heads, page)
                else "")
             + ("-ns" if plan.kernel == "wgmma" and not plan.staged_out else ""),
             splits=splits,
             ours_s=ours, graph_s=graph, b2b_s=b2b,
             bytes=batch * ctx * (L + R) * 2, flops=2 * batch * heads * ctx * (L + R + L))
    r["eager_s"] = bench(lambda: absorbed_torch(q, kv, scale))
    r["compile_s"] = None
    if compiled:
        fn = torch.compile(absorbed_torch)
        fn(q, kv, scale)
        r["compile_s"] = bench(lambda: fn(q, kv, scale))
    try:
        qq, kk, vv = q[:, :, None], kv[:, None], kv[:, None, :, :L]
        r["sdpa_s"] = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, scale=scale, enable_gqa=True))
    except RuntimeError as e:
        print(f"  SDPA: {str(e).splitlines()[0][:100]}")
        r["sdpa_s"] = None
    return r


def handoff_ab(a, ceiling) -> int:
    """The default hand-offs and the synced ones in turns (one card's clocks drift between runs: 64 x 4096 read 186.6
    and 154.0 us in two calls of one session on one H100), each time the best of eager and graph launches."""
    import statistics
    times = {}
    for _ in range(a.handoff_ab):
        for batch in (64, 32):
            for ov in (False, "sync"):
                r = case(batch, 4096, a.heads, a.page, False, None, "wgmma", ov)
                times.setdefault((batch, r["kernel"], r["bytes"]), []).append(min(r["ours_s"], r["graph_s"]))
                torch.cuda.empty_cache()
    for (batch, kernel, nbytes), ts in times.items():
        med = statistics.median(ts)
        print(f"{batch} seqs x 4096 {kernel.replace('wgmma', 'wg'):8s} median {med * 1e6:7.1f} us  "
              f"({nbytes / med / ceiling:.2f} of copy)  each: "
              + " ".join(f"{t * 1e6:.1f}" for t in ts))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--peak", type=float, default=700e12, help="dense bf16 FLOP/s for the bound (H200 cuBLAS: ~700e12)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--handoff-ab", type=int, default=0, metavar="ROUNDS",
                    help="only the A/B of the wgmma kernel's hand-offs: the default's (arrive + sync) and the synced "
                         "ones (\"wg-sh\") taking turns ROUNDS times at 64 and 32 x 4096, then each one's median")
    a = ap.parse_args(argv)
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s  "
          f"peak for the bound: {a.peak / 1e12:.0f} TFLOP/s")
    print(f"{f'MLA decode H{a.heads} L{L}+{R} p{a.page}':26s} {'splits':>6s} {'ours us':>8s} {'graph us':>9s} "
          f"{'TB/s':>6s} {'TFLOP/s':>8s} {'ours/copy':>9s} {'b2b us':>7s} {'b2b/copy':>8s} {'bound us':>9s} "
          f"{'ours/bound':>10s} {'eager us':>9s} "
          f"{'compile us':>10s} {'SDPA us':>8s} {'eager/ours':>10s}")
    if a.handoff_ab:
        return handoff_ab(a, ceiling)
    rows = []
    # the first cases again with the wgmma kernel's head blocks unpaired ("wg-up"), its overlap ("wg-ov") and seesaw
    # ("wg-ss") schedules, its synced hand-offs ("wg-sh"), its copies unpaired without the L2 hints ("wg-ne") and on
    # the mma.sync kernel (the sm_80 one; on
    # sm_90 the default is the wgmma kernel): the A/B; "n32" its 32-key tiles
    for batch, ctx, keys, kernel, ov in [(64, 4096, None, None, False), (64, 4096, None, "wgmma", "unpaired"),
                                         (32, 4096, None, "wgmma", "unpaired"), (16, 4096, None, "wgmma", "unpaired"),
                                         (64, 1024, None, "wgmma", "unpaired"), (64, 4096, None, "wgmma", "noevict"),
                                         (32, 4096, None, "wgmma", "noevict"), (1, 32768, None, "wgmma", "noevict"),
                                         (64, 4096, None, "wgmma", "sync"),
                                         (32, 4096, None, "wgmma", "sync"), (1, 32768, None, "wgmma", "sync"),
                                         (64, 4096, None, "wgmma", True),
                                         (64, 4096, None, "wgmma", "seesaw"), (32, 4096, None, "wgmma", "seesaw"),
                                         (8, 4096, None, "wgmma", "seesaw"), (1, 32768, None, "wgmma", "seesaw"),
                                         (64, 4096, 64, "mma", False), (64, 4096, 32, "mma", False),
                                         (32, 4096, None, None, False), (32, 4096, None, "wgmma", True),
                                         (32, 4096, 64, "mma", False), (16, 4096, None, None, False),
                                         (8, 4096, None, None, False), (8, 4096, 64, "mma", False),
                                         (1, 4096, None, None, False), (1, 32768, None, None, False),
                                         (64, 1024, None, None, False), (16, 1024, None, None, False)]:
        r = case(batch, ctx, a.heads, a.page, not a.no_compile and kernel is None, keys, kernel, ov)
        best = min(r["ours_s"], r["graph_s"])
        bound = max(r["bytes"] / ceiling, r["flops"] / a.peak)
        r.update(ours_TBps=r["bytes"] / best / 1e12, ours_TFLOPs=r["flops"] / best / 1e12,
                 ours_over_copy=r["bytes"] / best / ceiling, bound_s=bound, ours_over_bound=bound / best,
                 eager_over_ours=r["eager_s"] / best)
        rows.append(r)
        fmt = lambda x: f"{x * 1e6:.1f}" if x else "-"  # noqa: E731
        label = f"{batch} seqs x {ctx} n{r['keys']} {r['kernel'].replace('wgmma', 'wg')}"
        r["b2b_over_copy"] = r["bytes"] / r["b2b_s"] / ceiling
        print(f"{label:26s} {r['splits']:6d} {r['ours_s'] * 1e6:8.1f} {r['graph_s'] * 1e6:9.1f} "
              f"{r['ours_TBps']:6.2f} {r['ours_TFLOPs']:8.0f} {r['ours_over_copy']:9.2f} {r['b2b_s'] * 1e6:7.1f} "
              f"{r['b2b_over_copy']:8.2f} {bound * 1e6:9.1f} "
              f"{r['ours_over_bound']:10.2f} {fmt(r['eager_s']):>9s} {fmt(r['compile_s']):>10s} "
              f"{fmt(r['sdpa_s']):>8s} {r['eager_over_ours']:10.2f}", flush=True)
        torch.cuda.empty_cache()
    if a.json:
        write_results(a.json, ceiling, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
