"""Tensor parallelism's speed in one run: a Llama-3-70B-shaped model (4 layers by default, random
bf16 weights) split over the ranks of torchrun, beside the same layers on one GPU where they fit.

    torchrun --nproc-per-node 2 -m benchmarks.bench_parallel [--layers 4] [--context 2048]
             [--batches 1,64] [--prefill 4096] [--steps 30] [--no-tp1] [--json out.json]
    torchrun --nproc-per-node 2 -m benchmarks.bench_parallel --cpu --tiny     (gloo: a smoke run)

Per row (rank 0's times; every rank runs the same steps):
  decode b{B}   Engine.step() of B sequences with `context` tokens cached (CUDA-graph replays with
                the NCCL calls captured, host bookkeeping included)
  prefill 1xT   DecoderModel.step over T prompt tokens of one sequence (a fresh cache each time)
  tp1           the same on one GPU (rank 0 alone, the whole model), where it fits
  no-reduce     the TP step with the layers' all-reduces removed (wrong numbers, the time
                without them): the all-reduce's share of the step is 1 - no-reduce / tp
  ar alone      torch.distributed.all_reduce alone on the step's tensors ([tokens, H] in the model's
                dtype), 2 a layer, eager and (CUDA) replayed from a graph of 2L calls; per call
                time and bus bandwidth (2 (n-1)/n bytes / time), beside the in-step per-call
                time (tp - no-reduce) / 2L
NCCL_NVLS_ENABLE=0 is set before NCCL starts (NVLink multicast stays off on shared machines).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

LLAMA3_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192))
TINY = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def canonical_weights(spec, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights under the canonical names (models/families.canonical_shapes), the same on
    every rank (one seed): norms 1 + N(0, 0.1), matrices N(0, 0.02)."""
    from layerforge.models.families import canonical_shapes
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, shape in canonical_shapes(spec).items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        t = 1 + 0.1 * t if len(shape) == 1 else 0.02 * t
        out[name] = t.to(dtype)
    return out


def decode_time(model, batch: int, context: int, steps: int, device: torch.device) -> float:
    """Engine.step() of `batch` sequences of `context` cached tokens (each fed token 1: no sampling,
    the same on every rank)."""
    from layerforge.models.engine import Engine
    eng = Engine(model, max_seqs=batch, max_seq_len=context + steps + 8, prefill_chunk=8192)
    g = torch.Generator().manual_seed(batch)
    slots = [eng.add(torch.randint(0, model.spec.vocab_size, (context,), generator=g).tolist()) for _ in range(batch)]
    while any(eng.seqs[s].fed < context for s in slots):
        eng.step()

    def step():
        for s in eng.step():
            eng.feed(s, 1)
    for s in slots:
        eng.feed(s, 1)
    t = timed(step, steps, device)
    for s in slots:
        eng.release(s)
    eng.graphs = None
    return t


def prefill_time(model, tokens: int, iters: int, device: torch.device) -> float:
    P = model.page_size
    pages = -(-tokens // P)
    cache = model.make_cache(num_pages=pages, max_seqs=1, max_pages_per_seq=pages)
    ids = torch.randint(0, model.spec.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device=device, dtype=torch.int32)

    def run():
        cache.allocate(0, tokens)
        model.step(ids, [0] * tokens, cache)
        cache.free(0)
    return timed(run, iters, device, warmup=1)


def all_reduce_alone(group, rows: int, H: int, calls: int, dtype, device, iters: int) -> tuple[float, float | None]:
    """Per-call time of `calls` all-reduces of [rows, H] back to back: eager, and on CUDA replayed
    from one graph of them (as in the captured decode step)."""
    xs = [torch.randn(rows, H, device=device).to(dtype) for _ in range(calls)]

    def eager():
        for x in xs:
            group.all_reduce(x)
    t_eager = timed(eager, iters, device) / calls
    if device.type != "cuda":
        return t_eager, None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        eager()
    return t_eager, timed(g.replay, iters, device) / calls


def bus_bw(rows: int, H: int, elem: int, world: int, seconds: float) -> float:
    return 2 * (world - 1) / world * rows * H * elem / seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (float32, the reference path)")
    ap.add_argument("--tiny", action="store_true", help="a tiny llama config and sizes (smoke runs)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--prefill", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-tp1", action="store_true", help="skip the one-GPU model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from layerforge.models.families import spec_from_config
    from layerforge.models.model import DecoderModel
    from layerforge.models.parallel import parallel_model
    from layerforge.runtime.parallel import init_parallel

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    layout = init_parallel(tp_size=world, backend="gloo" if args.cpu else None)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.cpu else torch.bfloat16
    tiny = args.tiny
    context = args.context or (24 if tiny else 2048)
    batches = [int(b) for b in (args.batches or ("1,3" if tiny else "1,64")).split(",")]
    prefill = args.prefill or (40 if tiny else 4096)
    steps = args.steps or (3 if tiny else 30)
    spec = spec_from_config({**(TINY if tiny else LLAMA3_70B), "num_hidden_layers": args.layers})
    H, L = spec.hidden_size, spec.num_layers
    rank0 = layout.rank == 0
    say = print if rank0 else (lambda *a, **k: None)
    say(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} x {world}  "
        f"{'tiny llama' if tiny else 'Llama-3-70B shape'}, {L} layers, {dtype}, tp {world}; "
        f"decode ctx {context}, prefill 1 x {prefill}", flush=True)

    weights = canonical_weights(spec, device, dtype)
    tp = parallel_model(spec, weights, layout, dtype=dtype, device=device)
    rows = []
    cases = [("decode", b) for b in batches] + [("prefill", prefill)]

    def measure(model, kind, n):
        return (decode_time(model, n, context, steps, device) if kind == "decode" else
                prefill_time(model, n, max(2, steps // 5), device))
    for kind, n in cases:
        row = {"mode": kind, "n": n, "tokens": n if kind == "decode" else prefill}
        row["tp_s"] = measure(tp, kind, n)
        reduces = [layer.reduce for layer in tp.layers]
        for layer in tp.layers:   # the step without the layers' all-reduces: their share of it
            layer.reduce = None
        try:
            row["no_reduce_s"] = measure(tp, kind, n)
        finally:
            for layer, r in zip(tp.layers, reduces):
                layer.reduce = r
        alone, graphed = all_reduce_alone(layout.tp, row["tokens"], H, 2 * L, dtype, device, max(3, steps))
        row.update(ar_alone_s=alone, ar_graph_s=graphed)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del tp
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_tp1:   # the whole model on rank 0's GPU, while the others wait
        if rank0:
            try:
                one = DecoderModel(spec, dtype=dtype, device=device).eval()
                one.load_state_dict(weights)
                del weights
                for row, (kind, n) in zip(rows, cases):
                    row["tp1_s"] = measure(one, kind, n)
                del one
            except torch.cuda.OutOfMemoryError:
                say("tp1: the whole model does not fit on one GPU", flush=True)
        if dist.is_initialized():
            dist.barrier()
    elem = torch.tensor([], dtype=dtype).element_size()
    for r in rows:
        tag = f"{r['mode']} b{r['n']}" if r["mode"] == "decode" else f"prefill 1x{r['n']}"
        share = 1 - r["no_reduce_s"] / r["tp_s"]
        in_step = max(r["tp_s"] - r["no_reduce_s"], 0.0) / (2 * L)
        r.update(ar_share=share, ar_in_step_s=in_step)
        alone_bw = bus_bw(r["tokens"], H, elem, world, r["ar_graph_s"] or r["ar_alone_s"])
        tp1 = f"tp1 {r['tp1_s'] * 1e3:8.3f} ms ({r['tp1_s'] / r['tp_s']:.2f} x)  " if "tp1_s" in r else ""
        step_bw = f" ({bus_bw(r['tokens'], H, elem, world, in_step) / 1e9:6.1f} GB/s)" if in_step > 0 else ""
        graphed = f", {r['ar_graph_s'] * 1e6:7.1f} us graph" if r["ar_graph_s"] else ""
        say(f"  {tag:14s} tp{world} {r['tp_s'] * 1e3:8.3f} ms  {tp1}no-reduce {r['no_reduce_s'] * 1e3:8.3f} ms  "
            f"all-reduce share {share * 100:5.1f} %  per call in step {in_step * 1e6:7.1f} us{step_bw}  "
            f"alone {r['ar_alone_s'] * 1e6:7.1f} us eager{graphed} ({alone_bw / 1e9:6.1f} GB/s)", flush=True)
    if rank0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(), "world": world,
                       "layers": L, "context": context, "dtype": str(dtype), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
