"""What bounds the wgmma MLA decode: its default kernel timed beside copies of it with one part of the work cut.

    python -m benchmarks.probe_mla_bound [--batch 64] [--ctx 4096] [--heads 128] [--variants default,noload,s1,pv1]

The variants are the plan's own source with one edit each (the numbers they compute are wrong on purpose; only
their time is read):
  default   the kernel as built
  noload    the producer copies the first STAGES tiles only, then marks every later stage full without a copy:
            the consumers' MMAs, softmax and hand-offs alone (no load latency, no DRAM / L2 traffic)
  s1        S = Q K^T runs one k16 step of its DK / 16 (the S MMAs almost gone)
  pv1       O += P V runs one k16 step of its BN / 16 in both consumers (the P V MMAs almost gone)
  nosync    consumer 0 does not wait for consumer 1 to be done with the previous P (barrier 4): the hand-off's wait
  evict     the plan with evict=True (LAYERFORGE_MLA_EVICT: its TMA copies hinted L2 evict_first, as FlashMLA's are;
            the default now)
  noevict   the plan with evict=False (the copies unhinted)
  nopg      the producer reads no page table: tile i of sequence b is page b * max_pages + i (other pages, same
            sizes and pattern; numbers wrong): the page-entry read's latency off the producer's chain
  fine      the plan with fine=True (LAYERFORGE_MLA_FINE: a full barrier a column block, an empty one a consumer)
  pair      the plan with pair=True (LAYERFORGE_MLA_PAIR: a token's two head blocks a cluster sharing each key tile
            by TMA multicast, hinted evict_first; the default now)
  unpaired  the plan with pair=False (a CTA a head block, each copying every key tile itself)
  staged    the plan with staged_out=True (O out through shared memory in 16-byte stores; the default now)
  unstaged  the plan with staged_out=False (O's bf16 pairs stored from the fragments, as before)
Variants join with "+" (fine+evict: the fine plan with the hints).
Each is timed as the best of graph replays (benchmarks.probe_kernel.best_us), same run, same card: isolated calls,
the card idle between them. With --sustain SECONDS each is also replayed back to back (a graph of 20 calls) for that
long: the min and median a call, and nvidia-smi's SM clock, power and throttle reasons sampled meanwhile (a kernel
that holds the card at its power cap runs at lower clocks than isolated calls see)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

import torch

from layerforge.codegen import mla as mla_codegen
from layerforge.runtime.mla_decode import MLADecode

from .bench_mla import L, R, decode_inputs
from .probe_kernel import best_us


def _edit(source: str, variant: str) -> str:
    for v in variant.split("+"):
        source = _edit_one(source, v)
    return source


def _edit_one(source: str, variant: str) -> str:
    def sub(old: str, new: str, count: int) -> str:
        if source.count(old) != count:
            raise SystemExit(f"probe_mla_bound: {variant}: expected {count} of {old!r} in the kernel, found "
                             f"{source.count(old)} (the template changed: update the probe)")
        return source.replace(old, new)

    if variant in ("default", "fine", "pair", "unpaired", "staged", "unstaged", "evict", "noevict"):
        return source
    if variant == "noload":
        return sub("if (k0 + BN <= k_end) {",
                   "if (i >= STAGES) { if (tid == 0) lf_mbar_arrive(&full[stage]); } else if (k0 + BN <= k_end) {", 1)
    if variant == "s1":
        return sub("kk < DK / 16", "kk < 1", 1)
    if variant == "pv1":
        return sub("kk < BN / 16", "kk < 1", 2)
    if variant == "nosync":
        return sub("if (i > 0) lf_named_bar_sync(4, 256);", "", 1)
    if variant == "nopg":
        return sub("pg[tid] = min(max(page_table[(long long)b * max_pages + key / PAGE], 0), num_pages - 1);",
                   "pg[tid] = min(max(b * max_pages + key / PAGE, 0), num_pages - 1);", 1)
    raise SystemExit(f"probe_mla_bound: unknown variant {variant!r}")


def sustained(replay, seconds: float, calls: int) -> tuple[float, float, list[str]]:
    """replay() (a graph of `calls` calls) back to back for `seconds`: (min, median) us a call and nvidia-smi's samples
    (SM clock, power, throttle reasons; none where nvidia-smi is missing)."""
    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active",
                                "--format=csv,noheader", "-lms", "250", "-i", str(torch.cuda.current_device())],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times, end = [], time.time() + seconds
    while time.time() < end:
        ev[0].record()
        replay()
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) * 1e3 / calls)
    samples = []
    if smi is not None:
        smi.terminate()
        samples = smi.communicate()[0].strip().splitlines()
    times.sort()
    return times[0], times[len(times) // 2], samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--variants", default="default,noevict,unstaged,noload,s1,pv1,nosync,fine,default")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                    help="also replay each variant back to back this long (min / median a call, clocks and power)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_mla_bound: no CUDA GPU on this machine", file=sys.stderr)
        return 0
    batch, ctx, heads, page = a.batch, a.ctx, a.heads, a.page
    if MLADecode(num_heads=heads, latent_dim=L, rope_dim=R, page_size=page).plan.kernel != "wgmma":
        print("probe_mla_bound: the variants edit the wgmma kernel (sm_90); this GPU plans mma.sync", file=sys.stderr)
        return 1
    cache, table, lens, q_seq, q, out = decode_inputs(batch, ctx, heads, page)
    flops = 2 * batch * heads * ctx * (L + R + L)
    latent = batch * ctx * (L + R) * 2
    print(f"{torch.cuda.get_device_name()}: MLA decode {batch} x {ctx}, {heads} heads, page {page}; graph replays, "
          f"best of {a.reps}")
    print(f"{'variant':>8} | {'us':>7} | TFLOP/s | latent TB/s")
    base = mla_codegen.MLADecodePlan.source
    try:
        for variant in a.variants.split(","):
            mla_codegen.MLADecodePlan.source = lambda self, v=variant: _edit(base(self), v)
            parts = variant.split("+")
            dec = MLADecode(num_heads=heads, latent_dim=L, rope_dim=R, page_size=page,
                            fine=True if "fine" in parts else None,
                            pair=True if "pair" in parts else False if "unpaired" in parts else None,
                            staged_out=True if "staged" in parts else False if "unstaged" in parts else None,
                            evict=True if "evict" in parts else False if "noevict" in parts else None)
            def run():
                dec(q, cache, table, lens, q_seq, scale=192 ** -0.5, max_kv_len=ctx, out=out)
            run()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            us = best_us(g.replay, a.reps)
            print(f"{variant:>8} | {us:7.1f} | {flops / us / 1e6:7.0f} | {latent / us / 1e6:11.2f}", flush=True)
            if a.sustain > 0:
                calls = 20
                gs = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gs):
                    for _ in range(calls):
                        run()
                lo, med, samples = sustained(gs.replay, a.sustain, calls)
                smi = " | ".join(samples[1::2][:6]) or "-"
                print(f"{'':>8}   back to back {a.sustain:g} s: min {lo:.1f} us, median {med:.1f} us "
                      f"({latent / med / 1e6:.2f} TB/s); nvidia-smi: {smi}", flush=True)
                time.sleep(2)   # the card's clocks recover before the next variant
    finally:
        mla_codegen.MLADecodePlan.source = base
    return 0


if __name__ == "__main__":
    sys.exit(main())
