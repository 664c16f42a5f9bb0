"""The run-time block mask (codegen/block_mask.py), no GPU needed: the pre-pass's CPU model
classifies every tile of the prefill kernel's tiling, and each class is checked element by
element against the reference evaluator's own mask (empty: no allowed score; full: every
score allowed), on random document tables; its lists are the compacted classes; the pre-pass
and the prefill kernels that read its lists compile without spills."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import layerforge as lf
from layerforge.codegen.block_mask import block_mask_model, mask_heads, needs_block_mask, plan_block_mask
from layerforge.codegen.mask_tiles import EMPTY, FULL, PARTIAL

from ..fuzz.gen import attention_blocks, random_tensor
from ..seeding import stable_seed
from .test_mask_tiles import FUZZ, check_sound, exact_grid

MASKS = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention doc(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = doc[b, kv_pos] == doc[b, q_pos]
}
attention doc_causal(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]
}
attention doc_heads(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = (h < 2 or kv_pos <= q_pos) and doc[b, kv_pos] == doc[b, q_pos]
}
attention doc_pairs(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = doc[b, kv_pos // 2] == doc[b, q_pos // 2] or kv_pos < 3
}
attention keep(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], keep: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and keep[b, kv_pos] != 0
}
attention shared_doc(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[Skv]) -> T[B, S, Hq, D] {
    mask = doc[kv_pos] <= doc[q_pos]
}
"""
NAMES = ["doc", "doc_causal", "doc_heads", "doc_pairs", "keep", "shared_doc"]


@pytest.fixture(scope="module")
def prog():
    return lf.loads(MASKS, "masks.lf", with_stdlib=False)


def doc_ids(length: int, rng: random.Random, kind: str) -> list[int]:
    """Document ids of `length` positions: random boundaries (some documents one token long),
    one document, or unordered ids (not packed: soundness must hold anyway)."""
    if kind == "one":
        return [7] * length
    if kind == "unordered":
        return [rng.randrange(4) for _ in range(length)]
    ids, d = [], 0
    while len(ids) < length:
        run = rng.choice([1, 1, 2, 5, 17, 40, 90])
        ids += [d] * run
        d += rng.choice([1, 1, 3])          # ids rise, not always by one
    return ids[:length]


def check_block_mask(layer, *, rows, keys, lens, news, table, name, seed=0):
    """Every tile of the pre-pass model against the evaluator's mask: EMPTY -> no element true,
    FULL -> every element true (rows: the kernel's token x head packing, keys < len); the
    lists are the non-empty tiles in order with the full bit. Returns the classes seen."""
    spec = layer.function.outputs[0].arg
    hq, hkv = int(spec.num_q_heads), int(spec.num_kv_heads)
    group = hq // hkv
    B, width = len(lens), max(lens)
    cu = np.concatenate([[0], np.cumsum(news)]).astype(np.int32)
    tables = {name: table}
    max_q, max_kv = max(news), max(lens)
    cls, num, idx = block_mask_model(layer, rows=rows, keys=keys, seq_lens=lens, cu_seqlens=cu, max_q_len=max_q,
                                     max_kv_len=max_kv, env={f"p_{name}": table})
    grid, _, _ = exact_grid(layer, width, width, tables, batch=B)    # [B, Hq, q_pos, kv_pos]
    heads = mask_heads(layer)
    assert cls.shape == (B, heads, -(-max_q * group // rows), -(-max_kv // keys))
    seen = set()
    for b in range(B):
        n, length = news[b], lens[b]
        for hb in range(heads):
            for y in range(cls.shape[2]):
                listed = [(j << 1) | (c == FULL) for j, c in enumerate(cls[b, hb, y]) if c != EMPTY]
                assert idx[b, hb, y, :num[b, hb, y]].tolist() == listed
                R = np.arange(y * rows, min((y + 1) * rows, n * group))
                for j in range(cls.shape[3]):
                    c = int(cls[b, hb, y, j])
                    k = np.arange(j * keys, min((j + 1) * keys, length))
                    if len(R) == 0 or len(k) == 0:
                        assert c == EMPTY
                        continue
                    kvhs = [hb] if heads > 1 else range(hkv)
                    for kvh in kvhs:
                        h = torch.as_tensor(kvh * group + R % group)
                        qp = torch.as_tensor(length - n + R // group)
                        block = grid[b, h, qp][:, torch.as_tensor(k)]
                        if c == EMPTY:
                            assert not block.any(), (name, b, hb, y, j)
                        elif c == FULL:
                            assert block.all(), (name, b, hb, y, j)
                    seen.add(c)
    return seen


@pytest.mark.parametrize("kind", ["packed", "one", "unordered"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows,keys", [(32, 16), (128, 64)])
def test_block_mask_classes_are_sound(prog, name, kind, rows, keys):
    layer = prog.specialise(name, Hq=4, Hkv=2, D=64, dtype="bf16")
    assert needs_block_mask(layer)
    rng = random.Random(stable_seed(name, kind, rows))
    lens, news = [150, 300, 97], [150, 41, 1]                   # whole prompts, a chunk after a prefix, one token
    width = max(lens)
    if name == "shared_doc":
        table = torch.tensor(doc_ids(width, rng, kind), dtype=torch.int32)
    elif name == "keep":
        table = torch.tensor([[int(rng.random() < (0.9 if kind == "one" else 0.3)) if (i // 40) % 2 else 1
                               for i in range(width)] for _ in lens], dtype=torch.int32)
    else:
        table = torch.tensor([doc_ids(width, rng, kind) for _ in lens], dtype=torch.int32)
    seen = check_block_mask(layer, rows=rows, keys=keys, lens=lens, news=news, table=table,
                            name="keep" if name == "keep" else "doc")
    if kind == "packed" and rows == 32 and name in ("doc", "doc_causal", "doc_heads"):
        assert {EMPTY, FULL, PARTIAL} <= seen        # the point: tiles skipped and tiles unmasked
    if kind == "one" and name == "doc":
        assert seen == {FULL}                        # one document: every tile full


def test_document_mask_skips_tiles_at_scale(prog):
    """B2 S4096, documents of 256-1024 tokens, the prefill kernel's 128-row (32 tokens x 4 heads)
    x 64-key tiles: the fraction of tiles the kernel still walks is about the documents' share
    of the square (the benchmark's prediction, benchmarks/NOTES.md)."""
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    rng = random.Random(3)
    S, docs = 4096, []
    for _ in range(2):
        ids, d = [], 0
        while len(ids) < S:
            ids += [d] * rng.randrange(256, 1025)
            d += 1
        docs.append(ids[:S])
    table = torch.tensor(docs, dtype=torch.int32)
    cls, num, _ = block_mask_model(layer, rows=128, keys=64, seq_lens=[S, S], cu_seqlens=[0, S, 2 * S],
                                   max_q_len=S, max_kv_len=S, env={"p_doc": table})
    walked = num.sum() / (2 * 128 * 64)
    dense_causal = (64 * 65 / 2 + 64 * 64 / 2) / (128 * 64)     # the causal kernel's tiles (row blocks of 32 tokens)
    t = table.long()
    density = sum(((t[b][:, None] == t[b][None, :]) & torch.ones(S, S, dtype=torch.bool).tril()).float().mean()
                  for b in range(2)) / 2
    assert walked < 0.25 * dense_causal and walked < 2 * density + 0.02, (walked, density)
    assert (cls == FULL).sum() > 0.5 * (cls != EMPTY).sum()     # most walked tiles skip the element mask


@settings(**FUZZ)
@given(case=attention_blocks())
def test_fuzzed_masks_are_classified_soundly_with_position_lookups(case):
    """The fuzzer's masks (lookups at kv_pos, q_pos, q_pos - kv_pos, kv_pos // 3, ...) over
    random i32 tables, classified as the pre-pass does, on random tiles."""
    try:
        layer = lf.loads(case.source, "fuzz.lf", with_stdlib=False).specialise(case.name, dtype=case.dtype,
                                                                                 **case.bindings)
    except lf.DSLError:
        return
    spec = layer.function.outputs[0].arg
    if spec.mask is None or int(spec.num_q_heads) % int(spec.num_kv_heads):
        return
    params = {p.name: p for p in layer.function.params}
    gen = torch.Generator().manual_seed(2)
    sizes = {"B": 2, "Skv": 96, **{k: v for k, v in case.bindings.items() if isinstance(v, int)}}
    tables = {}
    for name, (_, dims) in case.tables.items():
        t = random_tensor(params[name].dtype, [sizes[x] for x in dims], gen)
        if params[name].dtype.is_int:   # few distinct values: lookups that agree over tiles, as documents do
            t = t % 3
        tables[name] = t
    check_sound(layer, tables, q_len=96, kv_len=96, tiles=60, ranges=True)


ATOMS = ["doc[b, kv_pos] == doc[b, q_pos]", "doc[b, kv_pos] <= doc[b, q_pos]", "doc[b, kv_pos // 3] != doc[b, q_pos // 2]",
         "keep[b, kv_pos] != 0", "keep[b, q_pos] > 0", "doc[b, min(q_pos - kv_pos + 48, 95)] > 1", "kv_pos <= q_pos",
         "q_pos - kv_pos < 20", "doc[b, kv_pos] + kv_pos % 5 < doc[b, q_pos] * 2", "h < 2 or doc[b, kv_pos] == 1",
         "abs(doc[b, kv_pos] - doc[b, q_pos]) <= 1", "where(keep[b, q_pos] > 0, doc[b, kv_pos], 0) == doc[b, q_pos]",
         "doc[b, kv_pos] - doc[b, q_pos] >= -1 and keep[b, kv_pos] * 3 + doc[b, q_pos] < 6"]


def random_mask(rng: random.Random, depth: int = 2) -> str:
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(ATOMS)
    op = rng.choice(["and", "or", "not"])
    if op == "not":
        return f"not ({random_mask(rng, depth - 1)})"
    return f"({random_mask(rng, depth - 1)}) {op} ({random_mask(rng, depth - 1)})"


@pytest.mark.parametrize("seed", range(24))
def test_random_position_lookup_masks_are_sound(seed):
    """Random and/or/not combinations of lookups at positions (and // % min abs where around
    them), every tile of the pre-pass model against the evaluator, packed or unordered ids."""
    rng = random.Random(seed)
    mask = random_mask(rng)
    while "[" not in mask:
        mask = random_mask(rng)
    src = ("dims Hq, Hkv, D\ndynamic B, S, Skv\nattention m(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], "
           "v: T[B, Skv, Hkv, D], doc: i32[B, Skv], keep: i32[B, Skv]) -> T[B, S, Hq, D] {\n"
           f"    mask = {mask}\n}}\n")
    layer = lf.loads(src, "random.lf", with_stdlib=False).specialise("m", Hq=4, Hkv=2, D=64, dtype="bf16")
    assert needs_block_mask(layer), mask
    lens, news = [150, 97], [150, 20]
    kind = "packed" if seed % 2 else "unordered"
    doc = torch.tensor([doc_ids(150, rng, kind) for _ in lens], dtype=torch.int32)
    keep = torch.tensor([[int(rng.random() < 0.8) for _ in range(150)] for _ in lens], dtype=torch.int32)
    spec = layer.function.outputs[0].arg
    group = int(spec.num_q_heads) // int(spec.num_kv_heads)
    cls, num, idx = block_mask_model(layer, rows=32, keys=16, seq_lens=lens, cu_seqlens=[0, 150, 170], max_q_len=150,
                                     max_kv_len=150, env={"p_doc": doc, "p_keep": keep})
    grid, _, hkv = exact_grid(layer, 150, 150, {"doc": doc, "keep": keep}, batch=2)
    heads = mask_heads(layer)
    for b, hb, y, j in itertools.product(range(2), range(heads), range(cls.shape[2]), range(cls.shape[3])):
        c = int(cls[b, hb, y, j])
        R = np.arange(y * 32, min((y + 1) * 32, news[b] * group))
        k = np.arange(j * 16, min((j + 1) * 16, lens[b]))
        if len(R) == 0 or len(k) == 0:
            assert c == EMPTY
            continue
        for kvh in ([hb] if heads > 1 else range(hkv)):
            block = grid[b, torch.as_tensor(kvh * group + R % group), torch.as_tensor(lens[b] - news[b] + R // group)]
            block = block[:, torch.as_tensor(k)]
            assert c != EMPTY or not block.any(), (mask, b, hb, y, j)
            assert c != FULL or block.all(), (mask, b, hb, y, j)


def test_mask_reads_heads_only_when_it_does(prog):
    assert mask_heads(prog.specialise("doc", Hq=4, Hkv=2, D=64, dtype="bf16")) == 1
    assert mask_heads(prog.specialise("doc_heads", Hq=4, Hkv=2, D=64, dtype="bf16")) == 2


def test_position_masks_need_no_pre_pass():
    std = lf.stdlib()
    for name, kw in [("llama_attn", {}), ("bert_attn", {}), ("t5_attn", {"NB": 32}), ("mistral_attn", {})]:
        assert not needs_block_mask(std.specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16", **kw)), name


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", NAMES)
def test_pre_pass_compiles_without_spills(prog, name, arch):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    plan = plan_block_mask(prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16"), arch, rows=128, keys=64)
    src = plan.source()
    assert "lf_table_range(p_" in src
    res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions(arch))
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


def test_packs_carry_the_pre_pass(prog, tmp_path):
    """A built pack holds the pre-pass beside the prefill kernel it serves (same tiling), and
    the pack's module knows it needs one."""
    pytest.importorskip("layerforge.runtime.nvrtc")
    from layerforge.codegen.families import plans_for_layer
    from layerforge.runtime.build import build
    from layerforge.runtime.pack import load_pack
    layer = prog.specialise("doc_causal", Hq=8, Hkv=8, D=64, dtype="bf16")
    families = [p.family for p in plans_for_layer(layer, "sm_90")]
    assert families.count("block_mask") == 1
    llama = lf.stdlib().specialise("llama_attn", Hq=8, Hkv=8, D=64, dtype="bf16")
    assert "block_mask" not in [p.family for p in plans_for_layer(llama, "sm_90")]
    build(prog, {"Hq": 8, "Hkv": 8, "D": 64}, dtype="bf16", arch="sm_90", out_dir=tmp_path, names=["doc_causal"])
    attn = load_pack(tmp_path, check_device=False).attention("doc_causal")
    assert attn.needs_block_mask
    _, (abi,), (rows, keys, heads, key) = attn._images["block_mask"]
    _, _, prefill_keys = attn._images["prefill"]
    assert keys == prefill_keys and heads == 1 and abi.name == "lf_" + key


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name,hq,hkv,d", [("doc_causal", 32, 8, 128), ("doc", 32, 32, 64), ("doc_heads", 16, 4, 256),
                                           ("doc_pairs", 32, 8, 128), ("keep", 32, 4, 64), ("shared_doc", 8, 8, 128)])
def test_prefill_kernels_walk_the_lists_and_compile_without_spills(prog, name, hq, hkv, d, arch):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    from layerforge.codegen.attention_tc import plan_tc_attention

    def compile_fn(plan):
        return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch)).resources
    layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=d, dtype="bf16")
    plan = plan_tc_attention(layer, arch, mode="prefill", compile_fn=compile_fn)
    src = plan.source()
    assert plan.block_mask and "tile_k0(i)" in src and "lf_mask_tile" not in src
    assert [a.name for a in plan.abi.args if a.name.startswith("bm_")] == ["bm_num", "bm_idx", "bm_rows", "bm_cols"]
    for kr in compile_fn(plan).values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.config, kr)
    pre = plan.block_mask_plan()
    assert (pre.rows, pre.keys) == (plan.config.rows, plan.config.keys)
    decode = plan_tc_attention(layer, arch, mode="decode", tiles=None)   # short chunks: the decode tiling, no lists
    assert not decode.block_mask and "bm_idx" not in decode.source()
