"""Mamba2's SSD kernels (runtime/ssd.py) beside transformers' torch path and the roofline, same run,
same card, bf16, Mamba2-2.7B sizes (d_model 2560, expand 2: H 80 heads of P 64, N 128, G 1, chunk 256).

    python -m benchmarks.bench_ssd [--cases prefill:1x8192,prefill:8x2048,decode:64] [--json out.json]
    python -m benchmarks.bench_ssd --cpu-smoke        # tiny shapes on the CPU references: the script runs
    python -m benchmarks.bench_ssd --kernels ...      # also each launch's own time (torch.profiler, CUPTI)
    ncu ... python -m benchmarks.bench_ssd --once ... # each case's kernels once, nothing timed (for a profiler)

Columns:
- ours: ssd_scan (chunk state, state passing, chunk scan: three launches) with D and dt_bias and the
  final state, as the mixer calls it; ssd_state_update for decode; graph-replayed (launch cost out);
- transformers: transformers' Mamba2 torch formulas (mamba2_chunk_scan: segment sums and einsums;
  mamba2_selective_state_update for decode), eager, on the same inputs; where the whole sequence
  runs out of memory, over consecutive spans with the state carried (initial_states), said in the row;
- roofline: max(bytes / copy, flops / bf16 GEMM peak), both ceilings measured in the same run.
  Bytes are the fewest the op must move: x, dt, B, C read and y written (bf16), the final state
  written (f32); decode reads and writes the f32 state. FLOPs are the chunked form's: C B^T once a
  group (its causal half), the masked product with x, the chunk states and the carried-state
  term, 2 a multiply-add; "of roof" is the roofline's time over ours (goal >= 0.5);
- decode: "of copy" is the copy ceiling's time for the step's bytes over ours (goal >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

DIMS = dict(heads=80, head_dim=64, groups=1, state=128)
CHUNK = 256
CASES = "prefill:1x8192,prefill:8x2048,decode:64"


def inputs(bt: int, length: int, dims: dict, device, dtype=torch.bfloat16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, p, gr, n = dims["heads"], dims["head_dim"], dims["groups"], dims["state"]
    step = torch.exp(torch.rand(h, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    t = dict(x=torch.randn(bt, length, h, p, generator=g), dt=torch.randn(bt, length, h, generator=g) * 0.5,
             B=torch.randn(bt, length, gr, n, generator=g), C=torch.randn(bt, length, gr, n, generator=g))
    out = {k: v.to(dtype).to(device) for k, v in t.items()}
    out.update(A=-torch.arange(1, h + 1, dtype=torch.float32).to(device), D=torch.ones(h, device=device),
               dt_bias=(step + torch.log(-torch.expm1(-step))).to(device))
    return out


def prefill_bytes_flops(bt: int, length: int, dims: dict, chunk: int = CHUNK) -> tuple[int, int]:
    h, p, g, n = dims["heads"], dims["head_dim"], dims["groups"], dims["state"]
    tokens = bt * length
    nbytes = tokens * (2 * h * p * 2 + h * 2 + 2 * g * n * 2) + bt * h * p * n * 4
    chunks = bt * -(-length // chunk)
    flops = chunks * (g * chunk * chunk * n + h * (chunk * chunk * p + 4 * chunk * p * n))
    return nbytes, flops


def decode_bytes(bt: int, dims: dict) -> int:
    h, p, g, n = dims["heads"], dims["head_dim"], dims["groups"], dims["state"]
    return bt * (2 * h * p * n * 4 + 2 * h * p * 2 + h * 2 + 2 * g * n * 2)


def hf_functions():
    from transformers.models.mamba2 import modeling_mamba2 as m
    return m.mamba2_chunk_scan, m.mamba2_selective_state_update


def run_prefill(inp: dict, chunk: int):
    from layerforge.runtime.ssd import ssd_scan
    return lambda: ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"], dt_bias=inp["dt_bias"],
                            chunk_size=chunk, return_final_state=True)


def hf_prefill(inp: dict, chunk: int):
    scan, _ = hf_functions()
    return lambda: scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=chunk, D=inp["D"],
                        dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True)


def hf_prefill_in_pieces(inp: dict, chunk: int, pieces: int):
    """transformers' scan over `pieces` consecutive spans of the sequence (whole chunks each), the
    final state of one the initial state of the next: the same recurrence, in memory that fits
    (its torch path materialises a [b, chunks, Q, Q, heads, N] product: 80 GB at 1 x 8192)."""
    scan, _ = hf_functions()
    length = inp["x"].shape[1]
    chunks = -(-length // chunk)
    span = -(-chunks // pieces) * chunk
    cut = lambda k, lo: inp[k][:, lo:lo + span]

    def run():
        state = None
        for lo in range(0, length, span):
            _, state = scan(cut("x", lo), cut("dt", lo), inp["A"], cut("B", lo), cut("C", lo), chunk_size=chunk,
                            D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, initial_states=state,
                            return_final_states=True)
        return state
    return run


def hf_prefill_time(bench, inp: dict, chunk: int) -> tuple[float, int]:
    """(seconds, pieces): the whole sequence at once, or in the fewest spans that fit in memory
    (bench_rows.in_pieces; at most one chunk a span)."""
    from .bench_rows import in_pieces
    return in_pieces(lambda pieces: bench(hf_prefill(inp, chunk) if pieces == 1
                                          else hf_prefill_in_pieces(inp, chunk, pieces), 500),
                     -(-inp["x"].shape[1] // chunk))


def step_inputs(bt: int, dims: dict, device, dtype=torch.bfloat16) -> dict:
    inp = inputs(bt, 1, dims, device, dtype)
    step = {k: (v[:, 0] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    step["state"] = torch.randn(bt, dims["heads"], dims["head_dim"], dims["state"], device=device)
    return step


def run_decode(s: dict):
    from layerforge.runtime.ssd import ssd_state_update
    return lambda: ssd_state_update(s["state"], s["x"], s["dt"], s["A"], s["B"], s["C"], D=s["D"],
                                    dt_bias=s["dt_bias"])


def hf_decode(s: dict):
    _, update = hf_functions()
    p, n = s["x"].shape[-1], s["B"].shape[-1]
    dt = s["dt"][:, :, None].expand(-1, -1, p)
    A = s["A"][:, None, None].expand(-1, p, n)
    D = s["D"][:, None].expand(-1, p)
    bias = s["dt_bias"][:, None].expand(-1, p)
    return lambda: update(s["state"], s["x"], dt, A, s["B"], s["C"], D, z=None, dt_bias=bias, dt_softplus=True)


def gemm_peak() -> float:
    from .bench_rows import bench
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / bench(lambda: a @ b, 300)


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    out = []
    for c in text.split(","):
        mode, _, size = c.partition(":")
        if mode == "prefill":
            bt, _, length = size.partition("x")
            out.append((mode, int(bt), int(length)))
        elif mode == "decode":
            out.append((mode, int(size), 1))
        else:
            raise SystemExit(f"unknown case {c!r}: prefill:BxL or decode:B")
    return out


def cpu_smoke() -> int:
    """Tiny shapes on the CPU: our references beside transformers' formulas (times and the largest
    difference), so a GPU run does not discover a broken script."""
    dims = dict(heads=4, head_dim=16, groups=2, state=16)
    rows = []
    for mode, bt, length in [("prefill", 2, 100), ("decode", 8, 1)]:
        if mode == "prefill":
            inp = inputs(bt, length, dims, "cpu", torch.float32)
            ours, theirs = run_prefill(inp, 32), hf_prefill(inp, 32)
            diff = (ours()[0] - theirs()[0]).abs().max().item()
        else:
            s = step_inputs(bt, dims, "cpu", torch.float32)
            s2 = dict(s, state=s["state"].clone())
            ours, theirs = run_decode(s), hf_decode(s2)
            diff = (ours() - theirs()).abs().max().item()
        times = []
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append(dict(mode=mode, batch=bt, length=length, ours_s=times[0], transformers_s=times[1], max_diff=diff))
        print(f"{mode} {bt} x {length}: ours {times[0] * 1e3:.2f} ms (CPU reference), transformers "
              f"{times[1] * 1e3:.2f} ms, max |diff| {diff:.2e}")
    return 0 if all(r["max_diff"] < 1e-3 for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--chunk", type=int, default=CHUNK)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-transformers", action="store_true", help="skip the eager peer (slow at 8 x 2048)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="print each launch's own time (torch.profiler)")
    ap.add_argument("--once", action="store_true", help="run each case's kernels once, time nothing (for ncu)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        return cpu_smoke()
    if args.once:
        for mode, bt, length in parse_cases(args.cases):
            (run_prefill(inputs(bt, length, DIMS, "cuda"), args.chunk) if mode == "prefill"
             else run_decode(step_inputs(bt, DIMS, "cuda")))()
        torch.cuda.synchronize()
        return 0
    from .bench_gemv import graph_time
    from .bench_rows import bench, copy_ceiling, kernel_times
    copy_bw, peak = copy_ceiling(), gemm_peak()
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {peak / 1e12:.0f} TFLOP/s")
    rows = []
    for mode, bt, length in parse_cases(args.cases):
        if mode == "prefill":
            inp = inputs(bt, length, DIMS, "cuda")
            ours = graph_time(run_prefill(inp, args.chunk), calls=3, replays=10)
            theirs, pieces = (None, 1) if args.no_transformers else hf_prefill_time(bench, inp, args.chunk)
            nbytes, flops = prefill_bytes_flops(bt, length, DIMS, args.chunk)
            roof = max(nbytes / copy_bw, flops / peak)
            row = dict(mode=mode, batch=bt, length=length, ours_s=ours, transformers_s=theirs, bytes=nbytes,
                       transformers_pieces=pieces, flops=flops, roofline_s=roof, of_roof=roof / ours, tflops=flops / ours / 1e12)
            print(f"prefill {bt} x {length}: ours {ours * 1e6:.1f} us ({row['tflops']:.0f} TFLOP/s, "
                  f"{row['of_roof']:.2f} of roof {roof * 1e6:.1f} us)"
                  + (f", transformers {theirs * 1e6:.0f} us = {theirs / ours:.1f} x ours" if theirs else "")
                  + (f" (transformers over {pieces} spans carrying the state: whole, it runs out of memory)"
                     if pieces > 1 else ""))
            if args.kernels:
                for name, us, n in kernel_times(run_prefill(inp, args.chunk)):
                    print(f"    {us:8.1f} us  x{n}  {name[:100]}")
        else:
            s = step_inputs(bt, DIMS, "cuda")
            ours = graph_time(run_decode(s), calls=20, replays=10)
            theirs = None if args.no_transformers else bench(hf_decode(dict(s, state=s["state"].clone())), 300)
            nbytes = decode_bytes(bt, DIMS)
            row = dict(mode=mode, batch=bt, length=1, ours_s=ours, transformers_s=theirs, bytes=nbytes,
                       of_copy=nbytes / copy_bw / ours)
            print(f"decode batch {bt}: ours {ours * 1e6:.1f} us ({row['of_copy']:.2f} of copy on {nbytes / 1e6:.1f} MB)"
                  + (f", transformers {theirs * 1e6:.0f} us = {theirs / ours:.1f} x ours" if theirs else ""))
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": copy_bw / 1e12,
                       "gemm_TFLOPs": peak / 1e12, "dims": DIMS, "chunk": args.chunk, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
