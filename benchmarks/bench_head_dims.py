"""Attention at head dims without a 64/128/256 specialisation (Phi-3 and GPT-NeoX-20B's 96, 80,
160, 192) on the padded tensor-core kernels, beside SDPA's flash and cuDNN backends (prefill) and
SDPA on contiguous K/V (decode), with D128 on the same kernels as the yardstick, one run.

    python -m benchmarks.bench_head_dims [--dims 80,96,128,160,192]

Prefill: causal, B4 H32 S4096 (H16 past D128), ours through the page table (page 64). Decode:
8 and 64 sequences x 4096 keys, GQA 32/8, page 16, eager and graph replay; bytes are K and V once.
"""
from __future__ import annotations

import argparse

import torch

import layerforge as lf

from .bench_attention import decode_case, prefill_case
from .bench_rows import copy_ceiling


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="80,96,128,160,192")
    a = ap.parse_args(argv)
    prog = lf.stdlib()
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    dims = [int(d) for d in a.dims.split(",")]
    print(f"{'causal prefill bf16':40s} {'kernel':>7s} {'ours ms':>8s} {'TFLOP/s':>8s} {'flash ms':>9s} {'cuDNN ms':>9s} "
          f"{'ours/flash':>10s} {'ours/cuDNN':>10s}")
    for d in dims:
        hq = 32 if d <= 128 else 16
        r = prefill_case(prog, "gpt2_attn", 4, 4096, hq, hq, d, prefill="tc" if d not in (64, 128, 256) else None)
        fl, cd = r["flash_s"], r["cudnn_s"]
        f = lambda t: f"{t * 1e3:9.2f}" if t else f"{'-':>9s}"  # noqa: E731
        g = lambda t: f"{t / r['ours_s']:10.2f}" if t else f"{'-':>10s}"  # noqa: E731
        label = f"gpt2_attn B4 H{hq} S4096 D{d} {r['tiles']}"
        print(f"{label:40s} "
              f"{r['kernel']:>7s} {r['ours_s'] * 1e3:8.2f} {r['flops'] / r['ours_s'] / 1e12:8.0f} {f(fl)} {f(cd)} {g(fl)} {g(cd)}",
              flush=True)
        torch.cuda.empty_cache()
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
