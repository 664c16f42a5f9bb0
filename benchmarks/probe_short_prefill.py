"""Where a short prompt's prefill spends its time (B1 S1024 and nearby, causal, D128): each kernel's
device time (profiler records), the call's host time (no sync inside), and do_bench's time, for the
wgmma and the mma.sync prefill, beside cuDNN. A probe: prints, asserts nothing.

    python -m benchmarks.probe_short_prefill [--profile] [--ab-switch NAME]

--ab-switch NAME: the wgmma prefill with the kernel switch NAME=0, then NAME=1 (e.g. LAYERFORGE_WGMMA_LPT).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

from .bench_attention import env_switch_set
from .bench_rows import bench, kernel_times


def case(prog, kernel, batch, seq, hq=32, d=128, page=64, profile=False):
    layer = prog.specialise("gpt2_attn", Hq=hq, Hkv=hq, D=d, dtype="bf16")
    attn = PagedAttention(layer, page_size=page, prefill=kernel)
    q = torch.randn(batch * seq, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(batch * seq // page, page, hq, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.arange(batch * seq // page, dtype=torch.int32, device="cuda").view(batch, seq // page)
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device="cuda")
    out = q.new_empty(batch * seq, hq, d)
    fn = lambda: attn.prefill(q, kc, vc, table, lens, cu, max_q_len=seq, max_kv_len=seq, out=out)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    ks = kernel_times(fn, calls=20)
    timed = bench(fn)
    label = f"B{batch} S{seq} H{hq} {kernel} {attn.tc_plan('prefill').config.label}"
    print(f"{label:40s} do_bench {timed * 1e6:8.1f} us  host {host * 1e6:7.1f} us/call  kernels: "
          + ", ".join(f"{k[:48]} {us:.1f} us x{c}" for k, us, c in ks), flush=True)
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
    qq = q.view(batch, seq, hq, d).transpose(1, 2)
    kk = kc.view(batch, seq, hq, d).transpose(1, 2)
    vv = vc.view(batch, seq, hq, d).transpose(1, 2)
    return qq, kk, vv


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="cProfile 200 calls of the wgmma prefill at B1 S1024")
    ap.add_argument("--ab-switch", default=None, metavar="NAME",
                    help="the wgmma prefill with NAME=0, then NAME=1 (a LAYERFORGE_* kernel switch)")
    a = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    prog = lf.stdlib()
    print(f"device: {torch.cuda.get_device_name()}")
    for batch, seq in [(1, 1024), (1, 2048), (2, 1024), (4, 1024)]:
        for kernel, on in ([("wgmma", False), ("wgmma", True)] if a.ab_switch else [("wgmma", None)]) + [("tc", None)]:
            if on is not None:
                print(f"{a.ab_switch}={int(on)}")
            with env_switch_set(a.ab_switch, on) if on is not None else contextlib.nullcontext():
                qq, kk, vv = case(prog, kernel, batch, seq,
                                  profile=a.profile and kernel == "wgmma" and (batch, seq) == (1, 1024))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            f = lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)  # noqa: E731
            print(f"{'cuDNN':40s} do_bench {bench(f) * 1e6:8.1f} us  kernels: "
                  + ", ".join(f"{k[:48]} {us:.1f} us x{c}" for k, us, c in kernel_times(f, calls=20)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
