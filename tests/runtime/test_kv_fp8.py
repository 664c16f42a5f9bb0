"""The FP8 (e4m3) KV cache on the CPU: quantisation (x / scale, nearest even, saturating to
+-448, NaN kept), per-tensor and per-head scales owned per layer, the append's torch path (K
quantised after its RoPE), and PagedAttention over the dequantised cache (no GPU needed)."""
import math

import pytest
import torch

import layerforge as lf
from layerforge import LayerInputError
from layerforge.dsl.attention_ref import apply_rope
from layerforge.dsl.ir import RopeSpec
from layerforge.runtime.attention import PagedAttention, float32_kv
from layerforge.runtime.kv_cache import KVCacheError, PagedKVCache, dequantise, quantise

from ..seeding import seeded_generator

FP8 = "fp8_e4m3"


def fp8_cache(scales="per_head", num_layers=1, hkv=2, d=64, **kw):
    return PagedKVCache(16, 16, hkv, d, torch.bfloat16, "cpu", 4, 8, num_layers=num_layers, kv_dtype=FP8,
                        scales=scales, **kw)


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, as float64, ascending (NaN codes 0x7f / 0xff left out)."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return b[~b.isnan()].unique()


# ---- quantise / dequantise ----------------------------------------------------------------
def test_quantise_rounds_to_nearest_even_and_saturates():
    grid = e4m3_grid()
    assert grid.max() == 448 and grid.min() == -448 and grid.numel() == 253   # 254 finite codes, +-0 equal
    pos = grid[grid > 0]
    lo, hi = pos[:-1], pos[1:]
    mid = (lo + hi) / 2
    scale = torch.ones(1)
    x = torch.stack([lo, mid, hi, (lo + mid) / 2, (mid + hi) / 2], dim=-1)[:, None, :].float()   # [N, 1, 5]
    got = quantise(x, scale).double()[:, 0]
    assert torch.equal(got[:, 0], lo) and torch.equal(got[:, 2], hi)
    assert torch.equal(got[:, 3], lo) and torch.equal(got[:, 4], hi)
    # ties go to the even mantissa: the neighbour whose code is even
    code = lambda v: v.float().to(torch.float8_e4m3fn).view(torch.uint8).int()   # noqa: E731
    even = torch.where(code(lo) % 2 == 0, lo, hi)
    assert torch.equal(got[:, 1], even)
    big = torch.tensor([448.0, 464.0, 1e6, float("inf"), -500.0, -float("inf")])[None, None, :]
    assert quantise(big, scale).double().flatten().tolist() == [448, 448, 448, 448, -448, -448]
    assert quantise(torch.tensor([[[float("nan")]]]), scale).isnan().all()


def test_quantise_divides_by_each_heads_scale():
    x = torch.tensor([[[1.0, -3.0], [1.0, -3.0]]])          # [T=1, H=2, D=2]
    scale = torch.tensor([0.5, 0.25])
    q = quantise(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    assert q.double().tolist() == [[[2.0, -6.0], [4.0, -12.0]]]
    assert dequantise(q, scale).tolist() == x.tolist()
    assert dequantise(q, scale, torch.float64).dtype == torch.float64


def test_round_trip_error_is_within_half_an_e4m3_step():
    gen = seeded_generator("fp8 round trip")
    x = torch.randn(64, 4, 128, generator=gen) * torch.tensor([0.1, 1.0, 10.0, 300.0])[:, None]
    scale = x.abs().amax(dim=(0, 2)) / 448   # calibrated per head: nothing saturates
    back = dequantise(quantise(x, scale), scale, torch.float64)
    rel = ((back - x.double()).abs() / x.double().abs().clamp_min(1e-30))
    normal = x.abs() >= 2 ** -6 * scale[:, None]    # e4m3 normals (3 mantissa bits): error <= 2^-4
    assert rel[normal].max() <= 2 ** -4 + 1e-12
    sub = ~normal                                   # subnormals: steps of 2^-9 * scale, half a step off at most
    assert sub.any()
    assert ((back - x.double()).abs() <= 2 ** -10 * scale.double()[:, None] + 1e-12)[sub].all()


# ---- the cache ------------------------------------------------------------------------------
def test_storage_and_default_scales():
    c = fp8_cache(num_layers=2)
    k, v = c.layer(1)
    assert k.dtype == v.dtype == torch.float8_e4m3fn and c.storage_dtype == torch.float8_e4m3fn
    assert c.dtype == torch.bfloat16   # what append() takes
    ks, vs = c.layer_scales(1)
    assert ks.dtype == torch.float32 and ks.tolist() == [1.0, 1.0] and vs.tolist() == [1.0, 1.0]
    assert "fp8_e4m3 per_head" in repr(c)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        PagedKVCache(4, 16, 2, 64, torch.bfloat16, "cpu", 2, 2, kv_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="scales must be one of"):
        PagedKVCache(4, 16, 2, 64, torch.bfloat16, "cpu", 2, 2, kv_dtype=FP8, scales="per_token")
    with pytest.raises(ValueError, match="bf16 or f16"):
        PagedKVCache(4, 16, 2, 64, torch.float32, "cpu", 2, 2, kv_dtype=FP8)
    with pytest.raises(ValueError, match="multiple of 16"):
        PagedKVCache(4, 16, 2, 72, torch.bfloat16, "cpu", 2, 2, kv_dtype=FP8)
    plain = PagedKVCache(4, 16, 2, 64, torch.bfloat16, "cpu", 2, 2)
    with pytest.raises(KVCacheError, match="not fp8"):
        plain.layer_scales(0)
    with pytest.raises(KVCacheError, match="not fp8"):
        plain.set_scales(0, 1.0, 1.0)


def test_per_tensor_scales_take_one_number():
    c = fp8_cache("per_tensor", num_layers=2)
    c.set_scales(1, 0.5, torch.tensor([0.25]))
    assert c.layer_scales(1)[0].tolist() == [0.5, 0.5] and c.layer_scales(1)[1].tolist() == [0.25, 0.25]
    assert c.layer_scales(0)[0].tolist() == [1.0, 1.0]      # each layer its own
    with pytest.raises(LayerInputError, match="one number"):
        c.set_scales(0, [0.5, 0.25], 1.0)


def test_per_head_scales_take_one_per_kv_head():
    c = fp8_cache("per_head", hkv=2)
    c.set_scales(0, [0.5, 0.25], 2.0)
    assert c.layer_scales(0)[0].tolist() == [0.5, 0.25] and c.layer_scales(0)[1].tolist() == [2.0, 2.0]
    with pytest.raises(LayerInputError, match="one per KV head"):
        c.set_scales(0, [0.5, 0.25, 1.0], 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e-50):   # 1e-50 is 0 in float32
        with pytest.raises(LayerInputError, match="finite and positive"):
            c.set_scales(0, 1.0, bad)
    assert c.layer_scales(0)[1].tolist() == [2.0, 2.0]      # a refused call changes nothing
    with pytest.raises(KVCacheError, match="out of range"):
        c.set_scales(1, 1.0, 1.0)


@pytest.mark.parametrize("scales", ["per_tensor", "per_head"])
def test_append_quantises_v_and_unrotated_k_exactly(scales):
    gen = seeded_generator("fp8 append", scales)
    c = fp8_cache(scales, num_layers=2)
    ks, vs = (torch.tensor([0.03, 0.05]), torch.tensor([0.01, 0.02])) if scales == "per_head" else (0.04, 0.015)
    c.set_scales(1, ks, vs)
    k_scale, v_scale = c.layer_scales(1)
    c.allocate(0, 40)
    c.allocate(2, 7)
    k = (torch.randn(47, 2, 64, generator=gen) * 4).bfloat16()
    v = torch.randn(47, 2, 64, generator=gen).bfloat16()
    ids = [0] * 25 + [2] * 7 + [0] * 15
    c.append(ids, k, v, layer=1)
    for s, rows in ((0, list(range(25)) + list(range(32, 47))), (2, list(range(25, 32)))):
        gk, gv = c.gather(s, 1)
        # independently: divide in float32, clamp, round (torch's e4m3 cast rounds to nearest even)
        want_k = (k[rows].float() / k_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        want_v = (v[rows].float() / v_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(gk.view(torch.uint8), want_k.view(torch.uint8))
        assert torch.equal(gv.view(torch.uint8), want_v.view(torch.uint8))
    assert c.gather(0, 0)[0].double().abs().sum() == 0     # layer 0 untouched


@pytest.mark.parametrize("rope", [RopeSpec(10000.0, "neox", 64), RopeSpec(500000.0, "gptj", 32)], ids=["neox", "gptj"])
def test_append_quantises_k_after_its_rope(rope):
    gen = seeded_generator("fp8 rope", rope.style)
    c = fp8_cache("per_head")
    c.set_scales(0, [0.04, 0.05], 1.0)
    c.allocate(1, 50)
    k = (torch.randn(50, 2, 64, generator=gen) * 3).bfloat16()
    v = torch.randn(50, 2, 64, generator=gen).bfloat16()
    c.append([1] * 30, k[:30], v[:30], rope)
    c.append([1] * 20, k[30:], v[30:], rope)
    got = c.dequantised(1)[0].double()
    ref = apply_rope(k.double()[None], torch.arange(50)[None], rope, int(rope.rotary_dim))[0]
    # one e4m3 rounding of the f32-rotated value: within half a step (2^-4 relative), and
    # exactly the quantised reference almost everywhere (f32 vs float64 rotation may tip a tie)
    scale = torch.tensor([0.04, 0.05], dtype=torch.float64)[:, None]
    err = (got - ref).abs()
    assert (err <= ref.abs() * 2 ** -4 + 2 ** -10 * scale + 1e-6).all()
    want = quantise(ref.float(), torch.tensor([0.04, 0.05]))
    same = c.gather(1)[0].view(torch.uint8) == want.view(torch.uint8)
    assert same.double().mean() > 0.99


def test_append_saturates_instead_of_overflowing():
    c = fp8_cache("per_tensor")
    c.set_scales(0, 0.01, 0.01)    # +-4.48 representable
    c.allocate(0, 2)
    big = torch.full((2, 2, 64), 100.0).bfloat16()
    big[1] = -100.0
    c.append([0, 0], big, big)
    k, v = c.dequantised(0)
    assert torch.allclose(k[0], torch.tensor(4.48)) and torch.allclose(v[1], torch.tensor(-4.48))
    assert not k.isnan().any()


def test_model_step_writes_quantise_with_that_layers_scales():
    c = fp8_cache("per_head", num_layers=2)
    c.set_scales(0, 1.0, 1.0)
    c.set_scales(1, [0.5, 0.25], [0.125, 1.0])
    x = torch.full((1, 2, 64), 1.5).bfloat16()
    c.allocate(3, 1)
    step = c.begin_step([3])
    for layer in (0, 1):
        c.write(step, layer, x, x)
    assert c.gather(3, 0)[0].double().unique().tolist() == [1.5]
    k1, v1 = c.gather(3, 1)
    assert k1[0, 0].double().unique().tolist() == [3.0] and k1[0, 1].double().unique().tolist() == [6.0]
    assert v1[0, 0].double().unique().tolist() == [12.0] and v1[0, 1].double().unique().tolist() == [1.5]


# ---- attention over the fp8 cache (CPU: the reference evaluator) ----------------------------
@pytest.fixture(scope="module")
def layer():
    return lf.stdlib().specialise("llama_attn", Hq=8, Hkv=2, D=64, dtype="bf16")


def filled_caches(layer, lens, gen):
    """The same tokens in a bf16 cache and an fp8 one with per-head scales from their maxima."""
    rope = layer.function.outputs[0].arg.rope
    ks = [(torch.randn(n, 2, 64, generator=gen) * 2).bfloat16() for n in lens]
    vs = [torch.randn(n, 2, 64, generator=gen).bfloat16() for n in lens]
    caches = {kv: PagedKVCache(16, 16, 2, 64, torch.bfloat16, "cpu", 4, 8, kv_dtype=kv, scales="per_head")
              for kv in (None, FP8)}
    k_amax = torch.stack([k.float().abs().amax(dim=(0, 2)) for k in ks]).amax(0) * 1.2   # room for the rotation
    v_amax = torch.stack([v.float().abs().amax(dim=(0, 2)) for v in vs]).amax(0)
    caches[FP8].set_scales(0, k_amax / 448, v_amax / 448)
    for c in caches.values():
        for s, (k, v) in enumerate(zip(ks, vs)):
            c.allocate(s, k.shape[0])
            c.append([s] * k.shape[0], k, v, rope)
    return caches


def run(layer, cache, q, lens, **kw):
    attn = PagedAttention(layer, page_size=16, kv_dtype=cache.kv_dtype)
    sc = dict(zip(("k_scale", "v_scale"), cache.layer_scales(0))) if cache.kv_dtype else {}
    return attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
                torch.arange(len(lens), dtype=torch.int32), torch.tensor([n - 1 for n in lens], dtype=torch.int32),
                max_kv_len=max(lens), **sc, **kw)


def test_fp8_attention_is_the_reference_over_the_dequantised_cache(layer):
    gen = seeded_generator("fp8 attention ref")
    lens = [1, 40, 17]
    caches = filled_caches(layer, lens, gen)
    q = torch.randn(3, 8, 64, generator=gen).bfloat16()
    out = run(layer, caches[FP8], q, lens)
    for s, n in enumerate(lens):
        k, v = caches[FP8].dequantised(s)
        (ref,) = lf.evaluate(float32_kv(layer.function), {"q": q[s][None, None], "k": k[None], "v": v[None]},
                             precision="float64", q_positions=torch.tensor([[n - 1]]),
                             kv_positions=torch.arange(n)[None], k_rotated=True)
        err = (out[s].double() - ref[0, 0]).norm() / ref.norm()
        assert err < 1e-2, f"sequence {s}: relative error {err:.3g}"   # bf16 output and probabilities


def test_fp8_attention_is_within_e4m3_error_of_bf16(layer):
    for seed in range(3):
        gen = seeded_generator("fp8 vs bf16", seed)
        lens = [5, 100, 33]
        caches = filled_caches(layer, lens, gen)
        q = torch.randn(3, 8, 64, generator=gen).bfloat16()
        a, b = run(layer, caches[None], q, lens).double(), run(layer, caches[FP8], q, lens).double()
        err = ((a - b).norm() / a.norm()).item()
        assert 0 < err < 2 ** -4, err       # not the bf16 path by mistake, and within e4m3's step


def test_fp8_attention_checks_its_inputs(layer):
    gen = seeded_generator("fp8 checks")
    caches = filled_caches(layer, [4], gen)
    c8, c16 = caches[FP8], caches[None]
    q = torch.randn(1, 8, 64, generator=gen).bfloat16()
    args = lambda c: (q, c.k_cache, c.v_cache, c.page_table, c.seq_lens, torch.zeros(1, dtype=torch.int32),  # noqa: E731
                      torch.tensor([3], dtype=torch.int32))
    fp8 = PagedAttention(layer, page_size=16, kv_dtype=FP8)
    plain = PagedAttention(layer, page_size=16)
    ks, vs = c8.layer_scales(0)
    with pytest.raises(LayerInputError, match="needs 'k_scale'"):
        fp8(*args(c8), max_kv_len=4)
    with pytest.raises(LayerInputError, match="reads torch.float8_e4m3fn caches"):
        fp8(*args(c16), max_kv_len=4, k_scale=ks, v_scale=vs)
    with pytest.raises(LayerInputError, match="reads torch.bfloat16 caches"):
        plain(*args(c8), max_kv_len=4)
    with pytest.raises(LayerInputError, match="for fp8 caches"):
        plain(*args(c16), max_kv_len=4, k_scale=ks, v_scale=vs)
    with pytest.raises(LayerInputError, match="'v_scale' dim 0 must be 2"):
        fp8(*args(c8), max_kv_len=4, k_scale=ks, v_scale=torch.ones(3))
    with pytest.raises(LayerInputError, match="'k_scale' must be torch.float32"):
        fp8(*args(c8), max_kv_len=4, k_scale=ks.double(), v_scale=vs)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        PagedAttention(layer, page_size=16, kv_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="bf16 or f16"):
        PagedAttention(lf.stdlib().specialise("llama_attn", Hq=8, Hkv=2, D=64, dtype="f32"), kv_dtype=FP8)
    assert math.isfinite(fp8(*args(c8), max_kv_len=4, k_scale=ks, v_scale=vs).double().sum().item())


def test_fp8_attention_compiles_fullgraph_and_matches_eager(layer):
    """Traced, the scales ride in the op's tensor list (runtime/ops.py): the compiled per-token and
    ragged forms give the eager outputs, and the op passes torch.library's fake-tensor checks."""
    from torch.library import opcheck

    from layerforge.runtime import ops
    gen = seeded_generator("fp8 compile")
    lens = [5, 40]
    c = filled_caches(layer, lens, gen)[FP8]
    attn = PagedAttention(layer, page_size=16, kv_dtype=FP8)
    ks, vs = c.layer_scales(0)
    q = torch.randn(2, 8, 64, generator=gen).bfloat16()
    q_seq, q_pos = torch.arange(2, dtype=torch.int32), torch.tensor([4, 39], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)   # the page table has 4 rows
    pt, sl = c.page_table, c.seq_lens

    def step(q, k_cache, v_cache, k_scale, v_scale):
        a = attn(q, k_cache, v_cache, pt, sl, q_seq, q_pos, max_kv_len=40, k_scale=k_scale, v_scale=v_scale)
        b = attn.prefill(q, k_cache, v_cache, pt, sl, cu, max_q_len=1, max_kv_len=40, k_scale=k_scale, v_scale=v_scale)
        return a, b

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, c.k_cache, c.v_cache, ks, vs)
    want = step(q, c.k_cache, c.v_cache, ks, vs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # (opcheck's schema test multiplies every input, which torch's CPU e4m3 tensors do not support)
    opcheck(torch.ops.layerforge.paged_attention.default,
            (ops.handle(attn), q, c.k_cache, c.v_cache, pt, sl, q_seq, q_pos, 40, None, [ks, vs], []),
            test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    with pytest.raises(ValueError, match="needs 'k_scale' and 'v_scale'"):
        ops.paged_attention(attn, q, c.k_cache, c.v_cache, pt, sl, q_seq, q_pos, max_kv_len=40, extra=None,
                            num_splits=None, out=None, scalars={})
