"""What the document mask's work costs its prefill: the kernel as built beside copies of it whose listed tiles all
take the full-tile path (no mask test, no bits: the numbers are wrong on purpose, only the time is read).

    python -m benchmarks.probe_doc_bound [--batch 4] [--seq 4096]

Rows (B H32/8 D128 bf16, documents of 128-1024 tokens as bench_masks builds them, its block mask made once, outside
the timing): the mma.sync prefill (the documents' default before sm_90) and the wgmma one (their default on sm_90:
persistent, its key terms staged), plain and persistent (LAYERFORGE_WGMMA_PERSIST), with and without the key terms
staged in shared memory (LAYERFORGE_WGMMA_KEY_STAGE), each as built ("as built") and with every listed tile full
("all full"); the time left between the two is what the partial tiles' mask work costs. The per-score test (the
mask beside every score, LAYERFORGE_*_MASK_BITS=0) is timed too. Flex's time beside, same run."""
from __future__ import annotations

import argparse
import contextlib
import os

import torch

import layerforge as lf
from layerforge.codegen import attention_tc as TC
from layerforge.codegen import attention_wgmma as W
from layerforge.runtime.attention import PagedAttention

from .bench_masks import SRC, problem, table_case
from .bench_rows import bench

FULL = {"wgmma": ("if (full_tile) {", "if (true) {"), "tc": ("const bool full = tile_full && k0 + BN <= k_end;",
                                                          "const bool full = true;")}


@contextlib.contextmanager
def patched(kind: str, full: bool, env: dict[str, str]):
    """Plans rendered with every listed tile full (full) under the environment's switches (env)."""
    mod = W if kind == "wgmma" else TC
    render, saved = mod._render, {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def edited(plan):
        src = render(plan)
        old, new = FULL[kind]
        assert old in src, f"{plan.key}: no {old!r} in its source"
        return src.replace(old, new)
    if full:
        mod._render = edited
    try:
        yield
    finally:
        mod._render = render
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    a = ap.parse_args(argv)
    B, S, hq, hkv, d, page = a.batch, a.seq, 32, 8, 128, 64
    layer = lf.loads(SRC, "masks.lf", with_stdlib=False).specialise("document", Hq=hq, Hkv=hkv, D=d, dtype="bf16")
    q, kc, vc, table, lens, cu, (qq, kk, vv) = problem(B, S, hq, hkv, d, page, seed=0)
    extra, mod, _ = table_case("document", B, S, hq)
    flex = torch.compile(flex_attention, dynamic=False)
    bm_flex = create_block_mask(mod, B, None, S, S, device="cuda")
    t_flex = bench(lambda: flex(qq, kk, vv, block_mask=bm_flex, enable_gqa=True))
    print(f"{torch.cuda.get_device_name()}  document B{B} H{hq}/{hkv} S{S} D{d} bf16; Flex {t_flex * 1e3:.3f} ms")
    print(f"{'kernel':>34} {'as built ms':>11} {'all full ms':>11} {'mask work':>9}  key")
    rows = [("tc", "mma.sync, bits", {"LAYERFORGE_TC_MASK_BITS": "1"}),
            ("tc", "mma.sync, per score", {"LAYERFORGE_TC_MASK_BITS": "0"}),
            ("wgmma", "wgmma, bits", {"LAYERFORGE_WGMMA_MASK_BITS": "1", "LAYERFORGE_WGMMA_PERSIST": "0",
                                      "LAYERFORGE_WGMMA_KEY_STAGE": "0"}),
            ("wgmma", "wgmma persist, bits", {"LAYERFORGE_WGMMA_MASK_BITS": "1", "LAYERFORGE_WGMMA_PERSIST": "1",
                                              "LAYERFORGE_WGMMA_KEY_STAGE": "0"}),
            ("wgmma", "wgmma, bits, keys staged", {"LAYERFORGE_WGMMA_MASK_BITS": "1", "LAYERFORGE_WGMMA_PERSIST": "0",
                                                   "LAYERFORGE_WGMMA_KEY_STAGE": "1"}),
            ("wgmma", "wgmma persist, keys staged", {"LAYERFORGE_WGMMA_MASK_BITS": "1", "LAYERFORGE_WGMMA_PERSIST": "1",
                                                     "LAYERFORGE_WGMMA_KEY_STAGE": "1"}),
            ("wgmma", "wgmma, per score", {"LAYERFORGE_WGMMA_MASK_BITS": "0", "LAYERFORGE_WGMMA_PERSIST": "0"})]
    for kind, label, env in rows:
        times, key = [], None
        for full in (False, True):
            with patched(kind, full, env):
                attn = PagedAttention(layer, page_size=page, prefill=kind)
                out = torch.empty_like(q)
                call = dict(max_q_len=S, max_kv_len=S, extra=extra)
                bm = attn.block_mask(lens, cu, **call)
                run = lambda: attn.prefill(q, kc, vc, table, lens, cu, out=out, block_mask=bm, **call)  # noqa: E731
                run()
                times.append(bench(run))
                key = key or attn.tc_plan("prefill").key.split("_p64_")[1]
        print(f"{label:>34} {times[0] * 1e3:>11.3f} {times[1] * 1e3:>11.3f} {1 - times[1] / times[0]:>9.0%}  {key}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
