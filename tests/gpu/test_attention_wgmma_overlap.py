"""The wgmma prefill's overlap schedule (WGTileConfig.overlap: the softmax of tile t under the
consumer's own P V of tile t - 1, P in two alternating buffers, O rescaled after) on what
tests/gpu/test_block_mask.py runs with the plain schedule: the block-mask lists (document masks,
fully masked rows, split-KV) and the per-tile distance tables, against the reference evaluator
in float64 (outputs NaN-filled first, NaN fails); and it being the default
(LAYERFORGE_WGMMA_OVERLAP=0 turns it off). The stdlib variants, GQA, head dims, sinks, split-KV
and the classifier-skipped tiles run under both schedules in tests/gpu/test_attention_hopper.py.
Runs only on sm_90 GPUs."""
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


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(scope="module")
def mask_prog():
    return lf.loads(SRC, "block_masks.lf", with_stdlib=False)


def overlapped(d: int, i: int = 0) -> WGTileConfig:
    """Tile candidate i of head dim d (the first: what the planner takes for these blocks), with overlap."""
    return dataclasses.replace(tile_candidates(d)[i], overlap=True)


def overlap_attn(layer, *, page_size=64, tiles=None) -> PagedAttention:
    attn = PagedAttention(layer, page_size=page_size, prefill="wgmma", tiles={"prefill": tiles} if tiles else None)
    assert attn.tc_plan("prefill").config.overlap
    return attn


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
