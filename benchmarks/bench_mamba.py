"""The Mamba2 mixer (runtime/mamba.Mamba2Mixer) beside transformers' Mamba2Mixer torch path and
beside the roofline, same run, same card, bf16.

    python -m benchmarks.bench_mamba [--prefill 1x8192,8x2048] [--decode 64] [--json out.json]
    python -m benchmarks.bench_mamba --device cpu --dims 64,16,8,16 --prefill 1x40 --decode 2   # smoke run

Dims (--dims H,head_dim,state,heads_per_group): Mamba2-2.7B's by default: hidden 2560, expand 2
(I = 5120 = 80 heads of 64), state 128, one group of B/C, conv 4, chunk 256; random weights.
Columns:
- prefill B x L: ours (the mixer's forward with a state: the conv and SSD kernels, cuBLAS for
  the projections) and transformers' mixer (its torch path: segment-sum SSD, eager), their
  ratio (floor 10 x; where transformers runs out of memory on the whole batch, its time is the
  sum over batch pieces that fit, said beside the row), and "of roofline": the roofline time over ours, the roofline being the
  larger of FLOPs / the bf16 GEMM rate and bytes / the copy rate, both measured in this run
  (FLOPs: the two projections, the SSD's intra-chunk (causal half) and state products; bytes:
  x, the weights, y and the final states once);
- decode batch B: one step (a CUDA graph of 20 steps, launch cost out; the median of three such
  timings, their range in brackets) beside transformers' step (eager), and "of copy": the bytes
  a step must move (every weight once, the conv and SSM states read and written) over ours' time
  against the copy ceiling (goal 0.8).
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

from layerforge.runtime.mamba import Mamba2Mixer, Mamba2MixerConfig

DIMS = (2560, 64, 128, 80)     # hidden, head_dim, state, heads per group (Mamba2-2.7B: 80 heads, 1 group)


def mixer_config(hidden: int, head_dim: int, state: int, heads_per_group: int, groups: int = 1) -> Mamba2MixerConfig:
    inter = 2 * hidden
    heads = inter // head_dim
    return Mamba2MixerConfig(hidden_size=hidden, intermediate_size=inter, num_heads=heads, head_dim=head_dim,
                             state_size=state, n_groups=max(groups, heads // heads_per_group), conv_kernel=4,
                             chunk_size=256)


def hf_config(c: Mamba2MixerConfig):
    import transformers
    return transformers.Mamba2Config(hidden_size=c.hidden_size, num_heads=c.num_heads, head_dim=c.head_dim,
                                     state_size=c.state_size, n_groups=c.n_groups, expand=2,
                                     conv_kernel=c.conv_kernel, chunk_size=c.chunk_size, num_hidden_layers=1,
                                     vocab_size=16)


def hf_mixer(c: Mamba2MixerConfig, device, dtype):
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HF
    cfg = hf_config(c)
    with torch.device(device):
        m = HF(cfg, layer_idx=0).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.rand_like(p.float()) * 15 + 1))
            elif name == "dt_bias":
                p.copy_(torch.rand_like(p.float()) * -4 - 1)      # softplus: dt in about (0.007, 0.3)
            elif not name.startswith(("D", "norm")):
                p.normal_(0.0, 0.02)
    return m, cfg


def timer(device: str):
    if device == "cuda":
        from .bench_rows import bench
        return bench

    def cpu_time(fn):
        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return cpu_time


def peer_in_pieces(t, run, B: int):
    """transformers' time for a batch of B: run(lo, hi) on sequences lo..hi-1, timed whole, or (its
    torch path materialises [b, chunks, Q, Q, heads, N] products: 160 GB at 8 x 2048) as the sum of
    equal batch pieces, halved until a piece fits (bench_rows.in_pieces). (seconds, pieces); (None, B) where one
    sequence alone does not fit (1 x 8192 on an 80 GB card asks for 80 GiB), so ours still prints."""
    from .bench_rows import in_pieces

    def measure(pieces):
        step = -(-B // pieces)
        return sum(t(lambda lo=lo: run(lo, lo + step)) for lo in range(0, B, step))
    try:
        return in_pieces(measure, B)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, B


def prefill_cost(c: Mamba2MixerConfig, B: int, L: int, elt: int) -> tuple[float, float]:
    """(FLOPs, bytes) a prefill must spend: see the module docstring."""
    T, H, I, Hh, P, N, G, Q = B * L, c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim, c.state_size, \
        c.n_groups, c.chunk_size
    proj = I + c.conv_dim + Hh
    flops = 2 * T * H * proj + 2 * T * I * H                 # in_proj, out_proj
    flops += 2 * T * Q * N * G / 2 + 2 * T * Q * P * Hh / 2   # C B^T and its product with x (causal halves)
    flops += 2 * 2 * T * P * N * Hh                          # chunk states and the inter-chunk outputs
    weights = (proj * H + I * H + c.conv_dim * c.conv_kernel + I) * elt
    nbytes = 2 * T * H * elt + weights + B * Hh * P * N * 4
    return flops, nbytes


def decode_bytes(c: Mamba2MixerConfig, B: int, elt: int) -> int:
    """Every weight once, the conv state and the SSM state read and written, x and y."""
    proj = c.intermediate_size + c.conv_dim + c.num_heads
    weights = (proj * c.hidden_size + c.intermediate_size * c.hidden_size + c.conv_dim * c.conv_kernel
               + c.intermediate_size + 3 * c.num_heads) * elt
    states = 2 * B * (c.conv_dim * c.conv_kernel * elt + c.num_heads * c.head_dim * c.state_size * 4)
    return weights + states + 2 * B * c.hidden_size * elt


def gemm_rate(device: str) -> float:
    """bf16 FLOP/s of torch's 8192^3 product (cuBLAS) in this run."""
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    t = timer(device)(lambda: a @ a)
    return 2 * n ** 3 / t


def ab_times(switch: str, step, rounds: int = 3) -> dict[str, list[float]]:
    """step's graph time (bench_gemv.graph_time: a graph captured under the switch's value) with switch=0 and =1 in
    turns, `rounds` times each; the environment as it was after."""
    import os

    from layerforge.codegen import tuning

    from .bench_gemv import graph_time
    before, times = os.environ.get(switch), {"0": [], "1": []}
    try:
        for _ in range(rounds):
            for v in ("0", "1"):
                os.environ[switch] = v
                tuning.clear_cache()   # lookups cached on the tables' generation (LAYERFORGE_TUNING: the tables)
                times[v].append(graph_time(step))
    finally:
        if before is None:
            os.environ.pop(switch, None)
        else:
            os.environ[switch] = before
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", default=",".join(map(str, DIMS)), help="hidden,head_dim,state,heads_per_group")
    ap.add_argument("--prefill", default="1x8192,8x2048", help="BxL cases")
    ap.add_argument("--decode", default="64", help="batch sizes of the decode step")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' mixer")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ab-switch", default=None, metavar="NAME",
                    help="the decode step with the switch NAME=0 and =1 in turns (three rounds, graph medians), after "
                         "its rows (e.g. LAYERFORGE_MAMBA_PREFETCH; LAYERFORGE_TUNING: the tuning tables, with "
                         "LAYERFORGE_TUNING_TABLE naming one)")
    a = ap.parse_args(argv)
    dev, dtype, elt = a.device, torch.bfloat16, 2
    c = mixer_config(*map(int, a.dims.split(",")))
    torch.manual_seed(0)
    hf, _ = hf_mixer(c, dev, dtype)
    ours = Mamba2Mixer(c, dtype=dtype, device=dev)
    ours.load_state_dict(hf.state_dict())
    t = timer(dev)
    if dev == "cuda":
        from .bench_rows import copy_ceiling
        copy_bw = copy_ceiling()
    else:
        x = torch.empty(1 << 24, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        copy_bw = 2 * x.numel() * 2 / t(lambda: y.copy_(x))
    flop_rate = gemm_rate(dev)
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}: copy {copy_bw / 1e12:.2f} TB/s, "
          f"bf16 GEMM {flop_rate / 1e12:.0f} TFLOP/s; Mamba2 mixer H {c.hidden_size}, {c.num_heads} heads x "
          f"{c.head_dim}, N {c.state_size}, G {c.n_groups}")
    rows = []
    with torch.no_grad():
        for case in filter(None, a.prefill.split(",")):
            B, L = map(int, case.split("x"))
            x = torch.randn(B, L, c.hidden_size, dtype=dtype, device=dev)
            state = ours.new_state(B)
            ours_s = t(lambda: ours(x, state))
            hf_s, pieces = (None, 1) if a.no_hf else peer_in_pieces(t, lambda lo, hi: hf(x[lo:hi]), B)
            flops, nbytes = prefill_cost(c, B, L, elt)
            roof = max(flops / flop_rate, nbytes / copy_bw)
            row = {"mode": "prefill", "B": B, "L": L, "ours_s": ours_s, "hf_s": hf_s, "roofline_s": roof,
                   "of_roofline": roof / ours_s, "speedup": None if hf_s is None else hf_s / ours_s,
                   "hf_pieces": pieces}
            rows.append(row)
            vs = "" if hf_s is None else f"  transformers {hf_s * 1e3:9.2f} ms  {hf_s / ours_s:6.1f} x"
            if hf_s is None and not a.no_hf:
                vs = "  transformers: out of memory on this card, even one sequence at a time"
            elif pieces > 1:
                vs += f" (transformers in {pieces} batch pieces: whole, it runs out of memory)"
            print(f"prefill {B} x {L}: ours {ours_s * 1e3:9.3f} ms{vs}  roofline {roof * 1e3:.3f} ms "
                  f"({roof / ours_s:.2f} of it)")
        if dev == "cuda":
            # transformers' prefills leave tens of GB in the caching allocator's segments; the decode state carved
            # from them steps ~8 % slower on an H200 (134.7 against 125.1 us with expandable segments or none cached:
            # benchmarks/NOTES.md), so they go back to the driver before the decode rows allocate
            torch.cuda.empty_cache()
        for case in filter(None, a.decode.split(",")):
            B = int(case)
            state = ours.new_state(B)
            x = torch.randn(B, c.hidden_size, dtype=dtype, device=dev)
            ours(torch.randn(B, 4, c.hidden_size, dtype=dtype, device=dev), state)   # a prefilled state
            if dev == "cuda":   # three graph timings (a step moves by ~1-6 % between them): the median, and the range
                from .bench_gemv import graph_time
                # warm-up, not counted: right after the prefill rows the first timings of the step read ~8 % slow
                # (135.0 against 124.7 us the call after; not thermal: benchmarks/NOTES.md)
                for _ in range(3):
                    graph_time(lambda: ours.step(x, state))
                runs = sorted(graph_time(lambda: ours.step(x, state)) for _ in range(3))
            else:
                runs = [t(lambda: ours.step(x, state))]
            ours_s = runs[len(runs) // 2]
            hf_s = None
            if not a.no_hf:
                from transformers.cache_utils import DynamicCache
                cache = DynamicCache(config=hf_config(c))
                kw = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "cache_params"
                chunk, hf.chunk_size = hf.chunk_size, 4   # its 4-token warm-up prefill padded to 256 per
                hf(torch.randn(B, 4, c.hidden_size, dtype=dtype, device=dev), **{kw: cache})   # chunk: 160 GB
                hf.chunk_size = chunk
                hf_s = t(lambda: hf(x[:, None], **{kw: cache}))
            nbytes = decode_bytes(c, B, elt)
            row = {"mode": "decode", "B": B, "ours_s": ours_s, "ours_runs_s": runs, "hf_s": hf_s, "bytes": nbytes,
                   "of_copy": nbytes / ours_s / copy_bw}
            rows.append(row)
            vs = "" if hf_s is None else f"  transformers {hf_s * 1e6:9.1f} us  {hf_s / ours_s:6.1f} x"
            spread = f" ({runs[0] * 1e6:.1f}-{runs[-1] * 1e6:.1f})" if len(runs) > 1 else ""
            print(f"decode batch {B}: ours {ours_s * 1e6:9.1f} us{spread}{vs}  {nbytes / 1e6:.1f} MB: "
                  f"{nbytes / ours_s / copy_bw:.2f} of copy ({nbytes / runs[-1] / copy_bw:.2f}-"
                  f"{nbytes / runs[0] / copy_bw:.2f})")
            if a.ab_switch and dev == "cuda":
                row["ab"] = ab_times(a.ab_switch, lambda: ours.step(x, state))
                off, on = (statistics.median(row["ab"][v]) for v in ("0", "1"))
                print(f"decode batch {B}: {a.ab_switch}=0 {off * 1e6:.1f} us ({nbytes / off / copy_bw:.2f} of copy), "
                      f"=1 {on * 1e6:.1f} us ({nbytes / on / copy_bw:.2f}); each: "
                      + "  ".join(f"{v}: " + " ".join(f"{s * 1e6:.1f}" for s in row["ab"][v]) for v in ("0", "1")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": dev, "copy_Bps": copy_bw, "gemm_flops": flop_rate, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
