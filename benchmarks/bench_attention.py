"""Attention over a paged KV cache beside SDPA, in one run on one card.

    python -m benchmarks.bench_attention [--json out.json] [--only decode|prefill] [--prefill-set main]

Decode: one new token per sequence against its paged cache, ours (tensor-core and CUDA-core
kernels) beside SDPA on the same K/V laid out contiguously ([B, Hkv, S, D], GQA through
enable_gqa) and the copy ceiling. Bytes are the K and V the step must read, each once. The
fp8 rows (tc-fp8, simt-fp8) read an e4m3 cache (PagedKVCache(kv_dtype="fp8_e4m3")): half the
bytes; "x bf16" is the bf16 row's time over theirs (same kernel kind, same shape).
Prefill: causal attention over whole prompts, ours (ragged form, K/V read through the page
table; on sm_90 both the wgmma kernel and the mma.sync one) beside SDPA's flash and cuDNN
backends and FlexAttention (torch.compile'd, causal block mask built outside the timing) on
[B, H, S, D] tensors; for the blocks that rotate q in the kernel (llama_attn, mistral_attn) a second line adds
to cuDNN's time the rotation of q the peers are spared (torch.compile'd RoPE). FLOPs count the visible half of
the causal score matrix:
4 * B * Hq * S^2 * D / 2. --prefill-set main: only the default tiles of each shape.
--wgmma-overlap: on sm_90 each shape's default wgmma row is followed by one planned under
LAYERFORGE_WGMMA_OVERLAP=1 (WGTileConfig.overlap, tiles labelled ...ov), in the same process."""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

import layerforge as lf
from layerforge.codegen.attention_tc import TileConfig
from layerforge.runtime.attention import PagedAttention

from .bench_rows import bench, copy_ceiling, write_results


def decode_case(prog, batch, ctx, kernel, hq=32, hkv=8, d=128, page=16, kv_dtype=None, tiles=None):
    layer = prog.specialise("llama_attn", Hq=hq, Hkv=hkv, D=d, dtype="bf16")
    attn = PagedAttention(layer, page_size=page, kernel=kernel, kv_dtype=kv_dtype,
                          tiles={"decode": tiles} if tiles else None)
    pages_per = ctx // page
    total = batch * pages_per
    kc = torch.randn(total, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    scales = {}
    if kv_dtype:   # e4m3 values of about the same spread, scales of one per KV head
        kc, vc = (16 * kc).to(torch.float8_e4m3fn), (16 * vc).to(torch.float8_e4m3fn)
        scales = dict(k_scale=torch.full((hkv,), 1 / 16, device="cuda"), v_scale=torch.full((hkv,), 1 / 16, device="cuda"))
    table = torch.randperm(total, device="cuda", dtype=torch.int64).to(torch.int32).view(batch, pages_per)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    # a decode step of every sequence in order: no q_seq / q_pos (token t is sequence t, at its last position)
    out = torch.empty_like(q)
    ours = bench(lambda: attn(q, kc, vc, table, lens, max_kv_len=ctx, out=out, **scales))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        attn(q, kc, vc, table, lens, max_kv_len=ctx, out=out, **scales)
    graph = bench(g.replay)
    kk = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    qq = q.view(batch, hq, 1, d)
    sdpa = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True))
    nbytes = 2 * batch * ctx * hkv * d * kc.element_size()
    return dict(kind="decode", kernel=kernel, kv_dtype=kv_dtype, batch=batch, ctx=ctx, ours_s=ours, graph_s=graph,
                sdpa_s=sdpa, bytes=nbytes)


@contextlib.contextmanager
def env_switch_set(name: str, on: bool | str | None):
    """The switch `name` (an environment variable) set to `on` inside the block (None: left as it is; a string: that
    value, for a whole-number setting such as LAYERFORGE_WGMMA_POLY_EXP), restored after.
    Set (on not None), a block that returns without any plan having read the switch (codegen.plan.env_switch) is an
    error naming it: a misspelt or unrelated switch would measure the same kernel twice."""
    from layerforge.codegen.plan import switch_read, switch_set
    with switch_set(name, on):
        yield
    if on is not None and not switch_read(name):
        raise SystemExit(f"{name}: no kernel plan read this switch (misspelt, or not a switch of the kernels "
                         f"measured here?)")


def ab_settings(ab: str) -> list[tuple[str, bool | str]]:
    """--ab-switch's NAME (0, then 1) or NAME=V,V... (those values, in turn) as (name, setting) pairs."""
    switch, _, values = ab.partition("=")
    return [(switch, v) for v in (values.split(",") if values else [False, True])]


def wgmma_overlap(on: bool | None):
    """LAYERFORGE_WGMMA_OVERLAP set to `on` inside the block (None: left as it is), restored after."""
    return env_switch_set("LAYERFORGE_WGMMA_OVERLAP", on)


def prefill_case(prog, name, batch, seq, hq, hkv, d=128, page=64, tiles=None, prefill=None, peers=True,
                 overlap=None, dv=None, consts=None, switch=None):
    """overlap: plan the wgmma prefill with LAYERFORGE_WGMMA_OVERLAP=1 (True) or 0 (False); None:
    as the environment says. dv: the value head dim of a block that declares one (dims Dv);
    consts: the block's constants (its softmax scale ...). switch: (name, on) of another
    switch (an environment variable read at plan time), set as overlap is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dv = dv or d
    layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=d, dtype="bf16", **({"Dv": dv} if dv != d else {}),
                            **(consts or {}))
    attn = PagedAttention(layer, page_size=page, tiles={"prefill": tiles} if tiles else None, prefill=prefill)
    with wgmma_overlap(overlap), (env_switch_set(*switch) if switch else contextlib.nullcontext()):
        attn.tc_plan("prefill")   # the module keeps this plan
    q = torch.randn(batch * seq, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(batch * seq // page, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(batch * seq // page, page, hkv, dv, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(batch * seq // page, dtype=torch.int32, device="cuda").view(batch, seq // page)
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device="cuda")
    out = q.new_empty(batch * seq, hq, dv)
    ours = bench(lambda: attn.prefill(q, kc, vc, table, lens, cu, max_q_len=seq, max_kv_len=seq, out=out))
    qq = q.view(batch, seq, hq, d).transpose(1, 2)
    kk = kc.view(batch, seq, hkv, d).transpose(1, 2)
    vv = vc.view(batch, seq, hkv, dv).transpose(1, 2)
    scale = float(consts["softmax_scale"]) if consts and "softmax_scale" in consts else None
    res = dict(kind="prefill", block=name, batch=batch, seq=seq, hq=hq, hkv=hkv, d=d, dv=dv, ours_s=ours,
               kernel=attn.prefill_kernel, tiles=attn.tc_plan("prefill").config.label,
               flops=2 * batch * hq * seq * seq * (d + dv) / 2, flash_s=None, cudnn_s=None, flex_s=None)
    if not peers:
        return res
    res["sdpa_s"] = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=hq != hkv,
                                                                 scale=scale))   # torch's own choice of backend
    for label, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                res[f"{label}_s"] = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                                                   enable_gqa=hq != hkv, scale=scale))
        except RuntimeError as e:   # a backend that does not take this case
            print(f"  SDPA {label}: {str(e).splitlines()[0][:100]}")
            res[f"{label}_s"] = None
    try:
        res["flex_s"] = flex_causal(qq, kk, vv, hq != hkv)
    except Exception as e:   # noqa: BLE001 - a shape Flex does not take
        print(f"  Flex: {str(e).splitlines()[0][:100]}")
    res["rope_s"] = rope_peer(qq) if name in ROPE_BLOCKS else None
    return res


ROPE_BLOCKS = ("llama_attn", "mistral_attn")   # rotate q in the kernel (K is rotated when appended to the cache)


def rope_peer(q) -> float:
    """The rotation of q the peers are spared (they are handed q as it is): NeoX-style RoPE over q [B, H, S, D] as
    transformers applies it, torch.compile'd into one kernel, from tables made outside the timing."""
    _, _, S, D = q.shape
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=q.device).float() / D))
    ang = torch.arange(S, device=q.device).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(q.dtype), torch.cat([ang, ang], -1).sin().to(q.dtype)

    def rotate(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin
    rot = torch.compile(rotate, dynamic=False)
    return bench(lambda: rot(q))


def flex_causal(q, k, v, gqa: bool) -> float:
    """FlexAttention, causal, compiled for this shape (a fresh compile per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    B, _, S, _ = q.shape
    bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device="cuda")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=gqa))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["decode", "prefill"], default=None)
    ap.add_argument("--prefill-set", choices=["all", "main"], default="all",
                    help="main: the default tiles of each shape only (no alternative tile shapes)")
    ab = ap.add_mutually_exclusive_group()
    ab.add_argument("--wgmma-overlap", action="store_true",
                    help="on sm_90, each default wgmma prefill row again with the overlap schedule "
                         "(LAYERFORGE_WGMMA_OVERLAP=1), side by side")
    ab.add_argument("--ab-switch", action="append", default=None, metavar="NAME[=V,V...]",
                    help="on sm_90, each default wgmma prefill row planned with the switch NAME=0, then NAME=1 (e.g. "
                         "LAYERFORGE_WGMMA_KV_RINGS), side by side; NAME=V,V...: with those values, in turn (e.g. "
                         "LAYERFORGE_WGMMA_POLY_EXP=0,2,4). Repeatable: each switch's settings in turn, one after "
                         "the other, the peers timed once a shape")
    ap.add_argument("--no-peers", action="store_true",
                    help="prefill: our kernels only, no SDPA / Flex / RoPE peer (a profiler's run: ncu -k ...)")
    ap.add_argument("--prefill-only", default=None,
                    help="comma-separated substrings: the prefill rows whose label holds one (e.g. 'D256,H32/8')")
    a = ap.parse_args(argv)
    prog = lf.stdlib()
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    rows = []
    if a.only in (None, "decode"):
        print(f"{'decode GQA 32/8 D128':24s} {'ours us':>8s} {'TB/s':>6s} {'graph us':>9s} {'SDPA us':>8s} "
              f"{'SDPA TB/s':>9s} {'ours/copy':>9s} {'SDPA/ours':>9s} {'x bf16':>7s}")
        # fp8: the default tiles, and (64 x 4096) 4 stages of e4m3 tiles (half the bytes in flight per stage)
        fp8_s4 = TileConfig(wm=1, wn=4, mt=1, bnw=16, stages=4, min_blocks=2, qreg=False)
        for batch, ctx in [(64, 4096), (1, 4096), (8, 4096), (1, 32768), (16, 1024), (64, 512)]:
            variants = [("tc", None, None), ("simt", None, None), ("tc", "fp8_e4m3", None), ("simt", "fp8_e4m3", None)]
            if (batch, ctx) == (64, 4096):
                variants.append(("tc", "fp8_e4m3", fp8_s4))
            base = {}
            for kernel, kv_dtype, tiles in variants:
                r = decode_case(prog, batch, ctx, kernel, kv_dtype=kv_dtype, tiles=tiles)
                best = min(r["ours_s"], r["graph_s"])
                base.setdefault(kernel, best)   # the bf16 row comes first
                r.update(ours_TBps=r["bytes"] / best / 1e12, sdpa_TBps=r["bytes"] / r["sdpa_s"] / 1e12,
                         ours_over_copy=r["bytes"] / best / ceiling, sdpa_over_ours=r["sdpa_s"] / best,
                         over_bf16=base[kernel] / best, tiles=tiles.label if tiles else None)
                rows.append(r)
                label = f"{batch} seqs x {ctx} {kernel}" + ("-fp8" if kv_dtype else "") + (f" {tiles.label}" if tiles else "")
                print(f"{label:24s} {r['ours_s']*1e6:8.1f} {r['ours_TBps']:6.2f} "
                      f"{r['graph_s']*1e6:9.1f} {r['sdpa_s']*1e6:8.1f} {r['sdpa_TBps']:9.2f} "
                      f"{r['ours_over_copy']:9.2f} {r['sdpa_over_ours']:9.2f} {r['over_bf16']:7.2f}", flush=True)
                torch.cuda.empty_cache()
    if a.only in (None, "prefill"):
        print(f"\n{'causal prefill bf16 (tile: auto = chosen by the planner)':60s} {'ours ms':>8s} {'TFLOP/s':>8s} {'flash ms':>9s} {'cuDNN ms':>9s} "
              f"{'Flex ms':>9s} {'ours/flash':>10s} {'ours/cuDNN':>10s} {'ours/Flex':>10s}")
        # on sm_90 each shape's default tiles run on both kernels (wgmma, then mma.sync), the
        # peers measured once per shape (with the first)
        # (--wgmma-overlap: the wgmma kernel twice, without and with the overlap schedule)
        hopper = torch.cuda.get_device_capability() == (9, 0)
        # (--ab-switch NAME: with NAME=0, then NAME=1)
        kernels = ((("wgmma", False, None), ("wgmma", True, None)) if a.wgmma_overlap else
                   tuple(("wgmma", None, setting) for ab in a.ab_switch for setting in ab_settings(ab))
                   if a.ab_switch else (("wgmma", None, None),))
        kernels += () if a.ab_switch else (("tc", None, None),)   # (an A/B run times the wgmma kernel only)
        kernels = kernels if hopper else ((None, None, None),)
        # the default (the first tile of tile_candidates that compiles without spills) beside
        # other tile shapes, forced whether they spill or not: 64-key tiles at once or in
        # softmax steps of 32 keys (k32), the S loop not unrolled (u1), 48-key tiles
        tile = dict(wm=4, wn=1, mt=2, stages=2, min_blocks=2, qreg=False)
        alts = [TileConfig(bnw=64, **tile), TileConfig(bnw=64, sunroll=1, **tile),
                TileConfig(bnw=64, ksub=32, **tile), TileConfig(bnw=48, **tile)]
        cases = [
                ("gpt2_attn", 4, 4096, 32, 32, 128, None)] + [("gpt2_attn", 4, 4096, 32, 32, 128, t) for t in alts] + [
                ("llama_attn", 4, 4096, 32, 8, 128, None)] + [("llama_attn", 4, 4096, 32, 8, 128, t) for t in alts[:3]] + [
                # the same GQA 32/8 without RoPE: the math SDPA's backends do (llama_attn rotates q in the kernel,
                # the peers are handed q as it is)
                ("gpt2_attn", 4, 4096, 32, 8, 128, None),
                ("gpt2_attn", 1, 1024, 32, 32, 128, None),
                ("gpt2_attn", 4, 4096, 16, 16, 64, None), ("gpt2_attn", 4, 4096, 16, 16, 64,
                                                         TileConfig(wm=4, wn=1, mt=2, bnw=64, stages=3, min_blocks=2, sunroll=1)),
                ("gpt2_attn", 2, 4096, 16, 16, 256, None)]
        if a.prefill_set == "main":
            cases = [c for c in cases if c[-1] is None]
        if a.prefill_only:
            cases = [c for c in cases if any(w in f"{c[0]} B{c[1]} H{c[3]}/{c[4]} S{c[2]} D{c[5]}"
                                             for w in a.prefill_only.split(","))]
        fmt = lambda x, f="9.2f": format(x, f) if x is not None else f"{'-':>{f.split('.')[0]}s}"  # noqa: E731
        for name, batch, seq, hq, hkv, d, tiles in cases:
            peers = None
            for kernel, overlap, switch in kernels if tiles is None else ((None, None, None),):
                r = prefill_case(prog, name, batch, seq, hq, hkv, d, tiles=tiles, prefill=kernel,
                                 peers=peers is None and not a.no_peers, overlap=overlap, switch=switch)
                if peers is None:
                    peers = {k: r.get(k) for k in ("flash_s", "cudnn_s", "flex_s", "rope_s")}
                r.update(peers)
                fl, cd, fx = peers["flash_s"], peers["cudnn_s"], peers["flex_s"]
                r.update(ours_TFLOPs=r["flops"] / r["ours_s"] / 1e12,
                         ours_over_flash=fl / r["ours_s"] if fl else None, ours_over_cudnn=cd / r["ours_s"] if cd else None,
                         ours_over_flex=fx / r["ours_s"] if fx else None)
                rows.append(r)
                label = f"{name} B{batch} H{hq}/{hkv} S{seq} D{d} {r['kernel']} {r['tiles']}" + ("" if tiles else " (auto)")
                print(f"{label:60s} {r['ours_s']*1e3:8.2f} {r['ours_TFLOPs']:8.0f} "
                      f"{fmt(fl and fl * 1e3)} {fmt(cd and cd * 1e3)} {fmt(fx and fx * 1e3)} {fmt(r['ours_over_flash'], '10.2f')} "
                      f"{fmt(r['ours_over_cudnn'], '10.2f')} {fmt(r['ours_over_flex'], '10.2f')}", flush=True)
                if peers["rope_s"] and cd:   # the layer's work: the peer rotates q first, ours inside the kernel
                    r["ours_over_cudnn_rope"] = (cd + peers["rope_s"]) / r["ours_s"]
                    note = f"  (cuDNN + q rotated by torch.compile first: {peers['rope_s'] * 1e3:.3f} ms)"
                    print(f"{note:60s}"
                          f" {'':8s} {'':8s} {'':9s} {(cd + peers['rope_s']) * 1e3:9.2f} {'':9s} {'':10s} "
                          f"{r['ours_over_cudnn_rope']:10.2f}", flush=True)
                torch.cuda.empty_cache()
    if a.json:
        write_results(a.json, ceiling, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
