"""The first timing of a product after new weights (and seconds of compiles) against the same plan timed again at once:
what made `layerforge tune` record splits that only beat a cold first timing (benchmarks/NOTES.md, "The tune's first
timing"). For Llama-3-70B's u4 gate/up and down at one token, each of three splits is timed twice through the tune's
own harness (runtime/tune._GpuMeasure), then through a launch of the same plan on other weight copies, then the
runtime's route with the tuning tables off and on.

    python -m benchmarks.probe_first_timing            # graph_time as it is (50 ms of untimed replays first)
    python -m benchmarks.probe_first_timing --no-warm  # without them: the first timing of each product reads slow
"""
from __future__ import annotations

import argparse
import os

import torch

SHAPES = ((57344, 8192, "silu"), (8192, 28672, None))
SPLITS = ((1, 4, 2), (1, 4, 4), (2, 4, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-warm", action="store_true", help="graph_time without its untimed replays (WARM_S = 0)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_first_timing: no CUDA GPU on this machine")
        return 1
    from layerforge.codegen import tuning
    from layerforge.codegen.gemv import plan_gemv
    from layerforge.runtime import linear, tune
    from layerforge.runtime.launch import device_arch, load_plan
    from layerforge.runtime.quant import QuantLinear
    if a.no_warm:
        tune.WARM_S = 0.0
    dev, arch = torch.device("cuda"), device_arch()
    print(f"device: {torch.cuda.get_device_name()}  graph_time's untimed replays: {tune.WARM_S * 1e3:.0f} ms")
    for n, k, gated in SHAPES:
        meas = tune._GpuMeasure(n, k, gated, 1, "bf16", "u4", 128, dev)
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
        lins = [QuantLinear.from_float(w, 128, wtype="u4") for _ in range(len(meas.weights))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n // 2 if gated else n, device="cuda", dtype=torch.bfloat16)
        for rt, warps, stages in SPLITS:
            plan = plan_gemv("bf16", n=n, k=k, max_m=1, gated=gated, wtype="u4", group=128, arch=arch, rt=rt,
                             warps=warps, stages=stages)
            first, again = meas(plan), meas(plan)
            launch = load_plan(plan, dev)
            other = tune.graph_time([lambda lin=lin: launch((), [x, *lin.qw.kernel_tensors, y, 1]) for lin in lins])
            print(f"{n} x {k} {gated or '':4s} r{rt}w{warps}s{stages}: first {first * 1e6:6.1f} us, again "
                  f"{again * 1e6:6.1f}, other copies {other * 1e6:6.1f} ({len(lins)} cold copies)")
        for on in ("0", "1"):
            os.environ["LAYERFORGE_TUNING"] = on
            tuning.clear_cache()
            linear._KERNELS.clear()
            t = tune.graph_time([lambda lin=lin: lin(x, gated=gated) for lin in lins])
            print(f"{n} x {k} {gated or '':4s} the runtime's route, LAYERFORGE_TUNING={on}: {t * 1e6:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
