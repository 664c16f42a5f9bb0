"""Whole models from transformers checkpoints, on the CPU (the reference evaluator behind the
same modules): for every family, a tiny random model saved with save_pretrained and loaded with
lf.from_pretrained gives transformers' logits, and greedy generation is token-identical."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import layerforge as lf
from layerforge.models.engine import Engine, EngineError, generate
from layerforge.runtime.moe import MoE
from layerforge.runtime.quant import QuantLinear

from .hf_tiny import MLA_FAMILIES, MOE_FAMILIES, make_tiny, routed_logits, tiny_configs, tiny_loader

transformers = pytest.importorskip("transformers")

FAMILIES = sorted(tiny_configs())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loader(tmp_path_factory, head_dim=16, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(loaded, name):
    hf, ours = loaded(name)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits
    got = ours(ids)
    assert got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_is_token_identical(loaded, name):
    hf, ours = loaded(name)
    prompt = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, 7:].tolist()
    assert ours.generate(prompt, max_new_tokens=16)[0] == ref


@pytest.mark.parametrize("name", MOE_FAMILIES + MLA_FAMILIES)
def test_moe_bf16_logits_match_transformers_where_the_routing_agrees(tmp_path, name):
    """In bf16 a few tokens' top-k choice is a near tie that rounding tips the other way; where
    every MoE layer chose transformers' experts (for the position and those before it: most of
    them), the logits agree within bf16 rounding."""
    hf = make_tiny(name, tmp_path)
    ours = lf.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (4, 37), generator=torch.Generator().manual_seed(1))
    got, ref, agree = routed_logits(hf, ours, ids)
    assert agree.sum() >= ids.numel() // 4, agree.sum(-1)
    err = (got.float() - ref)[agree].abs().max().item()
    assert err <= 3e-2 * ref.abs().max().item(), err


@pytest.mark.parametrize("name", MOE_FAMILIES + MLA_FAMILIES)
def test_moe_checkpoint_with_stacked_experts_loads(tmp_path, name):
    """save_pretrained writes the Hub's names, one tensor an expert (the tests above load those);
    with save_original_format=False it writes transformers 5's stacked experts, which load too."""
    hf = make_tiny(name, tmp_path / "hub")
    hf.save_pretrained(tmp_path / "stacked", save_original_format=False)
    with safe_open(str(tmp_path / "stacked" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in f.keys())
    ours = lf.from_pretrained(tmp_path / "stacked", dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = hf(ids).logits
    torch.testing.assert_close(ours(ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_moe_layers_are_left_alone_by_quantize_and_not_captured(tmp_path, loaded):
    """quantize_ replaces the dense layers' projections and the attention's, not an MoE layer's;
    an f32 MoE step (torch's expert products, which read row counts) is not capturable."""
    make_tiny("qwen2_moe", tmp_path)
    ours = lf.from_pretrained(tmp_path, dtype=torch.float32)   # not the shared one: quantize_ changes it
    assert not ours.capturable(1) and loaded("llama")[1].capturable(1)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(6))
    before = ours(ids)
    ours.quantize_("i8", group_size=32)
    assert isinstance(ours.layers[0].mlp.gate_up, QuantLinear) and isinstance(ours.layers[1].attn.qkv, QuantLinear)
    moe = ours.layers[1].mlp
    assert isinstance(moe, MoE) and not any(isinstance(m, QuantLinear) for m in moe.modules())
    torch.testing.assert_close(ours(ids), before, rtol=0, atol=0.05 * before.abs().max().item())


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox", "bloom"])
def test_batch_of_prompts_equals_each_alone(loaded, name):
    _, ours = loaded(name)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 12, 3, 8)]
    together = generate(ours, prompts, max_new_tokens=10)
    assert together == [generate(ours, [p], max_new_tokens=10)[0] for p in prompts]
    # chunked prefill (3 tokens a step over all sequences) changes nothing
    assert generate(ours, prompts, max_new_tokens=10, prefill_chunk=3) == together


def test_generate_keeps_its_engine_between_calls(loaded):
    _, ours = loaded("llama")
    ours.release_engine()
    a = generate(ours, [[1, 2, 3], [4, 5]], max_new_tokens=5)
    engine = ours._engine
    assert engine.max_seqs == 2 and engine.max_seq_len == 16 and not engine.seqs   # rounded up to a page
    assert generate(ours, [[4, 5]], max_new_tokens=5)[0] == a[1] and ours._engine is engine   # fits: reused
    assert generate(ours, [[1, 2, 3]] * 3, max_new_tokens=5) == [a[0]] * 3                      # more sequences
    assert ours._engine is not engine and ours._engine.max_seqs == 3 and ours._engine.max_seq_len == 16
    assert generate(ours, [[1, 2, 3, 4] * 5], max_new_tokens=5)[0]                              # a longer context:
    assert (ours._engine.max_seqs, ours._engine.max_seq_len) == (3, 32)                         # covers both calls
    ours.release_engine()
    assert not hasattr(ours, "_engine")


def test_generate_prefills_every_prompt_before_decoding(loaded, monkeypatch):
    """No step mixes new tokens with prompt chunks: the batch decodes together (one graph bucket
    on the GPU), not sequence by sequence while the others still prefill."""
    _, ours = loaded("llama")
    seen = []
    step = Engine.step

    def checked(self):
        prefilling = any(s.fed < len(s.tokens) - len(s.new) for s in self.seqs.values())
        decoding = any(s.new and s.fed < len(s.tokens) for s in self.seqs.values())
        seen.append((prefilling, decoding))
        return step(self)
    monkeypatch.setattr(Engine, "step", checked)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    got = generate(ours, prompts, max_new_tokens=4, prefill_chunk=4)
    assert not any(p and d for p, d in seen) and any(d for _, d in seen) and sum(p for p, _ in seen) >= 5
    monkeypatch.undo()
    assert got == [generate(ours, [p], max_new_tokens=4)[0] for p in prompts]


def test_a_prompt_joining_many_decoding_sequences_is_not_starved(loaded):
    """Decode tokens spend the step's prefill budget first; a waiting prompt still gets a chunk."""
    _, ours = loaded("llama")
    eng = Engine(ours, max_seqs=4, max_seq_len=32, prefill_chunk=2)
    for p in ([1, 2], [3, 4], [5, 6]):
        eng.add(p)
    while any(s.fed < len(s.tokens) for s in eng.seqs.values()):
        eng.step()
    for slot in list(eng.seqs):
        eng.feed(slot, 7)
    late = eng.add([8, 9, 10, 11, 12])
    for _ in range(5):
        eng.step()
        for slot in eng.seqs:
            if slot != late and len(eng.seqs[slot].tokens) < 20:
                eng.feed(slot, 7)
    assert eng.seqs[late].fed == 5


def test_sequences_join_and_leave_between_steps(loaded):
    _, ours = loaded("llama")
    g = torch.Generator().manual_seed(4)
    a_prompt, b_prompt = torch.randint(0, 96, (6,), generator=g).tolist(), torch.randint(0, 96, (4,), generator=g).tolist()
    alone_a = generate(ours, [a_prompt], max_new_tokens=6)[0]
    alone_b = generate(ours, [b_prompt], max_new_tokens=4)[0]
    eng = Engine(ours, max_seqs=2, max_seq_len=32)
    a = eng.add(a_prompt)
    got_a, got_b, b = [], [], None
    while len(got_a) < 6 or (b is not None and len(got_b) < 4):
        out = eng.step()
        for slot, logits in out.items():
            tok = int(logits.argmax())
            mine = got_a if slot == a else got_b
            mine.append(tok)
            if (slot == a and len(got_a) == 6) or (slot == b and len(got_b) == 4):
                eng.release(slot)
            else:
                eng.feed(slot, tok)
        if b is None and len(got_a) == 2:      # b joins while a decodes
            b = eng.add(b_prompt)
    assert got_a == alone_a and got_b == alone_b
    assert not eng.seqs and eng.cache.num_free_pages == eng.cache.num_pages - 1   # the pad slot keeps one
    with pytest.raises(EngineError, match="not active"):
        eng.feed(a, 1)


def test_engine_errors(loaded):
    _, ours = loaded("llama")
    eng = Engine(ours, max_seqs=1, max_seq_len=8)
    with pytest.raises(EngineError, match="prompt has 9 tokens"):
        eng.add(list(range(9)))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        eng.add([1, 500])
    eng.add([1, 2])
    with pytest.raises(EngineError, match="all 1 slots are taken"):
        eng.add([3])


def test_sampling_is_seeded_and_respects_top_k(loaded):
    _, ours = loaded("llama")
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    a = generate(ours, prompts, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=5, top_p=0.8, seed=7)
    b = generate(ours, prompts, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=5, top_p=0.8, seed=7)
    assert a == b and all(len(x) == 8 for x in a)
    # top_k = 1 is greedy
    assert generate(ours, prompts, max_new_tokens=8, do_sample=True, top_k=1, seed=3) == \
        generate(ours, prompts, max_new_tokens=8)


def test_stop_tokens_end_a_sequence(loaded):
    _, ours = loaded("llama")
    full = generate(ours, [[5, 6, 7]], max_new_tokens=12)[0]
    stop = full[4]
    cut = generate(ours, [[5, 6, 7]], max_new_tokens=12, stop_tokens=[stop])[0]
    assert cut == full[: full.index(stop) + 1]


def test_prompt_tuning_virtual_tokens_index_the_task_table(loaded):
    _, ours = loaded("llama")

    def run(ids, **kw):
        cache = ours.make_cache(num_pages=4, max_seqs=1, max_pages_per_seq=4)
        cache.allocate(0, len(ids))
        return ours.step(torch.tensor(ids, dtype=torch.int32), [0] * len(ids), cache, logits="all", **kw)
    table = torch.stack([torch.randn(3, ours.spec.hidden_size), ours.embed.weight[[5, 9, 11]]])   # [2 tasks, 3, H]
    V = ours.spec.vocab_size
    torch.testing.assert_close(run([1, V, V + 1, V + 2, 4], prompt_table=table, tasks=1), run([1, 5, 9, 11, 4]),
                               rtol=0, atol=0)
    assert not torch.equal(run([1, V, 4], prompt_table=table, tasks=0), run([1, 5, 4]))


@pytest.mark.parametrize("V", [128256, 32000, 50257, 96])
def test_two_pass_greedy_argmax_is_torch_argmax(V):
    """The decode graphs' arg-max (chunks, then their maxima): the first maximal index, NaN above all."""
    from layerforge.models.graphs import greedy_argmax
    g = torch.Generator().manual_seed(V)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(4, V, generator=g) * 3).round().to(dtype)   # many ties
        x[1, V // 2] = x[1, V // 3] = x[1].max() + 1                  # a tie for the max across chunks
        x[2, V - 1] = x[2, 5] = float("nan")
        assert torch.equal(greedy_argmax(x), x.argmax(dim=-1)), (V, dtype)
