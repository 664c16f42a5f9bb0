"""Extra tables sized by a dynamic dim other than B (`doc: i32[B, Skv]`): the dim is bound from
the tables themselves (consistently across them), the CPU path runs the reference, and the
kernels get the dim as their `d_<dim>` argument. No GPU needed."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

DOC_MASK = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention doc_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv],
                   weight: f32[B, Skv]) -> T[B, S, Hq, D] {
    score = score + weight[b, kv_pos]
    mask = q_pos >= kv_pos and doc[b, kv_pos] == doc[b, q_pos]
}
"""
PAGE, WIDTH = 16, 32   # the tables are as wide as the page table's capacity (2 pages)


@pytest.fixture(scope="module")
def layer():
    return lf.loads(DOC_MASK).specialise("doc_attn", Hq=4, Hkv=2, D=64, dtype="bf16")


def cache(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(8, PAGE, 2, 64, generator=g).bfloat16()
    vc = torch.randn(8, PAGE, 2, 64, generator=g).bfloat16()
    table = torch.arange(len(lens) * 2, dtype=torch.int32).view(len(lens), 2)
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32)


def tables(n_seqs, width=WIDTH):
    doc = (torch.arange(width) // 7).to(torch.int32).expand(n_seqs, width).contiguous()   # documents of 7 tokens
    weight = torch.linspace(-1, 1, n_seqs * width).view(n_seqs, width).contiguous()
    return {"doc": doc, "weight": weight}


def test_table_sized_by_skv_runs_the_reference_on_cpu(layer):
    attn = PagedAttention(layer, arch="sm_90")
    kc, vc, table, lens = cache([5, 20])
    q = torch.randn(2, 4, 64).bfloat16()
    extra = tables(2)
    out = attn(q, kc, vc, table, lens, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4, 19], dtype=torch.int32),
               max_kv_len=20, extra=extra)
    k = kc[2:4].reshape(-1, 2, 64)[:20]
    v = vc[2:4].reshape(-1, 2, 64)[:20]
    (want,) = lf.evaluate(layer.function, {"q": q[1:][None], "k": k[None], "v": v[None],
                                           "doc": extra["doc"][1:, :20], "weight": extra["weight"][1:, :20]},
                          q_positions=torch.tensor([[19]]), kv_positions=torch.arange(20)[None], k_rotated=True)
    assert torch.equal(out[1:], want[0])


def test_kernels_get_the_tables_dims(layer):
    attn = PagedAttention(layer, arch="sm_90")
    kc, vc, table, lens = cache([5, 20])
    q = torch.randn(2, 4, 64).bfloat16()
    *_, values = attn._common_checks(q, kc, vc, table, lens, 20, tables(2), None, {})
    dim_args = {a.ref for a in attn.plan.kernels[0].args if a.role == "dim" and a.ref is not None}
    assert {"B", "Skv"} <= dim_args
    assert values["B"] == 2 and values["Skv"] == WIDTH


def test_tables_that_disagree_on_a_dim_are_an_error(layer):
    attn = PagedAttention(layer, arch="sm_90")
    kc, vc, table, lens = cache([5, 20])
    extra = {**tables(2), "weight": tables(2, width=WIDTH + 1)["weight"]}
    with pytest.raises(lf.LayerInputError, match="'weight' dim 1 must be 32, got 33"):
        attn(torch.randn(1, 4, 64).bfloat16(), kc, vc, table, lens, torch.tensor([1], dtype=torch.int32),
             torch.tensor([19], dtype=torch.int32), max_kv_len=20, extra=extra)


BATCH_MASK = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention by_batch(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = b < h
}
"""


def test_hooks_reading_b_see_the_sequence_index_on_cpu():
    """The CPU path evaluates one sequence at a time; a hook reading `b` must still see the
    sequence's batch index (it saw 0 for every sequence, so `b < h` masked nothing in sequence 1)."""
    layer = lf.loads(BATCH_MASK).specialise("by_batch", Hq=4, Hkv=2, D=64, dtype="f32")
    attn = PagedAttention(layer, arch="sm_90")
    kc, vc, table, lens = cache([5, 20])
    kc, vc = kc.float(), vc.float()
    q = torch.randn(2, 4, 64)
    out = attn(q, kc, vc, table, lens, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4, 19], dtype=torch.int32),
               max_kv_len=20)
    k = torch.stack([kc[0:2].reshape(-1, 2, 64)[:20], kc[2:4].reshape(-1, 2, 64)[:20]])
    v = torch.stack([vc[0:2].reshape(-1, 2, 64)[:20], vc[2:4].reshape(-1, 2, 64)[:20]])
    (want,) = lf.evaluate(layer.function, {"q": q[1:][None].expand(2, -1, -1, -1), "k": k, "v": v},
                          q_positions=torch.tensor([[19], [19]]), kv_positions=torch.arange(20).expand(2, 20), k_rotated=True)
    torch.testing.assert_close(out[1], want[1, 0], rtol=1e-5, atol=1e-6)
    assert (out[1, :2] == 0).all() and (out[1, 2:] != 0).any()   # heads 0, 1 fully masked in sequence 1
