"""PagedAttention's choices and checks that need no GPU."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention


@pytest.fixture(scope="module")
def layer():
    return lf.stdlib().specialise("llama_attn", Hq=8, Hkv=2, D=64, dtype="bf16")


@pytest.mark.parametrize("arch,kernel", [("sm_75", "simt"), ("sm_80", "tc"), ("sm_90", "tc"), ("sm_90a", "tc")])
def test_kernel_default_follows_the_architecture(layer, arch, kernel):
    assert PagedAttention(layer, arch=arch).kernel == kernel


def test_explicit_kernel_wins(layer):
    assert PagedAttention(layer, arch="sm_90", kernel="simt").kernel == "simt"


def test_unknown_kernel_is_a_clear_error(layer):
    with pytest.raises(ValueError, match="kernel must be 'tc' or 'simt'"):
        PagedAttention(layer, kernel="wgmma")


def paged(lens, page=16, pages=8, seed=0):
    """A CPU cache holding random K/V for sequences of the given lengths, pages in order."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(pages, page, 2, 64, generator=g).bfloat16()
    vc = torch.randn(pages, page, 2, 64, generator=g).bfloat16()
    table = torch.arange(len(lens) * 2, dtype=torch.int32).view(len(lens), 2)
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32)


def test_cpu_tensors_run_the_reference_in_both_forms(layer):
    """Per-token and ragged forms agree with each other and with the evaluator on gathered K/V."""
    attn = PagedAttention(layer, arch="sm_75")           # CPU: the kernel choice does not matter
    kc, vc, table, lens = paged([5, 20])
    q = torch.randn(4, 8, 64).bfloat16()
    a = attn(q, kc, vc, table, lens, torch.tensor([0, 1, 1, 1], dtype=torch.int32),
             torch.tensor([4, 17, 18, 19], dtype=torch.int32), max_kv_len=20)
    b = attn.prefill(q, kc, vc, table, lens, torch.tensor([0, 1, 4], dtype=torch.int32), max_q_len=3, max_kv_len=20)
    assert torch.equal(a, b) and not torch.isnan(a).any()
    k = kc[:2].reshape(-1, 2, 64)[:5]
    v = vc[:2].reshape(-1, 2, 64)[:5]
    (want,) = lf.evaluate(layer.function, {"q": q[:1][None], "k": k[None], "v": v[None]},
                          q_positions=torch.tensor([[4]]), kv_positions=torch.arange(5)[None], k_rotated=True)
    assert torch.equal(a[:1], want[0])


@pytest.mark.parametrize("bad,match", [("page", "points outside the cache"), ("len", "outside \\[1, 32\\]"),
                                       ("seq", "not a row of the page table")])
def test_cpu_reference_rejects_bad_tables(layer, bad, match):
    attn = PagedAttention(layer, arch="sm_90")
    kc, vc, table, lens = paged([5, 20])
    seq = torch.tensor([1], dtype=torch.int32)
    if bad == "page":
        table[1, 1] = 99
    elif bad == "len":
        lens[1] = 40
    else:
        seq = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(lf.LayerInputError, match=match):
        attn(torch.randn(1, 8, 64).bfloat16(), kc, vc, table, lens, seq, torch.tensor([19], dtype=torch.int32),
             max_kv_len=20)


def test_identity_decode_matches_q_seq_q_pos_spelled_out(layer):
    """Without q_seq / q_pos token t is sequence t at its last position: on CPU tensors (the
    reference) exactly the call with arange / seq_lens - 1, also with fewer tokens than
    page-table rows."""
    attn = PagedAttention(layer, arch="sm_90")
    kc, vc, table, lens = paged([5, 20, 1])
    q = torch.randn(3, 8, 64).bfloat16()
    for T in (3, 2):
        got = attn(q[:T], kc, vc, table, lens, max_kv_len=20)
        want = attn(q[:T], kc, vc, table, lens, torch.arange(T, dtype=torch.int32), lens[:T] - 1, max_kv_len=20)
        assert torch.equal(got, want) and not torch.isnan(got).any()


def test_identity_decode_argument_checks_fail_before_any_launch(layer, monkeypatch):
    """q_seq / q_pos: both or neither; without them at most one token per page-table row. The
    checks come before anything is compiled or launched (no GPU needed)."""
    attn = PagedAttention(layer, arch="sm_90")

    def refuse(*args, **kwargs):
        raise AssertionError("reached a kernel launch or the reference")
    for path in ("_load", "_launch_tc", "_reference", "_common_checks"):
        monkeypatch.setattr(attn, path, refuse)
    kc, vc, table, lens = paged([5, 20])
    q = torch.randn(3, 8, 64).bfloat16()
    with pytest.raises(lf.LayerInputError, match="q has 3 tokens and the page table 2 rows"):
        attn(q, kc, vc, table, lens, max_kv_len=20)
    ids = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(lf.LayerInputError, match="'q_seq' is given but 'q_pos' is None"):
        attn(q[:2], kc, vc, table, lens, ids, max_kv_len=20)
    with pytest.raises(lf.LayerInputError, match="'q_pos' is given but 'q_seq' is None"):
        attn(q[:2], kc, vc, table, lens, q_pos=ids, max_kv_len=20)
    with pytest.raises(lf.LayerInputError, match="'q_pos' is given but 'q_seq' is None"):
        attn(q[:2], kc, vc, table, lens, None, ids, max_kv_len=20)


def test_tensor_core_plans_for_both_modes(layer, tmp_path):
    from layerforge.runtime.cache import KernelCache
    attn = PagedAttention(layer, arch="sm_90", cache=KernelCache(tmp_path), prefill="tc")
    pre, dec = attn.tc_plan("prefill"), attn.tc_plan("decode")
    assert pre.config.wn == 1 and dec.config.wn == 4       # rows split across warps vs keys
    assert pre.key != dec.key and attn.tc_plan("prefill") is pre


@pytest.mark.parametrize("arch,want", [("sm_90", "wgmma"), ("sm_80", "tc"), ("sm_89", "tc"), ("sm_100", "tc")])
def test_prefill_kernel_by_arch(layer, arch, want):
    """sm_90 prefills on the wgmma kernel (an sm_90a cubin), other archs on mma.sync; decode
    tiles stay on mma.sync everywhere."""
    attn = PagedAttention(layer, arch=arch)
    assert attn.prefill_kernel == want
    if want == "wgmma":
        assert attn.tc_plan("prefill").arch == "sm_90a" and attn.tc_plan("decode").arch == "sm_90"


def test_prefill_kernel_falls_back_where_wgmma_does_not_serve(monkeypatch):
    from layerforge.codegen.attention_tc import TileConfig
    prog = lf.stdlib()
    f32 = PagedAttention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=64, dtype="f32"), arch="sm_90")
    assert f32.kernel == "simt"
    d96 = PagedAttention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=96, dtype="bf16"), arch="sm_90")
    assert d96.prefill_kernel == "wgmma"   # every multiple of 16 (its 64-byte swizzle)
    pages2 = PagedAttention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=128, dtype="bf16"), arch="sm_90",
                            page_size=2)   # a 128-key tile would span 64 pages: more than a warp's lanes
    assert pages2.prefill_kernel == "tc"
    tiles = PagedAttention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=64, dtype="bf16"), arch="sm_90",
                           tiles={"prefill": TileConfig(wm=4, wn=1, mt=2, bnw=32, stages=3, min_blocks=2)})
    assert tiles.prefill_kernel == "tc"
    doc = lf.loads(DOC, "doc.lf", with_stdlib=False).specialise("document", Hq=8, Hkv=8, D=64, dtype="bf16")
    documents = PagedAttention(doc, arch="sm_90")   # the block-mask lists, the key terms staged: wgmma
    assert documents.needs_block_mask and documents.prefill_kernel == "wgmma"
    assert documents.tc_plan("prefill").block_mask_plan() is not None
    assert documents.tc_plan("prefill").key_terms_staged
    monkeypatch.setenv("LAYERFORGE_WGMMA_KEY_STAGE", "0")   # each thread's own key terms: mma.sync stays faster
    assert PagedAttention(doc, arch="sm_90").prefill_kernel == "tc"
    with pytest.raises(lf.LayerInputError, match="sm_90"):
        _ = PagedAttention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=64, dtype="bf16"), arch="sm_80",
                           prefill="wgmma").prefill_kernel


DOC = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention document(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]
}"""


def test_wgmma_block_mask_when_asked_for():
    """prefill="wgmma" (or a WGTileConfig) runs a document mask on the wgmma kernel, which walks
    the pre-pass's lists over its own tiling: 128 rows x the tile's keys."""
    from layerforge.codegen.attention_wgmma import WGTileConfig
    doc = lf.loads(DOC, "doc.lf", with_stdlib=False).specialise("document", Hq=32, Hkv=8, D=128, dtype="bf16")
    for attn, keys in ((PagedAttention(doc, arch="sm_90", prefill="wgmma"), 128),
                       (PagedAttention(doc, arch="sm_90", tiles={"prefill": WGTileConfig(bn=64, stages=3)}), 64)):
        plan = attn.tc_plan("prefill")
        assert attn.prefill_kernel == "wgmma" and plan.block_mask and "bm_idx" in plan.abi.signature
        bm = plan.block_mask_plan()
        assert (bm.rows, bm.keys, bm.arch) == (128, keys, "sm_90a")


def test_wgmma_distance_table_by_default():
    """The wgmma prefill tabulates the distance term per tile unless distance_table=False; a
    pack builds the same prefill (codegen.families), so its manifest's key is what runs."""
    from layerforge.codegen.families import plans_for_layer
    from layerforge.runtime.launch import compile_fn
    t5 = lf.stdlib().specialise("t5_attn", Hq=32, Hkv=8, D=128, NB=32, dtype="bf16")
    plan = PagedAttention(t5, arch="sm_90").tc_plan("prefill")
    assert plan.distance_table and plan.rel_table == (4, plan.config.keys + 16) and "_dt_" in plan.key
    assert plan.config.stages == 2   # 3 stages of 128 keys leave no room for the tables at D128
    assert plans_for_layer(t5, "sm_90", compile_fn=compile_fn())[0].key == plan.key
    off = PagedAttention(t5, arch="sm_90", distance_table=False).tc_plan("prefill")
    assert not off.distance_table and off.rel_table is None and "_dt_" not in off.key
    assert "lf_rel_term" not in off.source()


@pytest.mark.parametrize("batch,ctx,want", [
    (1, 2048, 8), (1, 4096, 16), (4, 2048, 8),   # few CTAs: up to two per SM, no more parts than key tiles
    (8, 2048, 4), (8, 4096, 4),                  # 64 CTAs: 4 parts fill one wave of two per SM (5 spilled over)
    (16, 1024, 1), (32, 2048, 1),                # ~one CTA per SM already: no split, no merge launch
])
def test_tensor_core_split_kv_fills_one_wave(batch, ctx, want, monkeypatch):
    """The split-KV choice of the tensor-core decode (H200: 132 SMs; Llama GQA 32/8, 8 CTAs a
    token; key tiles of 256): the counts that benchmarks/bench_splits.py measured best."""
    from types import SimpleNamespace

    from layerforge.runtime import linear
    attn = PagedAttention(lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), arch="sm_90")
    monkeypatch.setitem(linear._PROPS, 0, SimpleNamespace(multi_processor_count=132, major=9, minor=0))
    assert attn._splits(torch.device("cuda", 0), batch * 8, ctx, None, tile=256, one_wave=True) == want
    assert attn._splits(torch.device("cuda", 0), batch * 8, ctx, 3, tile=256, one_wave=True) == 3   # given: kept
