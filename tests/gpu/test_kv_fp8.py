"""The FP8 (e4m3) KV cache on the GPU.

Append: the generated kernel against the cache's torch path (a CPU cache fed the same calls),
bit for bit where no RoPE is involved (V, K without rope or past rotary_dim: one float32
division and one rounding on both sides), and within one e4m3 step almost everywhere exact
for rotated K (the kernel's f32 sin/cos differ from torch's in the last bits).
Attention: decode (tensor-core and CUDA-core kernels) and ragged prefill (tensor cores) over
an e4m3 cache with per-head scales, outputs poisoned with NaN first, against the float64
reference evaluator over the dequantised cache (the kernel's exact task), and against the
bf16 cache of the same tokens within e4m3's error (one step, 2^-3 of the output's norm)."""
import itertools
import math

import pytest
import torch

import layerforge as lf
from layerforge.dsl.attention_ref import apply_rope
from layerforge.runtime.attention import PagedAttention, float32_kv
from layerforge.runtime.kv_cache import PagedKVCache, dequantise, quantise

from ..codegen.test_kv_fp8_compile import FP8, ROPES
from ..seeding import seeded_generator

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


# ---- append -------------------------------------------------------------------------------
@pytest.mark.parametrize("scales", ["per_tensor", "per_head"])
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_append_kernel_matches_the_torch_path(dtype, d, rope, scales):
    gen = seeded_generator("fp8 append gpu", dtype, d, rope, scales)
    H, dt = 4, DTYPES[dtype]
    spec = ROPES[rope](d)
    caches = {dev: PagedKVCache(64, 16, H, d, dt, dev, 8, 16, num_layers=2, kv_dtype=FP8, scales=scales)
              for dev in ("cuda", "cpu")}
    k_scale = torch.rand(H, generator=gen) * 0.02 + 0.01 if scales == "per_head" else 0.015
    v_scale = torch.rand(H, generator=gen) * 0.01 + 0.005 if scales == "per_head" else 0.008
    lengths = [1, 17, 100, 33, 200]
    for c in caches.values():
        c.set_scales(1, k_scale, v_scale)
        for s, n in enumerate(lengths):
            c.allocate(s, n)
    caches["cuda"].layer(1)[0].view(torch.uint8).fill_(0x7F)   # NaN codes: a slot not written stays NaN
    caches["cuda"].layer(1)[1].view(torch.uint8).fill_(0x7F)
    ks = {s: (torch.randn(n, H, d, generator=gen) * 3).to(dt) for s, n in enumerate(lengths)}   # some saturate
    vs = {s: torch.randn(n, H, d, generator=gen).to(dt) for s, n in enumerate(lengths)}
    done = {s: 0 for s in ks}
    prefix = {s: max(0, ks[s].shape[0] - 3) for s in ks}   # prefill chunks, then three decode steps
    while any(done[s] < prefix[s] for s in ks):
        ids, rows_k, rows_v = [], [], []
        for s in ks:
            take = min(int(torch.randint(1, 40, (1,), generator=gen)), prefix[s] - done[s])
            if take > 0:
                ids += [s] * take
                rows_k.append(ks[s][done[s]:done[s] + take])
                rows_v.append(vs[s][done[s]:done[s] + take])
                done[s] += take
        k, v = torch.cat(rows_k), torch.cat(rows_v)
        for dev, c in caches.items():
            c.append(ids, k.to(dev), v.to(dev), spec, layer=1)
    for _ in range(3):
        ids = [s for s in ks if done[s] < ks[s].shape[0]]
        k = torch.stack([ks[s][done[s]] for s in ids])
        v = torch.stack([vs[s][done[s]] for s in ids])
        for s in ids:
            done[s] += 1
        for dev, c in caches.items():
            c.append(ids, k.to(dev), v.to(dev), spec, layer=1)
    assert all(done[s] == ks[s].shape[0] for s in ks)
    torch.cuda.synchronize()
    rd = int(spec.rotary_dim) if spec is not None else 0
    for s in ks:
        gk, gv = (x.cpu().view(torch.uint8) for x in caches["cuda"].gather(s, 1))
        wk, wv = (x.view(torch.uint8) for x in caches["cpu"].gather(s, 1))
        assert torch.equal(gv, wv), f"sequence {s}: V differs from the torch path"
        assert torch.equal(gk[..., rd:], wk[..., rd:]), f"sequence {s}: unrotated K differs"
        if rd:
            got = dequantise(gk[..., :rd].view(torch.float8_e4m3fn), caches["cpu"].layer_scales(1)[0], torch.float64)
            want = dequantise(wk[..., :rd].view(torch.float8_e4m3fn), caches["cpu"].layer_scales(1)[0], torch.float64)
            assert not got.isnan().any(), f"sequence {s}: a rotated K slot was not written"
            step = want.abs() * 2 ** -3 + 2 ** -9 * 0.03   # one e4m3 step (relative 2^-3 at worst), subnormals
            assert ((got - want).abs() <= step).all(), f"sequence {s}: rotated K off by more than one e4m3 step"
            assert (gk[..., :rd] == wk[..., :rd]).double().mean() >= 0.97
    # the other layer is untouched
    assert (caches["cuda"].layer(0)[0].view(torch.uint8) == 0).all()


# ---- attention ----------------------------------------------------------------------------
def build_caches(ks, vs, page, spec, dtype, k_scale, v_scale, gen):
    """An e4m3 cache and a bf16/f16 one of the same tokens, random page placement, K rotated in
    float64 at its positions (as the append kernel stores it); pages not in use hold NaN codes."""
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    pages_per = [max(1, math.ceil(k.shape[0] / page)) for k in ks]
    total = sum(pages_per) + 3
    perm = torch.randperm(total, generator=gen).tolist()
    k8 = torch.full((total, page, hkv, d), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    v8 = k8.clone()
    k16 = torch.full((total, page, hkv, d), float("nan"), dtype=dtype)
    v16 = k16.clone()
    table = torch.full((len(ks), max(pages_per) + 1), -1, dtype=torch.int32)
    for s, (k, v) in enumerate(zip(ks, vs)):
        n = k.shape[0]
        kr = k.double()
        if spec.rope is not None and n:
            kr = apply_rope(kr[None], torch.arange(n)[None], spec.rope, int(spec.rope.rotary_dim))[0]
        for i in range(pages_per[s]):
            pg = perm.pop()
            table[s, i] = pg
            lo, hi = i * page, min(n, (i + 1) * page)
            if hi > lo:
                k8[pg, : hi - lo] = quantise(kr[lo:hi].float(), k_scale)
                v8[pg, : hi - lo] = quantise(v[lo:hi].float(), v_scale)
                k16[pg, : hi - lo] = kr[lo:hi].to(dtype)
                v16[pg, : hi - lo] = v[lo:hi]
    lens = torch.tensor([k.shape[0] for k in ks], dtype=torch.int32)
    return (k8.cuda(), v8.cuda()), (k16.cuda(), v16.cuda()), table.cuda(), lens.cuda()


def run_case(prog, form, name, hq, hkv, d, page, lens, new, dtype=torch.bfloat16, splits=None, q_mult=1.0,
             scale_mult=1.0, extra_fn=None, **consts):
    gen = seeded_generator("fp8 attention", name, hq, hkv, d, page, tuple(lens), tuple(new), dtype, consts)
    kw = dict(Hq=hq, Hkv=hkv, D=d, **consts)
    layer = prog.specialise(name, dtype="bf16" if dtype == torch.bfloat16 else "f16", **kw)
    spec = layer.function.outputs[0].arg
    ks = [(torch.randn(n, hkv, d, generator=gen) * 2).to(dtype) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lens]
    qs = [(torch.randn(m, hq, d, generator=gen) * q_mult).to(dtype) for m in new]
    # per-head scales from the heads' maxima (K: room for the rotation), each head its own
    k_scale = torch.stack([k.float().abs().amax(dim=(0, 2)) for k in ks]).amax(0) * 1.5 / 448
    v_scale = torch.stack([v.float().abs().amax(dim=(0, 2)) for v in vs]).amax(0) / 448
    k_scale = k_scale * (1 + 0.5 * torch.rand(hkv, generator=gen))   # unequal heads
    k_scale, v_scale = k_scale * scale_mult, v_scale * scale_mult   # scale_mult 2^15: every code subnormal
    (k8, v8), (k16, v16), table, seq_lens = build_caches(ks, vs, page, spec, dtype, k_scale, v_scale, gen)
    q = torch.cat(qs).cuda()
    q_seq = torch.cat([torch.full((m,), s, dtype=torch.int32) for s, m in enumerate(new)]).cuda()
    q_pos = torch.cat([torch.arange(n - m, n, dtype=torch.int32) for n, m in zip(lens, new)]).cuda()
    cu = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32, device="cuda")
    kernel = "simt" if form == "simt" else "tc"
    extra = extra_fn(gen) if extra_fn else {}

    def attend(kc, vc, kv_dtype, **sc):
        attn = PagedAttention(layer, page_size=page, kernel=kernel, kv_dtype=kv_dtype)
        out = torch.full_like(q, float("nan"))
        if form == "tc-ragged":
            attn.prefill(q, kc, vc, table, seq_lens, cu, max_q_len=max(new), max_kv_len=max(lens), out=out,
                         num_splits=splits, extra=extra, **sc)
        else:
            attn(q, kc, vc, table, seq_lens, q_seq, q_pos, max_kv_len=max(lens), out=out, num_splits=splits,
                 extra=extra, **sc)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), "NaN in output"
        return out.double()

    got = attend(k8, v8, FP8, k_scale=k_scale.cuda(), v_scale=v_scale.cuda())
    ref16 = attend(k16, v16, None)
    start = 0
    for s, (n, m) in enumerate(zip(lens, new)):
        pages = table[s, : math.ceil(n / page)].long()
        kd = dequantise(k8[pages].reshape(-1, hkv, d)[:n].cpu(), k_scale)
        vd = dequantise(v8[pages].reshape(-1, hkv, d)[:n].cpu(), v_scale)
        ref = lf.evaluate(float32_kv(layer.function), {"q": qs[s][None], "k": kd[None], "v": vd[None],
                                                       **{n_: t.cpu() for n_, t in extra.items()}},
                          precision="float64", q_positions=torch.arange(n - m, n)[None],
                          kv_positions=torch.arange(n)[None], k_rotated=True)[0][0].cuda()
        rows = got[start:start + m]
        err = (rows - ref).norm() / ref.norm().clamp_min(1e-6)
        assert err < 2e-2, f"{name} seq {s} (len {n}, {m} new): relative error {err:.3g} to the dequantised reference"
        if ref.abs().max() == 0:
            assert (rows == 0).all(), "a fully masked row must give zeros"
        elif q_mult <= 1.0 and scale_mult == 1.0:
            # e4m3 rounds each value within 2^-4; K's errors also move the softmax weights, which
            # long contexts do not average out (the CPU run of these cases: 0.068 at 1000 keys).
            # A sharp softmax (q x 40: logits ~80 apart) follows whichever key K's rounding favours, so
            # there the distance to the bf16 cache measures the data's quantisation, not the kernel;
            # the check against the dequantised reference above is the kernel's
            e16 = (rows - ref16[start:start + m]).norm() / ref16[start:start + m].norm()
            assert e16 < 2 ** -3, f"{name} seq {s}: {e16:.3g} from the bf16 cache's output (e4m3: one step, 2^-3)"
        start += m


@pytest.fixture(params=["tc", "tc-ragged", "simt"])
def form(request):
    return request.param


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8), (32, 4)])
def test_decode_over_fp8(prog, form, hq, hkv, d):
    run_case(prog, form, "llama_attn", hq, hkv, d, 16, lens=[1, 17, 100, 300], new=[1, 1, 1, 1])


@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn", "bloom_attn"])
@pytest.mark.parametrize("page", [16, 64])
def test_variants_and_pages_over_fp8(prog, form, name, page):
    consts = {"window": 37} if name in ("mistral_attn", "gemma2_attn") else {}
    run_case(prog, form, name, 32, 8, 128, page, lens=[5, 33, 70, 130], new=[1, 1, 1, 1], **consts)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_chunked_prefill_over_fp8(prog, d):
    run_case(prog, "tc-ragged", "llama_attn", 32, 8, d, 16, lens=[5, 33, 200, 64], new=[5, 3, 150, 17])


@pytest.mark.parametrize("splits", [2, 5])
def test_split_kv_over_fp8(prog, form, splits):
    run_case(prog, form, "llama_attn", 32, 8, 128, 16, lens=[300, 1000], new=[1, 1], splits=splits)


def test_f16_over_fp8(prog, form):
    run_case(prog, form, "llama_attn", 32, 8, 128, 16, lens=[17, 300], new=[1, 1], dtype=torch.float16)


def test_append_then_decode_end_to_end(prog):
    """The append kernel fills the cache (RoPE fused, per-head scales), the decode kernels read
    it: the float64 reference over cache.dequantised()."""
    gen = seeded_generator("fp8 end to end")
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    rope = layer.function.outputs[0].arg.rope
    cache = PagedKVCache(64, 16, 8, 128, torch.bfloat16, "cuda", 4, 32, kv_dtype=FP8, scales="per_head")
    cache.set_scales(0, torch.rand(8, generator=gen) * 0.01 + 0.02, torch.rand(8, generator=gen) * 0.005 + 0.006)
    lens = [3, 250, 77]
    for s, n in enumerate(lens):
        cache.allocate(s, n)
        cache.append([s] * n, (torch.randn(n, 8, 128, generator=gen) * 2).bfloat16().cuda(),
                     torch.randn(n, 8, 128, generator=gen).bfloat16().cuda(), rope)
    q = torch.randn(3, 32, 128, generator=gen).bfloat16().cuda()
    for kernel in ("tc", "simt"):
        attn = PagedAttention(layer, page_size=16, kernel=kernel, kv_dtype=FP8)
        k_scale, v_scale = cache.layer_scales(0)
        out = torch.full_like(q, float("nan"))
        attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
             torch.arange(3, dtype=torch.int32, device="cuda"), torch.tensor([n - 1 for n in lens], dtype=torch.int32,
                                                                               device="cuda"),
             max_kv_len=max(lens), out=out, k_scale=k_scale, v_scale=v_scale)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        for s, n in enumerate(lens):
            k, v = (x.cpu() for x in cache.dequantised(s))
            ref = lf.evaluate(float32_kv(layer.function), {"q": q[s].cpu()[None, None], "k": k[None], "v": v[None]},
                              precision="float64", q_positions=torch.tensor([[n - 1]]),
                              kv_positions=torch.arange(n)[None], k_rotated=True)[0][0, 0]
            err = (out[s].double().cpu() - ref).norm() / ref.norm()
            assert err < 2e-2, f"{kernel} seq {s}: relative error {err:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the hardware e4m3 conversion needs sm_89 or newer")
@pytest.mark.parametrize("q_mult", [1.0, pytest.param(40.0, marks=pytest.mark.xfail(
    strict=False, reason="bf16 with RoPE at logits ~80 apart: the kernel's rotated q rounded to bf16 puts the output "
    "0.0247 from the dequantised reference on an H200 (bound 0.02), on the default paths too "
    "(test_raw_widening_switch, benchmarks/NOTES.md)")), 1e-3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cvt_form", ["tc", "tc-ragged"])
def test_hardware_conversion_path(prog, monkeypatch, cvt_form, dtype, q_mult):
    """LAYERFORGE_FP8_KV_CVT=1 (TCAttentionPlan.fp8_cvt): e4m3 widened by cvt.rn.f16x2.e4m3x2, the products in
    f16, bf16 q scaled into f16 by a power of two (large and small q: sharp and flat softmax), decode and
    chunked prefill, GQA and MHA, split-KV, against the same float64 references as the default path."""
    monkeypatch.setenv("LAYERFORGE_FP8_KV_CVT", "1")
    from layerforge.codegen.attention_tc import plan_tc_attention
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    assert plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype="fp8_e4m3", fp8_cvt=True).key.endswith(
        ("_cvt_t8_sm90", "_cvt_hf_t8_sm90"))
    new = [1, 1, 1, 1] if cvt_form == "tc" else [5, 3, 150, 17]
    run_case(prog, cvt_form, "llama_attn", 32, 8, 128, 16, lens=[5, 33, 200, 1000], new=new, dtype=dtype, q_mult=q_mult)
    run_case(prog, cvt_form, "mistral_attn", 16, 16, 64, 64, lens=[70, 300], new=new[:2], dtype=dtype, q_mult=q_mult,
             window=37)
    if cvt_form == "tc":
        run_case(prog, cvt_form, "llama_attn", 32, 8, 256, 16, lens=[300, 1000], new=[1, 1], dtype=dtype, splits=3,
                 q_mult=q_mult)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_subnormal_codes(prog, form, dtype):
    """Scales 2^15 times the heads' maxima / 448: every K and V value is an e4m3 subnormal (or zero), which
    the raw widening (TCAttentionPlan.fp8_raw) hands the tensor cores as bf16 / f16 subnormals; a flushed
    operand would give zero scores and zero outputs, far from the dequantised reference."""
    run_case(prog, form, "llama_attn", 32, 8, 128, 16, lens=[17, 300], new=[1, 1], dtype=dtype, scale_mult=2.0 ** 15)
    run_case(prog, form, "llama_attn", 32, 8, 128, 16, lens=[300, 1000], new=[1, 1], dtype=dtype, splits=3,
             scale_mult=2.0 ** 15)


@pytest.mark.parametrize("splits", [None, 3])
def test_sinks_over_fp8(form, splits):
    """gpt-oss sinks over an e4m3 cache: the sink's term enters the sums once (split 0), with the raw
    widening's 2^100 on P in bf16."""
    from ..dsl.test_attention_sinks import SINKS
    prog = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    sinks = lambda gen: {"sinks": (torch.randn(8, generator=gen) * 2).cuda()}   # noqa: E731
    run_case(prog, form, "sink_attn", 8, 2, 128, 16, lens=[700, 1, 333, 90], new=[1, 1, 1, 1], extra_fn=sinks,
             splits=splits)


@pytest.mark.parametrize("raw", ["0", "1"])
@pytest.mark.parametrize("q_mult", [1e-3, 1.0, 40.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("raw_form", ["tc", "tc-ragged"])
def test_raw_widening_switch(prog, monkeypatch, raw_form, dtype, q_mult, raw):
    """LAYERFORGE_FP8_KV_RAW=1 (the default: e4m3 widened without the multiply, q x 2^40 and P x 2^100 in bf16)
    and =0 (the multiply), flat and sharp softmax, decode, chunked prefill and split-KV, against the float64
    reference over the dequantised cache. The sharp case (q x 40, logits ~80 apart) runs a layer without RoPE:
    with RoPE the kernel's rotated q is rounded to bf16 (2^-9), which moves logits that large by ~0.1 and the
    output by ~0.025 on every path (the multiply, raw, the hardware cvt: the same 0.0247 on an H200)."""
    monkeypatch.setenv("LAYERFORGE_FP8_KV_RAW", raw)
    monkeypatch.setenv("LAYERFORGE_FP8_KV_KCVT", "0")   # K widened by integer ops too (KCVT, the default, elsewhere)
    from layerforge.codegen.attention_tc import plan_tc_attention
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    assert ("_raw_" in plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype="fp8_e4m3").key) == (raw == "1")
    new = [1, 1, 1, 1] if raw_form == "tc" else [5, 3, 150, 17]
    name = "llama_attn" if q_mult <= 1.0 else "gpt2_attn"
    run_case(prog, raw_form, name, 32, 8, 128, 16, lens=[5, 33, 200, 1000], new=new, dtype=dtype, q_mult=q_mult)
    run_case(prog, raw_form, "gemma2_attn", 16, 16, 256, 64, lens=[70, 300], new=new[:2], dtype=dtype, q_mult=q_mult,
             window=37)
    if raw_form == "tc":
        run_case(prog, raw_form, name, 32, 8, 64, 16, lens=[300, 1000], new=[1, 1], dtype=dtype, splits=3,
                 q_mult=q_mult)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the hardware e4m3 conversion needs sm_89 or newer")
@pytest.mark.parametrize("q_mult", [1e-3, 1.0, 40.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vcvt_form", ["tc", "tc-ragged"])
@pytest.mark.parametrize("which", ["V", "K", "KW"])
def test_one_operand_by_hardware_conversion_switch(prog, monkeypatch, which, vcvt_form, dtype, q_mult):
    """LAYERFORGE_FP8_KV_VCVT=1 (TCAttentionPlan.fp8_vcvt: K widened by integer ops as fp8_raw has it, V by
    cvt.rn.f16x2.e4m3x2 and P V in f16, P unscaled) and LAYERFORGE_FP8_KV_KCVT=1 (fp8_kcvt: K by the cvt and
    Q K^T in f16, bf16 q as f16 times 2^-qe; V by integer ops): flat and sharp softmax (the sharp case without
    RoPE, as in test_raw_widening_switch), decode, chunked prefill, split-KV, subnormal codes and gpt-oss
    sinks, against the float64 reference over the dequantised cache. "KW": fp8_kcvt with fp8_kwords (K's
    fragments as words, q's channel pairs permuted in shared memory)."""
    monkeypatch.setenv(f"LAYERFORGE_FP8_KV_{which[0]}CVT", "1")
    monkeypatch.setenv("LAYERFORGE_FP8_KV_KWORDS", "1" if which == "KW" else "0")
    from layerforge.codegen.attention_tc import plan_tc_attention
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    key = plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype="fp8_e4m3").key
    assert f"_raw_{which[0].lower()}cvt_" in key and ("_kw_" in key) == (which == "KW")
    new = [1, 1, 1, 1] if vcvt_form == "tc" else [5, 3, 150, 17]
    name = "llama_attn" if q_mult <= 1.0 else "gpt2_attn"
    run_case(prog, vcvt_form, name, 32, 8, 128, 16, lens=[5, 33, 200, 1000], new=new, dtype=dtype, q_mult=q_mult)
    run_case(prog, vcvt_form, "gemma2_attn", 16, 16, 256, 64, lens=[70, 300], new=new[:2], dtype=dtype,
             q_mult=q_mult, window=37)
    if vcvt_form == "tc":
        run_case(prog, vcvt_form, name, 32, 8, 64, 16, lens=[300, 1000], new=[1, 1], dtype=dtype, splits=3,
                 q_mult=q_mult)
        if q_mult == 1.0:
            run_case(prog, vcvt_form, "llama_attn", 32, 8, 128, 16, lens=[300, 1000], new=[1, 1], dtype=dtype,
                     splits=3, scale_mult=2.0 ** 15)
            from ..dsl.test_attention_sinks import SINKS
            sp = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
            sinks = lambda gen: {"sinks": (torch.randn(8, generator=gen) * 2).cuda()}   # noqa: E731
            for splits in (None, 3):
                run_case(sp, vcvt_form, "sink_attn", 8, 2, 128, 16, lens=[700, 1, 333, 90], new=[1, 1, 1, 1],
                         extra_fn=sinks, splits=splits, dtype=dtype)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="TMA needs sm_90 or newer")
@pytest.mark.parametrize("wide", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widen", ["raw", "KW", "KW_T8", "V"])
def test_decode_by_tma_switch(prog, monkeypatch, widen, dtype, wide):
    """LAYERFORGE_DECODE_TMA=1 (TCAttentionPlan.tma: whole K/V tiles of an e4m3 cache as TMA boxes from each warp's
    lane 0 on the stage's mbarrier, an arrival a warp; the partial last tile by cp.async, its rows past the length
    zeros): with the
    64- and 128-key tiles (LAYERFORGE_FP8_DECODE_WIDE), each widening (raw; K by the cvt as words; with TOP_ROWS; V
    by the cvt), pages of 16 (boxes of 16 keys), 64 and 256 (a box within a page: its row offset), lengths on and
    off the tiles' multiples, unused pages and rows of NaN codes (build_caches), head dims 128 and 64, sliding
    windows (the keys starting past 0), split-KV,
    speculative tokens (2-4 a sequence, still decode tiles), subnormal codes and gpt-oss sinks, against the float64
    reference over the dequantised cache."""
    monkeypatch.setenv("LAYERFORGE_DECODE_TMA", "1")
    monkeypatch.setenv("LAYERFORGE_FP8_DECODE_WIDE", wide)
    monkeypatch.setenv("LAYERFORGE_FP8_KV_KCVT", "1" if widen.startswith("KW") else "0")
    monkeypatch.setenv("LAYERFORGE_FP8_KV_KWORDS", "1" if widen.startswith("KW") else "0")
    monkeypatch.setenv("LAYERFORGE_DECODE_TOP_ROWS", "1" if widen == "KW_T8" else "0")
    monkeypatch.setenv("LAYERFORGE_FP8_KV_VCVT", "1" if widen == "V" else "0")
    from layerforge.codegen.attention_tc import plan_tc_attention
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    assert "_tma_" in plan_tc_attention(layer, "sm_90", mode="decode", kv_dtype="fp8_e4m3").key
    lens = [5, 33, 128, 129, 200, 256, 1000]
    for page in (16, 64, 256):
        run_case(prog, "tc", "llama_attn", 32, 8, 128, page, lens=lens, new=[1] * len(lens), dtype=dtype)
    run_case(prog, "tc", "llama_attn", 32, 8, 64, 16, lens=lens, new=[1] * len(lens), dtype=dtype)
    # a window (mistral's, 37 and 300 keys): the keys start past 0, at a tile of whole pages
    for window in (37, 300):
        run_case(prog, "tc", "mistral_attn", 32, 8, 128, 16, lens=lens, new=[1] * len(lens), dtype=dtype,
                 window=window)
    run_case(prog, "tc", "llama_attn", 32, 8, 128, 16, lens=[300, 1000, 4097], new=[1, 1, 1], dtype=dtype, splits=3)
    run_case(prog, "tc-ragged", "llama_attn", 32, 8, 128, 16, lens=[40, 300, 1000], new=[2, 4, 3], dtype=dtype)
    run_case(prog, "tc", "llama_attn", 32, 8, 128, 16, lens=[300, 1000], new=[1, 1], dtype=dtype, splits=3,
             scale_mult=2.0 ** 15)
    from ..dsl.test_attention_sinks import SINKS
    sp = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    sinks = lambda gen: {"sinks": (torch.randn(8, generator=gen) * 2).cuda()}   # noqa: E731
    run_case(sp, "tc", "sink_attn", 8, 2, 128, 16, lens=[700, 1, 333, 90], new=[1, 1, 1, 1], extra_fn=sinks,
             splits=3, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_ctas_decode_over_fp8(prog, loaded_modes, dtype):
    """Decode grids past one wave of the default e4m3 tile (48 sequences x 8 KV heads: 384 CTAs, more than 2 an SM on
    up to 191 SMs) take the tile of more, smaller CTAs (runtime/attention.DECODE_MANY, codegen/attention_tc.
    many_ctas_tile): per-token and ragged (2 tokens a sequence, still decode rows), lengths on and off the tiles'
    multiples, pages of 16 and 64, a sliding window, against the float64 reference over the dequantised cache; 8
    sequences keep the default tile."""
    from layerforge.runtime.attention import DECODE_MANY
    modes = loaded_modes
    gen = torch.Generator().manual_seed(11)
    lens = [int(n) for n in torch.randint(1, 700, (48,), generator=gen)] + [64, 65, 1, 2048]
    for page in (16, 64):
        modes.clear()
        run_case(prog, "tc", "llama_attn", 32, 8, 128, page, lens=lens, new=[1] * len(lens), dtype=dtype)
        assert DECODE_MANY in modes, modes
    modes.clear()
    run_case(prog, "tc-ragged", "llama_attn", 32, 8, 128, 16, lens=lens, new=[2] * len(lens), dtype=dtype)
    assert DECODE_MANY in modes, modes
    modes.clear()
    run_case(prog, "tc", "mistral_attn", 32, 8, 128, 16, lens=lens, new=[1] * len(lens), dtype=dtype, window=37)
    assert DECODE_MANY in modes, modes
    modes.clear()
    run_case(prog, "tc", "llama_attn", 32, 8, 128, 16, lens=lens[:8], new=[1] * 8, dtype=dtype)
    assert "decode" in modes and DECODE_MANY not in modes, modes
