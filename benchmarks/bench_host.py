"""Host cost of one call of a generated layer: microseconds of Python and launch per call,
measured as the wall time of many back-to-back 1-token calls (the GPU work is a few
microseconds, so the host decides). Run with one tree's package on PYTHONPATH to compare trees.

    python -m benchmarks.bench_host
"""
import time

import torch

import layerforge as lf


def per_call_us(fn, n: int = 20000) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main() -> None:
    from layerforge.runtime.layers import module
    norm = module("rms_norm", H=4096, dtype="bf16", eps=1e-5).cuda()
    act = module("swiglu", F=14336, dtype="bf16").cuda()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(1, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    print(f"layerforge {lf.__file__}")
    print(f"rms_norm 1x4096 bf16          {per_call_us(lambda: norm(x)):6.2f} us/call")
    print(f"rms_norm 1x4096 bf16, out=    {per_call_us(lambda: norm(x, out=(out,))):6.2f} us/call")
    print(f"swiglu 1x14336 bf16           {per_call_us(lambda: act(gu)):6.2f} us/call")
    print(f"torch rms_norm (eager) 1x4096 {per_call_us(lambda: torch.nn.functional.rms_norm(x, (4096,), norm.weight, 1e-5)):6.2f} us/call")


if __name__ == "__main__":
    main()
