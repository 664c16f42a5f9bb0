"""The wgmma prefill's overlap schedule (WGTileConfig.overlap: the softmax of tile t under the
consumer's own P V of tile t - 1, P in two alternating buffers, O rescaled after) against the
reference evaluator in float64, as tests/gpu/test_attention_hopper.py and test_block_mask.py
run the plain schedule (fresh random inputs, outputs NaN-filled first, NaN fails): causal, GQA,
head dims 64/128/256, ragged lengths that are not multiples of the tile, sliding window, soft-cap,
ALiBi, padding and fully masked rows (zeros), split-KV, sinks, tiles the mask's classifier
skips (the P buffers alternate by tiles computed), the block-mask lists, the per-tile distance
tables, f16; and it being the default (LAYERFORGE_WGMMA_OVERLAP=0 turns it off). Runs only on sm_90 GPUs."""
import dataclasses
import random

import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, tile_candidates
from layerforge.runtime.attention import PagedAttention

from .test_block_mask import LENS, NEW, SRC, doc_table, run as run_prefill
from .test_paged_attention import run_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                 reason="the wgmma prefill kernel runs on sm_90 GPUs (H100, H200) only")]
LONG = dict(lens=[700, 1, 333, 900], new=[700, 1, 333, 77])   # whole prompts, a length-1 one, a chunk


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(scope="module")
def mask_prog():
    return lf.loads(SRC, "block_masks.lf", with_stdlib=False)


def overlapped(d: int, i: int = 0) -> WGTileConfig:
    """Tile candidate i of head dim d (the first: what the planner takes for these blocks), with overlap."""
    return dataclasses.replace(tile_candidates(d)[i], overlap=True)


def wgmma(prog, name, hq, hkv, d, page, tiles=None, **kw):
    run_case(prog, "tc-ragged", name, hq, hkv, d, page, prefill="wgmma", tiles={"prefill": tiles or overlapped(d)},
             **kw)


def overlap_attn(layer, *, page_size=64, tiles=None) -> PagedAttention:
    attn = PagedAttention(layer, page_size=page_size, prefill="wgmma", tiles={"prefill": tiles} if tiles else None)
    assert attn.tc_plan("prefill").config.overlap
    return attn


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


@pytest.mark.parametrize("splits", [None, 5])
def test_split_kv(prog, splits):
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
def test_tiles_the_classifier_skips(name):
    """Skipped tiles take no turn: the P buffers alternate by the tiles computed."""
    from ..codegen.test_mask_tiles import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    wgmma(prog, name, 8, 2, 128, 16, **LONG)
    wgmma(prog, name, 16, 4, 64, 64, lens=[1000, 257], new=[1000, 3])


CANDIDATES = [(d, overlapped(d, i)) for d in (64, 128, 256) for i in range(len(tile_candidates(d)))]


@pytest.mark.parametrize("d,tiles", CANDIDATES, ids=lambda x: getattr(x, "label", str(x)))
def test_every_tile_candidate(prog, d, tiles):
    wgmma(prog, "gemma2_attn", 16, 4, d, 16, tiles=tiles, lens=[700, 1, 333], new=[700, 1, 100], window=200)


@pytest.mark.parametrize("bn", [128, 64])
@pytest.mark.parametrize("name", ["doc_causal", "doc"])
def test_document_masks_over_the_block_mask(mask_prog, name, bn):
    layer = mask_prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = overlap_attn(layer, tiles=WGTileConfig(bn=bn, stages=3, overlap=True))
    run_prefill(layer, LENS, NEW, {"doc": doc_table(LENS, "random", random.Random(11 + bn))}, hq=32, hkv=8, attn=attn)


def test_block_mask_fully_masked_rows_give_zeros(mask_prog):
    layer = mask_prog.specialise("doc_pad", Hq=32, Hkv=8, D=128, dtype="bf16")
    run_prefill(layer, LENS, NEW, {"doc": doc_table(LENS, "pad", random.Random(5))}, hq=32, hkv=8,
                attn=overlap_attn(layer, tiles=overlapped(128)))


@pytest.mark.parametrize("splits", [2, 5])
def test_split_kv_over_the_block_mask(mask_prog, splits):
    layer = mask_prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    run_prefill(layer, [900, 40], [3, 40], {"doc": doc_table([900, 40], "random", random.Random(9))}, hq=32, hkv=8,
                splits=splits, attn=overlap_attn(layer, tiles=overlapped(128)))


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4)])
def test_t5_distance_table(monkeypatch, hq, hkv, d):
    """The planner's choice under LAYERFORGE_WGMMA_OVERLAP=1: the tables' tile shape, with overlap."""
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "1")
    layer = lf.stdlib().specialise("t5_attn", Hq=hq, Hkv=hkv, D=d, NB=32, dtype="bf16", bidirectional=False)
    attn = overlap_attn(layer)
    assert attn.tc_plan("prefill").rel_table is not None
    gen = torch.Generator().manual_seed(3)
    run_prefill(layer, [600, 250, 1], [600, 70, 1], {"rel_bias": torch.randn(32, hq, generator=gen)}, hq=hq, hkv=hkv,
                d=d, attn=attn)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_clamped_relative_bias_table(monkeypatch, mask_prog, d):
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "1")
    layer = mask_prog.specialise("rel_bias", Hq=32, Hkv=8, D=d, dtype="bf16")
    attn = overlap_attn(layer)
    assert attn.tc_plan("prefill").rel_table is not None
    gen = torch.Generator().manual_seed(4)
    run_prefill(layer, [500, 130], [500, 129], {"bias": torch.randn(129, 32, generator=gen)}, hq=32, hkv=8, d=d,
                attn=attn)


def test_environment_variable_selects_overlap(prog, monkeypatch):
    """By default (and with LAYERFORGE_WGMMA_OVERLAP=1) the sm_90 prefill plans the overlap
    schedule at its tile shape; LAYERFORGE_WGMMA_OVERLAP=0 the plain one."""
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "0")
    plain = PagedAttention(layer, page_size=16).tc_plan("prefill")
    monkeypatch.delenv("LAYERFORGE_WGMMA_OVERLAP", raising=False)
    plan = PagedAttention(layer, page_size=16).tc_plan("prefill")
    assert not plain.config.overlap and plan.config == dataclasses.replace(plain.config, overlap=True)
    run_case(prog, "tc-ragged", "gemma2_attn", 32, 8, 128, 16, lens=[700, 129, 1], new=[700, 64, 1], window=300)
