"""Every attention block of the standard library renders and compiles, for sm_80 and sm_90,
into the tensor-core prefill and decode kernels and the CUDA-core paged kernel (bf16/f16; f32
on the CUDA-core kernel), without register spills (no GPU needed)."""
import pytest

import layerforge as lf
from layerforge.codegen.attention import plan_paged_attention
from layerforge.codegen.attention_tc import TileConfig, plan_tc_attention, tile_candidates
from layerforge.codegen.row import LoweringError

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
ATTENTION = ["llama_attn", "mistral_attn", "bert_attn", "gemma2_attn", "bloom_attn", "gpt2_attn", "t5_attn"]


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def specialise(prog, name, hq, hkv, d, dtype="bf16"):
    kw = dict(Hq=hq, Hkv=hkv, D=d)
    if name == "t5_attn":
        kw["NB"] = 32
    return prog.specialise(name, dtype=dtype, **kw)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_attention_compiles_without_spills(prog, name, d, arch):
    plan = plan_paged_attention(specialise(prog, name, 32, 8, d), arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4), (32, 1)])
@pytest.mark.parametrize("page", [16, 64])
def test_gqa_ratios_and_pages_compile(prog, hq, hkv, page):
    plan = plan_paged_attention(specialise(prog, "gemma2_attn", hq, hkv, 128, "f16"), "sm_90", page_size=page)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    assert all(kr.spill_stores == 0 for kr in res.resources.values())


def test_mask_bounds_skip_ruled_out_keys(prog):
    src = plan_paged_attention(prog.specialise("mistral_attn", Hq=8, Hkv=8, D=64, dtype="bf16", window=128),
                               "sm_90").source()
    assert "hi = min(hi, qp + 1);" in src          # causal: keys past the query are never read
    assert "lo = max(lo, qp - (int)(" in src       # sliding window: keys before it neither


def test_hooks_are_inlined(prog):
    src = plan_paged_attention(specialise(prog, "gemma2_attn", 8, 8, 128), "sm_90").source()
    assert "lf_tanh_sfu(" in src and "lf_score" in src   # the soft-cap's tanh on the SFU
    src = plan_paged_attention(specialise(prog, "bloom_attn", 8, 8, 128), "sm_90").source()
    table = src[src.index("lf_alibi_slopes[] = {"):]
    assert table[:table.index("}")].count("f,") == 7 and "lf_alibi_slopes[min(max((int)(" in src   # 8 heads' slopes


def test_unsupported_head_dim_is_a_clear_error(prog):
    with pytest.raises(LoweringError, match="head dim 72"):
        plan_paged_attention(specialise(prog, "llama_attn", 8, 8, 72), "sm_90")
    with pytest.raises(LoweringError, match="head dim 72"):
        plan_tc_attention(specialise(prog, "llama_attn", 8, 8, 72), "sm_90", mode="decode")


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("d", [16, 48, 80, 96, 112, 160, 192, 224])
def test_cuda_core_kernel_serves_other_head_dims(prog, d, dtype):
    """Phi-3 and GPT-NeoX-20B (96), 80, ...: lanes of EPL channels loaded as EPL / VW vectors
    (codegen/attention.py lane_shape), for GPUs before sm_80, f32, and fp8 caches (the
    tensor-core kernel's other head dims: tests/codegen/test_attention_tc_dims.py)."""
    from layerforge.codegen.attention import lane_shape
    plan = plan_paged_attention(specialise(prog, "gemma2_attn", 8, 2, d, dtype), "sm_90")
    src = plan.source()
    shape = lane_shape(d, 2 if dtype == "bf16" else 4)
    assert (shape is not None) == ("lf_load_kv_arr" in src)
    if shape:
        assert 32 % shape["LPK"] == 0 and shape["EPL"] * shape["LPK"] == d and shape["EPL"] % shape["VW"] == 0
    res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn", "bloom_attn"])
def test_f32_paged_kernel_compiles_without_spills(prog, name, d):
    """f32 storage runs on the CUDA-core kernel (4 channels a 16-byte lane load; 8 at head dim 256)."""
    plan = plan_paged_attention(specialise(prog, name, 8, 2, d, "f32"), "sm_90")
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


def test_f32_storage_on_tensor_cores_is_a_clear_error(prog):
    with pytest.raises(LoweringError, match="bf16 or f16"):
        plan_tc_attention(specialise(prog, "llama_attn", 8, 8, 64, "f32"), "sm_90", mode="decode")


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_tensor_core_attention_compiles_without_spills(prog, name, d, arch, mode, tmp_path):
    from layerforge.runtime.cache import KernelCache
    from layerforge.runtime.launch import compile_fn
    plan = plan_tc_attention(specialise(prog, name, 32, 8, d), arch, mode=mode,
                             compile_fn=compile_fn(KernelCache(tmp_path)))
    assert f"_tc{mode}_" in plan.key
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.config, kr)
    assert plan.shared_bytes <= 227 * 1024
    if mode == "prefill" and d == 128:   # 64-key tiles measured 7-8% faster than 48 (benchmarks/NOTES.md)
        assert plan.config.keys == 64, plan.config


@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4), (32, 1), (40, 8)])
def test_tensor_core_gqa_groups_compile(prog, hq, hkv):
    """Any group size packs into the tile rows (40/8 = 5 rows per token; MQA: 32)."""
    for mode in ("prefill", "decode"):
        tiles = tile_candidates(mode, 128, hq // hkv)[-1]
        plan = plan_tc_attention(specialise(prog, "llama_attn", hq, hkv, 128, "f16"), "sm_90", mode=mode, tiles=tiles)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
        assert all(kr.spill_stores == 0 for kr in res.resources.values())
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in plan.source()


def test_exact_masks_skip_the_mask_on_full_tiles(prog):
    from layerforge.codegen.scalar_expr import mask_is_exact
    spec = lambda n, **kw: specialise(prog, n, 8, 8, 64).function.outputs[0].arg if not kw else \
        prog.specialise(n, Hq=8, Hkv=8, D=64, dtype="bf16", **kw).function.outputs[0].arg  # noqa: E731
    assert mask_is_exact(spec("llama_attn").mask)            # causal
    assert mask_is_exact(spec("mistral_attn").mask)          # causal and window
    assert mask_is_exact(spec("bert_attn").mask)             # kv_pos < kv_len[b]: a bound from a table
    assert mask_is_exact(spec("t5_attn").mask)               # none (bidirectional)
    odd = lf.loads("""
attention striped(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = q_pos >= kv_pos and kv_pos % 2 == 0
}
""").specialise("striped", Hq=8, Hkv=8, D=64, dtype="bf16")
    assert not mask_is_exact(odd.function.outputs[0].arg.mask)
    src = plan_tc_attention(odd, "sm_90", tiles=tile_candidates("prefill", 64, 1)[0]).source()
    # other masks skip the per-element mask only on tiles the classifier proves full
    # (codegen/mask_tiles.py); every other key is never a full tile, so this kernel gets none
    assert "const bool full = false;" in src and "lf_mask_tile" not in src


def test_llama3_rope_scaling_reaches_every_attention_kernel(prog):
    """rope_factor & co. (a Llama 3.1 config's rope_scaling) change the q-rotation tables of
    the tensor-core and CUDA-core kernels; factor 1 leaves them as they were."""
    from layerforge.dsl.numerics import rope_inv_freq
    base = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16", theta=500000.0)
    l3 = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16", theta=500000.0, rope_factor=8.0)
    last = repr(float(rope_inv_freq(500000.0, 128, (8.0, 1.0, 4.0, 8192.0))[-1]))
    for make in (lambda l: plan_paged_attention(l, "sm_90"),
                 lambda l: plan_tc_attention(l, "sm_90", tiles=tile_candidates("decode", 128, 4)[0], mode="decode")):
        a, b = make(base), make(l3)
        assert a.key != b.key and last in b.source() and last not in a.source()
        res = nvrtc.compile_cuda(b.source(), b.kernel_name, nvrtc.CompileOptions("sm_90"))
        assert all(kr.spill_stores == 0 for kr in res.resources.values())
    same = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16", theta=500000.0, rope_factor=1.0)
    assert same.function.outputs[0].arg.rope.scaling is None


@pytest.mark.parametrize("tiles", [TileConfig(wm=4, wn=1, mt=2, bnw=64, stages=2, min_blocks=2, qreg=True),
                                   TileConfig(wm=4, wn=1, mt=2, bnw=48, stages=2, min_blocks=2, qreg=True)],
                         ids=lambda t: t.label)
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn", "bloom_attn", "bert_attn"])
def test_alternative_prefill_tiles_compile(prog, name, tiles):
    """Tile shapes chosen by hand (the benchmark measures some beside the default) compile;
    spills are allowed here (the automatic choice never takes a tile that spills)."""
    plan = plan_tc_attention(specialise(prog, name, 32, 8, 128), "sm_90", tiles=tiles)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}


def test_the_hooks_tanh_formula_matches_tanh(prog):
    """lf_tanh_sfu's algebra for f32 kernels (attention_hooks.cuh.jinja) in float32, the SFU's ex2 / rcp
    taken as exact: copysign(1 - 2 / (2^(2 log2(e) |x|) + 1), x) within 2e-7 of tanh, 0 at 0, +-1 where
    2^x overflows. 16-bit kernels take tanh.approx.f32 (relative error 2^-11, under a bf16 score's 2^-9)."""
    f32 = plan_paged_attention(specialise(prog, "gemma2_attn", 8, 8, 128, dtype="f32"), "sm_90").source()
    b16 = plan_paged_attention(specialise(prog, "gemma2_attn", 8, 8, 128), "sm_90").source()
    assert 'asm("tanh.approx.f32' in b16 and 'asm("tanh.approx.f32' not in f32 and 'asm("rcp.approx.ftz.f32' in f32
    import numpy as np
    x = np.concatenate([np.linspace(-60, 60, 200001), [0.0, 1e-30, -1e-30, 1e4, -1e4]]).astype(np.float32)
    with np.errstate(over="ignore"):
        e = np.exp2(np.float32(2.8853900817779268) * np.abs(x))
    got = np.copysign(np.float32(1) - np.float32(2) * (np.float32(1) / (e + np.float32(1))), x)
    assert np.abs(got.astype(np.float64) - np.tanh(x.astype(np.float64))).max() < 2e-7
    assert got[-4] == 0 and got[-2] == 1 and got[-1] == -1
