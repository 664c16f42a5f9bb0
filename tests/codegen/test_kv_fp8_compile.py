"""Every FP8 (e4m3) KV-cache specialisation renders and compiles with NVRTC for sm_80 and sm_90
without register spills or warnings: the append kernel with and without RoPE, the tensor-core
decode and prefill kernels (head dims 64/128/256) and the CUDA-core kernel; fp8 keys are their
own, and a plan without kv_dtype renders no fp8 code (no GPU needed)."""
import dataclasses

import pytest

import layerforge as lf
from layerforge.codegen.attention import plan_paged_attention
from layerforge.codegen.attention_tc import TCAttentionPlan, plan_tc_attention
from layerforge.codegen.kv_append import plan_kv_append
from layerforge.codegen.row import LoweringError
from layerforge.dsl.ir import RopeSpec

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
FP8 = "fp8_e4m3"
ROPES = {
    "none": lambda d: None,
    "neox": lambda d: RopeSpec(10000.0, "neox", d),
    "gptj": lambda d: RopeSpec(500000.0, "gptj", d),
    "partial": lambda d: RopeSpec(10000.0, "neox", d // 2),
}


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


# the switches of the e4m3 decode's defaults (K by the cvt as words, 128-key tiles, the top rows skipped)
DECODE_DEFAULTS = ("LAYERFORGE_FP8_KV_KCVT", "LAYERFORGE_FP8_DECODE_WIDE", "LAYERFORGE_DECODE_TOP_ROWS")


@pytest.fixture(autouse=True)
def integer_widening(monkeypatch):
    """The tests below name the widening and tiles they check; the decode's defaults are pinned off here and
    checked on their own (test_fp8_decode_defaults)."""
    for name in DECODE_DEFAULTS:
        monkeypatch.setenv(name, "0")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fp8_decode_defaults(prog, monkeypatch, d, dtype, tmp_path):
    """Without switches an e4m3 decode on sm_90 takes K by the cvt as words and skips the top rows (and at D128 the
    128-key tiles), spill-free; its prefill keeps the integer widening; sm_80 (no cvt) the integer widening."""
    from layerforge.runtime.cache import KernelCache
    from layerforge.runtime.launch import compile_fn
    for name in DECODE_DEFAULTS:
        monkeypatch.delenv(name)
    layer = specialise(prog, "llama_attn", d, dtype)
    plan = plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8, compile_fn=compile_fn(KernelCache(tmp_path)))
    assert "_raw_kcvt_kw_" in plan.key and "_t8_" in plan.key
    assert ("_w1x4m1n32s3q_" in plan.key) == (d == 128)
    compile_clean(plan, "sm_90")
    prefill = plan_tc_attention(layer, "sm_90", mode="prefill", kv_dtype=FP8, tiles=None)
    assert "_raw_" in prefill.key and "kcvt" not in prefill.key
    old = plan_tc_attention(layer, "sm_80", mode="decode", kv_dtype=FP8, tiles=None)
    assert "_raw_" in old.key and "kcvt" not in old.key


def compile_clean(plan, arch):
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
    assert "warning" not in res.log, res.log
    return res


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fp8_append_compiles_without_spills(arch, dtype, head_dim, rope):
    plan = plan_kv_append(dtype, 8, head_dim, 16, ROPES[rope](head_dim), arch, kv_dtype=FP8)
    res = compile_clean(plan, arch)
    (kr,) = res.resources.values()
    assert kr.registers <= 64, kr
    src = plan.source()
    assert "__nv_cvt_float_to_fp8" in src and "__NV_SATFINITE" in src and "k_scale[h]" in src
    assert "unsigned char* __restrict__ k_cache" in src


def test_fp8_append_keys_and_arguments():
    plain = plan_kv_append("bf16", 8, 128, 16, RopeSpec(10000.0, "neox", 128), "sm_90")
    fp8 = plan_kv_append("bf16", 8, 128, 16, RopeSpec(10000.0, "neox", 128), "sm_90", kv_dtype=FP8)
    assert fp8.key == "kv_append_hkv8_d128_p16_bf16_kvfp8e4m3_neox_theta10000_sm90"
    assert plain.key == "kv_append_hkv8_d128_p16_bf16_neox_theta10000_sm90"
    assert [a.name for a in fp8.abi.args][-2:] == ["k_scale", "v_scale"]
    assert "k_scale" not in [a.name for a in plain.abi.args]
    assert "fp8" not in plain.source() and "e4m3" not in plain.source()
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        plan_kv_append("bf16", 8, 128, 16, None, "sm_90", kv_dtype="fp8")
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_kv_append("bf16", 8, 72, 16, None, "sm_90", kv_dtype=FP8)


def specialise(prog, name, d, dtype="bf16", hq=32, hkv=8):
    kw = dict(Hq=hq, Hkv=hkv, D=d)
    if name == "t5_attn":
        kw["NB"] = 32
    return prog.specialise(name, dtype=dtype, **kw)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn"])
def test_fp8_tensor_core_attention_compiles_without_spills(prog, name, d, arch, mode, raw, tmp_path):
    """Both widenings (TCAttentionPlan.fp8_raw: without the multiply, the powers of two in q, P and the
    scales; and with it)."""
    from layerforge.runtime.cache import KernelCache
    from layerforge.runtime.launch import compile_fn
    plan = plan_tc_attention(specialise(prog, name, d), arch, mode=mode, kv_dtype=FP8,
                             compile_fn=compile_fn(KernelCache(tmp_path)), fp8_raw=raw)
    assert f"_kvfp8e4m3_tc{mode}_" in plan.key and ("_raw_" in plan.key) == raw
    res = compile_clean(plan, arch)
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}
    assert plan.shared_bytes <= 227 * 1024
    src = plan.source()
    form = "raw" if raw else "to"
    assert "lf_k8_frag<__nv_bfloat16>(bk, k8," in src and f"lf_e4m3_odd_{form}<__nv_bfloat16>(bv[3])" in src
    assert f"lf_e4m3x2_{form}<T>(*reinterpret_cast" in src
    assert ("q in place times 2^40" in src and "mu - 100.0f" in src) == raw
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src and "lf_ldsm4(bk" not in src
    assert "sK8" in src and "sV8" in src and " sV = " not in src   # no widened copy in shared memory
    assert "* k_scale[kvh]" in src and ("v_sc / l[sl]" in src or "aa / ll * v_sc" in src)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_fp8_tensor_core_attention_f16_and_other_groups(prog, mode):
    for hq, hkv in ((8, 8), (32, 4), (32, 1)):
        plan = plan_tc_attention(specialise(prog, "llama_attn", 128, "f16", hq, hkv), "sm_90", mode=mode,
                                 kv_dtype=FP8, tiles=None)
        compile_clean(plan, "sm_90")
        assert "lf_k8_frag<__half>" in plan.source() and "lf_e4m3_even_raw<__half>" in plan.source()
        assert "q in place" not in plan.source() and "mu_p = mu;" in plan.source()   # f16: no q or P factors


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn", "bloom_attn"])
def test_fp8_cuda_core_attention_compiles_without_spills(prog, name, d, arch):
    plan = plan_paged_attention(specialise(prog, name, d), arch, kv_dtype=FP8)
    assert "_kvfp8e4m3_" in plan.key
    compile_clean(plan, arch)
    src = plan.source()
    assert "lf_e4m3_to_float(kv.v[e])" in src and "* k_scale[kvh]" in src
    if d != 96:   # 16 channels a lane: 16-byte loads of the e4m3 rows
        assert "lf_vec<unsigned char, EPL>" in src and "lf_load_kv<unsigned char, EPL, " in src


def test_fp8_plans_have_their_own_keys_and_arguments(prog):
    layer = specialise(prog, "llama_attn", 128)
    plain = plan_tc_attention(layer, "sm_90", mode="decode")
    fp8 = plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8, fp8_raw=False)
    assert plain.key.replace("_tcdecode", "_kvfp8e4m3_tcdecode") == fp8.key
    raw = plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8, fp8_raw=True)
    assert raw.key == fp8.key.replace("_sm90", "_raw_sm90")
    names = [a.name for a in fp8.main_abi().args]
    assert names[:7] == ["q", "k_cache", "v_cache", "page_table", "seq_lens", "k_scale", "v_scale"]
    assert "k_scale" not in [a.name for a in plain.main_abi().args]
    assert "e4m3" not in plain.source() and "e4m3" not in plan_paged_attention(layer, "sm_90").source()
    with pytest.raises(LoweringError, match="bf16 or f16"):
        plan_paged_attention(specialise(prog, "llama_attn", 128, "f32"), "sm_90", kv_dtype=FP8)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        plan_tc_attention(layer, "sm_90", kv_dtype="e4m3")


def test_fp8_widening_constants_decode_every_e4m3_code():
    """The integer widening in templates/cuda/fp8.cuh (its masks, shifts, byte selector and
    power-of-two factors, read from the file) gives torch's e4m3 value for every finite code,
    subnormals and both zeros included, in f32, bf16 and f16; and for the byte pairs the kernels
    take: consecutive channels (lf_e4m3x2_to) and bytes (0, 2) / (1, 3) (lf_e4m3_even_to / odd_to)."""
    import re
    from importlib import resources

    import numpy as np
    import torch

    src = resources.files("layerforge.templates").joinpath("cuda/fp8.cuh").read_text()
    codes = np.arange(256, dtype=np.uint32)
    want = torch.from_numpy(codes.astype(np.uint8)).view(torch.float8_e4m3fn).double().numpy()
    finite = ~np.isnan(want)

    f32 = re.search(r"\(\(b & 0x80u\) << 24\) \| \(\(b & 0x7fu\) << (\d+)\)\) \* __uint_as_float\((0x[0-9a-f]+)u\)", src)
    got = ((((codes & 0x80) << 24) | ((codes & 0x7F) << int(f32[1]))).astype(np.uint32).view(np.float32).astype(np.float64)
           * np.array([int(f32[2], 16)], dtype=np.uint32).view(np.float32)[0])
    assert np.array_equal(got[finite], want[finite])

    def prmt(x, sel):   # __byte_perm(x, 0, sel) on arrays
        out = np.zeros_like(x)
        for i in range(4):
            s = (sel >> (4 * i)) & 7
            out |= (((x >> (8 * s)) & 0xFF) if s < 4 else 0) << (8 * i)
        return out

    x2_sel = int(re.search(r"lf_e4m3x2_to\(unsigned w\) \{\s*return lf_e4m3_top_to<T>\(__byte_perm\(w, 0u, (0x[0-9a-f]+)\)", src)[1], 16)
    assert f"lf_e4m3x2_raw(unsigned w) {{\n    return lf_e4m3_top_raw<T>(__byte_perm(w, 0u, 0x{x2_sel:x}));" in src
    assert "lf_e4m3_even_raw(unsigned w) { return lf_e4m3_top_raw<T>(w << 8); }" in src
    assert "lf_e4m3_odd_raw(unsigned w) { return lf_e4m3_top_raw<T>(w); }" in src
    assert "lf_e4m3_even_to(unsigned w) { return lf_e4m3_top_to<T>(w << 8); }" in src
    assert "lf_e4m3_odd_to(unsigned w) { return lf_e4m3_top_to<T>(w); }" in src
    c0, c1 = codes, (codes * 37 + 11) % 256   # two channels a word, every code in each
    words = {   # the word each helper reads -> the codes in its (low, high) halves
        "x2": (prmt(c0 | (c1 << 8), x2_sel), c0, c1),
        "even": ((c0 | (c1 << 16) | (((c1 + 5) % 256) << 8) | (((c0 + 9) % 256) << 24)) << 8, c0, c1),
        "odd": ((((c0 + 3) % 256) | (c0 << 8) | (((c1 + 7) % 256) << 16) | (c1 << 24)), c0, c1),
    }
    for ctype in ("__nv_bfloat16", "__half"):
        body = src[src.index(f"lf_e4m3_top_to<{ctype}>(unsigned t) {{"):]
        shift, mask = re.search(r"\(\(t >> (\d+)\) & (0x[0-9a-f]+)u\)", body).groups()
        factor = int(re.search(r"__ushort_as_(?:bfloat16|half)\((0x[0-9a-f]+)\)", body)[1], 16)
        for name, (t, lo, hi) in words.items():
            t = t.astype(np.uint64).astype(np.uint32)   # 32-bit words (the even case shifts out byte 3)
            a = (t & 0x80008000) | ((t >> int(shift)) & int(mask, 16))
            lanes = np.stack([a & 0xFFFF, a >> 16], axis=-1).astype(np.uint16)
            if ctype == "__nv_bfloat16":
                val = (lanes.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
                k = float(np.array([factor << 16], dtype=np.uint32).view(np.float32)[0])
            else:
                val = lanes.view(np.float16).astype(np.float64)
                k = float(np.array([factor], dtype=np.uint16).view(np.float16)[0])
            got = val * k   # exact: a power of two
            ok = finite[lo] & finite[hi]
            assert np.array_equal(got[ok, 0], want[lo][ok]), (ctype, name)
            assert np.array_equal(got[ok, 1], want[hi][ok]), (ctype, name)
        # the raw forms: the same placement without the multiply, the value times 2^-lf_e4m3_raw_exp<T>
        raw = src[src.index(f"lf_e4m3_top_raw<{ctype}>(unsigned t) {{"):]
        assert re.search(r"\(\(t >> (\d+)\) & (0x[0-9a-f]+)u\)", raw).groups() == (shift, mask)
        exp = int(re.search(rf"lf_e4m3_raw_exp<{ctype}> {{ static constexpr int value = (\d+); }}", src)[1])
        assert k == 2.0 ** exp, (ctype, k, exp)   # the factor the raw form leaves to the kernel's scales


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_fp8_hardware_conversion_compiles_without_spills(prog, dtype, d, mode):
    """TCAttentionPlan.fp8_cvt (sm_89+): cvt.rn.f16x2.e4m3x2 for K and V, f16 products, bf16 q scaled into f16
    by a power of two; its own key; sm_80 plans never take it."""
    plan = plan_tc_attention(specialise(prog, "llama_attn", d, dtype), "sm_90", mode=mode, kv_dtype=FP8, fp8_cvt=True)
    assert plan.fp8_cvt and plan.key.endswith("_cvt_sm90")
    compile_clean(plan, "sm_90")
    src = plan.source()
    assert "cvt.rn.f16x2.e4m3x2" in src and "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert ("ldexpf(lf_to_float(*x), -qe)" in src) == (dtype == "bf16")
    assert "lf_e4m3_odd_to" not in src.split("extern \"C\"")[1]
    old = plan_tc_attention(specialise(prog, "llama_attn", d, dtype), "sm_80", mode=mode, kv_dtype=FP8, fp8_cvt=True)
    assert not old.fp8_cvt and "cvt.rn.f16x2.e4m3x2" not in old.source()


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_fp8_v_by_hardware_conversion_compiles_without_spills(prog, dtype, d, mode):
    """TCAttentionPlan.fp8_vcvt (sm_89+, with fp8_raw): K widened by integer ops (q x 2^40 in bf16), V by
    cvt.rn.f16x2.e4m3x2, P packed to f16 and P V in f16 with no 2^100 on P; its own key; sm_80 plans and
    plans without fp8_raw never take it."""
    layer = specialise(prog, "llama_attn", d, dtype)
    plan = plan_tc_attention(layer, "sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_vcvt=True)
    assert plan.fp8_vcvt and plan.key.endswith("_raw_vcvt_sm90")
    compile_clean(plan, "sm_90")
    src = plan.source()
    body = src.split("extern \"C\"")[1]
    assert "cvt.rn.f16x2.e4m3x2" in src and "lf_e4m3_odd_raw" not in body and "lf_k8_frag<" in body
    assert "lf_e4m3x2_raw<T>(*reinterpret_cast" in src   # K: the integer widening
    assert ("q in place times 2^40" in src) == (dtype == "bf16") and "mu - 100.0f" not in src
    assert "const float v_sc = v_scale[kvh];" in src
    if dtype == "bf16":   # Q K^T in bf16, P V in f16
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src
        assert "lf_mma_h(o[mt][4 * dp]" in body and "lf_pack2_h(p0, p1)" in body
    else:   # f16: both products in f16 already
        assert "lf_mma_h" not in src and "m16n8k16.row.col.f32.f16.f16.f32" in src
    assert not plan_tc_attention(layer, "sm_80", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_vcvt=True).fp8_vcvt
    assert not plan_tc_attention(layer, "sm_90", mode=mode, kv_dtype=FP8, fp8_raw=False, fp8_vcvt=True).fp8_vcvt
    with pytest.raises(ValueError, match="fp8_vcvt"):
        TCAttentionPlan(layer=layer, arch="sm_80", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_vcvt=True)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_fp8_k_by_hardware_conversion_compiles_without_spills(prog, dtype, d, mode):
    """TCAttentionPlan.fp8_kcvt (sm_89+, with fp8_raw, not with fp8_vcvt): K's channel pairs by
    cvt.rn.f16x2.e4m3x2, Q K^T in f16 (bf16 q as f16 times 2^-qe, no 2^40), V by integer ops with P x 2^100 in
    bf16; its own key; sm_80 plans never take it, and it does not go with fp8_vcvt."""
    layer = specialise(prog, "llama_attn", d, dtype)
    plan = plan_tc_attention(layer, "sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_kcvt=True,
                              fp8_kwords=False)
    assert plan.fp8_kcvt and plan.key.endswith("_raw_kcvt_sm90")
    compile_clean(plan, "sm_90")
    src = plan.source()
    body = src.split("extern \"C\"")[1]
    assert "b[0] = lf_e4m3x2_cvt(*reinterpret_cast<const unsigned short*>(p0));" in src
    assert f"lf_e4m3_odd_raw<{'__nv_bfloat16' if dtype == 'bf16' else '__half'}>(bv[3])" in body
    assert "q in place times 2^40" not in src and ("mu - 100.0f" in src) == (dtype == "bf16")
    assert ("ldexpf(lf_to_float(*x), -qe)" in src) == (dtype == "bf16")
    if dtype == "bf16":   # Q K^T in f16, P V in bf16
        assert "lf_mma_h(s[mt][2 * np]" in body and "lf_mma(o[mt][4 * dp]" in body
    assert not plan_tc_attention(layer, "sm_80", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_kcvt=True).fp8_kcvt
    both = plan_tc_attention(layer, "sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_vcvt=True, fp8_kcvt=True)
    assert both.fp8_vcvt and not both.fp8_kcvt
    with pytest.raises(ValueError, match="fp8_kcvt"):
        TCAttentionPlan(layer=layer, arch="sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_vcvt=True,
                        fp8_kcvt=True)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_fp8_k_words_compile_without_spills(prog, dtype, d, mode):
    """TCAttentionPlan.fp8_kwords (with fp8_kcvt): one 32-bit word of K a key and 16 channels, both halves widened
    by the cvt; q's channel pairs permuted in shared memory once a CTA; its own key; it needs fp8_kcvt."""
    layer = specialise(prog, "llama_attn", d, dtype)
    plan = plan_tc_attention(layer, "sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_kcvt=True, fp8_kwords=True)
    assert plan.fp8_kwords and plan.key.endswith("_raw_kcvt_kw_sm90")
    compile_clean(plan, "sm_90")
    src = plan.source()
    assert "lf_e4m3x4_cvt(w0, b[0], b[1]);" in src and "*c0 = make_uint4(a.x, a.z, b.x, b.z);" in src
    assert not plan_tc_attention(layer, "sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_kwords=True).fp8_kwords
    with pytest.raises(ValueError, match="fp8_kwords"):
        TCAttentionPlan(layer=layer, arch="sm_90", mode=mode, kv_dtype=FP8, fp8_raw=True, fp8_kwords=True)


def test_k_words_permutation_matches_the_mma_k_slots():
    """The channel permutation q takes in shared memory (pairs 0, 2, 4, 6 then 1, 3, 5, 7 of a 16-channel block)
    puts in the mma's k slots (2 tig, 2 tig + 1 | 2 tig + 8, 2 tig + 9) of lane tig exactly the channels of K's
    word 4 tig .. 4 tig + 3 (b[0]: its low half, b[1]: its high half)."""
    pairs = [0, 2, 4, 6, 1, 3, 5, 7]          # position pair j <- channel pair pairs[j]
    q_at = [2 * pairs[p // 2] + p % 2 for p in range(16)]   # the channel at each k position
    for tig in range(4):
        assert [q_at[2 * tig], q_at[2 * tig + 1]] == [4 * tig, 4 * tig + 1]          # b[0]
        assert [q_at[2 * tig + 8], q_at[2 * tig + 9]] == [4 * tig + 2, 4 * tig + 3]  # b[1]
    assert sorted(q_at) == list(range(16))


def test_fp8_decode_takes_wide_tiles_at_d128(prog, monkeypatch, tmp_path):
    """LAYERFORGE_FP8_DECODE_WIDE=1 (the default, measured on an H200): an e4m3 decode at D128 tries 128-key
    tiles (32 keys a warp) first, spill-free, so the planner keeps them; a bf16 one and other head dims keep 64-key
    tiles; off, the e4m3 decode takes the bf16 tiles."""
    from layerforge.codegen.attention_tc import tile_candidates
    from layerforge.runtime.cache import KernelCache
    from layerforge.runtime.launch import compile_fn
    monkeypatch.setenv("LAYERFORGE_FP8_DECODE_WIDE", "0")
    assert tile_candidates("decode", 128, 4, kv_dtype=FP8)[0].label == "w1x4m1n16s3q"
    monkeypatch.setenv("LAYERFORGE_FP8_DECODE_WIDE", "1")
    assert tile_candidates("decode", 128, 4, kv_dtype=FP8)[0].label == "w1x4m1n32s3q"
    assert tile_candidates("decode", 128, 4)[0].label == "w1x4m1n16s3q"
    assert tile_candidates("decode", 64, 4, kv_dtype=FP8)[0].label == "w1x4m1n16s3q"
    plan = plan_tc_attention(specialise(prog, "llama_attn", 128), "sm_90", mode="decode", kv_dtype=FP8,
                             compile_fn=compile_fn(KernelCache(tmp_path)))
    assert "_w1x4m1n32s3q_" in plan.key   # spill-free: the planner keeps it


DECODE_TILES = {"n16": dict(wm=1, wn=4, mt=1, bnw=16, stages=3, min_blocks=2, qreg=True),
                "n32": dict(wm=1, wn=4, mt=1, bnw=32, stages=3, min_blocks=2, qreg=True)}
WIDENINGS = {"raw": {}, "kcvt": dict(fp8_kcvt=True), "kw": dict(fp8_kcvt=True, fp8_kwords=True),
             "kw_t8": dict(fp8_kcvt=True, fp8_kwords=True, top_rows=True), "vcvt": dict(fp8_vcvt=True)}


@pytest.mark.parametrize("widen", list(WIDENINGS))
@pytest.mark.parametrize("d, tiles, dtype, page", [(128, "n16", "bf16", 16), (128, "n32", "bf16", 16),
                                                   (128, "n32", "f16", 16), (64, "n16", "bf16", 16),
                                                   (128, "n16", "bf16", 64), (128, "n32", "bf16", 8)])
def test_fp8_decode_tma_compiles_without_spills(prog, d, tiles, dtype, page, widen):
    """TCAttentionPlan.tma (a decode over an e4m3 cache on sm_90, head dim 64 / 128): whole K/V tiles as TMA boxes of
    min(PAGE, BN) keys x HD bytes, each warp's lane 0 issuing its share, completing on the stage's mbarrier, the
    partial tile by cp.async; stages 1024-byte aligned, the mbarriers past the warps' merge; k_map / v_map last
    in the ABI; its own key; spill-free with every widening."""
    from layerforge.codegen.attention_tc import TileConfig
    layer = specialise(prog, "llama_attn", d, dtype)
    plan = plan_tc_attention(layer, "sm_90", mode="decode", tiles=TileConfig(**DECODE_TILES[tiles]), page_size=page,
                             kv_dtype=FP8, tma=True, **WIDENINGS[widen])
    assert plan.uses_tma and plan.key.endswith("_tma_sm90") and plan.tma_box == (min(page, plan.config.keys), d)
    compile_clean(plan, "sm_90")
    src = plan.source()
    assert "lf_tma_load_2d(dk + p * BOXR * HD, &k_map, kvh * HD, row, &bars[t % STAGES]);" in src
    assert "lf_mbar_wait(&bars[i % STAGES], (i / STAGES) & 1);" in src
    assert [a.name for a in plan.abi.args[-2:]] == ["k_map", "v_map"]
    off, c = plan.shared_layout.offsets, plan.config
    assert off["sK8"] % 1024 == 0 and off["sV8"] % 1024 == 0 and (c.keys * d) % 1024 == 0
    merge = 4 * (c.wn * c.rows * d + 2 * c.wn * c.rows)
    assert off["bars"] >= merge and plan.shared_bytes == plan.shared_layout.bytes + 1024
    untouched = dataclasses.replace(plan, tma=False)
    assert not untouched.uses_tma and "_tma" not in untouched.key and "lf_tma_load_2d" not in untouched.source()


def test_fp8_decode_tma_only_where_it_applies(prog, monkeypatch):
    """uses_tma: sm_90+, decode, an e4m3 cache, head dim 64 / 128, page-aligned tiles of boxes of >= 8 keys;
    LAYERFORGE_DECODE_TMA=1 asks for it (off by default), a plan that cannot take it keeps cp.async."""
    layer = specialise(prog, "llama_attn", 128)
    monkeypatch.delenv("LAYERFORGE_DECODE_TMA", raising=False)
    assert not plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8).uses_tma
    monkeypatch.setenv("LAYERFORGE_DECODE_TMA", "1")
    assert plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8).uses_tma
    assert not plan_tc_attention(layer, "sm_80", mode="decode", kv_dtype=FP8).uses_tma
    assert not plan_tc_attention(layer, "sm_90", mode="prefill", kv_dtype=FP8).uses_tma
    assert not plan_tc_attention(layer, "sm_90", mode="decode").uses_tma               # a bf16 cache
    assert not plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8, page_size=4).uses_tma   # 4-key boxes
    assert not plan_tc_attention(specialise(prog, "llama_attn", 256), "sm_90", mode="decode", kv_dtype=FP8).uses_tma
    assert plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8, page_size=256).tma_box == (64, 128)
    assert not plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype=FP8, tma=False).uses_tma


@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn"])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_many_ctas_decode_tile(prog, monkeypatch, name, dtype, arch, tmp_path):
    """The e4m3 decode's tile for grids past one wave of the default (many_ctas_tile: 2 warps of 16 keys, 4 stages,
    4 CTAs an SM) exists at D128 with the decode's defaults, compiles without spills or warnings, and
    PagedAttention takes it (its decode has a DECODE_MANY plan) only where it exists: not for a bf16 cache with its
    own switch off (LAYERFORGE_DECODE_MANY_BF16=0; test_many_ctas_decode_tile_bf16_switch has it on), other head
    dims, a forced decode tile, or with LAYERFORGE_DECODE_MANY=0."""
    from layerforge.codegen.attention_tc import many_ctas_tile
    from layerforge.runtime.attention import DECODE_MANY, PagedAttention
    from layerforge.runtime.cache import KernelCache
    for sw in DECODE_DEFAULTS:
        monkeypatch.delenv(sw)
    monkeypatch.setenv("LAYERFORGE_DECODE_MANY_BF16", "0")
    tile = many_ctas_tile(128, 4, kv_dtype=FP8)
    assert tile is not None and tile.label == "w1x2m1n16s4qb4"
    assert many_ctas_tile(128, 4) is None and many_ctas_tile(64, 4, kv_dtype=FP8) is None
    assert many_ctas_tile(256, 4, kv_dtype=FP8) is None and many_ctas_tile(128, 32, kv_dtype=FP8) is None
    layer = specialise(prog, name, 128, dtype)
    attn = PagedAttention(layer, page_size=16, arch=arch, kv_dtype=FP8, cache=KernelCache(tmp_path))
    assert attn._decode_many()
    plan = attn.tc_plan(DECODE_MANY)
    assert plan.mode == "decode" and plan.config == tile and plan.key != attn.tc_plan("decode").key
    assert (("_kcvt_kw_" in plan.key) == (arch == "sm_90")) and ("_t8_" in plan.key)   # the decode's widening
    compile_clean(plan, arch)
    assert plan.many and plan.describe()["mode"] == "decode_many" and not attn.tc_plan("decode").many
    assert plan_tc_attention(layer, arch, mode="decode", kv_dtype=FP8, many=True, fp8_cvt=False,
                             heads_first=attn.tc_plan("decode").heads_first).key == plan.key
    from layerforge.codegen.families import plans_for_layer
    from layerforge.codegen.trt import plugin_specs
    from layerforge.runtime.launch import compile_fn
    plans = plans_for_layer(layer, arch, compile_fn=compile_fn(KernelCache(tmp_path)), kv_cache=FP8)
    assert [p.key for p in plans if getattr(p, "many", False)] == [plan.key]   # a pack holds it
    _, excluded = plugin_specs(plans)
    assert "decode_many" in excluded[plan.key]   # a TensorRT plugin launches the default decode kernel
    assert not any(getattr(p, "many", False) for p in plans_for_layer(layer, arch, compile_fn=compile_fn(
        KernelCache(tmp_path))))   # a bf16 cache: none
    with pytest.raises(ValueError, match="many_ctas_tile"):
        plan_tc_attention(layer, arch, mode="decode", many=True)   # bf16 cache: no such tile
    assert not PagedAttention(layer, page_size=16, arch=arch)._decode_many()   # bf16 cache
    forced = PagedAttention(layer, page_size=16, arch=arch, kv_dtype=FP8, tiles={"decode": tile})
    assert not forced._decode_many()
    monkeypatch.setenv("LAYERFORGE_DECODE_MANY", "0")
    assert many_ctas_tile(128, 4, kv_dtype=FP8) is None
    assert not PagedAttention(layer, page_size=16, arch=arch, kv_dtype=FP8, cache=KernelCache(tmp_path))._decode_many()


@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn", "bloom_attn"])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_many_ctas_decode_tile_bf16_switch(prog, monkeypatch, name, dtype, arch, tmp_path):
    """A bf16 / f16 cache's decode at D128 gets the many-CTA tile too (2 warps of 16 keys, 3 stages, 4 CTAs an SM; on
    by default since measured on an H100), spill-free and warning-free; LAYERFORGE_DECODE_MANY_BF16=0, none."""
    from layerforge.codegen.attention_tc import many_ctas_tile
    from layerforge.runtime.attention import DECODE_MANY, PagedAttention
    from layerforge.runtime.cache import KernelCache
    layer = specialise(prog, name, 128, dtype)
    monkeypatch.setenv("LAYERFORGE_DECODE_MANY_BF16", "0")
    assert many_ctas_tile(128, 4) is None
    assert not PagedAttention(layer, page_size=16, arch=arch, cache=KernelCache(tmp_path))._decode_many()
    monkeypatch.delenv("LAYERFORGE_DECODE_MANY_BF16")
    assert many_ctas_tile(128, 4).label == "w1x2m1n16s3qb4" and many_ctas_tile(64, 4) is None
    attn = PagedAttention(layer, page_size=16, arch=arch, cache=KernelCache(tmp_path))
    assert attn._decode_many()
    plan = attn.tc_plan(DECODE_MANY)
    assert plan.many and plan.kv_dtype is None and plan.config.label == "w1x2m1n16s3qb4"
    compile_clean(plan, arch)
