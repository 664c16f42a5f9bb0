"""What compute-sanitizer's racecheck makes of the hand-offs the Hopper kernels use between warpgroups, on kernels small
enough to read whole: run each kind under racecheck and compare its hazard count with the kind's expectation.

    for k in 0 1 2 3 4; do compute-sanitizer --tool racecheck python -m benchmarks.probe_racecheck --kind $k; done

Two warpgroups of one CTA (with --threads 384, a third that only starts and ends with the others, as a producer
warpgroup does: the named barriers then count 256 of the CTA's 384 threads, as the Hopper kernels' do) hand a
128-float shared buffer back and forth `iters` times:
  0 named   one writes, bar.arrive 1; the other bar.sync 1, reads, bar.arrive 2; the first bar.sync 2 before its next
            write (the MLA decode's P / factor exchange). Ordered in PTX's memory model (an arrive synchronizes with
            the sync that completes the barrier): a hazard reported here is the tool's, not the kernel's.
  1 lane0   one warpgroup writes (every lane), lane 0 of each warp arrives on an mbarrier (count 4), the other waits on
            it and overwrites (a consumer handing a stage back to its producer). mbarrier.arrive releases only the
            arriving thread's accesses: lanes 1-31's writes are not ordered before the overwrite.
  2 syncwarp  kind 1 with __syncwarp() before lane 0's arrive (the warp's writes ordered before it in PTX's model).
  3 none    no barrier between the write and the read: a race, which racecheck must report (the control).
  4 sync    kind 0 with bar.sync on both sides of both barriers.
The kernel's result is checked too (every kind but 3 must read what was written). Measured on an H100 (CUDA 13
compute-sanitizer, benchmarks/NOTES.md): hazards reported for kinds 0, 1, 2 and 3, none for 4; every kind read what
was written. So racecheck flags correct arrive / sync and synchronised lane-0 mbarrier hand-offs too: a report on
one of those patterns in a Hopper kernel is checked against this probe, not taken as a race."""
from __future__ import annotations

import argparse
import sys

SOURCE = r"""
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void bar_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

extern "C" __global__ void __launch_bounds__(384) racecheck_probe(float* out, int iters, int kind) {
    __shared__ float buf[128];
    __shared__ unsigned long long mbar;
    const int tid = threadIdx.x, wg = tid >> 7, r = tid & 127;
    if (tid == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], 4;\n" ::"r"(smem_addr(&mbar)) : "memory");
    if (tid < 128) buf[tid] = 0.0f;
    __syncthreads();
    float acc = 0.0f;
    if (wg == 2) {   // the bystander: no part in the hand-off
    } else if (kind == 0 || kind == 4) {
        for (int i = 0; i < iters; ++i) {
            if (wg == 0) {
                if (i > 0) bar_sync(2);
                buf[r] = (float)(i + r);
                if (kind == 4) bar_sync(1); else bar_arrive(1);
            } else {
                bar_sync(1);
                acc += buf[127 - r] - (float)(i + 127 - r);   // 0 when the hand-off holds
                if (i + 1 < iters) { if (kind == 4) bar_sync(2); else bar_arrive(2); }
            }
        }
    } else if (kind == 1 || kind == 2) {
        if (wg == 1) {
            buf[r] = 1.0f;
            if (kind == 2) __syncwarp();
            if ((r & 31) == 0) asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n"
                                            ::"r"(smem_addr(&mbar)) : "memory");
        } else {
            asm volatile("{\n .reg .pred done;\nWAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
                         " @!done bra WAIT;\n}\n" ::"r"(smem_addr(&mbar)) : "memory");
            acc = buf[127 - r] - 1.0f;
            buf[127 - r] = 2.0f;
        }
    } else {   // 3: no hand-off at all
        if (wg == 0) buf[r] = 1.0f;
        else if (wg == 1) acc = buf[127 - r];
    }
    out[tid] = acc;
}
"""
KINDS = ("named", "lane0", "syncwarp", "none", "sync")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", type=int, choices=range(len(KINDS)), required=True)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, choices=(256, 384), default=384)
    a = ap.parse_args(argv)
    from .probe_kernel import load
    k = load(SOURCE, "racecheck_probe", ["ptr", "i32", "i32"], "probe_racecheck")
    if k is None:
        return 1
    import torch
    out = torch.full((a.threads,), float("nan"), device="cuda")
    k.launch(1, a.threads, [out, a.iters, a.kind])
    torch.cuda.synchronize()
    readers = out[128:256] if a.kind in (0, 4) else out[:128]   # kind 3 (the race) reads whatever it finds
    bad = int((readers != 0).sum()) if a.kind != 3 else 0
    print(f"probe_racecheck kind {a.kind} ({KINDS[a.kind]}): {'read what was written' if not bad else f'{bad} wrong reads'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
