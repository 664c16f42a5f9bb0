"""The split-KV count of the tensor-core decode kernel: the heuristic's choice against a sweep,
per (batch, context), graph replays (the launch cost out), Llama-3-8B heads (GQA 32/8, D 128).

    python -m benchmarks.bench_splits [--cases 64x512,16x1024]
"""
from __future__ import annotations

import argparse

from layerforge.dsl.program import Program
from layerforge.runtime.attention import PagedAttention

from .bench_decode_tiles import inputs, timed


def case(attn, batch, ctx, splits):
    return timed(attn, inputs(batch, ctx), ctx, splits) * 1e-6


CASES = ((1, 2048), (1, 4096), (1, 16384), (4, 2048), (8, 2048), (8, 4096), (16, 1024), (32, 2048))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", help="batch x context pairs, comma-separated (default: the list above)")
    a = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in a.cases.split(",")] if a.cases else CASES
    attn = PagedAttention(Program.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), page_size=16)
    print(f"{'batch x ctx':>12} {'heuristic':>12} {'best':>16}  sweep (splits: us)")
    for batch, ctx in cases:
        base = case(attn, batch, ctx, None) * 1e6
        sweep = {s: case(attn, batch, ctx, s) * 1e6 for s in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) if s * 64 <= ctx}
        best = min(sweep, key=sweep.get)
        print(f"{batch:>5} x {ctx:<5} {base:>10.1f}us {best:>4} -> {sweep[best]:>6.1f}us  "
              + " ".join(f"{s}:{t:.1f}" for s, t in sweep.items()))


if __name__ == "__main__":
    main()
