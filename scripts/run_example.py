"""Run the example model's generated kernels on the GPU: each against the reference
evaluator (float64) on random inputs, then timed. Used by scripts/build-example.sh."""
from __future__ import annotations

import json
import sys

import torch

import layerforge as lf
from layerforge.runtime.layers import LayerModule


def main(config_path: str) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: kernels built, not run")
        return 0
    from triton.testing import do_bench
    torch.manual_seed(0)  # the same inputs every run, so an error reproduces
    cfg = json.load(open(config_path))
    prog = lf.stdlib()
    n = 2048
    H, F, Hq, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["head_dim"]
    bf = torch.bfloat16
    cases = {
        "rms_norm": [torch.randn(n, H, device="cuda", dtype=bf)],
        "add_rms_norm": [torch.randn(n, H, device="cuda", dtype=bf), torch.randn(n, H, device="cuda", dtype=bf)],
        "swiglu": [torch.randn(n, 2 * F, device="cuda", dtype=bf)],
        "rope": [torch.randn(n, Hq, D, device="cuda", dtype=bf),
                 torch.arange(n, device="cuda", dtype=torch.int32)],
    }
    print(f"{'layer':14s} {'tokens':>6s} {'max rel err':>12s} {'us':>8s}")
    status = 0
    for name, args in cases.items():
        bindings = prog.bindings_for(name, lf.dims_from_config(cfg))
        mod = LayerModule(prog.specialise(name, dtype="bf16", **bindings), device="cuda")
        if "eps" in mod._scalars:
            mod._scalars["eps"] = cfg.get("rms_norm_eps", 1e-5)
        out = mod(*args)
        out = out if isinstance(out, tuple) else (out,)
        ref = lf.evaluate(mod.function, {**dict(zip(mod.input_names, args)),
                                         **{k: getattr(mod, a) for k, a in mod._weights.items()}, **mod._scalars},
                          precision="float64")
        err = max(float((o.double() - r).norm() / r.norm()) for o, r in zip(out, ref))
        us = do_bench(lambda: mod(*args), return_mode="median") * 1e3
        ok = err < 2e-2 and not any(torch.isnan(o).any() for o in out)
        status |= not ok
        print(f"{name:14s} {n:6d} {err:12.2e} {us:8.1f} {'ok' if ok else 'FAIL'}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
