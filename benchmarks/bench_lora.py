"""Multi-LoRA projections (runtime/lora.py) of a Llama-3-8B-shaped layer beside the base products
alone and beside a PEFT-style torch peer, same run, same card, bf16, CUDA-graph replays.

    python -m benchmarks.bench_lora [--cases decode:64,prefill:4096] [--adapters 4] [--rank 16]
                                    [--route dense|grouped] [--json out.json]

The layer's projections as layerforge's models hold them: qkv [4096 + 1024 + 1024, 4096] (q, k and
v fused), o [4096, 4096], gate_up [2 x 14336, 4096] (fused), down [4096, 14336]; random weights.
`--adapters` adapters of rank `--rank` on all seven of transformers' modules (q, k, v, o, gate, up,
down: q/k/v and gate/up as slices of the fused projections), the step's tokens split evenly over
them (contiguous runs, as sequences of one adapter come). Columns, each one step's four
projections (every input drawn once, outside the timing):
- base: x @ W^T of the four projections alone (cuBLAS, as the models' projections run);
- ours: LoRALinear on each with one AdapterBatch a step, made inside the timed step (its slot
  mapping and, where the route needs it, the permutation kernel: once a step, however many
  layers); at decode the folded product x [W; A_all]^T and the expand kernel (or, where the A
  rows do not fold, the shrink kernel, the base product and the expand in place), at prefill the
  route of --route (default: the store's, dense while slots x rank <= 256);
- layer: the same with the step's AdapterBatch made before the timing: what each further layer
  of a model adds;
- peer: the base products, then for every adapter and module what PEFT's mixed-batch forward
  does: x.index_select(the adapter's tokens) @ A^T @ B^T * scale, index_add_ into the output
  (the token rows found on the host before the timing, as PEFT does);
- over: (time - base) / base. Targets: at most 15 % at decode 64, 10 % at prefill 4096.
On the CPU (--device cpu, with --dims for a small layer) it runs the same steps eagerly once each:
a smoke test of the script.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from layerforge.runtime import lora as lora_mod
from layerforge.runtime.lora import AdapterBatch, LoRALinear, MultiLoRA, lora_scale

CASES = "decode:64,prefill:4096"
DIMS = "4096,4096,1024,14336"   # hidden, q rows, k (= v) rows, intermediate
TARGETS = ("decode", 0.15), ("prefill", 0.10)


def projections(H: int, Q: int, KV: int, Fi: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (K, the output slices: one a transformers module)."""
    return {"qkv": (H, (Q, KV, KV)), "o": (Q, (H,)), "gate_up": (H, (Fi, Fi)), "down": (Fi, (H,))}


def build(dims: tuple[int, int, int, int], adapters: int, rank: int, device, dtype, gen):
    """{name: (LoRALinear, [per slice: [per adapter: (A, B, scale)]])} with random weights."""
    out = {}
    for name, (K, slices) in projections(*dims).items():
        base = torch.nn.Linear(K, sum(slices), bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(torch.randn(sum(slices), K, generator=gen) / K ** 0.5)
        store = MultiLoRA(K, slices, adapters=adapters, max_rank=rank, dtype=dtype, device=device)
        per_slice = []
        for s, w in enumerate(slices):
            mods = []
            for e in range(adapters):
                a = (torch.randn(rank, K, generator=gen) / K ** 0.5).to(dtype).to(device)
                b = (torch.randn(w, rank, generator=gen) / rank ** 0.5).to(dtype).to(device)
                scale = lora_scale(2 * rank, rank)
                store.set_adapter(e, a, b, scale, part=s)
                mods.append((a, b, scale))
            per_slice.append(mods)
        out[name] = (LoRALinear(base, store), per_slice)
    return out


def peer_step(layer, xs: dict, rows: list[torch.Tensor]) -> dict:
    """PEFT's mixed-batch arithmetic on each projection: base, then each adapter's tokens."""
    ys = {}
    for name, (lin, per_slice) in layer.items():
        x = xs[name]
        y = F.linear(x, lin.weight)
        at = 0
        for mods in per_slice:
            w = mods[0][1].shape[0]
            view = y[:, at:at + w]
            for (a, b, scale), r in zip(mods, rows):
                xa = x.index_select(0, r)
                view.index_add_(0, r, (xa @ a.t()) @ b.t() * scale)
            at += w
        ys[name] = y
    return ys


def timer(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from .bench_gemv import graph_time
        return graph_time(fn)
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=CASES, help="mode:tokens,... (mode decode or prefill: only the label)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--route", choices=("dense", "grouped"), default=None, help="the prefill route (default: the store's)")
    ap.add_argument("--dims", default=DIMS, help="hidden,q,kv,intermediate")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dense_max = lora_mod.DENSE_MAX_RANKS
    lora_mod.DENSE_MAX_RANKS = {None: dense_max, "grouped": 0, "dense": 1 << 30}[a.route]
    try:
        return run(a)
    finally:
        lora_mod.DENSE_MAX_RANKS = dense_max


def run(a) -> int:
    dev, dt = torch.device(a.device), torch.bfloat16
    dims = tuple(int(d) for d in a.dims.split(","))
    gen = torch.Generator().manual_seed(0)
    layer = build(dims, a.adapters, a.rank, dev, dt, gen)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}: bf16, {a.adapters} adapters of rank {a.rank} on q k v o gate up down, layer {a.dims}")
    print(f"{'case':>14} {'base us':>9} {'ours us':>9} {'layer us':>9} {'peer us':>9} {'ours over':>10} "
          f"{'layer over':>10} {'peer over':>10} {'route':>8} {'rel err':>8}")
    rows = []
    targets = dict(TARGETS)
    for case in a.cases.split(","):
        mode, tokens = case.split(":")
        T = int(tokens)
        xs = {n: torch.randn(T, lin.in_features, generator=gen).to(dt).to(dev) for n, (lin, _) in layer.items()}
        ids = (torch.arange(T) * a.adapters // T).to(torch.int32).to(dev)
        token_rows = [(ids == e).nonzero().squeeze(1) for e in range(a.adapters)]

        def base():
            return {n: F.linear(xs[n], lin.weight) for n, (lin, _) in layer.items()}

        def ours(batch=None):
            batch = batch or AdapterBatch(ids, a.adapters)
            return {n: lin(xs[n], batch) for n, (lin, _) in layer.items()}

        with torch.no_grad():
            shared = AdapterBatch(ids, a.adapters)
            got, want = ours(shared), peer_step(layer, xs, token_rows)   # (computes what the shared batch needs)
            err = max(((got[n].float() - want[n].float()).abs().max() / want[n].float().abs().max()).item()
                      for n in got)
            t_base, t_ours = timer(base, dev), timer(ours, dev)
            t_layer = timer(lambda: ours(shared), dev)
            t_peer = timer(lambda: peer_step(layer, xs, token_rows), dev)
        route = next(iter(layer.values()))[0].lora.route(xs["qkv"])
        over, layer_over, peer_over = t_ours / t_base - 1, t_layer / t_base - 1, t_peer / t_base - 1
        mark = "" if mode not in targets else ("  ok" if over <= targets[mode] else f"  over {targets[mode]:.0%}")
        print(f"{mode + ' ' + tokens:>14} {t_base * 1e6:9.1f} {t_ours * 1e6:9.1f} {t_layer * 1e6:9.1f} "
              f"{t_peer * 1e6:9.1f} {over:10.1%} {layer_over:10.1%} {peer_over:10.1%} {route:>8} {err:8.1e}{mark}")
        rows.append(dict(mode=mode, tokens=T, base_s=t_base, ours_s=t_ours, layer_s=t_layer, peer_s=t_peer,
                         ours_over=over, layer_over=layer_over, peer_over=peer_over, route=route, rel_err=err))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "adapters": a.adapters, "rank": a.rank, "dims": dims, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
