"""What the single-kernel probes (probe_ssd_chain, probe_fp8_widen) share: their CUDA source compiled by NVRTC for
this GPU and loaded from the cubin, and a launch timed as the best of a few event pairs."""
from __future__ import annotations

import sys


def load(source: str, name: str, args: list[str], who: str):
    """The kernel `name` of `source` (args: LoadedKernel's argument kinds) for this GPU; None, after saying so on
    stderr, where there is no CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        print(f"{who}: no CUDA GPU on this machine", file=sys.stderr)
        return None
    from layerforge.runtime import nvrtc
    from layerforge.runtime.driver import LoadedKernel
    from layerforge.runtime.launch import device_arch
    res = nvrtc.compile_cuda(source, f"{name}.cu", nvrtc.CompileOptions(device_arch()))
    return LoadedKernel.load(res.cubin, name, args)


def best_us(run, reps: int, warmup: int = 3) -> float:
    """The shortest of `reps` timings of run() (microseconds, CUDA events around each call), after `warmup` calls."""
    import torch
    for _ in range(warmup):
        run()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    best = float("inf")
    for _ in range(reps):
        ev[0].record()
        run()
        ev[1].record()
        torch.cuda.synchronize()
        best = min(best, ev[0].elapsed_time(ev[1]) * 1e3)
    return best
