"""The tensor-core attention kernel at head dims off 64/128/256 and with a value head dim of its
own (codegen/attention_tc.py's padded kernels): 80, 96 (Phi-3, GPT-NeoX-20B), 160, 192, every
multiple of 16 from 32 to 256, and DeepSeek's MLA prefill (q/k 192, values 128). Each renders
and compiles for sm_80 and sm_90, in prefill and decode tiles, without register spills; the
runtime picks these kernels, and the wgmma prefill leaves them to mma.sync (no GPU needed).
Their outputs are checked on a GPU in tests/gpu/test_attention_dims.py."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_tc import padded_dim, plan_tc_attention, tile_candidates
from layerforge.codegen.row import LoweringError
from layerforge.runtime.attention import PagedAttention

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

NEW_DIMS = [80, 96, 160, 192]
# causal + RoPE + GQA; soft-capping + sliding window; ALiBi
LAYERS = ["llama_attn", "gemma2_attn", "bloom_attn"]
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}   # a CTA's dynamic shared memory at most

# DeepSeek-style prefill attention: q/k heads of D, values of Dv; a padding mask (kv_len) to get
# fully masked rows
VALUE_DIM_BLOCKS = """
dims Dv
attention mla_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, Dv],
                   const softcap: f32 = 0.0) -> T[B, S, Hq, Dv] {
    score = score if softcap == 0.0 else softcap * tanh(score / softcap)
    mask = q_pos >= kv_pos
}
attention mla_pad_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, Dv],
                       kv_len: i32[B]) -> T[B, S, Hq, Dv] {
    mask = kv_pos < kv_len[b]
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(scope="module")
def mla():
    return lf.loads(VALUE_DIM_BLOCKS, "mla.lf")


@pytest.fixture(scope="module")
def compile_fn(tmp_path_factory):
    """One kernel cache for the module: a candidate compiled once serves every plan that tries it."""
    from layerforge.runtime.cache import KernelCache
    from layerforge.runtime.launch import compile_fn
    return compile_fn(KernelCache(tmp_path_factory.mktemp("kernels")))


def assert_spill_free(plan, compile_fn, arch):
    res = compile_fn(plan)
    assert set(res) == {plan.kernel_name, plan.merge_name}
    for kr in res.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.config, kr)
    assert plan.shared_bytes <= SHARED_LIMIT[arch], (plan.config, plan.shared_bytes)
    return res[plan.kernel_name]


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", NEW_DIMS)
@pytest.mark.parametrize("name", LAYERS)
def test_new_head_dims_compile_without_spills(prog, compile_fn, name, d, arch, mode):
    plan = plan_tc_attention(prog.specialise(name, Hq=32, Hkv=8, D=d, dtype="bf16"), arch, mode=mode,
                             compile_fn=compile_fn)
    assert f"_tc{mode}_" in plan.key and plan.config in tile_candidates(mode, d, 4)
    src = plan.source()
    assert f"constexpr int HDV = {d}, HDP = {padded_dim(d)}, HDVP = {padded_dim(d)}," in src
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src
    assert_spill_free(plan, compile_fn, arch)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 1), (40, 8)])
@pytest.mark.parametrize("d", [96, 192])
def test_new_head_dims_gqa_groups_compile(prog, compile_fn, d, hq, hkv, mode):
    """MHA, MQA (32 rows a token: two m16 row tiles in decode where O fits) and 5 heads a KV head."""
    plan = plan_tc_attention(prog.specialise("llama_attn", Hq=hq, Hkv=hkv, D=d, dtype="f16"), "sm_90", mode=mode,
                             compile_fn=compile_fn)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in plan.source()
    assert_spill_free(plan, compile_fn, "sm_90")


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("d", [d for d in range(32, 257, 16) if d not in (64, 128, 256)])
def test_every_multiple_of_16_compiles(prog, compile_fn, d, mode):
    """Soft-capping and a window (the most registers of the stdlib blocks), GQA 4."""
    plan = plan_tc_attention(prog.specialise("gemma2_attn", Hq=16, Hkv=4, D=d, dtype="bf16"), "sm_90", mode=mode,
                             compile_fn=compile_fn)
    assert_spill_free(plan, compile_fn, "sm_90")


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d,dv", [(192, 128), (128, 64), (64, 128)])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_value_dim_of_its_own_compiles(mla, compile_fn, d, dv, arch, mode, softcap):
    """Dv != D: S = Q K^T over D, O = P V over Dv (its tiles, stores and merge kernel)."""
    layer = mla.specialise("mla_attn", Hq=16, Hkv=16, D=d, Dv=dv, dtype="bf16", softcap=softcap)
    plan = plan_tc_attention(layer, arch, mode=mode, compile_fn=compile_fn)
    src = plan.source()
    assert f"constexpr int HDV = {dv}, HDP = {padded_dim(d)}, HDVP = {padded_dim(dv)}," in src
    assert "float o[MT][HDV / 8][4];" in src and "__launch_bounds__(HDV)" in src
    assert plan.kernels[1].block == (dv, 1, 1)   # the merge: a thread per output channel
    assert_spill_free(plan, compile_fn, arch)


def test_padded_rows_size_shared_memory(prog, mla):
    """Q and K tile rows are the head dim rounded up to 64 elements, V's the value dim's."""
    assert [padded_dim(d) for d in (32, 64, 80, 96, 128, 160, 192, 256)] == [64, 64, 128, 128, 128, 192, 192, 256]
    tiles = tile_candidates("prefill", 96, 4)[-1]
    plan = plan_tc_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=96, dtype="bf16"), "sm_90", tiles=tiles)
    buf = dict(plan.shared_layout.buffers)
    assert buf["sQ"] == 2 * tiles.rows * 128 and buf["sK"] == buf["sV"] == 2 * tiles.stages * tiles.keys * 128
    layer = mla.specialise("mla_attn", Hq=16, Hkv=16, D=192, Dv=128, dtype="bf16")
    tiles = tile_candidates("prefill", 192, 1, 128)[-1]
    buf = dict(plan_tc_attention(layer, "sm_90", tiles=tiles).shared_layout.buffers)
    assert buf["sK"] == 2 * tiles.stages * tiles.keys * 192 and buf["sV"] == 2 * tiles.stages * tiles.keys * 128


def test_whole_line_head_dims_keep_their_kernel(prog):
    """64/128/256 with values of the head dim render as before: no padded constants."""
    for d in (64, 128, 256):
        for mode in ("prefill", "decode"):
            src = plan_tc_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16"), "sm_90",
                                    mode=mode, tiles=tile_candidates(mode, d, 4)[0]).source()
            assert "HDP" not in src and "HDV" not in src and "CPRL" not in src


def test_fp8_cache_at_other_head_dims_is_a_clear_error(prog, mla):
    with pytest.raises(LoweringError, match="fp8_e4m3 cache takes head dims 64, 128, 256.*head dim 96"):
        plan_tc_attention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=96, dtype="bf16"), "sm_90", mode="decode",
                          kv_dtype="fp8_e4m3")
    with pytest.raises(LoweringError, match="head dim 192 \\(value dim 128\\)"):
        plan_tc_attention(mla.specialise("mla_attn", Hq=8, Hkv=8, D=192, Dv=128, dtype="bf16"), "sm_90",
                          kv_dtype="fp8_e4m3")


def test_head_dims_without_a_kernel_are_clear_errors(prog, mla):
    with pytest.raises(LoweringError, match="head dim 72.*multiples of 16 from 32 to 256"):
        plan_tc_attention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=72, dtype="bf16"), "sm_90")
    with pytest.raises(LoweringError, match="head dim 16"):
        plan_tc_attention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=16, dtype="bf16"), "sm_90")
    with pytest.raises(LoweringError, match="value dim 40"):
        plan_tc_attention(mla.specialise("mla_attn", Hq=8, Hkv=8, D=128, Dv=40, dtype="bf16"), "sm_90")


@pytest.mark.parametrize("d,dv", [(80, None), (96, None), (160, None), (192, None), (192, 128)])
def test_runtime_picks_tensor_cores_for_new_head_dims(prog, mla, d, dv):
    """Ampere and Hopper run them on tensor cores: the mma.sync kernels on sm_80, the wgmma
    prefill on sm_90 (mma.sync there when asked for), never the CUDA-core kernel."""
    layer = (mla.specialise("mla_attn", Hq=16, Hkv=16, D=d, Dv=dv, dtype="bf16") if dv else
             prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16"))
    for arch, prefill in (("sm_80", None), ("sm_90", "tc")):
        attn = PagedAttention(layer, arch=arch, prefill=prefill)
        assert attn.kernel == "tc" and attn.prefill_kernel == "tc"
        assert attn.tc_plan("prefill").arch == arch and "_tcprefill_" in attn.tc_plan("prefill").key
    attn = PagedAttention(layer, arch="sm_90")
    assert attn.prefill_kernel == "wgmma" and "_wgprefill_" in attn.tc_plan("prefill").key
    assert PagedAttention(layer, arch="sm_75").kernel == "simt"
    if dv is None:   # the CUDA-core kernel reads fp8 caches at any head dim
        assert PagedAttention(layer, arch="sm_90", kv_dtype="fp8_e4m3").kernel == "simt"


def test_wgmma_prefill_defaults_and_other_dims(prog, mla):
    """The wgmma prefill is the sm_90 default at 64/128/256; it plans the other dims (and value
    dims of their own) where asked for; head dims outside multiples of 16 stay clear errors."""
    from layerforge.codegen.attention_wgmma import DEFAULT_HEAD_DIMS, plan_wgmma_attention, supports
    assert supports(prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), 16)
    d96 = prog.specialise("llama_attn", Hq=32, Hkv=8, D=96, dtype="bf16")
    mla192 = mla.specialise("mla_attn", Hq=16, Hkv=16, D=192, Dv=128, dtype="bf16")
    assert supports(d96, 16) == (96 in DEFAULT_HEAD_DIMS)
    assert plan_wgmma_attention(d96).dims == (64, 96, 96)
    assert plan_wgmma_attention(mla192).dims == (128, 192, 128)
    with pytest.raises(LoweringError, match="head dim 72"):
        plan_wgmma_attention(prog.specialise("llama_attn", Hq=8, Hkv=8, D=72, dtype="bf16"))


def test_value_dim_on_cpu_tensors_runs_the_reference(mla):
    """A block whose values have their own head dim, on CPU tensors (the reference evaluator):
    v_cache and the output are [.., Dv], in both forms, against softmax(q k^T / sqrt(D)) v."""
    hq, hkv, d, dv, page = 4, 2, 48, 32, 16
    attn = PagedAttention(mla.specialise("mla_pad_attn", Hq=hq, Hkv=hkv, D=d, Dv=dv, dtype="f32"), page_size=page)
    assert (attn.d, attn.dv) == (d, dv)
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(4, page, hkv, d, generator=g), torch.randn(4, page, hkv, dv, generator=g)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    kv_len = torch.tensor([7, 0], dtype=torch.int32)   # sequence 1: every key masked
    q = torch.randn(3, hq, d, generator=g)
    q_seq, q_pos = torch.tensor([0, 0, 1], dtype=torch.int32), torch.tensor([18, 19, 4], dtype=torch.int32)
    out = attn(q, kc, vc, table, lens, q_seq, q_pos, max_kv_len=20, extra={"kv_len": kv_len})
    assert out.shape == (3, hq, dv)
    k = kc[[2, 0]].reshape(-1, hkv, d)[:7].repeat_interleave(hq // hkv, dim=1)
    v = vc[[2, 0]].reshape(-1, hkv, dv)[:7].repeat_interleave(hq // hkv, dim=1)
    p = torch.softmax(torch.einsum("thd,khd->thk", q[:2].double(), k.double()) / d ** 0.5, dim=-1)
    want = torch.einsum("thk,khd->thd", p, v.double())
    assert torch.allclose(out[:2].double(), want, atol=1e-5)
    assert (out[2] == 0).all()   # a fully masked row gives zeros
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    ragged = attn.prefill(q, kc, vc, table, torch.tensor([20, 5], dtype=torch.int32), cu, max_q_len=2,
                          max_kv_len=20, extra={"kv_len": kv_len})
    assert torch.equal(ragged, out)
    with pytest.raises(lf.LayerInputError, match="v_cache"):
        attn(q, kc, kc, table, lens, q_seq, q_pos, max_kv_len=20, extra={"kv_len": kv_len})


def test_decode_grid_walks_the_kv_heads_first(monkeypatch, compile_fn):
    """The decode kernel's grid: one dimension of (query chunk, split, KV head), the KV head fastest, so
    the CTAs running at once read all heads of the same cache rows; LAYERFORGE_DECODE_HEADS_FIRST=0
    gives the (chunk, row block, KV head x split) grid; prefill plans never take it."""
    layer = lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    plan = plan_tc_attention(layer, "sm_90", mode="decode", heads_first=True, top_rows=False)
    abi = plan.main_abi()
    assert plan.key.endswith("_hf_sm90") and abi.grid[0] == "chunks * 8 * num_splits" and abi.grid[2] == "1"
    assert abi.grid_for(chunks=5, max_q_len=1, num_splits=3) == (120, 1, 1)
    src = plan.source()
    assert "blockIdx.x / (HKV * num_splits)" in src and "blockIdx.z" not in src
    assert_spill_free(plan, compile_fn, "sm_90")
    off = plan_tc_attention(layer, "sm_90", mode="decode")
    assert off.main_abi().grid_for(chunks=5, max_q_len=1, num_splits=3) == (5, 1, 24) and "blockIdx.z" in off.source()
    assert not plan_tc_attention(layer, "sm_90", mode="prefill", heads_first=True).heads_first
    with pytest.raises(ValueError, match="decode grid"):
        type(plan)(layer=layer, arch="sm_90", mode="prefill", heads_first=True)
    monkeypatch.setenv("LAYERFORGE_DECODE_HEADS_FIRST", "0")
    assert not PagedAttention(layer, page_size=16, arch="sm_90").tc_plan("decode").heads_first
    monkeypatch.setenv("LAYERFORGE_DECODE_HEADS_FIRST", "1")
    assert PagedAttention(layer, page_size=16, arch="sm_90").tc_plan("decode").heads_first


def test_decode_top_rows_skips_the_tiles_second_half(monkeypatch, compile_fn):
    """TCAttentionPlan.top_rows (LAYERFORGE_DECODE_TOP_ROWS=1): the decode kernel skips rows 8-15's softmax where
    the CTA's rows fit the first 8 (a uniform branch; their P zeros), with its own key, spill-free, bf16 and an
    e4m3 cache; prefill plans never take it."""
    layer = lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    for kv in (None, "fp8_e4m3"):
        plan = plan_tc_attention(layer, "sm_90", mode="decode", heads_first=True, top_rows=True, kv_dtype=kv)
        assert plan.top_rows and plan.key.endswith("_hf_t8_sm90")
        src = plan.source()
        assert "if (half == 1 && rows <= 8) {" in src and "pa[mt][nt >> 1][(nt & 1) * 2 + 1] = 0u;" in src
        assert_spill_free(plan, compile_fn, "sm_90")
        off = plan_tc_attention(layer, "sm_90", mode="decode", heads_first=True, top_rows=False, kv_dtype=kv)
        assert "rows <= 8" not in off.source() and off.key == plan.key.replace("_t8", "")
    assert not plan_tc_attention(layer, "sm_90", mode="prefill", top_rows=True).top_rows
    with pytest.raises(ValueError, match="top_rows"):
        type(plan)(layer=layer, arch="sm_90", mode="prefill", top_rows=True)
    monkeypatch.setenv("LAYERFORGE_DECODE_TOP_ROWS", "1")
    assert PagedAttention(layer, page_size=16, arch="sm_90").tc_plan("decode").top_rows
    monkeypatch.setenv("LAYERFORGE_DECODE_TOP_ROWS", "0")
    assert not PagedAttention(layer, page_size=16, arch="sm_90").tc_plan("decode").top_rows


def test_attention_rope_table_lives_in_global_memory():
    """Every attention template reads the RoPE frequency table with a different pair a lane: from
    constant memory those reads serialise (32 addresses a warp), which ncu found on the decode CTA's
    critical path (benchmarks/NOTES.md, "Decode under cuDNN's kernel"); the table is a global array,
    and the mma.sync kernel loads each thread's frequency at its start."""
    layer = lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    for mode in ("decode", "prefill"):
        src = plan_tc_attention(layer, "sm_90", mode=mode).source()
        assert "__device__ __align__(16) const double lf_inv_freq" in src and "__constant__ double lf_inv_freq" not in src
        assert "const double rope_freq = lf_inv_freq[threadIdx.x % LF_ROPE_PAIRS];" in src
    assert "__constant__ double lf_inv_freq" not in PagedAttention(layer, arch="sm_90").tc_plan("prefill").source()
