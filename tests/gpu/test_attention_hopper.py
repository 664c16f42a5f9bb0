"""The Hopper (sm_90a, wgmma) prefill kernel against the reference evaluator in float64, as
tests/gpu/test_paged_attention.py runs the other kernels (fresh random inputs, outputs
NaN-filled first, NaN fails): causal, sliding window, soft-cap, ALiBi, T5 bias, GQA up to
32 heads a KV head, head dims 64/128/256, ragged sequences and chunks over a cached prefix,
pages of 16 and 64, split-KV, sinks, block-sparse masks (the overlap schedule's P buffers
alternate by the tiles computed), fully masked rows, f16; each under the plain and the overlap
schedule of the consumers. Runs only on sm_90 GPUs (the kernel is compiled for sm_90a)."""
import dataclasses

import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_wgmma import tile_candidates
from layerforge.runtime.attention import PagedAttention

from .test_paged_attention import run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the wgmma prefill kernel runs on sm_90 GPUs (H100, H200) only")
LONG = dict(lens=[700, 1, 333, 900], new=[700, 1, 333, 77])   # whole prompts, a length-1 one, a chunk


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(autouse=True, params=["plain", "overlap"])
def schedule(request, monkeypatch):
    """Every case under both consumer schedules: the plain one and the overlap one (the softmax
    under the consumer's own P V; the planner's default where it compiles without spills)."""
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "1" if request.param == "overlap" else "0")
    return request.param


def wgmma(prog, name, hq, hkv, d, page, **kw):
    run_case(prog, "tc-ragged", name, hq, hkv, d, page, prefill="wgmma", **kw)


def test_default_on_sm90_is_wgmma(prog):
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = PagedAttention(layer, page_size=16)
    assert attn.prefill_kernel == "wgmma" and attn.tc_plan("prefill").arch == "sm_90a"
    assert PagedAttention(layer, page_size=16, prefill="tc").tc_plan("prefill").arch == "sm_90"


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 8), (32, 1)])
def test_causal_gqa_head_dims(prog, hq, hkv, d):
    wgmma(prog, "llama_attn", hq, hkv, d, 16, lens=[5, 33, 70, 300], new=[5, 3, 70, 129])


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn", "bloom_attn", "gpt2_attn"])
def test_variants_long_ragged(prog, name, d, page):
    """Causal, window (mistral), soft-cap + window (gemma2), ALiBi (bloom), no RoPE (gpt2)."""
    consts = {"window": 200} if name in ("mistral_attn", "gemma2_attn") else {}
    wgmma(prog, name, 16, 4, d, page, **LONG, **consts)


def test_bert_padding_and_fully_masked_rows(prog):
    extra = lambda nseq, gen: {"kv_len": torch.tensor([10, 0, 20], dtype=torch.int32).cuda()}   # noqa: E731
    wgmma(prog, "bert_attn", 8, 8, 64, 16, lens=[10, 10, 200], new=[10, 10, 200], extra_fn=extra)
    extra = lambda nseq, gen: {"kv_len": torch.tensor([700, 0, 100, 900], dtype=torch.int32).cuda()}   # noqa: E731
    wgmma(prog, "bert_attn", 16, 4, 128, 16, **LONG, extra_fn=extra)


def test_t5_relative_bias(prog):
    extra = lambda nseq, gen: {"rel_bias": torch.randn(32, 8, generator=gen).cuda()}   # noqa: E731
    wgmma(prog, "t5_attn", 8, 8, 64, 16, lens=[12, 200], new=[12, 200], extra_fn=extra)


@pytest.mark.parametrize("splits", [None, 5])
def test_split_kv(prog, splits):
    """A short chunk over a long cached prefix: the keys split across CTAs, merged after."""
    wgmma(prog, "llama_attn", 8, 8, 128, 64, lens=[4096], new=[20], splits=splits)
    wgmma(prog, "llama_attn", 32, 8, 128, 16, lens=[3000, 17], new=[300, 17], splits=splits)


def test_f16(prog):
    wgmma(prog, "gemma2_attn", 16, 8, 128, 16, lens=[300, 90], new=[300, 40], dtype=torch.float16, window=64)


@pytest.mark.parametrize("window", [0, 40])
def test_attention_sinks(window):
    from ..dsl.test_attention_sinks import SINKS
    prog = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    sinks = lambda n, gen: {"sinks": (torch.randn(8, generator=gen) * 2).cuda()}   # noqa: E731
    wgmma(prog, "sink_attn", 8, 2, 128, 16, lens=[700, 1, 333, 90], new=[700, 1, 1, 7], extra_fn=sinks, window=window)
    wgmma(prog, "sink_attn", 8, 2, 128, 16, lens=[700, 333], new=[700, 100], extra_fn=sinks, splits=3, window=window)


@pytest.mark.parametrize("name", ["prefix_lm", "sinks", "dilated", "natten", "by_head"])
def test_block_sparse_masks(name):
    """Masks whose tiles the tile classifier skips (both warpgroup roles alike) or runs unmasked."""
    from ..codegen.test_mask_tiles import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    wgmma(prog, name, 8, 2, 128, 16, **LONG)
    wgmma(prog, name, 16, 4, 64, 64, lens=[1000, 257], new=[1000, 3])


@pytest.mark.parametrize("name", ["natten32", "natten64", "natten128", "strided", "outside", "never"])
@pytest.mark.parametrize("split", ["1", "0"])
def test_masks_split_over_the_key_tile(name, split, schedule, monkeypatch):
    """Masks that read kv_pos // 2^j or % 2^j, with those terms split over the key tile (lf_mask_kt, the default)
    and without (LAYERFORGE_WGMMA_KEY_SPLIT=0), and |x| against constants as unsigned compares: the planner's
    kernel, 64-key tiles (G = 128's terms not split there), and a second shape."""
    from layerforge.codegen.attention_wgmma import WGTileConfig
    from ..codegen.test_mask_key_split import MASKS
    monkeypatch.setenv("LAYERFORGE_WGMMA_KEY_SPLIT", split)
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    wgmma(prog, name, 8, 2, 128, 16, **LONG)
    bn64 = WGTileConfig(bn=64, stages=2, overlap=schedule == "overlap")
    wgmma(prog, name, 8, 2, 128, 16, tiles={"prefill": bn64}, **LONG)
    wgmma(prog, name, 16, 4, 64, 64, lens=[1000, 257], new=[1000, 3])


@pytest.mark.parametrize("d", [64, 128, 256])
def test_staged_out(prog, d, monkeypatch):
    """O out through Q's buffer in 16-byte stores (the default; set here as well) against the float64 reference: ragged
    chunks whose last row block is partial (its rows past the chunk not stored), GQA, a window, bert's fully masked
    rows (zeros), f16, and split-KV (its f32 parts keep the fragments' stores)."""
    monkeypatch.setenv("LAYERFORGE_WGMMA_STAGED_OUT", "1")
    wgmma(prog, "llama_attn", 32, 8, d, 16, lens=[5, 33, 700, 300], new=[5, 3, 700, 129])
    wgmma(prog, "mistral_attn", 16, 4, d, 64, **LONG, window=200)
    extra = lambda nseq, gen: {"kv_len": torch.tensor([700, 0, 100, 900], dtype=torch.int32).cuda()}   # noqa: E731
    wgmma(prog, "bert_attn", 16, 4, d, 16, **LONG, extra_fn=extra)
    wgmma(prog, "gemma2_attn", 16, 8, d, 16, lens=[300, 90], new=[300, 40], dtype=torch.float16, window=64)
    wgmma(prog, "llama_attn", 32, 8, d, 16, lens=[3000, 17], new=[300, 17], splits=5)
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16")
    assert PagedAttention(layer, page_size=16).tc_plan("prefill").config.staged_out


@pytest.mark.parametrize("d", [64, 128, 256])
def test_tile_branch(prog, d, monkeypatch, schedule):
    """The full-tile branch around both rows' softmax (LAYERFORGE_WGMMA_TILE_BRANCH=1, off until measured; the overlap
    schedule's) against the float64 reference: causal GQA over ragged chunks (full and diagonal tiles), a window,
    soft-cap with a window in f16, bert's padding with fully masked rows (zeros), split-KV, a mask of positional key
    terms (natten: tiles classified by the mask's tile lines)."""
    from ..codegen.test_mask_key_split import MASKS
    monkeypatch.setenv("LAYERFORGE_WGMMA_TILE_BRANCH", "1")
    wgmma(prog, "llama_attn", 32, 8, d, 16, lens=[5, 33, 700, 300], new=[5, 3, 700, 129])
    wgmma(prog, "mistral_attn", 16, 4, d, 64, **LONG, window=200)
    wgmma(prog, "gemma2_attn", 16, 8, d, 16, lens=[300, 90], new=[300, 40], dtype=torch.float16, window=64)
    extra = lambda nseq, gen: {"kv_len": torch.tensor([700, 0, 100, 900], dtype=torch.int32).cuda()}   # noqa: E731
    wgmma(prog, "bert_attn", 16, 4, d, 16, **LONG, extra_fn=extra)
    wgmma(prog, "llama_attn", 32, 8, d, 16, lens=[3000, 17], new=[300, 17], splits=5)
    wgmma(lf.loads(MASKS, "masks.lf", with_stdlib=False), "natten32", 8, 2, d, 16, **LONG)
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16")
    assert PagedAttention(layer, page_size=16).tc_plan("prefill").config.tile_branch == (schedule == "overlap")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("switch,value,field", [("LAYERFORGE_WGMMA_POLY_EXP", "2", "poly"),
                                                ("LAYERFORGE_WGMMA_POLY_EXP", "16", "poly"),
                                                ("LAYERFORGE_WGMMA_CHAINS", "4", "chains"),
                                                ("LAYERFORGE_WGMMA_CHAINS", "8", "chains"),
                                                ("LAYERFORGE_WGMMA_LATE_PACK", "1", "late_pack")])
def test_softmax_variants(prog, d, switch, value, field, monkeypatch, schedule):
    """The softmax's variants on the planner's kernel (D64: three consumers) against the float64 reference: 2^x as a
    polynomial on the FMA pipe for a row's first key groups (POLY_EXP; 16: every group of a 128-key tile), a row's
    max and sum over partial values (CHAINS), the overlap schedule with one P buffer (LATE_PACK: taken where the
    two-buffer overlap spills, D64's three consumers). Causal GQA over ragged chunks, a window, and padding with
    fully masked rows (their sums stay 0)."""
    monkeypatch.setenv(switch, value)
    wgmma(prog, "llama_attn", 32, 8, d, 16, lens=[5, 33, 700, 300], new=[5, 3, 700, 129])
    wgmma(prog, "mistral_attn", 16, 4, d, 64, **LONG, window=200)
    extra = lambda nseq, gen: {"kv_len": torch.tensor([700, 0, 100, 900], dtype=torch.int32).cuda()}   # noqa: E731
    wgmma(prog, "bert_attn", 16, 4, d, 16, **LONG, extra_fn=extra)
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16")
    if field != "late_pack" or (d == 64 and schedule == "overlap"):   # (late_pack is a form of the overlap schedule)
        assert getattr(PagedAttention(layer, page_size=16).tc_plan("prefill").config, field) == int(value)


@pytest.mark.parametrize("d,tiles", [(d, c) for d in (64, 128, 256) for c in tile_candidates(d)],
                         ids=lambda x: getattr(x, "label", str(x)))
def test_every_tile_candidate(prog, d, tiles, schedule):
    """The planner's fallbacks (taken where a block's hooks spill the first), forced, in either schedule."""
    tiles = dataclasses.replace(tiles, overlap=schedule == "overlap")
    wgmma(prog, "gemma2_attn", 16, 4, d, 16, lens=[700, 1, 333], new=[700, 1, 100], window=200,
          tiles={"prefill": tiles})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,hq,hkv,consts", [("llama_attn", 32, 8, {}), ("llama_attn", 16, 16, {}),
                                                 ("mistral_attn", 16, 16, {"window": 200}),
                                                 ("llama_attn", 32, 1, {})])
def test_rope_by_steps(prog, name, hq, hkv, consts, dtype):
    """WGTileConfig.rope_step (q rotated by one precise sincos a thread and step rotations after it), MHA and
    GQA, at positions up to 20000 (long contexts: the steps start from a large angle) and ragged, against the
    float64 reference."""
    import dataclasses
    from layerforge.codegen.attention_wgmma import tile_candidates
    tiles = dataclasses.replace(tile_candidates(128)[0], rope_step=True)
    wgmma(prog, name, hq, hkv, 128, 64, lens=[20000, 300, 1000], new=[100, 129, 7], dtype=dtype,
          tiles={"prefill": tiles}, **consts)


@pytest.mark.parametrize("name", ["gpt2_attn", "llama_attn", "mistral_attn", "bert_attn"])
def test_scale_folded_into_the_exponent(prog, name):
    """WGTileConfig.fold (no score hook, a positive constant scale: the raw scores' max, then 2^(s scale2 - m)
    as one FFMA a score; with rope_step for the RoPE blocks) against the float64 reference: causal, GQA,
    window, padding with fully masked rows, long ragged chunks."""
    import dataclasses
    from layerforge.codegen.attention_wgmma import tile_candidates
    tiles = dataclasses.replace(tile_candidates(128)[0], fold=True, rope_step=True)
    consts = {"window": 200} if name == "mistral_attn" else {}
    extra = {}
    if name == "bert_attn":
        extra = {"extra_fn": lambda nseq, gen: {"kv_len": torch.tensor([700, 0, 100, 900], dtype=torch.int32).cuda()}}
    wgmma(prog, name, 16, 4 if name == "llama_attn" else 16, 128, 64, tiles={"prefill": tiles}, **LONG, **consts,
          **extra)
