"""Block masks and hoisted distance terms on the GPU, against the reference evaluator in float64
(outputs poisoned with NaN first): document masks over random document boundaries (tokens
alone in their document, one document, rows with nothing to attend to -> zeros), GQA with a
head-dependent document mask, split-KV over the tile lists, an explicit BlockMask shared by
calls and the automatic cache; the device pre-pass equals its CPU model tile for tile. T5
buckets and clamped relative biases (the per-tile distance table) over several key tiles. The
same on the Hopper (wgmma) prefill (sm_90 only): document masks (its producer and consumers walk
the pre-pass's lists over its own tiling; the default there, with the mask's key-side reads staged
in shared memory; LAYERFORGE_WGMMA_KEY_STAGE=0 each thread's own), distance tables by default and
the per-score kernel with distance_table=False. The mma.sync tests ask for it (prefill="tc"): the
default before sm_90."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig
from layerforge.codegen.block_mask import block_mask_model
from layerforge.dsl.evaluator import LayerInputError
from layerforge.runtime import block_mask as bmc
from layerforge.runtime.attention import PagedAttention

from ..seeding import seeded_generator
from .test_paged_attention import build_cache

SRC = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention doc_causal(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]
}
attention doc(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = doc[b, kv_pos] == doc[b, q_pos]
}
attention doc_pad(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos] and doc[b, q_pos] >= 0
}
attention doc_heads(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = (h % 3 == 0 or kv_pos <= q_pos) and doc[b, kv_pos] == doc[b, q_pos]
}
attention rel_bias(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], bias: f32[129, Hq]) -> T[B, S, Hq, D] {
    score = score + bias[min(max(kv_pos - q_pos, -64), 64) + 64, h]
    mask = kv_pos <= q_pos
}
attention back_bias(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], bias: f32[64]) -> T[B, S, Hq, D] {
    score = score * 0.5 + bias[min(q_pos - kv_pos, 63)]
    mask = kv_pos <= q_pos
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.loads(SRC, "block_masks.lf", with_stdlib=False)


def doc_table(lens, kind, rng) -> torch.Tensor:
    width = max(lens)
    rows = []
    for _ in lens:
        if kind == "one":
            rows.append([3] * width)
            continue
        ids, d = [], 0
        while len(ids) < width:
            run = rng.choice([1, 1, 2, 9, 33, 64, 150, 400])
            ids += [d if kind != "pad" or rng.random() < 0.7 else -1] * run
            d += 1
        rows.append(ids[:width])
    return torch.tensor(rows, dtype=torch.int32)


def run(layer, lens, new, extra, *, hq, hkv, d=128, splits=None, block_mask=None, attn=None, check_model=True):
    gen = seeded_generator(layer.name, hq, hkv, d, tuple(lens), tuple(new))
    dtype = torch.bfloat16
    ks = [torch.randn(n, hkv, d, generator=gen).to(dtype).cuda() for n in lens]
    vs = [torch.randn(n, hkv, d, generator=gen).to(dtype).cuda() for n in lens]
    qs = [torch.randn(m, hq, d, generator=gen).to(dtype).cuda() for m in new]
    spec = layer.function.outputs[0].arg
    kc, vc, table, seq_lens = build_cache(ks, vs, 64, spec, dtype, gen)
    q = torch.cat(qs)
    cu = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32, device="cuda")
    attn = attn or PagedAttention(layer, page_size=64, prefill="tc")
    extra = {k: v.cuda() for k, v in extra.items()}
    out = torch.full_like(q, float("nan"))
    attn.prefill(q, kc, vc, table, seq_lens, cu, max_q_len=max(new), max_kv_len=max(lens), extra=extra, out=out,
                 num_splits=splits, block_mask=block_mask)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "NaN in output"
    start = 0
    for s, (n, m) in enumerate(zip(lens, new)):
        ins = {"q": qs[s][None], "k": ks[s][None], "v": vs[s][None]}
        for name, t in extra.items():
            ins[name] = t[s:s + 1, :n] if name == "doc" else t
        ref = lf.evaluate(layer.function, ins, precision="float64", q_positions=torch.arange(n - m, n, device="cuda")[None],
                          kv_positions=torch.arange(n, device="cuda")[None])[0][0]
        got = out[start:start + m].double()
        start += m
        err = (got - ref).norm() / ref.norm().clamp_min(1e-6)
        assert err < 2e-2, f"{layer.name} seq {s} (len {n}, {m} new): relative error {err:.3g}"
        dead = ref.abs().amax(dim=-1) == 0                       # rows with nothing to attend to
        assert (got[dead] == 0).all(), "a fully masked row must give zeros"
    if check_model and "doc" in extra:   # the device pre-pass is its CPU model, tile for tile
        bm = attn.block_mask(seq_lens, cu, max_q_len=max(new), max_kv_len=max(lens), extra=extra)
        cls, num, idx = block_mask_model(layer, rows=bm.rows, keys=bm.keys, seq_lens=seq_lens.tolist(),
                                         cu_seqlens=cu.tolist(), max_q_len=max(new), max_kv_len=max(lens),
                                         env={"p_doc": extra["doc"].cpu(), "d_B": len(lens), "d_Skv": max(lens)})
        assert torch.equal(bm.cls.cpu(), torch.from_numpy(cls))
        assert torch.equal(bm.num.cpu(), torch.from_numpy(num))
        for row in itertools.product(*map(range, num.shape)):
            assert bm.idx[row][:num[row]].tolist() == idx[row][:num[row]].tolist()
    return attn, out


LENS, NEW = [700, 1000, 64, 513, 1], [700, 300, 17, 1, 1]    # whole prompts, chunks after a prefix, single tokens


@pytest.mark.parametrize("kind", ["random", "one"])
@pytest.mark.parametrize("name", ["doc_causal", "doc"])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8)])
def test_document_masks(prog, name, kind, hq, hkv):
    layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=128, dtype="bf16")
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(len(name) + hq))}, hq=hq, hkv=hkv)


@pytest.mark.parametrize("bits", [True, False])
@pytest.mark.parametrize("name,kind", [("doc_causal", "random"), ("doc", "random"), ("doc_pad", "pad")])
def test_document_masks_tested_as_bits_or_per_score(prog, monkeypatch, name, kind, bits):
    """The mask's test made once a tile as bits (its key-side table reads once per key: the default,
    TCAttentionPlan.mask_bits) and beside every score (LAYERFORGE_TC_MASK_BITS=0): the same float64 reference."""
    monkeypatch.setenv("LAYERFORGE_TC_MASK_BITS", "1" if bits else "0")
    layer = prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = PagedAttention(layer, page_size=64, prefill="tc")
    plan = attn.tc_plan("prefill")
    assert plan.mask_split is bits and ("_mb_" in plan.key) is bits, plan.key
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(len(name)))}, hq=32, hkv=8, attn=attn)


def test_fully_masked_rows_give_zeros(prog):
    layer = prog.specialise("doc_pad", Hq=32, Hkv=8, D=128, dtype="bf16")
    run(layer, LENS, NEW, {"doc": doc_table(LENS, "pad", random.Random(5))}, hq=32, hkv=8)


@pytest.mark.parametrize("d", [64, 256])
def test_head_dependent_document_mask(prog, d):
    layer = prog.specialise("doc_heads", Hq=16, Hkv=4, D=d, dtype="bf16")
    run(layer, LENS, NEW, {"doc": doc_table(LENS, "random", random.Random(7))}, hq=16, hkv=4, d=d)


@pytest.mark.parametrize("splits", [2, 5])
def test_split_kv_over_the_tile_lists(prog, splits):
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    run(layer, [900, 40], [3, 40], {"doc": doc_table([900, 40], "random", random.Random(9))}, hq=32, hkv=8,
        splits=splits)


def test_block_mask_shared_by_calls_and_cached(prog):
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    lens = [300, 200]                                                      # 300 and 50 new tokens
    gen = torch.Generator().manual_seed(12)
    ks = [torch.randn(n, 8, 128, generator=gen).bfloat16().cuda() for n in lens]
    kc, vc, table, seq_lens = build_cache(ks, ks, 64, layer.function.outputs[0].arg, torch.bfloat16, gen)
    q = torch.randn(350, 32, 128, generator=gen).bfloat16().cuda()
    cu = torch.tensor([0, 300, 350], dtype=torch.int32, device="cuda")
    doc = doc_table(lens, "random", random.Random(11)).cuda()
    attn = PagedAttention(layer, page_size=64, prefill="tc")
    call = dict(max_q_len=300, max_kv_len=300, extra={"doc": doc})
    bm = attn.block_mask(seq_lens, cu, **call)
    assert 0 < bm.walked() < 1
    bmc.clear_block_masks()
    explicit = attn.prefill(q, kc, vc, table, seq_lens, cu, block_mask=bm, **call)
    auto = attn.prefill(q, kc, vc, table, seq_lens, cu, **call)            # computes one and caches it
    assert len(bmc._CACHE) == 1 and torch.equal(explicit, auto)
    attn.prefill(q, kc, vc, table, seq_lens, cu, **call)                   # a hit
    assert len(bmc._CACHE) == 1
    doc[1, :] = torch.arange(300, device="cuda") % 2                       # in place: the version moves
    changed = attn.prefill(q, kc, vc, table, seq_lens, cu, **call)
    assert len(bmc._CACHE) == 2 and not torch.equal(changed[300:], auto[300:])
    small = attn.block_mask(seq_lens, cu, max_q_len=100, max_kv_len=300, extra={"doc": doc})
    with pytest.raises(LayerInputError, match="needs"):
        attn.prefill(q, kc, vc, table, seq_lens, cu, block_mask=small, **call)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (16, 4)])
def test_t5_buckets_hoisted(hq, hkv, bidirectional):
    layer = lf.stdlib().specialise("t5_attn", Hq=hq, Hkv=hkv, D=64, NB=32, dtype="bf16", bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(3)
    run(layer, [600, 250, 1], [600, 70, 1], {"rel_bias": torch.randn(32, hq, generator=gen)}, hq=hq, hkv=hkv, d=64)


def test_clamped_relative_bias_hoisted(prog):
    layer = prog.specialise("rel_bias", Hq=32, Hkv=8, D=128, dtype="bf16")
    gen = torch.Generator().manual_seed(4)
    run(layer, [500, 130], [500, 129], {"bias": torch.randn(129, 32, generator=gen)}, hq=32, hkv=8)


def test_negated_distance_term_hoisted(prog):
    """rel = q_pos - kv_pos (the table is built over kv_pos - q_pos and negated), one column."""
    layer = prog.specialise("back_bias", Hq=32, Hkv=8, D=64, dtype="bf16")
    gen = torch.Generator().manual_seed(6)
    run(layer, [400, 90], [400, 90], {"bias": torch.randn(64, generator=gen)}, hq=32, hkv=8, d=64)


# ---- the same on the Hopper (wgmma) prefill (document masks asked for explicitly) -------------
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="the wgmma prefill kernel runs on sm_90 GPUs (H100, H200) only")


def wgmma_attn(layer, *, distance_table=True, tiles=None):
    attn = PagedAttention(layer, page_size=64, prefill="wgmma", distance_table=distance_table,
                          tiles={"prefill": tiles} if tiles else None)
    plan = attn.tc_plan("prefill")
    assert attn.prefill_kernel == "wgmma" and plan.arch == "sm_90a"
    assert plan.block_mask == ("doc" in layer.name)
    # tables (the default) for the blocks with a distance term (the non-document ones here)
    assert (plan.rel_table is not None) == (distance_table and "doc" not in layer.name)
    return attn


@hopper
@pytest.mark.parametrize("kind", ["random", "one"])
@pytest.mark.parametrize("name", ["doc_causal", "doc"])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8)])
@pytest.mark.parametrize("persist", [None, "0"])
def test_wgmma_document_masks(prog, monkeypatch, name, kind, hq, hkv, persist):
    """The default on sm_90: the persistent wgmma kernel, its key terms staged; with LAYERFORGE_WGMMA_PERSIST=0 the
    plain one."""
    if persist is not None:
        monkeypatch.setenv("LAYERFORGE_WGMMA_PERSIST", persist)
    layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=128, dtype="bf16")
    attn = wgmma_attn(layer)
    assert PagedAttention(layer, page_size=64).prefill_kernel == "wgmma"   # the default on sm_90
    assert attn.tc_plan("prefill").key_terms_staged and "_ks_" in attn.tc_plan("prefill").key
    if persist is not None or hq == 32:   # (8 / 8: the planner takes persist where it compiles spill-free)
        assert attn.tc_plan("prefill").config.persist is (persist is None)
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(len(name) + hq))}, hq=hq, hkv=hkv, attn=attn)


@hopper
@pytest.mark.parametrize("name,kind", [("doc_causal", "random"), ("doc", "one"), ("doc_pad", "pad")])
def test_wgmma_document_masks_per_score(prog, monkeypatch, name, kind):
    """With LAYERFORGE_WGMMA_MASK_BITS=0 the wgmma kernel tests the mask beside every score (its table reads per
    score), as before the bits: the same float64 reference; the default takes the bits."""
    layer = prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16")
    assert wgmma_attn(layer).tc_plan("prefill").mask_split
    monkeypatch.setenv("LAYERFORGE_WGMMA_MASK_BITS", "0")
    attn = wgmma_attn(layer)
    assert not attn.tc_plan("prefill").mask_split and "_mb_" not in attn.tc_plan("prefill").key
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(len(name)))}, hq=32, hkv=8, attn=attn)


@hopper
@pytest.mark.parametrize("name,kind,hq", [("doc_causal", "random", 32), ("doc", "one", 8), ("doc_pad", "pad", 32)])
def test_wgmma_document_key_terms_per_thread(prog, monkeypatch, name, kind, hq):
    """LAYERFORGE_WGMMA_KEY_STAGE=0: each consumer thread makes its keys' table reads itself (no shared buffer), and
    the block goes back to the mma.sync prefill by default: the same float64 reference, fully masked rows zeros."""
    monkeypatch.setenv("LAYERFORGE_WGMMA_KEY_STAGE", "0")
    layer = prog.specialise(name, Hq=hq, Hkv=8, D=128, dtype="bf16")
    assert PagedAttention(layer, page_size=64).prefill_kernel == "tc"
    attn = wgmma_attn(layer)
    assert attn.tc_plan("prefill").mask_split and not attn.tc_plan("prefill").key_terms_staged
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(len(name) + 3))}, hq=hq, hkv=8, attn=attn)


@hopper
def test_wgmma_fully_masked_rows_give_zeros(prog):
    layer = prog.specialise("doc_pad", Hq=32, Hkv=8, D=128, dtype="bf16")
    run(layer, LENS, NEW, {"doc": doc_table(LENS, "pad", random.Random(5))}, hq=32, hkv=8, attn=wgmma_attn(layer))


@hopper
@pytest.mark.parametrize("d", [64, 128, 256])
def test_wgmma_head_dependent_document_mask(prog, d):
    layer = prog.specialise("doc_heads", Hq=16, Hkv=4, D=d, dtype="bf16")
    run(layer, LENS, NEW, {"doc": doc_table(LENS, "random", random.Random(7))}, hq=16, hkv=4, d=d,
        attn=wgmma_attn(layer))


@hopper
@pytest.mark.parametrize("splits", [2, 5])
def test_wgmma_split_kv_over_the_tile_lists(prog, splits):
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    run(layer, [900, 40], [3, 40], {"doc": doc_table([900, 40], "random", random.Random(9))}, hq=32, hkv=8,
        splits=splits, attn=wgmma_attn(layer))


@hopper
@pytest.mark.parametrize("name,kind", [("doc_causal", "random"), ("doc", "one"), ("doc_pad", "pad")])
@pytest.mark.parametrize("splits", [None, 3])
def test_wgmma_persist_over_the_tile_lists(prog, monkeypatch, name, kind, splits):
    """The persistent wgmma prefill (LAYERFORGE_WGMMA_PERSIST=1: a work queue, each next row block's Q early, the
    planner's register budgets for the lists' walk) over the pre-pass's lists: the same float64 reference, fully
    masked rows zeros, split-KV."""
    monkeypatch.setenv("LAYERFORGE_WGMMA_PERSIST", "1")
    layer = prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = wgmma_attn(layer)
    assert attn.tc_plan("prefill").config.persist, attn.tc_plan("prefill").key
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(21))}, hq=32, hkv=8, splits=splits, attn=attn)


@hopper
def test_wgmma_block_mask_of_64_key_tiles(prog):
    """The pre-pass follows the kernel's tiling (128 rows x 64 keys here)."""
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = wgmma_attn(layer, tiles=WGTileConfig(bn=64, stages=3))
    attn, _ = run(layer, LENS, NEW, {"doc": doc_table(LENS, "random", random.Random(13))}, hq=32, hkv=8, attn=attn)
    bm = attn.block_mask(torch.tensor(LENS, dtype=torch.int32, device="cuda"),
                         torch.tensor([0, *itertools.accumulate(NEW)], dtype=torch.int32, device="cuda"),
                         max_q_len=max(NEW), max_kv_len=max(LENS),
                         extra={"doc": doc_table(LENS, "random", random.Random(13)).cuda()})
    assert (bm.rows, bm.keys) == (128, 64)


@hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (16, 4), (32, 4)])
def test_wgmma_t5_distance_table(hq, hkv, bidirectional, d):
    layer = lf.stdlib().specialise("t5_attn", Hq=hq, Hkv=hkv, D=d, NB=32, dtype="bf16", bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(3)
    run(layer, [600, 250, 1], [600, 70, 1], {"rel_bias": torch.randn(32, hq, generator=gen)}, hq=hq, hkv=hkv, d=d,
        attn=wgmma_attn(layer))


@hopper
@pytest.mark.parametrize("d", [64, 128, 256])
def test_wgmma_clamped_relative_bias_table(prog, d):
    layer = prog.specialise("rel_bias", Hq=32, Hkv=8, D=d, dtype="bf16")
    gen = torch.Generator().manual_seed(4)
    run(layer, [500, 130], [500, 129], {"bias": torch.randn(129, 32, generator=gen)}, hq=32, hkv=8, d=d,
        attn=wgmma_attn(layer))


@hopper
@pytest.mark.parametrize("splits", [None, 3])
def test_wgmma_negated_distance_term_table(prog, splits):
    layer = prog.specialise("back_bias", Hq=32, Hkv=8, D=64, dtype="bf16")
    gen = torch.Generator().manual_seed(6)
    run(layer, [400, 90], [400, 90], {"bias": torch.randn(64, generator=gen)}, hq=32, hkv=8, d=64, splits=splits,
        attn=wgmma_attn(layer))


@hopper
@pytest.mark.parametrize("name", ["t5_attn", "rel_bias"])
def test_wgmma_per_score_distance_term(prog, name):
    """distance_table=False: the per-score kernel (the term computed for every score)."""
    gen = torch.Generator().manual_seed(8)
    if name == "t5_attn":
        layer = lf.stdlib().specialise("t5_attn", Hq=16, Hkv=4, D=128, NB=32, dtype="bf16")
        extra = {"rel_bias": torch.randn(32, 16, generator=gen)}
    else:
        layer = prog.specialise("rel_bias", Hq=16, Hkv=4, D=128, dtype="bf16")
        extra = {"bias": torch.randn(129, 16, generator=gen)}
    run(layer, [600, 250, 1], [600, 70, 1], extra, hq=16, hkv=4, d=128, attn=wgmma_attn(layer, distance_table=False))


@pytest.mark.parametrize("name,kind", [("doc_causal", "random"), ("doc", "one"), ("doc_pad", "pad")])
def test_tc_scale_folded_into_the_exponent(prog, monkeypatch, name, kind):
    """LAYERFORGE_TC_FOLD=1 (TCAttentionPlan.fold: the raw scores' max, one FFMA a score into the exponent) on the
    mma.sync prefill and decode tiles over the block-mask lists: the same float64 reference, fully masked rows
    zeros."""
    monkeypatch.setenv("LAYERFORGE_TC_FOLD", "1")
    layer = prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = PagedAttention(layer, page_size=64, prefill="tc")
    assert attn.tc_plan("prefill").fold and attn.tc_plan("decode").fold
    run(layer, LENS, NEW, {"doc": doc_table(LENS, kind, random.Random(len(name)))}, hq=32, hkv=8, attn=attn)
