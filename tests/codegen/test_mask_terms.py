"""A mask's table reads split by the positions they read (codegen/mask_terms.py), and the kernels that take the split:
the test made once a tile as bits, the wgmma kernel's key terms staged in shared memory where it holds them."""
from __future__ import annotations

import pytest

import layerforge as lf
from layerforge.codegen.attention_tc import plan_tc_attention
from layerforge.codegen.attention_wgmma import SHARED_LIMIT, WGTileConfig, plan_wgmma_attention
from layerforge.codegen.mask_terms import attention_mask_split
from layerforge.dsl.ir import Op

from ..gpu.test_block_mask import SRC as BLOCKS   # doc_causal, doc, doc_pad, doc_heads, ...

SRC = BLOCKS + """
attention keyed(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], keep: i32[B, Skv],
                 lim: i32[Hq]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and keep[b, kv_pos] + h < lim[h] + 7
}
attention scored(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] > score
}
attention prefix(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], pre: i32[B]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos or kv_pos < pre[b]
}
attention parity(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and kv_pos % 2 == 0
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.loads(SRC, "mask_terms.lf", with_stdlib=False)


def split_of(prog, name):
    layer = prog.specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16")
    return attention_mask_split(layer.function.outputs[0].arg.mask)


def test_document_mask_splits_into_its_key_and_row_reads(prog):
    for name in ("doc_causal", "doc"):
        mask = prog.specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16").function.outputs[0].arg.mask
        s = attention_mask_split(mask)
        assert len(s.keys) == 1 and len(s.rows) == 1
        assert s.keys[0].op is Op.INDEX and s.rows[0].op is Op.INDEX
        # the causal bound stays out of the test (a key bound); without bounds the whole mask is the test
        assert (s.expr is not mask) == (name == "doc_causal")


def test_terms_are_the_largest_reads_of_one_side(prog):
    s = split_of(prog, "keyed")
    assert len(s.keys) == 1 and len(s.rows) == 1
    assert s.keys[0].op is Op.INDEX            # keep[b, kv_pos] + h reads h too: the key term is the read alone
    assert s.rows[0].op is Op.BINARY and s.rows[0].arg == "add"   # lim[h] + 7, the whole row-side sum


def test_no_split_without_a_key_read_or_with_the_score(prog):
    assert split_of(prog, "scored") is None     # the test reads the score: made per score
    assert split_of(prog, "parity") is None     # no table read at the key: nothing worth a register
    for name in lf.stdlib().names:              # no stdlib block's mask changes
        try:
            layer = lf.stdlib().specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16")
        except Exception:   # noqa: BLE001 - blocks of other dims / kinds
            continue
        spec = layer.function.outputs[0].arg
        if hasattr(spec, "mask"):
            assert attention_mask_split(spec.mask) is None, name


@pytest.mark.parametrize("d", [64, 128, 256])
def test_wgmma_kernel_stages_the_key_terms_where_shared_memory_holds_them(prog, d):
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=d, dtype="bf16")
    plain = plan_wgmma_attention(layer, page_size=64)   # stage_keys=False: each thread makes its keys' terms
    assert plain.mask_split and not plain.key_terms_staged and "sKeyT" not in plain.source()
    plan = plan_wgmma_attention(layer, page_size=64, stage_keys=True)
    src = plan.source()
    assert plan.mask_split and "_mb_" in plan.key and "lf_mask_split(" in src and "keep[half]" in src
    assert plan.key_terms_staged and "_ks_" in plan.key
    assert "sKeyT" in plan.shared_layout.offsets and "key_t0[kp - k0]" in src
    assert plan.shared_bytes <= SHARED_LIMIT
    off = plan_wgmma_attention(layer, page_size=64, mask_bits=False)
    assert not off.mask_split and "_mb_" not in off.key and "lf_mask_split(" not in off.source().split("__global__")[1]


@pytest.mark.parametrize("d", [64, 128, 256])
def test_runtime_takes_the_staged_wgmma_kernel_for_documents_spill_free(prog, d):
    """On sm_90 a document block's default prefill is the persistent wgmma kernel with its key terms staged, as the
    runtime and the pack plan it; compiled, it does not spill (at D256 the plain kernel's longest-first order
    spilled 32 bytes with the lists' walk: the planner drops it there)."""
    from layerforge.codegen.attention_wgmma import default_options
    from layerforge.runtime.attention import PagedAttention
    from layerforge.runtime.launch import compile_fn
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=d, dtype="bf16")
    attn = PagedAttention(layer, arch="sm_90", page_size=64)
    assert attn.prefill_kernel == "wgmma"
    plan = plan_wgmma_attention(layer, page_size=64, compile_fn=compile_fn(), **default_options(layer))
    assert plan.key_terms_staged and plan.block_mask and "_ks_" in plan.key and plan.config.persist
    res = compile_fn()(plan)[plan.abi.name]
    assert res.spill_stores == 0 and res.spill_loads == 0, (plan.key, res)


def test_wgmma_key_terms_fit_beside_three_stages(prog):
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    full = plan_wgmma_attention(layer, page_size=64, tiles=WGTileConfig(bn=128, stages=3), stage_keys=True)
    assert full.key_terms_staged   # 1 KB left beside three 128-key stages: a consumer's 512 bytes of ids each
    assert full._layout(True).bytes + 1024 <= SHARED_LIMIT < full._layout(True).bytes + 1024 + 1024


def test_tc_kernel_takes_the_bits(prog, monkeypatch):
    layer = prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    plan = plan_tc_attention(layer, "sm_90", page_size=64)
    assert plan.mask_split and "_mb_" in plan.key and "keep[sl]" in plan.source()
    monkeypatch.setenv("LAYERFORGE_TC_MASK_BITS", "0")
    off = plan_tc_attention(layer, "sm_90", page_size=64)
    assert not off.mask_split and "keep[sl]" not in off.source()


def test_only_block_mask_kernels_take_the_bits(prog):
    """A mask whose table is read at the batch only (a prefix length) is bounded per tile by the classifier, not by a
    block mask: its key read splits off, but the kernels keep their per-score test and their sources."""
    layer = prog.specialise("prefix", Hq=32, Hkv=8, D=128, dtype="bf16")
    assert attention_mask_split(layer.function.outputs[0].arg.mask) is not None
    for plan in (plan_wgmma_attention(layer, page_size=64), plan_tc_attention(layer, "sm_90", page_size=64)):
        assert not plan.block_mask and not plan.mask_split and "lf_mask_split" not in plan.source()

