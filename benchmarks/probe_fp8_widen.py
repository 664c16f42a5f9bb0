"""How fast the H200 widens e4m3 pairs, by pipe: a probe for the fp8 KV decode (issue 11), whose key loop spends
~40 % of its instructions widening K and V bytes with integer ops (benchmarks/NOTES.md, "fp8 decode tiles").

    python -m benchmarks.probe_fp8_widen [--iters 2048]

Each thread runs 8 independent chains; each step of a chain widens one e4m3 pair into a 16-bit pair and feeds
the result's low half back in, so the step cannot be hoisted and the chains keep the pipe busy. Kinds:
  cvt  cvt.rn.f16x2.e4m3x2 (F2FP, one instruction a pair)
  raw  fp8.cuh's integer placement into bf16 (PRMT, shift, two LOP3: the decode's widening)
  lop3 one LOP3 a step (the integer pipe's own rate, for scale)
  mix  cvt on 4 chains, raw on the other 4 (do the two pipes add up?)
Printed: pairs a nanosecond over the card and a cycle an SM (at the clock nvidia-smi reports under load).
"""
from __future__ import annotations

import argparse
import subprocess
import sys

SOURCE = r"""
__device__ __forceinline__ unsigned cvt_pair(unsigned x) {
    unsigned r;
    asm volatile("{.reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t;}" : "=r"(r) : "r"(x));
    return r;
}
__device__ __forceinline__ unsigned raw_pair(unsigned w) {
    const unsigned t = __byte_perm(w, 0u, 0x1404);
    return (t & 0x80008000u) | ((t >> 4) & 0x07f007f0u);
}
__device__ __forceinline__ unsigned lop_step(unsigned x, unsigned k) {
    unsigned r;
    asm volatile("lop3.b32 %0, %1, %2, 0x3c3c3c3c, 0x96;" : "=r"(r) : "r"(x), "r"(k));
    return r;
}
extern "C" __global__ void __launch_bounds__(256) fp8_widen_probe(unsigned* out, int iters, int kind) {
    unsigned x[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) x[c] = threadIdx.x * 2654435761u + c * 40503u;
    if (kind == 0) {
        for (int i = 0; i < iters; ++i)
#pragma unroll
            for (int c = 0; c < 8; ++c) x[c] = cvt_pair(x[c]);
    } else if (kind == 1) {
        for (int i = 0; i < iters; ++i)
#pragma unroll
            for (int c = 0; c < 8; ++c) x[c] = raw_pair(x[c] ^ (unsigned)i);
    } else if (kind == 2) {
        for (int i = 0; i < iters; ++i)
#pragma unroll
            for (int c = 0; c < 8; ++c) x[c] = lop_step(x[c], (unsigned)i);
    } else {
        for (int i = 0; i < iters; ++i) {
#pragma unroll
            for (int c = 0; c < 4; ++c) x[c] = cvt_pair(x[c]);
#pragma unroll
            for (int c = 4; c < 8; ++c) x[c] = raw_pair(x[c] ^ (unsigned)i);
        }
    }
    unsigned s = 0;
#pragma unroll
    for (int c = 0; c < 8; ++c) s ^= x[c];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""
KINDS = ("cvt", "raw", "lop3", "mix")


def sm_clock_mhz() -> float | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        return float(r.stdout.split()[0])
    except Exception:   # no nvidia-smi: pairs a nanosecond only
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    from .probe_kernel import best_us, load
    k = load(SOURCE, "fp8_widen_probe", ["ptr", "i32", "i32"], "probe_fp8_widen")
    if k is None:
        return 1
    import torch
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ctas, threads = sms * 8, 256
    out = torch.empty(ctas * threads, dtype=torch.int32, device="cuda")
    mhz = sm_clock_mhz()
    print(f"device: {torch.cuda.get_device_name()}, {sms} SMs, max SM clock {mhz} MHz; {ctas} CTAs x {threads} "
          f"threads x 8 chains x {a.iters} steps")
    print(f"{'kind':>5} {'us':>9} {'pairs/ns':>9} {'pairs/clk/SM':>13}")
    for kind, name in enumerate(KINDS):
        best = best_us(lambda: k.launch(ctas, threads, [out, a.iters, kind]), a.reps, warmup=1)
        pairs = ctas * threads * 8 * a.iters
        per_ns = pairs / (best * 1e3)
        per_clk = per_ns * 1e3 / mhz / sms if mhz else float("nan")
        print(f"{name:>5} {best:>9.1f} {per_ns:>9.1f} {per_clk:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
