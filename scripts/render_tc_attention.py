"""Render a representative set of tensor-core attention plans (codegen/attention_tc.py) into a folder, one
file per plan key, so that two trees' generated sources can be diffed (CPU only, nothing compiled):

    python scripts/render_tc_attention.py /tmp/before        # on one commit
    python scripts/render_tc_attention.py /tmp/after         # on the other
    diff -r /tmp/before /tmp/after

(--layers / --dims narrow the set, e.g. --layers llama_attn --dims 128.)

The set: llama / gemma2 (soft-capping) / bloom (ALiBi) / t5 (a distance table) blocks, bf16 and f16, head dims
64 / 128 / 256 (and the padded 80 / 96 over a bf16/f16 cache), decode and prefill with every tile candidate,
over a bf16/f16 cache and an e4m3 one (the raw widening, the multiply, and the hardware cvt on sm_90),
sm_80 and sm_90, decode with and without heads_first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import layerforge as lf
from layerforge.codegen.attention_tc import TCAttentionPlan, fp8_cvt_applies, tile_candidates
from layerforge.codegen.row import LoweringError

FP8 = "fp8_e4m3"
LAYERS = ("llama_attn", "gemma2_attn", "bloom_attn", "t5_attn")
KV_FORMS = ((None, False, False), (FP8, True, False), (FP8, False, False), (FP8, False, True))  # kv, raw, cvt


def plans(prog, layers=LAYERS, dims=(64, 80, 96, 128, 256)):
    for name in layers:
        for dtype in ("bf16", "f16"):
            for d in dims:
                kw = dict(Hq=32, Hkv=8, D=d, dtype=dtype)
                if name == "t5_attn":
                    kw["NB"] = 32
                layer = prog.specialise(name, **kw)
                for arch in ("sm_80", "sm_90"):
                    for kv, raw, cvt in KV_FORMS:
                        if cvt and not fp8_cvt_applies(arch, kv):
                            continue
                        for mode in ("decode", "prefill"):
                            for tiles in tile_candidates(mode, d, 4, d, kv):
                                for hf in ((False, True) if mode == "decode" else (False,)):
                                    yield TCAttentionPlan(layer=layer, arch=arch, mode=mode, tiles=tiles, kv_dtype=kv,
                                                          fp8_raw=raw, fp8_cvt=cvt, heads_first=hf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the sources (<plan key>.cu)")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated stdlib attention blocks")
    p.add_argument("--dims", default="64,80,96,128,256", help="comma-separated head dims")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    n = skipped = 0
    for plan in plans(lf.stdlib(), tuple(a.layers.split(",")), tuple(int(d) for d in a.dims.split(","))):
        try:
            src = plan.source()
        except LoweringError:   # e.g. an e4m3 cache at a padded head dim
            skipped += 1
            continue
        (a.out / f"{plan.key}.cu").write_text(src)
        n += 1
    print(f"{n} sources in {a.out} ({skipped} plans not specialisable)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
