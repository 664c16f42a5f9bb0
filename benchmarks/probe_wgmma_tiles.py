"""The wgmma prefill at one shape under several tile configurations (ring depths, key tiles, K/V rings),
beside the planner's choice and cuDNN, one run. A probe for choosing tile candidates: prints, asserts nothing.

    python -m benchmarks.probe_wgmma_tiles --d 64 [--hq 16 --hkv 16 --batch 4 --seq 4096 --name gpt2_attn]
    python -m benchmarks.probe_wgmma_tiles --d 128 --hkv 4 --bn 128 --stages 3 --rings 0 --persist 0,1,2
"""
from __future__ import annotations

import argparse

import torch

import layerforge as lf
from layerforge.codegen.attention_wgmma import SHARED_LIMIT, WGMMAAttentionPlan, WGTileConfig

from .bench_attention import prefill_case


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="gpt2_attn")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--bn", default="128,64", help="key tiles to try")
    ap.add_argument("--stages", default="2,3,4,5,6", help="ring depths to try")
    ap.add_argument("--rings", default="0,1", help="K and V in one ring (0), in two (1)")
    ap.add_argument("--consumers", default="2", help="consumer warpgroups (2, 3)")
    ap.add_argument("--overlap", default="1", help="the overlap schedule (1), the plain one (0)")
    ap.add_argument("--persist", default="0", help="one row block a CTA (0), the persistent kernel over a work queue in "
                                                   "the sectioned order (1), the same with each next Q early (2)")
    a = ap.parse_args(argv)
    ints = lambda x: [int(v) for v in x.split(",")]  # noqa: E731
    hkv = a.hkv or a.hq
    prog = lf.stdlib()
    layer = prog.specialise(a.name, Hq=a.hq, Hkv=hkv, D=a.d, dtype="bf16")
    r = prefill_case(prog, a.name, a.batch, a.seq, a.hq, hkv, a.d, prefill="wgmma")
    print(f"device: {torch.cuda.get_device_name()}  {a.name} B{a.batch} H{a.hq}/{hkv} S{a.seq} D{a.d}  "
          f"cuDNN {r['cudnn_s'] * 1e3:.3f} ms  flash {r['flash_s'] * 1e3:.3f}  Flex {(r['flex_s'] or 0) * 1e3:.3f}")
    print(f"  {'auto ' + r['tiles']:28s} {r['ours_s'] * 1e3:7.3f} ms {r['flops'] / r['ours_s'] / 1e12:5.0f} TFLOP/s "
          f"{r['cudnn_s'] / r['ours_s']:5.2f}x cuDNN", flush=True)
    base = dict(tma=True, fold=True, rope_step=True)   # the last two where the block takes them
    for consumers, persist in ((c, p) for c in ints(a.consumers) for p in ints(a.persist)):
        queue = dict(persist=True, q_next=persist == 2, lpt=128) if persist else {}
        for overlap in ints(a.overlap):
            for bn in ints(a.bn):
                for stages in ints(a.stages):
                    for rings in ints(a.rings):
                        c = WGTileConfig(bn=bn, stages=stages, kv_rings=bool(rings), consumers=consumers,
                                         overlap=bool(overlap), **base, **queue)
                        if WGMMAAttentionPlan(layer=layer, page_size=64, tiles=c).shared_bytes > SHARED_LIMIT:
                            continue
                        try:
                            t = prefill_case(prog, a.name, a.batch, a.seq, a.hq, hkv, a.d, tiles=c, prefill="wgmma",
                                             peers=False)
                        except Exception as e:   # noqa: BLE001 - a configuration that does not build
                            print(f"  {c.label:28s} {str(e).splitlines()[0][:80]}")
                            continue
                        print(f"  {c.label:28s} {t['ours_s'] * 1e3:7.3f} ms {t['flops'] / t['ours_s'] / 1e12:5.0f} "
                              f"TFLOP/s {r['cudnn_s'] / t['ours_s']:5.2f}x cuDNN", flush=True)
                        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
