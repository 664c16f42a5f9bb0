"""A probe for issue 14's next step (benchmarks/NOTES.md, "Issue 14's next step"): can the SSD chunk states'
inter-chunk recurrence h_c+1 = a_c h_c + S_c run inside the chunk-state kernel as a decoupled look-back, without
its serial chain showing? Before building it, time the chain alone:

    python -m benchmarks.probe_ssd_chain [--heads 80 --chunks 32 --work 0,256,1024,4096]

One CTA per (chunk, head), numbered in the order the CTAs start (a ticket from one atomicAdd, chunk-major, so a
CTA only ever waits on one that already runs). Each CTA spins `work` dependent FMAs a thread (standing in for
its S_c product), then - with the chain - waits on chunk c - 1's flag of its head, reads that running state (the
head's P x N f32, L2-hot), writes its own (f32) and the chunk's start (bf16), and raises its flag; without the
chain it reads its own slot instead and raises nothing. Printed: both times per `work`, and what the chain adds.
Mamba2-2.7B at 1 x 8192: 80 heads, 32 chunks of 256, P x N = 64 x 128; the chunk-state kernel took 101 us and
the state passing launch it would replace 30 us (H200). The chain pays if it adds well under ~30 us where
`work` makes the no-chain time ~100 us.
"""
from __future__ import annotations

import argparse
import sys

SOURCE = r"""
#include <cuda_bf16.h>
extern "C" __global__ void __launch_bounds__(256)
ssd_chain_probe(int* ticket, int* flags, float* states, __nv_bfloat16* starts, int heads, int state, int work,
                int chain) {
    __shared__ int t;
    if (threadIdx.x == 0) t = atomicAdd(ticket, 1);
    __syncthreads();
    const int c = t / heads, h = t % heads;   // chunk-major tickets: chunk c - 1 of head h started earlier
    float acc = (float)threadIdx.x;
    for (int i = 0; i < work; ++i) acc = fmaf(acc, 0.999f, 0.5f);   // the S_c product's stand-in
    const long long mine = ((long long)c * heads + h) * state;
    const float* prev = states + (c > 0 && chain ? mine - (long long)heads * state : mine);
    if (chain && c > 0) {
        if (threadIdx.x == 0) {
            int f = 0;
            do {
                asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(f) : "l"(flags + (c - 1) * heads + h));
            } while (f == 0);
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < state; i += blockDim.x) {
        const float x = (c > 0 || !chain ? __ldcg(prev + i) : 0.0f) * 0.9f + acc * 1e-9f;
        states[mine + i] = x;
        starts[mine + i] = __float2bfloat16(x);
    }
    if (chain) {
        __syncthreads();   // every thread's stores before the flag (the release orders them for the reader)
        if (threadIdx.x == 0) asm volatile("st.release.gpu.global.b32 [%0], %1;" :: "l"(flags + c * heads + h), "r"(1));
    }
}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=80)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--state", type=int, default=64 * 128, help="P x N f32 values a head")
    ap.add_argument("--work", type=lambda s: [int(x) for x in s.split(",")], default=[0, 256, 1024, 4096])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    from .probe_kernel import best_us, load
    k = load(SOURCE, "ssd_chain_probe", ["ptr", "ptr", "ptr", "ptr", "i32", "i32", "i32", "i32"], "probe_ssd_chain")
    if k is None:
        return 1
    import torch
    ctas = a.heads * a.chunks
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    flags = torch.zeros(ctas, dtype=torch.int32, device="cuda")
    states = torch.zeros(ctas * a.state, dtype=torch.float32, device="cuda")
    starts = torch.zeros(ctas * a.state, dtype=torch.bfloat16, device="cuda")

    def run(work, chain):
        ticket.zero_()
        flags.zero_()
        k.launch(ctas, 256, [ticket, flags, states, starts, a.heads, a.state, work, chain])

    def timed(work, chain):
        return best_us(lambda: run(work, chain), a.reps)

    print(f"device: {torch.cuda.get_device_name()}; {a.chunks} chunks x {a.heads} heads, {a.state * 4 // 1024} KB of "
          f"f32 state a head; us, best of {a.reps} (two memsets included in both)")
    print(f"{'work':>6} {'no chain':>9} {'chain':>9} {'added':>8}")
    for w in a.work:
        free, chained = timed(w, 0), timed(w, 1)
        print(f"{w:>6} {free:>9.1f} {chained:>9.1f} {chained - free:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
