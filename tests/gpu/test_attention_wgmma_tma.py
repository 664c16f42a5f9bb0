"""The Hopper (wgmma) prefill with its K/V tiles loaded by TMA (LAYERFORGE_WGMMA_TMA=1: boxes of a
page run through tensor maps of the caches; a range's last, partial tile by cp.async with the
keys past it zero-filled), against the reference evaluator in float64 as every attention kernel
(tests/gpu/test_paged_attention.py's run_case): lengths off the tile and page sizes, chunks over a
cached prefix, pages of 16 / 64 / 256, head dims 64 / 128 / 256, GQA, split-KV, a block-sparse
mask, f16, fully masked rows; plain and overlap schedules, K and V in one ring or in two. Runs only on sm_90 GPUs."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

from .test_paged_attention import run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the wgmma prefill kernel runs on sm_90 GPUs (H100, H200) only")
LONG = dict(lens=[700, 1, 333, 900], new=[700, 1, 333, 77])


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(autouse=True, params=["plain", "overlap", "plain-rings", "overlap-rings"])
def tma(request, monkeypatch):
    """Both schedules, each with K and V in one ring of stages and in rings of their own (WGTileConfig.kv_rings: the
    planner's choice at two stages, D256 here; the other dims' tests force it through test_forced_rings)."""
    monkeypatch.setenv("LAYERFORGE_WGMMA_TMA", "1")
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "1" if request.param.startswith("overlap") else "0")
    monkeypatch.setenv("LAYERFORGE_WGMMA_KV_RINGS", "1" if request.param.endswith("rings") else "0")
    return request.param


def wgmma(prog, name, hq, hkv, d, page, **kw):
    run_case(prog, "tc-ragged", name, hq, hkv, d, page, prefill="wgmma", **kw)


@pytest.mark.parametrize("d", [64, 128])
def test_plans_take_tma(prog, d, tma):
    for page in (16, 64, 256):
        plan = PagedAttention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16"), page_size=page,
                              prefill="wgmma").tc_plan("prefill")
        assert plan.tma and plan.config.tma and "k_map" in plan.abi.signature, plan.key
        assert not plan.kv_rings, plan.key   # three stages keep one ring (kv_rings_default)


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn", "bloom_attn"])
def test_variants_ragged(prog, name, d, page):
    consts = {"window": 200} if name == "gemma2_attn" else {}
    wgmma(prog, name, 16, 4, d, page, **LONG, **consts)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 1)])
def test_gqa(prog, hq, hkv):
    wgmma(prog, "llama_attn", hq, hkv, 128, 16, lens=[5, 33, 70, 300], new=[5, 3, 70, 129])


def test_split_kv_f16_and_masked_rows(prog):
    wgmma(prog, "llama_attn", 8, 8, 128, 64, lens=[4096], new=[256], splits=5)
    wgmma(prog, "gemma2_attn", 16, 8, 128, 16, lens=[512, 90], new=[512, 40], dtype=torch.float16, window=64)

    def extra(nseq, gen):
        return {"kv_len": torch.tensor([3, 0, 200][:nseq], dtype=torch.int32).cuda()}
    wgmma(prog, "bert_attn", 8, 8, 128, 16, lens=[100, 100, 384], new=[100, 100, 384], extra_fn=extra)


def test_block_sparse_mask(prog):
    from ..codegen.test_mask_tiles import MASKS
    masks = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    wgmma(masks, "prefix_lm", 8, 2, 128, 16, lens=[1000, 300], new=[1000, 300])


@pytest.mark.parametrize("d", [80, 96, 160])
def test_padded_rows_take_whole_boxes(prog, d):
    """Head dims padded to 128-byte rows (swizzle=128) load whole 64-column boxes: the columns past a
    head are the next head's (zeros past the last), read neither by S nor stored from O."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
    c = tile_candidates(-(-d // 64) * 64)[0]
    tiles = {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, swizzle=128, tma=True)}
    attn = PagedAttention(prog.specialise("llama_attn", Hq=16, Hkv=4, D=d, dtype="bf16"), page_size=16, tiles=tiles)
    assert attn.tc_plan("prefill").tma
    wgmma(prog, "llama_attn", 16, 4, d, 16, tiles=tiles, **LONG)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", [80, 96, 160])
def test_narrow_swizzles(prog, d, page):
    """Head dims in the 32- / 64-byte swizzles take boxes of 16 / 32 columns (asked for by tiles)."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
    c = tile_candidates(d)[0]
    tiles = {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, tma=True)}
    assert PagedAttention(prog.specialise("llama_attn", Hq=16, Hkv=4, D=d, dtype="bf16"), page_size=page,
                          tiles=tiles).tc_plan("prefill").tma
    wgmma(prog, "gemma2_attn", 16, 4, d, page, tiles=tiles, window=200, **LONG)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_forced_rings(prog, d, tma):
    """K and V in rings of their own at the default tile's depth, asked for by tiles (three stages at D64 / D128),
    in both schedules: ragged lengths off the tile, split-KV, a window."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
    c = tile_candidates(d)[0]
    for k_stages in (0, 3) if d == 256 else (0,):   # D256: K's ring also one stage deeper than V's (deep_k)
        tiles = WGTileConfig(bn=c.bn, stages=c.stages, overlap=tma.startswith("overlap"), tma=True, kv_rings=True,
                             k_stages=k_stages)
        wgmma(prog, "llama_attn", 16, 4, d, 64, tiles={"prefill": tiles}, **LONG)
        wgmma(prog, "gemma2_attn", 8, 8, d, 16, tiles={"prefill": tiles}, lens=[1500], new=[900], splits=3, window=300)


@pytest.mark.parametrize("d,bn", [(64, 64), (64, 128), (128, 64)])
def test_three_consumers(prog, d, bn, tma):
    """Three consumer warpgroups (192 query rows a CTA, turns in order), both schedules, one ring or two: ragged
    lengths off the tile, GQA packing of 3 and 4 heads (192 rows: 64 / 48 tokens), split-KV with a window."""
    from layerforge.codegen.attention_wgmma import WGTileConfig
    tiles = {"prefill": WGTileConfig(bn=bn, stages=3, consumers=3, overlap=tma.startswith("overlap"), tma=True,
                                     kv_rings=tma.endswith("rings"))}
    wgmma(prog, "llama_attn", 16, 4, d, 64, tiles=tiles, **LONG)
    wgmma(prog, "llama_attn", 12, 4, d, 16, tiles=tiles, lens=[5, 33, 70, 300], new=[5, 3, 70, 129])
    wgmma(prog, "gemma2_attn", 8, 8, d, 16, tiles=tiles, lens=[1500], new=[900], splits=3, window=300)


@pytest.mark.parametrize("lpt", [40, 128, 528])
def test_lpt_order(prog, lpt, tma):
    """The sectioned launch order (WGTileConfig.lpt) over sections of at least `lpt` CTAs: these grids' heads hold
    under 128 and 528, so their sections grow to several heads, cut into uneven sizes; 40 keeps some launches'
    default order. Every CTA must take one row block of one (chunk, KV head, split): a row block missed stays NaN in
    the poisoned output. Both schedules, one ring or two, three consumers."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
    for d in (128, 64):
        c = tile_candidates(d)[0]
        tiles = {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, consumers=c.consumers, tma=True, lpt=lpt,
                                         overlap=tma.startswith("overlap") and c.consumers == 2,
                                         kv_rings=tma.endswith("rings"))}
        wgmma(prog, "llama_attn", 16, 4, d, 64, tiles=tiles, **LONG)
        wgmma(prog, "gemma2_attn", 8, 8, d, 16, tiles=tiles, lens=[1500, 40, 700], new=[900, 40, 3], splits=3,
              window=300)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_pairs(prog, d, tma):
    """Two row blocks a CTA (WGTileConfig.pairs: the longer, then the shorter, the rings' places carried over), both
    schedules, one ring or two: ragged chunks over cached prefixes (odd and even row-block counts, a chunk of one
    token), GQA packing, split-KV with a window, a fully masked row block (bert's lengths), the distance tables (T5)."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
    c = tile_candidates(d)[-1] if d == 64 else tile_candidates(d)[0]   # D64: two consumers (three keep one block)
    tiles = {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, overlap=tma.startswith("overlap"), tma=True,
                                     kv_rings=tma.endswith("rings"), pairs=True)}
    wgmma(prog, "llama_attn", 16, 4, d, 64, tiles=tiles, **LONG)
    wgmma(prog, "llama_attn", 12, 4, d, 16, tiles=tiles, lens=[5, 33, 70, 300], new=[5, 3, 70, 129])
    wgmma(prog, "gemma2_attn", 8, 8, d, 16, tiles=tiles, lens=[1500, 40, 700], new=[900, 40, 3], splits=3, window=300)
    if d == 128:
        def extra(nseq, gen):
            return {"kv_len": torch.tensor([3, 0, 200][:nseq], dtype=torch.int32).cuda()}
        wgmma(prog, "bert_attn", 8, 8, d, 16, tiles=tiles, lens=[100, 100, 384], new=[100, 100, 384], extra_fn=extra)
        t5 = {"prefill": WGTileConfig(bn=128, stages=2, overlap=False, tma=True, pairs=True)}
        wgmma(prog, "t5_attn", 8, 8, d, 16, tiles=t5, lens=[700, 300], new=[700, 77],
              extra_fn=lambda nseq, gen: {"rel_bias": torch.randn(32, 8, generator=gen).cuda()})


@pytest.mark.parametrize("lpt", [0, 128])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_persist(prog, d, lpt, tma):
    """The persistent kernel (WGTileConfig.persist: at most one CTA an SM taking row blocks from a work queue, in the
    sectioned or the default order, the rings' places carried over, each next row block's Q loaded early), both
    schedules, one ring or two, D64 with three consumers and with two: ragged chunks
    over cached prefixes (row blocks without rows skipped by the producer), GQA packing, split-KV with a window, a
    fully masked row block (bert's lengths), the distance tables (T5)."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
    for c in tile_candidates(d)[:1] + (tile_candidates(d)[-1:] if d == 64 else []):   # D64: three consumers, two
        tiles = {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, consumers=c.consumers, tma=True, persist=True,
                                         q_next=True, overlap=tma.startswith("overlap") and c.consumers == 2,
                                         lpt=lpt, kv_rings=tma.endswith("rings"))}
        wgmma(prog, "llama_attn", 16, 4, d, 64, tiles=tiles, **LONG)
        wgmma(prog, "llama_attn", 12, 4, d, 16, tiles=tiles, lens=[5, 33, 70, 300], new=[5, 3, 70, 129])
        wgmma(prog, "gemma2_attn", 8, 8, d, 16, tiles=tiles, lens=[1500, 40, 700], new=[900, 40, 3], splits=3,
              window=300)
    if d == 128:
        def extra(nseq, gen):
            return {"kv_len": torch.tensor([3, 0, 200][:nseq], dtype=torch.int32).cuda()}
        wgmma(prog, "bert_attn", 8, 8, d, 16, tiles=tiles, lens=[100, 100, 384], new=[100, 100, 384], extra_fn=extra)
        t5 = {"prefill": WGTileConfig(bn=128, stages=2, overlap=False, tma=True, persist=True, q_next=True, lpt=lpt)}
        wgmma(prog, "t5_attn", 8, 8, d, 16, tiles=t5, lens=[700, 300], new=[700, 77],
              extra_fn=lambda nseq, gen: {"rel_bias": torch.randn(32, 8, generator=gen).cuda()})


def test_persist_same_bits_every_launch(prog, tma):
    """A row block's arithmetic is the one-CTA-a-block kernel's, whichever CTA takes it: the persistent kernel's
    outputs equal the plain kernel's bit for bit, call after call through one module (its counter back at zero after
    each launch), at launches of other sizes in between (more places than SMs, fewer), and replayed from a CUDA graph."""
    import itertools

    from layerforge.codegen.attention_wgmma import WGTileConfig

    from .test_paged_attention import build_cache
    layer = prog.specialise("llama_attn", Hq=16, Hkv=4, D=128, dtype="bf16")
    spec = layer.function.outputs[0].arg
    base = dict(bn=128, stages=3, overlap=tma.startswith("overlap"), tma=True, kv_rings=tma.endswith("rings"),
                lpt=128)
    mods = [PagedAttention(layer, page_size=64, prefill="wgmma",
                           tiles={"prefill": WGTileConfig(**base, persist=p, q_next=e)})
            for p, e in ((False, False), (True, False), (True, True))]
    gen = torch.Generator().manual_seed(7)
    lens = [3000, 1, 700, 2048, 65]
    ks = [torch.randn(n, 4, 128, generator=gen).to(torch.bfloat16).cuda() for n in lens]
    vs = [torch.randn(n, 4, 128, generator=gen).to(torch.bfloat16).cuda() for n in lens]
    kc, vc, table, seq_lens = build_cache(ks, vs, 64, spec, torch.bfloat16, gen)

    def inputs(new):
        cu = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32, device="cuda")
        q = torch.randn(sum(new), 16, 128, generator=torch.Generator().manual_seed(sum(new))).to(torch.bfloat16).cuda()
        return new, q, cu

    def call(mod, case, out=None):
        new, q, cu = case
        out = q.new_full((q.shape[0], 16, 128), float("nan")) if out is None else out
        mod.prefill(q, kc, vc, table[:len(new)], seq_lens[:len(new)], cu, max_q_len=max(new), max_kv_len=max(lens),
                    out=out)
        return out
    for new in ([3000, 1, 700, 2048, 65], [5, 1, 3], [3000, 1, 700, 2048, 65], [1, 1, 1, 1, 1]):
        case = inputs(new)
        want = call(mods[0], case)
        for mod in mods[1:]:   # the queue with Q at each row block's start, and with each next one's early
            got = call(mod, case)
            torch.cuda.synchronize()
            assert not torch.isnan(got).any()
            assert torch.equal(want.view(torch.int16), got.view(torch.int16)), (new, mod.tc_plan("prefill").key)
            assert int(mod._work_counter(got.device)[0]) == 0
    case = inputs([3000, 1, 700, 2048, 65])
    want = call(mods[0], case)
    out = torch.full_like(want, float("nan"))
    call(mods[2], case, out)   # compiled and loaded before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(mods[2], case, out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(want.view(torch.int16), out.view(torch.int16))


@pytest.mark.parametrize("regs", [False, True], ids=["smem", "regs"])
@pytest.mark.parametrize("name,hq,hkv,d", [("llama_attn", 16, 4, 128), ("llama_attn", 8, 8, 128),
                                           ("llama_attn", 24, 8, 64), ("llama_attn", 16, 2, 256),
                                           ("llama_attn", 28, 4, 128), ("gptj_attn", 16, 4, 128),
                                           ("partial_attn", 16, 4, 128)])
def test_rope_batch(prog, name, hq, hkv, d, tma, regs):
    """q's rotation with every pair read before any store (WGTileConfig.rope_batch: neox in 16-byte runs of 8 pairs,
    whole or partial rotary; gptj pair by pair), GQA 1 / 3 / 4 / 7 / 8: ragged chunks over cached prefixes (rows past
    a chunk left as they are), positions up to 20000, split-KV, f16. regs: the neox runs read from global memory into
    registers and rotated there (WGTileConfig.rope_regs; gptj's pairs keep the shared-memory path), the other columns
    and the zero rows copied; GQA 3 and 7 put a token's rows across two warpgroups."""
    from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates

    from ..codegen.test_attention_wgmma_pairs import ROPE_BLOCKS
    src = prog if name == "llama_attn" else lf.loads(ROPE_BLOCKS, "rope_blocks.lf")
    c = tile_candidates(d)[0]
    tiles = {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, consumers=c.consumers, tma=True, rope_step=True,
                                     fold=True, rope_batch=True, overlap=tma.startswith("overlap") and c.consumers == 2,
                                     kv_rings=tma.endswith("rings"), rope_regs=regs)}
    wgmma(src, name, hq, hkv, d, 64, tiles=tiles, **LONG)
    wgmma(src, name, hq, hkv, d, 16, tiles=tiles, lens=[20000, 5], new=[900, 5], splits=3)
    wgmma(src, name, hq, hkv, d, 64, tiles=tiles, lens=[300, 129], new=[300, 7], dtype=torch.float16)
    if regs and name == "llama_attn":   # the persistent kernel: each row block's Q rotated in registers in its turn
        import dataclasses
        queued = {"prefill": dataclasses.replace(tiles["prefill"], persist=True, lpt=128)}
        wgmma(src, name, hq, hkv, d, 64, tiles=queued, **LONG)
