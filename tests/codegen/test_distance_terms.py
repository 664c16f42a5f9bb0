"""Per-tile tables of the score's distance term (codegen/distance_terms.py), no GPU needed: the
term is found where it should be (T5 buckets, clamped relative bias) and nowhere else; the
prefill kernel's table, modelled here index for index (build: distance-major over the tile's
distances and the CTA's heads; read: (kp - q_pos) relative to the tile), gives every score of
every tile the term the reference evaluator computes at its own q_pos and kv_pos; the kernels
compile without spills for sm_80 and sm_90, and kernels without a term render as before."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_tc import TCAttentionPlan, plan_tc_attention, tile_candidates
from layerforge.codegen.distance_terms import distance_term
from layerforge.dsl.attention_ref import _subgraph
from layerforge.dsl.evaluator import _Evaluator, bind_inputs

SRC = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention rel_bias(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], bias: f32[129, Hq]) -> T[B, S, Hq, D] {
    score = score + bias[min(max(kv_pos - q_pos, -64), 64) + 64, h]
    mask = kv_pos <= q_pos
}
attention back_bias(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], bias: f32[64]) -> T[B, S, Hq, D] {
    score = score * 0.5 + bias[min(q_pos - kv_pos, 63)]
    mask = kv_pos <= q_pos
}
attention mixed(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], bias: f32[64]) -> T[B, S, Hq, D] {
    score = score + bias[min(q_pos - kv_pos, 63) + 0 * kv_pos]
    mask = kv_pos <= q_pos
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.loads(SRC, "distance.lf", with_stdlib=False)


def t5(hq=8, hkv=8, d=64, bidirectional=True):
    return lf.stdlib().specialise("t5_attn", Hq=hq, Hkv=hkv, D=d, NB=32, dtype="bf16", bidirectional=bidirectional)


def test_terms_are_found_where_they_pay(prog):
    term = distance_term(t5().function.outputs[0].arg.score)
    assert term is not None and term.sign == 1 and term.heads and term.node.op.value == "index"
    term = distance_term(prog.specialise("back_bias", Hq=4, Hkv=2, D=64, dtype="bf16").function.outputs[0].arg.score)
    assert term is not None and term.sign == -1 and not term.heads
    # kv_pos outside the difference: not a function of the distance
    assert distance_term(prog.specialise("mixed", Hq=4, Hkv=2, D=64, dtype="bf16").function.outputs[0].arg.score) is None
    std = lf.stdlib()   # ALiBi's slope * distance is cheaper than a table read; soft-capping reads no position
    for name in ("bloom_attn", "gemma2_attn", "llama_attn"):
        assert distance_term(std.specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16").function.outputs[0].arg.score) is None


def model_tables(layer, plan, table_inputs, q_first: int, n_tokens: int, k0: int, kvh: int):
    """One tile as the kernel does it: the table built from lf_rel_term (here: the reference
    evaluator of the term at q_pos = 0, kv_pos = rel), then read for every (row, key) of the
    tile; returns (read values, the reference's term at each row's own positions)."""
    spec = layer.function.outputs[0].arg
    term = distance_term(spec.score)
    heads, width = plan.distance_table
    group = plan.group
    rows, keys = plan.config.rows, plan.config.keys
    fn = layer.function
    hq = int(spec.num_q_heads)
    hkv, d = int(spec.num_kv_heads), int(spec.head_dim)
    inputs = {"q": torch.zeros(1, 1, hq, d, dtype=torch.bfloat16), "k": torch.zeros(1, 1, hkv, d, dtype=torch.bfloat16),
              "v": torch.zeros(1, 1, hkv, d, dtype=torch.bfloat16),
              **table_inputs}
    ev = _Evaluator(fn, inputs, bind_inputs(fn, inputs), True, None, None)

    def f(q_pos, kv_pos, h):
        env = {"b": torch.tensor(0), "h": torch.as_tensor(h), "kv_h": torch.as_tensor(h) // group,
               "q_pos": torch.as_tensor(q_pos), "kv_pos": torch.as_tensor(kv_pos), "score": torch.tensor(0.0)}
        return _subgraph(ev, term.node, env).double()

    r0 = 0
    qp_first, qp_last = q_first, q_first + (min(rows, n_tokens * group) - 1) // group
    w = keys + qp_last - qp_first
    assert w <= width                                   # the table holds every distance of the tile
    x = torch.arange(w * heads)
    rel = k0 - qp_last + x // heads                     # kv_pos - q_pos
    h = kvh * group + x % heads
    # lf_rel_term(rel) is the term at any positions of that distance (its sign: the kernel's
    # argument); the reference evaluates it at q_pos = 0, kv_pos = rel
    tab = f(torch.zeros_like(rel), rel, h)
    R = torch.arange(r0, r0 + min(rows, n_tokens * group))
    qp = qp_first + R // group
    kp = torch.arange(k0, k0 + keys)
    idx = (kp[None, :] - qp[:, None] + qp_last - k0) * heads + (R % group)[:, None] * (heads > 1)
    assert idx.min() >= 0 and idx.max() < w * heads     # never outside the tile's table
    got = tab[idx]
    want = f(qp[:, None], kp[None, :], (kvh * group + R % group)[:, None])
    return got, want.expand_as(got)


@pytest.mark.parametrize("case", ["t5_bi", "t5_causal_gqa", "rel_bias", "back_bias"])
@pytest.mark.parametrize("q_first,k0", [(0, 0), (300, 64), (1000, 320), (130, 1024)])
def test_tile_tables_give_every_score_its_term(prog, case, q_first, k0):
    gen = torch.Generator().manual_seed(0)
    if case.startswith("t5"):
        hq, hkv = (8, 8) if case == "t5_bi" else (16, 4)
        layer = t5(hq, hkv, bidirectional=case == "t5_bi")
        tables = {"rel_bias": torch.randn(32, hq, generator=gen)}
    else:
        layer = prog.specialise(case, Hq=16, Hkv=4, D=64, dtype="bf16")
        shape = (129, 16) if case == "rel_bias" else (64,)
        tables = {"bias": torch.randn(*shape, generator=gen)}
    plan = TCAttentionPlan(layer=layer, arch="sm_90", mode="prefill")
    assert plan.distance_table is not None
    for kvh in range(int(layer.function.outputs[0].arg.num_kv_heads))[:2]:
        got, want = model_tables(layer, plan, tables, q_first, 200, k0, kvh)
        assert torch.equal(got, want), (case, q_first, k0, kvh)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("case", ["t5_bi_mha", "t5_causal_gqa", "t5_causal_mha", "t5_d64", "t5_d256", "rel_bias",
                                  "back_bias"])
def test_tabulating_kernels_compile_without_spills(prog, case, arch):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    layer = {"t5_bi_mha": lambda: t5(16, 16, 128), "t5_causal_gqa": lambda: t5(32, 8, 128, False),
             "t5_causal_mha": lambda: t5(16, 16, 128, False), "t5_d64": lambda: t5(8, 8, 64),
             "t5_d256": lambda: t5(8, 8, 256, False),
             "rel_bias": lambda: prog.specialise("rel_bias", Hq=32, Hkv=8, D=128, dtype="bf16"),
             "back_bias": lambda: prog.specialise("back_bias", Hq=32, Hkv=8, D=64, dtype="bf16")}[case]()

    def compile_fn(plan):
        return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch)).resources
    plan = plan_tc_attention(layer, arch, mode="prefill", compile_fn=compile_fn)
    assert plan.distance_table is not None and "lf_rel_term(" in plan.source()
    for kr in compile_fn(plan).values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
    decode = TCAttentionPlan(layer=layer, arch=arch, mode="decode")     # the decode tiling keeps the per-score hook
    assert decode.distance_table is None and "lf_rel_term" not in decode.source()


def test_mqa_tables_too_large_stay_per_score():
    plan = TCAttentionPlan(layer=t5(32, 1, 128), arch="sm_90", mode="prefill",
                           tiles=tile_candidates("prefill", 128, 32)[0])
    assert plan.distance_table is None and "lf_rel_term" not in plan.source()
