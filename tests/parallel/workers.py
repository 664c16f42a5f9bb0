"""The bodies that tests/parallel runs on every rank (tests/parallel/ranks.py): module-level
functions, so that spawned processes can import them. Each raises AssertionError on a mismatch.

A case (make_case) is a tiny transformers checkpoint folder and what the one-process model
(TP = PP = 1) gives on it: logits of a batch and greedy tokens of prompts of different lengths.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def make_case(folder: Path, *, dtype=torch.float32, device="cpu", seed: int = 1, max_new_tokens: int = 6) -> Path:
    """Save the one-process model's logits and greedy tokens on the checkpoint in `folder` beside it."""
    import layerforge as lf
    model = lf.from_pretrained(folder, dtype=dtype, device=device)
    V = model.spec.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 11), generator=g)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (7, 5)]
    logits = model(ids.to(device)).float().cpu()
    # each prompt's next-token logits: which first tokens are a greedy choice within rounding
    prompt_last = torch.stack([model(torch.tensor([p], device=device))[0, -1].float().cpu() for p in prompts])
    tokens = model.generate(prompts, max_new_tokens=max_new_tokens)
    feed = [3, 5]
    decode, _ = decode_logits(model, prompts, feed, cuda_graphs=False)
    path = Path(folder) / "expected.pt"
    torch.save({"ids": ids, "logits": logits, "prompts": prompts, "tokens": tokens, "feed": feed,
                "decode": decode.float().cpu(), "prompt_last": prompt_last, "max_new_tokens": max_new_tokens}, path)
    model.release_engine()
    return path


def decode_logits(model, prompts: list[list[int]], feed: list[int], *, cuda_graphs: bool | None
                  ) -> tuple[torch.Tensor, bool]:
    """The logits of one decode step (each prompt's next token `feed`) after the prompts' prefill,
    through an Engine; and whether the step was a CUDA-graph replay."""
    from layerforge.models.engine import Engine
    engine = Engine(model, max_seqs=len(prompts), max_seq_len=64, cuda_graphs=cuda_graphs)
    slots = [engine.add(p) for p in prompts]
    engine.step()
    for slot, token in zip(slots, feed):
        engine.feed(slot, token)
    out = engine.step()
    replayed = engine.graphs is not None and engine.graphs.replays > 0
    return torch.stack([out[s] for s in slots]), replayed


def close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """|got - ref| <= rel * max|ref| everywhere; NaN never passes."""
    got, ref = got.float().cpu(), ref.float().cpu()
    assert got.shape == ref.shape, f"{what}: shape {list(got.shape)} != {list(ref.shape)}"
    assert not got.isnan().any(), f"{what}: NaN"
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{what}: max error {err:.3g} > {rel} x {ref.abs().max().item():.3g}"


def _fusable(s) -> bool:
    """Whether DecoderLayer.fused serves the spec (DecoderModel.fuses without the device rules)."""
    return s.residual == "sequential" and not s.sandwich_norms and s.norm in ("rms", "rms_1p") and s.moe is None


def check_models(rank: int, world: int, folders: list[str], tp: int, pp: int, dtype: str = "float32",
                 device: str = "cpu", rel: float = 1e-5, micro_batch_tokens: int = 4,
                 compare_tokens: bool = True) -> None:
    """Each folder's model split tp x pp: logits (on the last stage) and greedy tokens (on every
    rank) equal the one-process model's (make_case); each rank's spec and cache hold its shard."""
    import layerforge as lf
    torch_dtype = getattr(torch, dtype)
    if device == "cuda":
        device = f"cuda:{rank}"
    for folder in folders:
        exp = torch.load(Path(folder) / "expected.pt")
        model = lf.from_pretrained(folder, dtype=torch_dtype, device=device, tp_size=tp, pp_size=pp)
        name = f"{Path(folder).name} rank {rank} (tp {tp}, pp {pp})"
        s, sh = model.spec, model.sharding
        assert (sh["tp_size"], sh["tp_rank"], sh["pp_size"], sh["pp_rank"]) == (tp, rank % tp, pp, rank // tp), sh
        assert s.num_heads * tp == sh["num_heads"] and s.intermediate_size * tp == sh["intermediate_size"], name
        assert s.num_kv_heads == max(1, sh["num_kv_heads"] // tp), name
        cache = model.make_cache(num_pages=4, max_seqs=1, max_pages_per_seq=4)
        assert cache.num_kv_heads == s.num_kv_heads and cache.num_layers == s.num_layers, name
        if pp > 1:
            model.micro_batch_tokens = micro_batch_tokens
        last = sh["pp_rank"] == pp - 1
        logits = model(exp["ids"].to(device))
        if last:
            close(logits, exp["logits"], rel, f"{name}: logits")
        else:
            assert logits.shape[-1] == 0, name
        # a decode step: eager, and on GPUs without pipeline stages also replayed from a CUDA graph
        # (tensor parallel: its all-reduces and all-gather captured)
        for graphs in ([False, True] if device.startswith("cuda") and pp == 1 else [None]):
            got, replayed = decode_logits(model, exp["prompts"], exp["feed"], cuda_graphs=graphs)
            assert replayed == bool(graphs), f"{name}: cuda_graphs={graphs}, replayed {replayed}"
            if last:
                close(got, exp["decode"], rel, f"{name}: decode logits (cuda_graphs={graphs})")
        if device == "cpu" and _fusable(s):
            # the fused decode layers (rank 0 adds the residual in the products' epilogues; a stage
            # sends the residual stream alone) run on the GPU only by default (DecoderModel.fuses):
            # here through the products' reference path
            model.fuses = lambda x: 1 <= x.shape[0] <= 16
            got, _ = decode_logits(model, exp["prompts"], exp["feed"], cuda_graphs=None)
            del model.fuses
            if last:
                close(got, exp["decode"], rel, f"{name}: decode logits, fused layers")
        tokens = model.generate(exp["prompts"], max_new_tokens=exp["max_new_tokens"])
        if compare_tokens:
            assert tokens == exp["tokens"], f"{name}: greedy tokens {tokens} != {exp['tokens']}"
        else:   # bf16: near ties may go either way; each first token is a greedy choice of the
            # one-process model's logits within the tolerance (and every rank has the same tokens)
            for t, ref in zip(tokens, exp["prompt_last"]):
                top = ref.max().item()
                assert ref[t[0]].item() >= top - rel * ref.abs().max().item(), f"{name}: first token {t[0]}"
        mine = torch.tensor(sum(tokens, []), device=device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(everyone, mine)
        assert all(torch.equal(t, mine) for t in everyone), f"{name}: ranks generated different tokens"
        model.release_engine()


def check_layers(rank: int, world: int, device: str = "cpu") -> None:
    """ColumnLinear, RowLinear (all-reduce, reduce-scatter, residual, input not yet split),
    VocabParallelEmbedding and ParallelLMHead from full weights equal the one-process products."""
    from layerforge.runtime.parallel import (ColumnLinear, ParallelLMHead, RowLinear, VocabParallelEmbedding,
                                             init_parallel, shard)
    tp = init_parallel(tp_size=world).tp
    assert (tp.rank, tp.size) == (rank, world)
    if device == "cuda":
        device = f"cuda:{rank}"
    g = torch.Generator().manual_seed(7)   # the same full weights on every rank

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)
    H, Fd, V, T = 16, 24, 40, 6
    x, w, b = rand(T, H), rand(Fd, H), rand(Fd)
    wgu, w2, b2, res, emb = rand(2 * Fd, H), rand(H, Fd), rand(H), rand(T, H), rand(V, H)
    ref = F.linear(x, w, b)
    close(ColumnLinear.shard_from(w, b, group=tp, gather_output=True)(x), ref, 1e-5, "column, gathered")
    close(ColumnLinear.shard_from(w, b, group=tp)(x), shard(ref, rank, world, dim=1), 1e-5, "column, local")
    gate, up = F.linear(x, wgu).chunk(2, dim=-1)
    close(ColumnLinear.shard_from(wgu, group=tp, parts=(Fd, Fd), gather_output=True)(x, gated="silu"),
          F.silu(gate) * up, 1e-5, "column, gated")
    h = F.silu(ref)
    full = F.linear(h, w2, b2)
    h_mine = shard(h, rank, world, dim=1)
    close(RowLinear.shard_from(w2, b2, group=tp)(h_mine), full, 1e-5, "row, all-reduce")
    close(RowLinear.shard_from(w2, b2, group=tp)(h_mine, residual=res), full + res, 1e-5, "row, residual")
    close(RowLinear.shard_from(w2, b2, group=tp, input_is_parallel=False)(h), full, 1e-5, "row, whole input")
    close(RowLinear.shard_from(w2, b2, group=tp, reduce="reduce_scatter")(h_mine), shard(full, rank, world),
          1e-5, "row, reduce-scatter")
    ids = torch.randint(0, V, (3, 5), generator=g).to(device)
    close(VocabParallelEmbedding.shard_from(emb, group=tp)(ids), emb[ids], 0.0, "embedding")
    close(ParallelLMHead.shard_from(emb, group=tp)(x), x @ emb.T, 1e-5, "LM head")


def check_layers_and_models(rank: int, world: int, *args, **kw) -> None:
    """check_layers, then check_models(*args) in the same world (one start of the processes)."""
    check_layers(rank, world, kw.get("device", "cpu"))
    check_models(rank, world, *args, **kw)


def run_benchmark(rank: int, world: int, out: str) -> None:
    """benchmarks/bench_parallel.py's smallest run (gloo, a tiny llama)."""
    from benchmarks.bench_parallel import main
    assert main(["--cpu", "--tiny", "--layers", "1", "--batches", "2", "--context", "8", "--prefill", "8",
                 "--steps", "1", "--json", out]) == 0


def check_moe_models(rank: int, world: int, folders: list[str], pp_folder: str, dtype: str = "float32",
                     device: str = "cpu", rel: float = 1e-5, compare_tokens: bool = True) -> None:
    """MoE models split TP = 2: each rank's MoE layers hold every expert with half of each expert's
    (and the shared expert's) intermediate features, the router whole; a step makes exactly one
    all-reduce per attention and one per MLP (dense or MoE) of every layer; then check_models
    (logits, decode, greedy tokens equal one process). With pp_folder, that model at PP = 2 too
    (in the same world)."""
    import layerforge as lf
    from layerforge.runtime.moe import MoE
    for folder in folders:
        model = lf.from_pretrained(folder, dtype=getattr(torch, dtype),
                                   device=f"cuda:{rank}" if device == "cuda" else device, tp_size=world)
        sh, s = model.sharding, model.spec
        name = f"{Path(folder).name} rank {rank}"
        assert s.moe is not None and s.moe.inter * world == sh["moe_inter"], (name, sh)
        assert s.moe.shared_inter * world == sh["moe_shared_inter"], (name, sh)
        moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
        assert moes and len(moes) == sum(s.moe_layers), name
        for m in moes:
            E, H, Fl = s.moe.experts, s.hidden_size, s.moe.inter
            assert tuple(m.experts.gate_up_proj.shape) == (E, 2 * Fl, H), name
            assert tuple(m.experts.down_proj.shape) == (E, H, Fl), name
            assert tuple(m.gate.weight.shape) == (E, H), name      # the router replicated
        calls = []
        for i, layer in enumerate(model.layers):
            layer.reduce = (lambda f, i: lambda x: (calls.append(i), f(x))[1])(layer.reduce, i)
        exp = torch.load(Path(folder) / "expected.pt")
        model(exp["ids"].to(model.device))
        assert calls == [i for i in range(s.num_layers) for _ in range(2)], f"{name}: all-reduces {calls}"
        model.release_engine()
    check_models(rank, world, folders, world, 1, dtype, device, rel, 4, compare_tokens)
    if pp_folder:
        check_models(rank, world, [pp_folder], 1, world, dtype, device, rel, 4, compare_tokens)
