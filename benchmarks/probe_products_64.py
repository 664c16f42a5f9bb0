"""Products at decode-batch rows (64 by default) on cold weights, by the ways torch can ask cuBLAS for them:
y = x W^T (F.linear, what a model calls), (W x^T)^T (the swapped product: cuBLAS's heuristics see M = N of W),
and the swapped product written into a preallocated [N, M] buffer. Mamba2-2.7B's in_proj / out_proj and the
Llama-3-8B shapes; the copy ceiling beside. Times are graph replays cycling through weight copies (none in L2).

    python -m benchmarks.probe_products_64 [--rows 64] [--only Mamba2]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .bench_gemv import cold_copies, graph_time
from .bench_rows import copy_ceiling

SHAPES = [("Mamba2 in", 10576, 2560), ("Mamba2 out", 2560, 5120), ("8B qkv", 6144, 4096), ("8B o", 4096, 4096),
          ("8B gate/up", 28672, 4096), ("8B down", 4096, 14336)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64")
    ap.add_argument("--only", default=None)
    a = ap.parse_args(argv)
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}  copy ceiling: {ceiling / 1e12:.2f} TB/s")
    print(f"{'shape':12s} {'M':>4s} {'linear us':>9s} {'swapped us':>10s} {'swapped out= us':>15s} {'copy us':>7s} "
          f"{'best of copy':>12s}")
    for name, n, k in SHAPES:
        if a.only and a.only not in name:
            continue
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        ws = [w] + [w.clone() for _ in range(cold_copies(2 * n * k) - 1)]
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            yt = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)
            lin = graph_time([lambda w=w: F.linear(x, w) for w in ws])
            sw = graph_time([lambda w=w: torch.mm(w, x.t()).t() for w in ws])
            swo = graph_time([lambda w=w: torch.mm(w, x.t(), out=yt) for w in ws])
            copy = 2 * n * k / ceiling
            print(f"{name:12s} {m:>4d} {lin * 1e6:>9.1f} {sw * 1e6:>10.1f} {swo * 1e6:>15.1f} {copy * 1e6:>7.1f} "
                  f"{copy / min(lin, sw, swo):>12.2f}", flush=True)


if __name__ == "__main__":
    main()
