"""Whole-model speed beside transformers, in one run on one GPU: a Llama-3-8B-shaped model
(8 layers by default, random weights, bf16).

    python -m benchmarks.bench_model [--layers 8] [--context 2048] [--batches 1,8,64] [--no-compile]
                                     [--weights u4|i8|f8e4m3]   (our projections quantised)
                                     [--gemm cublas|wgmma]      (bf16 products past 16 rows)

Decode (one new token per sequence, `context` tokens already cached), per step:
  step        Engine.step() with CUDA-graph replay + argmax + feed (the host waits for every token)
  generate    greedy generate(): self-feeding graphs, the host reads tokens one step behind
  ours-graph  the graph replay alone, back to back (device time of a step)
  hf-eager    transformers' forward with its default (dynamic) cache + argmax on the device
  hf-flash    the same with SDPA held to its flash backend (the default, cuDNN, re-plans every step)
  hf-compiled torch.compile(mode="reduce-overhead") over forward with a StaticCache
  roofline    (weights + the KV read once) / the copy bandwidth measured in this run
Prefill (1 x 2048 and 8 x 512 tokens): ours (model.step) against transformers eager.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192))


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def make_models(layers: int):
    import transformers
    from layerforge.models.families import canonical_state_dict, spec_from_config
    from layerforge.models.model import DecoderModel
    cfg = transformers.LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    d = cfg.to_dict()
    d["model_type"] = "llama"
    spec = spec_from_config(d)
    ours = DecoderModel(spec, dtype=torch.bfloat16, device="cuda").eval()
    ours.load_state_dict(canonical_state_dict(spec, hf.state_dict()))
    return cfg, hf, ours, spec


def weight_bytes(spec, batch: int) -> int:
    H, Fd, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    per_layer = H * spec.qkv_size + spec.num_heads * spec.head_dim * H + 3 * H * Fd + 2 * H
    return 2 * (L * per_layer + spec.vocab_size * H + H + batch * H)


def model_weight_bytes(ours, batch: int) -> int:
    """Bytes a decode step reads of the model as it is (quantised projections at their packed
    size): every parameter and buffer but the embedding table, of which `batch` rows."""
    emb = ours.embed.weight
    total = sum(t.numel() * t.element_size() for t in list(ours.parameters()) + list(ours.buffers())
                if t.data_ptr() != emb.data_ptr())
    return total + batch * emb.shape[1] * emb.element_size()


def kv_bytes(spec, batch: int, context: int) -> int:
    return 2 * 2 * spec.num_layers * batch * context * spec.num_kv_heads * spec.head_dim


def ready_engine(model, batch: int, context: int, steps: int, *, max_seq_len: int = 0, adapters=None):
    """(engine, step): an Engine holding `batch` random prompts of `context` tokens, prefilled, each
    sequence's first token fed (sequence i on adapters[i] when given), and a greedy decode step of
    every sequence (the engine's graphs replay it on a GPU)."""
    from layerforge.models.engine import Engine
    eng = Engine(model, max_seqs=batch, max_seq_len=max_seq_len or context + 3 * steps + 16, prefill_chunk=8192)
    g = torch.Generator().manual_seed(batch)
    slots = [eng.add(torch.randint(0, model.spec.vocab_size, (context,), generator=g).tolist(),
                     adapter=None if adapters is None else adapters[i]) for i in range(batch)]
    out = {}
    while any(eng.seqs[s].fed < context for s in slots):     # prefill
        out.update(eng.step())
    for s in slots:
        eng.feed(s, int(out[s].argmax()))

    def step():
        out = eng.step()
        order = sorted(out)
        toks = torch.stack([out[s] for s in order]).argmax(-1).tolist()
        for s, t in zip(order, toks):
            eng.feed(s, t)
    return eng, step


def bench_ours_decode(ours, batch: int, context: int, steps: int, max_seq_len: int = 0) -> tuple[float, float]:
    eng, step = ready_engine(ours, batch, context, steps, max_seq_len=max_seq_len)
    full = timed(step, steps)
    graphs = eng.graphs
    toks, sl = [1] * batch, list(range(batch))

    def replay():
        for s in sl:
            eng.cache.allocate(s, eng.cache.seq_len(s) + 1)
        graphs.decode(toks, sl)
    replay_t = timed(replay, steps)
    return full, replay_t


def bench_generate(ours, batch: int, context: int, steps: int, profile: bool = False) -> float:
    """A decode step of greedy generate() (self-feeding graphs, tokens read one step behind):
    the time of its decode loop for 1 + steps new tokens, over steps (the first token comes from
    the prefill's logits). Also printed: the whole call and a 1-token call (the prefill)."""
    from layerforge.models.engine import generate
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, ours.spec.vocab_size, (context,), generator=g).tolist() for _ in range(batch)]
    generate(ours, prompts, max_new_tokens=1 + steps)   # warm: the engine for the longest call, its graphs
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(ours, prompts, max_new_tokens=1)
    torch.cuda.synchronize()
    short = time.perf_counter() - t
    from layerforge.models import engine as E
    loop, spent = E._greedy_loop, []

    def timed_loop(*a, **k):   # the decode loop alone, beside the difference of the two calls
        t0 = time.perf_counter()
        loop(*a, **k)
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - t0)
    E._greedy_loop = timed_loop
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    try:
        t = time.perf_counter()
        if prof:
            prof.enable()
        generate(ours, prompts, max_new_tokens=1 + steps)
        torch.cuda.synchronize()
    finally:
        E._greedy_loop = loop
        if prof:
            prof.disable()
    total = time.perf_counter() - t
    if prof:
        import pstats
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(r"engine|graphs|kv_cache|Event|replay|copy_|tolist", 25)
    print(f"   generate b{batch}: 1 token {short * 1e3:.1f} ms, {1 + steps} tokens {total * 1e3:.1f} ms, "
          f"greedy loop {sum(spent) * 1e3:.1f} ms in {len(spent)} call(s)", flush=True)
    return sum(spent) / steps   # the loop makes `steps` tokens (the first comes from the prefill)


def bench_hf_decode(hf, cfg, batch: int, context: int, steps: int, compiled: bool, profile: bool = False,
                    flash: bool = False) -> float:
    """transformers' decode step: eager with its default cache (SDPA picks its backend; with
    flash=True, SDPA is held to its flash backend: in torch 2.11 on the H200 the default picks
    cuDNN, which rebuilds its plan every step as the key length changes, ~4.9 ms of host time
    per call), or compiled with a StaticCache."""
    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return bench_hf_decode(hf, cfg, batch, context, steps, compiled, profile)
    import transformers
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
    with torch.no_grad():
        if not compiled:   # the default cache, as transformers' forward makes it
            out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
            state = {"tok": out.logits[:, -1].argmax(-1, keepdim=True), "cache": out.past_key_values}

            def step():
                o = hf(input_ids=state["tok"], past_key_values=state["cache"], use_cache=True)
                state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
                state["cache"] = o.past_key_values
            if profile:
                from torch.profiler import ProfilerActivity, profile as prof_
                step()
                with prof_(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            return timed(step, steps)
        max_len = context + 3 * steps + 16
        try:
            cache = transformers.StaticCache(config=cfg, max_cache_len=max_len)
        except TypeError:
            cache = transformers.StaticCache(config=cfg, max_batch_size=batch, max_cache_len=max_len,
                                             device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(context, device="cuda")
        out = hf(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
        state = {"tok": out.logits[:, -1].argmax(-1, keepdim=True), "pos": context}

        def fwd(tok, cache_position):
            return hf(input_ids=tok, past_key_values=cache, cache_position=cache_position, use_cache=True).logits

        cfwd = torch.compile(fwd, mode="reduce-overhead", fullgraph=True)

        def step():
            p = torch.tensor([state["pos"]], device="cuda")
            logits = cfwd(state["tok"], p)
            state["tok"] = logits[:, -1].argmax(-1, keepdim=True)
            state["pos"] += 1
        return timed(step, steps, warmup=5)


def profile_decode(ours, context: int) -> None:
    """The kernels of one batch-1 graph replay, by total time (torch.profiler / CUPTI)."""
    from layerforge.models.engine import Engine

    from .bench_rows import kernel_times
    eng = Engine(ours, max_seqs=1, max_seq_len=context + 64)
    eng.add(list(range(1, context + 1)))
    while eng.seqs[0].fed < context:
        eng.step()
    eng.feed(0, 1)
    eng.step()
    eng.feed(0, 2)

    def step():
        eng.step()
        eng.feed(0, 3)
    rows = kernel_times(step, calls=5, warmup=0)
    total = sum(t for _, t, _ in rows)
    print(f"batch-1 decode step, GPU kernel time {total:.1f} us per step:")
    for name, t, n in rows[:25]:
        print(f"  {t:8.1f} us  {n:4d}x  {name[:90]}")


def bench_prefill(hf, ours, batch: int, length: int, iters: int) -> tuple[float, float]:
    ids = torch.randint(0, ours.spec.vocab_size, (batch, length), device="cuda")
    P = ours.page_size
    cache = ours.make_cache(num_pages=batch * (-(-length // P)) + 1, max_seqs=batch, max_pages_per_seq=-(-length // P))
    flat = ids.reshape(-1)
    seq_ids = [b for b in range(batch) for _ in range(length)]

    def ours_step():
        for b in range(batch):
            cache.free(b)
            cache.allocate(b, length)
        ours.step(flat, seq_ids, cache)
    t_ours = timed(ours_step, iters)
    with torch.no_grad():
        t_hf = timed(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1), iters)
    return t_ours, t_hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="ours only (no transformers decode)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--max-seq-len", type=int, default=0, help="the step/graph engine's (default: what the run needs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print the kernels of a batch-1 decode step")
    ap.add_argument("--profile-hf", action="store_true", help="print the ops of transformers' eager decode step")
    ap.add_argument("--profile-generate", action="store_true", help="cProfile the host side of generate()")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "u4", "i8", "f8e4m3"],
                    help="quantise our projections (DecoderModel.quantize_; u4 group 128, i8 / f8e4m3 per row); "
                         "the roofline counts the packed bytes; transformers stays bf16")
    ap.add_argument("--gemm", default="cublas", choices=["cublas", "wgmma"],
                    help="our bf16 products past the small-token rows: cuBLAS (the default route) or the generated "
                         "Hopper GEMM with the epilogues fused (runtime/linear.WGMMA_MIN_ROWS = 17)")
    ap.add_argument("--unfused", action="store_true",
                    help="also the decode step with model.fused_decode = False (norm, activation and add kernels, cuBLAS)")
    args = ap.parse_args()
    from .bench_rows import copy_ceiling
    bw = copy_ceiling()
    if args.gemm == "wgmma":
        from layerforge.runtime import linear
        linear.WGMMA_MIN_ROWS = 17
    cfg, hf, ours, spec = make_models(args.layers)
    if args.weights != "bf16":
        ours.quantize_(args.weights, 128 if args.weights == "u4" else 0)
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s  Llama-3-8B shape, {args.layers} layers, bf16, "
          f"context {args.context}")
    if args.profile:
        profile_decode(ours, args.context)
    rows = []
    print(f"{'decode':>8} {'step':>9} {'generate':>9} {'graph':>9} {'hf-eager':>9} {'hf-flash':>9} {'hf-comp':>9} {'roofline':>9}  "
          f"{'gen/comp':>8} {'gen/roof':>8}")
    for B in [int(b) for b in args.batches.split(",")]:
        full, replay = bench_ours_decode(ours, B, args.context, args.steps, args.max_seq_len)
        gen = bench_generate(ours, B, args.context, 2 * args.steps, profile=args.profile_generate)
        eager = float("nan") if args.no_hf else bench_hf_decode(hf, cfg, B, args.context, args.steps, compiled=False,
                                                                profile=args.profile_hf and B == 1)
        flash = float("nan") if args.no_hf else bench_hf_decode(hf, cfg, B, args.context, args.steps, compiled=False, flash=True)
        comp = float("nan") if args.no_compile or args.no_hf else bench_hf_decode(hf, cfg, B, args.context, args.steps, True)
        wb = weight_bytes(spec, B) if args.weights == "bf16" else model_weight_bytes(ours, B)
        roof = (wb + kv_bytes(spec, B, args.context)) / bw
        rows.append(dict(kind="decode", batch=B, ours_ms=full * 1e3, graph_ms=replay * 1e3, generate_ms=gen * 1e3,
                         hf_eager_ms=eager * 1e3, hf_eager_flash_ms=flash * 1e3,
                         hf_compiled_ms=comp * 1e3, roofline_ms=roof * 1e3))
        print(f"{B:>8} {full * 1e3:>8.3f}m {gen * 1e3:>8.3f}m {replay * 1e3:>8.3f}m {eager * 1e3:>8.3f}m {flash * 1e3:>8.3f}m "
              f"{comp * 1e3:>8.3f}m {roof * 1e3:>8.3f}m  {comp / gen:>8.2f} {roof / gen:>8.2f}")
        if args.unfused:
            ours.release_engine()
            ours.fused_decode = False
            u_full, u_replay = bench_ours_decode(ours, B, args.context, args.steps, args.max_seq_len)
            u_gen = bench_generate(ours, B, args.context, 2 * args.steps)
            ours.release_engine()
            ours.fused_decode = True
            rows[-1].update(unfused_ours_ms=u_full * 1e3, unfused_graph_ms=u_replay * 1e3,
                            unfused_generate_ms=u_gen * 1e3)
            print(f"{'unfused':>8} {u_full * 1e3:>8.3f}m {u_gen * 1e3:>8.3f}m {u_replay * 1e3:>8.3f}m {'':>9} {'':>9} "
                  f"{'':>9} {roof * 1e3:>8.3f}m  {comp / u_gen:>8.2f} {roof / u_gen:>8.2f}")
        torch.cuda.empty_cache()
    print(f"{'prefill':>8} {'ours':>9} {'hf-eager':>9} {'speedup':>8}")
    for B, S in () if args.no_prefill else ((1, 2048), (8, 512)):
        t_ours, t_hf = bench_prefill(hf, ours, B, S, 10)
        rows.append(dict(kind="prefill", batch=B, length=S, ours_ms=t_ours * 1e3, hf_eager_ms=t_hf * 1e3))
        print(f"{B:>3}x{S:<4} {t_ours * 1e3:>8.3f}m {t_hf * 1e3:>8.3f}m {t_hf / t_ours:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_tb_s=bw / 1e12, layers=args.layers,
                           context=args.context, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
