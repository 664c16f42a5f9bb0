"""The Hopper (wgmma) prefill with two row blocks a CTA (LAYERFORGE_WGMMA_PAIRS=1, WGTileConfig
items=2: row block Y - 1 - j, then j; each warpgroup role loops over them with its mbarrier ring
running on), against the reference evaluator in float64: test_attention_hopper.py's cases
(ragged chunks whose long row block is past the chunk, GQA, head dims 64/128/256, windows,
soft-cap, ALiBi, T5 tables, sinks, split-KV, block-sparse masks, fully masked rows, f16) under
the plain and overlap schedules with TMA tiles, and the overlap schedule with cp.async tiles.
Runs only on sm_90 GPUs."""
import dataclasses

import pytest
import torch

from layerforge.codegen.attention_wgmma import tile_candidates
from layerforge.runtime.attention import PagedAttention

from .test_attention_hopper import (LONG, prog, test_attention_sinks, test_bert_padding_and_fully_masked_rows,  # noqa: F401
                                    test_block_sparse_masks, test_causal_gqa_head_dims, test_f16, test_split_kv,
                                    test_t5_relative_bias, test_variants_long_ragged, wgmma)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the wgmma prefill kernel runs on sm_90 GPUs (H100, H200) only")


@pytest.fixture(autouse=True, params=["plain-tma", "overlap-tma", "overlap-cp.async"])
def schedule(request, monkeypatch):
    sched, loads = request.param.split("-")
    monkeypatch.setenv("LAYERFORGE_WGMMA_PAIRS", "1")
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "1" if sched == "overlap" else "0")
    monkeypatch.setenv("LAYERFORGE_WGMMA_TMA", "1" if loads == "tma" else "0")
    return sched


@pytest.mark.parametrize("d", [64, 128, 256])
def test_plans_take_pairs(prog, d, schedule):
    plan = PagedAttention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16"), page_size=16,
                          prefill="wgmma").tc_plan("prefill")
    assert plan.config.items == 2 and plan.config.label.endswith("i2"), plan.key
    assert plan.abi.grid[1] == "cdiv(cdiv(max_q_len * 4, 128), 2)"


@pytest.mark.parametrize("d,tiles", [(d, c) for d in (64, 128, 256) for c in tile_candidates(d)],
                         ids=lambda x: getattr(x, "label", str(x)))
@pytest.mark.parametrize("prefetch_q", [False, True])
def test_every_tile_candidate_paired(prog, d, tiles, schedule, prefetch_q):
    """Odd and even row-block counts (700 and 333 tokens x 4 heads), a one-token chunk; the second
    row block's Q loaded under the first one's last tile (prefetch_q) or after it."""
    tiles = dataclasses.replace(tiles, overlap=schedule == "overlap", items=2, prefetch_q=prefetch_q)
    wgmma(prog, "gemma2_attn", 16, 4, d, 16, lens=[700, 1, 333], new=[700, 1, 100], window=200,
          tiles={"prefill": tiles})
    wgmma(prog, "llama_attn", 16, 4, d, 64, **LONG, tiles={"prefill": tiles})
