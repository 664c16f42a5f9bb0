"""Attention sinks (gpt-oss): `sink = ...` puts one logit per row into the softmax's denominator,
weighing no value. The reference against transformers' gpt-oss eager attention, the checker's
errors, and every kernel form compiling without spills (no GPU needed)."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention import plan_paged_attention
from layerforge.codegen.attention_tc import plan_tc_attention

SINKS = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention sink_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], sinks: f32[Hq],
                    const window: int = 0) -> T[B, S, Hq, D] {
    sink = sinks[h]
    mask = q_pos >= kv_pos if window == 0 else q_pos >= kv_pos and q_pos - kv_pos < window
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.loads(SINKS, "sinks.lf", with_stdlib=False)


def gpt_oss_attention(q, k, v, sinks, window=0):
    """transformers' gpt-oss eager attention (q, k, v as [B, S, H, D]; causal, optional window)."""
    mod = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    B, S, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    qp = torch.arange(Skv - S, Skv)[:, None]
    kp = torch.arange(Skv)[None, :]
    visible = kp <= qp
    if window:
        visible &= qp - kp < window
    mask = torch.zeros(S, Skv, dtype=q.dtype).masked_fill(~visible, float("-inf"))[None, None]

    class M(torch.nn.Module):
        num_key_value_groups = Hq // Hkv
        training = False
    m = M()
    m.sinks = sinks
    out, _ = mod.eager_attention_forward(m, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                         scaling=D ** -0.5)
    return out


@pytest.mark.parametrize("window", [0, 5])
def test_reference_matches_gpt_oss(prog, window):
    layer = prog.specialise("sink_attn", Hq=8, Hkv=2, D=16, dtype="f32", window=window)
    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(2, n, h, 16, generator=g) for n, h in ((7, 8), (11, 2), (11, 2)))
    sinks = torch.randn(8, generator=g) * 3
    (got,) = lf.evaluate(layer.function, {"q": q, "k": k, "v": v, "sinks": sinks}, precision="float64")
    want = gpt_oss_attention(q.double(), k.double(), v.double(), sinks.double(), window)
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-12)
    # a sink far below every score changes nothing; far above, the output goes to zero
    (low,) = lf.evaluate(layer.function, {"q": q, "k": k, "v": v, "sinks": torch.full((8,), -1e4)}, precision="float64")
    plain = lf.loads(SINKS.replace("sink = sinks[h]", ""), "plain.lf", with_stdlib=False)
    (ref,) = lf.evaluate(plain.specialise("sink_attn", Hq=8, Hkv=2, D=16, dtype="f32", window=window).function,
                         {"q": q, "k": k, "v": v, "sinks": sinks}, precision="float64")
    torch.testing.assert_close(low, ref)
    (high,) = lf.evaluate(layer.function, {"q": q, "k": k, "v": v, "sinks": torch.full((8,), 1e4)}, precision="float64")
    assert high.abs().max() < 1e-30


@pytest.mark.parametrize("body,match", [
    ("sink = score", "sink must be a number per row"),
    ("sink = f32(kv_pos)", "sink must be a number per row"),
    ("sink = q_pos < 3", "sink must be a number per row"),
    ("snik = sinks[h]", "did you mean 'sink'"),
])
def test_bad_sinks_are_positioned_errors(body, match):
    src = SINKS.replace("sink = sinks[h]", body)
    with pytest.raises(lf.DSLError, match=match) as e:
        lf.loads(src, "bad.lf", with_stdlib=False)
    assert "bad.lf:" in str(e.value)


def test_integer_and_position_sinks_are_allowed(prog):
    lf.loads(SINKS.replace("sink = sinks[h]", "sink = f32(h) - 0.5 * f32(q_pos % 3)"), "ok.lf", with_stdlib=False)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("d", [64, 128])
def test_sink_kernels_compile_without_spills(prog, mode, d):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    layer = prog.specialise("sink_attn", Hq=32, Hkv=8, D=d, dtype="bf16", window=128)
    for plan in (plan_tc_attention(layer, "sm_90", mode=mode), plan_paged_attention(layer, "sm_90")):
        src = plan.source()
        assert "lf_sink(" in src and "split == 0" in src
        res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"))
        for kr in res.resources.values():
            assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


def test_cpu_paged_path_applies_the_sink(prog):
    from layerforge.runtime.attention import PagedAttention
    layer = prog.specialise("sink_attn", Hq=4, Hkv=2, D=64, dtype="f32")
    attn = PagedAttention(layer, arch="sm_90")
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(4, 16, 2, 64, generator=g), torch.randn(4, 16, 2, 64, generator=g)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    q = torch.randn(2, 4, 64, generator=g)
    sinks = torch.tensor([0.0, 2.0, -1.0, 5.0])
    out = attn(q, kc, vc, table, lens, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4, 19], dtype=torch.int32),
               max_kv_len=20, extra={"sinks": sinks})
    k = kc[2:4].reshape(-1, 2, 64)[:20]
    v = vc[2:4].reshape(-1, 2, 64)[:20]
    (want,) = lf.evaluate(layer.function, {"q": q[1:][None], "k": k[None], "v": v[None], "sinks": sinks},
                          q_positions=torch.tensor([[19]]), kv_positions=torch.arange(20)[None], k_rotated=True)
    torch.testing.assert_close(out[1], want[0, 0])
