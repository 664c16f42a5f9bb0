"""Multi-LoRA projections (runtime/lora.py) of a Llama-3-8B-shaped layer beside the base products
alone and beside a PEFT-style torch peer, same run, same card, bf16, CUDA-graph replays.

    python -m benchmarks.bench_lora [--cases decode:64,prefill:4096,engine:64,engine-prefill:4096] [--adapters 4] [--rank 16]
                                    [--route dense|grouped] [--layers 32] [--context 256] [--no-kext] [--breakdown]
                                    [--json out.json]

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

`engine:B` serves B sequences through models/engine.Engine, decoding with CUDA graphs, of a whole
Llama-3-8B-shaped model (--layers layers of --dims, the 128256-token LM head, random weights; B
prompts of --context tokens prefilled first). Per decode step (one token a sequence):
- step: Engine.step() (a graph replay) + argmax + feed, the host reading every token;
- replay: the graph replays alone, back to back (the step's device time);
rows: the base model (its fused decode layer), the base model unfused (model.fused_decode = False,
as attached adapters run it), and the model with --adapters adapters of rank --rank on every
projection attached, sequence i on adapter i % adapters (every step mixes them). over: against the
base model's graph decode (target at most 15 %); the adapters' steps must all replay (no eager
fallback; the row says how many replays and eager steps there were).

`engine-prefill:T` prefills T prompt tokens through the same Engine and model: --adapters sequences
of T / --adapters tokens, sequence i on adapter i (one step packs them all: every adapter in it),
timed from add() to the last logits (the engine's host work included), against the same prompts
on the base model (target at most 10 %).

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

CASES = "decode:64,prefill:4096,engine:64,engine-prefill:4096"
MODES = ("decode", "prefill", "engine", "engine-prefill")
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


def kernel_table(fn, label: str, device: torch.device, iters: int = 5) -> None:
    """Each kernel's GPU time a call of fn (the mean of `iters`), from torch.profiler; CUDA only."""
    if device.type != "cuda":
        print(f"  {label}: the kernel breakdown needs a CUDA device")
        return
    from .bench_rows import kernel_times
    rows = kernel_times(fn, calls=iters, warmup=2)
    print(f"  {label}: {sum(t for _, t, _ in rows):.1f} us of kernels a call")
    for key, t, n in rows[:16]:
        print(f"    {t:9.1f} us {n:4d}x  {key[:90]}")


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
    ap.add_argument("--cases", default=CASES, help=f"mode:tokens,... (modes {', '.join(MODES)})")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--route", choices=("dense", "grouped"), default=None, help="the prefill route (default: the store's)")
    ap.add_argument("--dims", default=DIMS, help="hidden,q,kv,intermediate")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32, help="the engine case's decoder layers")
    ap.add_argument("--context", type=int, default=256, help="the engine case's prompt tokens a sequence")
    ap.add_argument("--steps", type=int, default=32, help="the engine case's timed decode steps")
    ap.add_argument("--breakdown", action="store_true",
                    help="each kernel's GPU time a step (torch.profiler), base beside ours, for every case")
    ap.add_argument("--no-kext", action="store_true",
                    help="without the K-extended storage (runtime/lora.KEXT off: the delta's own pass at prefill)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bad = [c for c in a.cases.split(",") if c.split(":")[0] not in MODES or c.count(":") != 1]
    if bad:
        ap.error(f"--cases: {bad[0]!r} is not mode:tokens with a mode of {', '.join(MODES)}")
    from layerforge.runtime import linear
    dense_max, kext, strided = lora_mod.DENSE_MAX_RANKS, lora_mod.KEXT, linear.STRIDED_W
    lora_mod.DENSE_MAX_RANKS = {None: dense_max, "grouped": 0, "dense": 1 << 30}[a.route]
    if a.no_kext:
        lora_mod.KEXT = False
    try:
        return run(a)
    finally:
        lora_mod.DENSE_MAX_RANKS, lora_mod.KEXT, linear.STRIDED_W = dense_max, kext, strided


def run(a) -> int:
    dev, dt = torch.device(a.device), torch.bfloat16
    dims = tuple(int(d) for d in a.dims.split(","))
    gen = torch.Generator().manual_seed(0)
    layer = build(dims, a.adapters, a.rank, dev, dt, gen)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}: bf16, {a.adapters} adapters of rank {a.rank} on q k v o gate up down, layer {a.dims}")
    cases = [(mode, tokens) for mode, tokens in (c.split(":") for c in a.cases.split(","))]
    layer_cases = [c for c in cases if c[0] in ("decode", "prefill")]
    if layer_cases:
        print(f"{'case':>14} {'base us':>9} {'ours us':>9} {'layer us':>9} {'peer us':>9} {'ours over':>10} "
              f"{'layer over':>10} {'peer over':>10} {'route':>8} {'rel err':>8}")
    rows = []
    targets = dict(TARGETS)
    for mode, tokens in layer_cases:
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
        if a.breakdown:
            with torch.no_grad():
                kernel_table(base, f"{mode} {tokens}, base products", dev)
                kernel_table(lambda: ours(shared), f"{mode} {tokens}, ours (the step's batch made before)", dev)
    layer = None   # (its memory back before whole models load)
    for mode, tokens in (c for c in cases if c[0] not in ("decode", "prefill")):   # whole models: after the layer's
        rows.extend((engine_rows if mode == "engine" else engine_prefill_rows)(a, dims, int(tokens), dev))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "adapters": a.adapters, "rank": a.rank, "dims": dims, "rows": rows}, f, indent=1)
    return 0


# ---- the engine case ------------------------------------------------------------------------------
def engine_model(dims: tuple[int, int, int, int], layers: int, device, dtype):
    """A Llama-3-8B-shaped DecoderModel of `layers` layers of `dims`, random weights."""
    from layerforge.models.families import spec_from_config
    from layerforge.models.model import DecoderModel
    H, Q, KV, Fi = dims
    hd = 128 if H >= 1024 else 16
    spec = spec_from_config(dict(model_type="llama", vocab_size=128256, hidden_size=H, intermediate_size=Fi,
                                 num_hidden_layers=layers, num_attention_heads=Q // hd, num_key_value_heads=KV // hd,
                                 head_dim=hd, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                                 tie_word_embeddings=False))
    model = DecoderModel(spec, dtype=dtype, device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def engine_adapters(model, adapters: int, rank: int) -> dict:
    """PeftAdapters of rank `rank` on q, k, v, o, gate, up and down of every layer, random."""
    from layerforge.models.lora import adapter_from_state_dict
    s = model.spec
    shapes = {"self_attn.q_proj": (s.hidden_size, s.num_heads * s.head_dim),
              "self_attn.k_proj": (s.hidden_size, s.num_kv_heads * s.head_dim),
              "self_attn.v_proj": (s.hidden_size, s.num_kv_heads * s.head_dim),
              "self_attn.o_proj": (s.num_heads * s.head_dim, s.hidden_size),
              "mlp.gate_proj": (s.hidden_size, s.intermediate_size), "mlp.up_proj": (s.hidden_size, s.intermediate_size),
              "mlp.down_proj": (s.intermediate_size, s.hidden_size)}
    gen = torch.Generator(device=model.device).manual_seed(1)
    out = {}
    for e in range(adapters):
        tensors = {}
        for i in range(s.num_layers):
            for mod, (k, o) in shapes.items():
                key = f"base_model.model.model.layers.{i}.{mod}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=gen, device=model.device,
                                                              dtype=model.dtype) / k ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(o, rank, generator=gen, device=model.device,
                                                              dtype=model.dtype) * 0.01
        out[f"a{e}"] = adapter_from_state_dict(f"a{e}", {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank},
                                               tensors)
    return out


def engine_decode(model, batch: int, context: int, steps: int, adapters: list | None, dev) -> dict:
    """Per-step times of an Engine decoding `batch` sequences (each on its adapter, or the base)."""
    from .bench_model import ready_engine
    eng, step = ready_engine(model, batch, context, steps, adapters=adapters)
    row = dict(step_s=wall_time(step, steps, dev), replay_s=None)
    if eng.graphs is not None:
        sl, toks = list(range(batch)), [1] * batch
        ids = eng.adapter_slots(sl)

        def replay():
            for s in sl:
                eng.cache.allocate(s, eng.cache.seq_len(s) + 1)
            eng.graphs.decode(toks, sl, ids)
        row["replay_s"] = wall_time(replay, steps, dev)
        row["replays"] = eng.graphs.replays
    row["eager_steps"] = sum(eng.eager_steps.values())
    for s in list(eng.seqs):
        eng.release(s)
    return row


def wall_time(fn, iters: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds a call of fn takes (host included), over iters calls after warmup ones."""
    if device.type != "cuda":     # the CPU smoke run: once each
        iters, warmup = 1, 1
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def engine_prefill(model, prompts: list[list[int]], adapters: list | None, iters: int, dev,
                   breakdown: bool = False) -> list[float]:
    """Seconds of each of `iters` prefills of `prompts` (each on its adapter, or the base) through a
    fresh Engine's steps, from add() to every sequence's logits (with breakdown: each kernel's time a
    prefill)."""
    from layerforge.models.engine import Engine
    eng = Engine(model, max_seqs=len(prompts), max_seq_len=max(map(len, prompts)) + 16,
                 prefill_chunk=sum(map(len, prompts)))

    def prefill():
        slots = [eng.add(p, adapter=None if adapters is None else adapters[i]) for i, p in enumerate(prompts)]
        done = {}
        while len(done) < len(slots):
            done.update(eng.step())
        for s in slots:
            eng.release(s)
    if breakdown:
        with torch.no_grad():
            kernel_table(prefill, f"engine prefill, {'adapters' if adapters else 'base model'}", dev, iters=2)
    wall_time(prefill, 1, dev)   # warm
    return [wall_time(prefill, 1, dev, warmup=0) for _ in range(iters)]


def engine_prefill_rows(a, dims, tokens: int, dev) -> list[dict]:
    from layerforge.models.lora import attach_adapters
    model = engine_model(dims, a.layers, dev, torch.bfloat16)
    n = a.adapters
    g = torch.Generator().manual_seed(tokens)
    prompts = [torch.randint(0, model.spec.vocab_size, (tokens // n,), generator=g).tolist() for _ in range(n)]
    # base and adapters in alternating blocks (clock drift hits both), the median of every prefill
    times: dict[str, list[float]] = {"base": [], "lora": []}
    adapters = engine_adapters(model, a.adapters, a.rank)
    blocks = 3 if dev.type == "cuda" else 1
    for b in range(blocks):
        times["base"] += engine_prefill(model, prompts, None, 4, dev, a.breakdown and b == 0)
        attached = attach_adapters(model, adapters)
        times["lora"] += engine_prefill(model, prompts, [f"a{i}" for i in range(n)], 4, dev, a.breakdown and b == 0)
        attached.detach()
    runs = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    target = dict(TARGETS)["prefill"]
    print(f"engine prefill, {n} prompts of {tokens // n} tokens (one step), {a.layers} layers + the LM head; "
          f"over: against the base model's (median of {len(times['base'])} prefills each, base and adapters "
          f"alternating in {blocks} blocks)")
    print(f"{'':>14} {'prefill us':>11} {'over':>8}")
    out = []
    for name, t in runs.items():
        over = t / runs["base"] - 1
        mark = "" if name != "lora" else ("  ok" if over <= target else f"  over {target:.0%}")
        print(f"{name:>14} {t * 1e6:11.1f} {over:8.1%}{mark}")
        out.append(dict(mode="engine-prefill", tokens=tokens, run=name, layers=a.layers, prefill_s=t, over=over))
    return out


def engine_rows(a, dims, batch: int, dev) -> list[dict]:
    from layerforge.models.lora import attach_adapters
    model = engine_model(dims, a.layers, dev, torch.bfloat16)
    names = [f"a{i % a.adapters}" for i in range(batch)]
    runs = {"base": engine_decode(model, batch, a.context, a.steps, None, dev)}
    model.fused_decode = False
    runs["base unfused"] = engine_decode(model, batch, a.context, a.steps, None, dev)
    model.fused_decode = True
    attached = attach_adapters(model, engine_adapters(model, a.adapters, a.rank))
    runs["lora"] = engine_decode(model, batch, a.context, a.steps, names, dev)
    attached.detach()
    base = runs["base"]
    print(f"engine decode, {batch} sequences of {a.context} tokens, {a.layers} layers + the LM head, graphs "
          f"{'on' if dev.type == 'cuda' else 'off (cpu)'}; over: against the base model's")
    print(f"{'':>14} {'step us':>9} {'replay us':>10} {'step over':>10} {'replay over':>12} {'replays':>8} "
          f"{'eager':>6}")
    out = []
    for name, r in runs.items():
        over = r["step_s"] / base["step_s"] - 1
        rover = None if r["replay_s"] is None else r["replay_s"] / base["replay_s"] - 1
        mark = "" if name != "lora" else ("  ok" if (rover if rover is not None else over) <= dict(TARGETS)["decode"]
                                          else f"  over {dict(TARGETS)['decode']:.0%}")
        replay = "-" if r["replay_s"] is None else f"{r['replay_s'] * 1e6:10.1f}"
        rover_s = "-" if rover is None else f"{rover:12.1%}"
        print(f"{name:>14} {r['step_s'] * 1e6:9.1f} {replay:>10} {over:10.1%} {rover_s:>12} "
              f"{r.get('replays', 0):8d} {r['eager_steps']:6d}{mark}")
        out.append(dict(mode="engine", tokens=batch, run=name, layers=a.layers, context=a.context, **r,
                        step_over=over, replay_over=rover))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
