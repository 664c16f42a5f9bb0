"""Attention at head dims without a 64/128/256 specialisation (Phi-3 and GPT-NeoX-20B's 96, 80,
160, 192) and DeepSeek's MLA prefill (q/k 192, values 128, 128 heads), on the mma.sync kernels
(padded rows) and the Hopper wgmma kernel (its native swizzle, and 128-byte rows padded: "w128"; each with TMA tiles, "t", where the
planner does not take them),
beside SDPA's flash and cuDNN backends and FlexAttention (prefill) and SDPA on contiguous K/V
(decode), with D128 on the same kernels as the yardstick, one run.

    python -m benchmarks.bench_head_dims [--dims 80,96,128,160,192] [--mla] [--no-decode] [--tiles]

Prefill: causal, B4 H32 S4096 (H16 past D128), ours through the page table (page 64); --tiles:
every wgmma tile candidate too. MLA: B1 H128 S4096 and B4 H128 S1024 (DeepSeek-V3's heads and
softmax scale). Decode: 8 and 64 sequences x 4096 keys, GQA 32/8, page 16, eager and graph replay;
bytes are K and V once.
"""
from __future__ import annotations

import argparse

import torch

import layerforge as lf

from .bench_attention import decode_case, prefill_case
from .bench_rows import copy_ceiling


def _row(label, r, peers):
    f = lambda t: f"{t * 1e3:9.2f}" if t else f"{'-':>9s}"  # noqa: E731
    g = lambda t: f"{t / r['ours_s']:9.2f}" if t else f"{'-':>9s}"  # noqa: E731
    print(f"{label:44s} {r['kernel']:>6s} {r['ours_s'] * 1e3:8.2f} {r['flops'] / r['ours_s'] / 1e12:8.0f} "
          f"{f(peers['flash_s'])} {f(peers['cudnn_s'])} {f(peers['flex_s'])} "
          f"{g(peers['flash_s'])} {g(peers['cudnn_s'])} {g(peers['flex_s'])} {f(peers.get('sdpa_s'))}", flush=True)


def _prefill_rows(prog, name, batch, seq, hq, d, dv=None, consts=None, tiles=False):
    """Our kernels at one shape: mma.sync, then on sm_90 the wgmma kernel (its planner's choice;
    with tiles, every candidate, and its 128-byte padded rows where the native swizzle is
    narrower), the peers measured once (with the first row)."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, native_swizzle, tile_candidates
    kw = dict(dv=dv, consts=consts)
    runs = [("tc", None)]
    if torch.cuda.get_device_capability() == (9, 0):
        runs.append(("wgmma", None))
        cands = tile_candidates(d, dv or d)
        if tiles:
            runs += [("wgmma", c) for c in cands]
        if native_swizzle(d, dv or d) != 128:   # TMA at the narrow swizzle (asked for); padded rows with and without
            c0 = cands[0]
            runs.append(("wgmma", WGTileConfig(bn=c0.bn, stages=c0.stages, overlap=True, tma=True)))
            c = tile_candidates(-(-d // 64) * 64, -(-(dv or d) // 64) * 64)[0]   # the tile shape of the padded dims
            runs.append(("wgmma", WGTileConfig(bn=c.bn, stages=c.stages, swizzle=128)))
            runs.append(("wgmma", WGTileConfig(bn=c.bn, stages=c.stages, swizzle=128, overlap=True, tma=True)))
    peers = None
    for kernel, t in runs:
        try:
            r = prefill_case(prog, name, batch, seq, hq, hq, d, prefill=kernel, tiles=t, peers=peers is None, **kw)
        except Exception as e:   # noqa: BLE001 - a tile shape that does not fit: say so, go on
            print(f"  {kernel} {t.label if t else ''}: {str(e).splitlines()[0][:120]}")
            continue
        peers = peers or r
        _row(f"{name} B{batch} H{hq} S{seq} D{d}" + (f"/{dv}" if dv else "") + f" {r['tiles']}", r, peers)
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="80,96,128,160,192")
    ap.add_argument("--mla", action="store_true", help="the MLA prefill rows (q/k 192, values 128, 128 heads)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--tiles", action="store_true", help="every wgmma tile candidate")
    a = ap.parse_args(argv)
    prog = lf.stdlib()
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    dims = [int(d) for d in a.dims.split(",")] if a.dims else []
    print(f"{'causal prefill bf16':44s} {'kernel':>6s} {'ours ms':>8s} {'TFLOP/s':>8s} {'flash ms':>9s} {'cuDNN ms':>9s} "
          f"{'Flex ms':>9s} {'ours/fl':>9s} {'ours/cuDNN':>9s} {'ours/Flex':>9s} {'SDPA ms':>9s}")
    for d in dims:
        _prefill_rows(prog, "gpt2_attn", 4, 4096, 32 if d <= 128 else 16, d, tiles=a.tiles)
    if a.mla:
        from layerforge.runtime.mla import MLA_PREFILL_SOURCE
        mla = lf.loads(MLA_PREFILL_SOURCE, "mla_prefill.lf", with_stdlib=False)
        for batch, seq in ((1, 4096), (4, 1024)):
            _prefill_rows(mla, "mla_prefill", batch, seq, 128, 192, dv=128, consts={"softmax_scale": 192 ** -0.5},
                          tiles=a.tiles)
    if a.no_decode:
        return
    print(f"\n{'decode GQA 32/8':28s} {'ours us':>8s} {'graph us':>9s} {'SDPA us':>8s} {'ours/copy':>9s} {'SDPA/ours':>9s}")
    for d in dims:
        for batch in (8, 64):
            r = decode_case(prog, batch, 4096, "tc", d=d)
            best = min(r["ours_s"], r["graph_s"])
            print(f"{f'{batch} x 4096 D{d}':28s} {r['ours_s'] * 1e6:8.1f} {r['graph_s'] * 1e6:9.1f} {r['sdpa_s'] * 1e6:8.1f} "
                  f"{r['bytes'] / best / ceiling:9.2f} {r['sdpa_s'] / best:9.2f}", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
