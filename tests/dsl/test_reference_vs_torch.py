"""The reference evaluator of every standard-library definition against plain torch.

Each definition runs on fresh random inputs in three modes (reference_checks.MODES): f32 and
bf16 storage with precision="program", and precision="float64" against float64 torch.
The independent side is torch's own modules and functions (F.rms_norm, nn.LayerNorm,
nn.GroupNorm, F.gelu, F.scaled_dot_product_attention with explicit float masks and
enable_gqa) or a formula written here differently from the DSL (rotary embeddings as
complex multiplication, ALiBi slopes as MPT computes them, T5 buckets from transformers).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import layerforge as lf

from .reference_checks import BF16, F32, F64, MODES, assert_finite, assert_matches, distinct_rows, run

ROWS = [(1, 7), (5, 64), (3, 1536)]  # (N, H): one token, a small width, a model-sized width


# --------------------------------------------------------------------------- norms
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H", ROWS)
def test_rms_norm_matches_F_rms_norm(mode, N, H):
    x, w = mode.inp(torch.randn(N, H) * 3), mode.inp(torch.randn(H))
    (y,) = run("rms_norm", mode, {"x": x, "w": w, "eps": 1e-5}, H=H)
    assert_matches(y, F.rms_norm(mode.to_ref(x), (H,), mode.to_ref(w), eps=1e-5), mode)


def test_rms_norm_default_eps_is_1e_minus_6():
    # rows with mean(x^2) ~ 1e-6, so eps changes the result by tens of percent
    x, w = torch.randn(4, 32) * 1e-3, torch.randn(32)
    (y,) = run("rms_norm", F32, {"x": x, "w": w}, H=32)
    assert_matches(y, F.rms_norm(x, (32,), w, eps=1e-6), F32)
    assert not torch.allclose(y, F.rms_norm(x, (32,), w, eps=1e-5), rtol=1e-2)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H", ROWS)
def test_gemma_rms_norm_scales_by_one_plus_weight(mode, N, H):
    x, w = mode.inp(torch.randn(N, H) * 2), mode.inp(torch.randn(H) * 0.5)
    (y,) = run("gemma_rms_norm", mode, {"x": x, "w": w, "eps": 1e-6}, H=H)
    cd = torch.float64 if mode is F64 else torch.float32  # Gemma computes in f32, then casts
    xf = x.to(cd)
    want = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.to(cd))
    assert_matches(y, want.to(mode.out), mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H", ROWS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_matches_nn_LayerNorm(mode, N, H, bias):
    ln = torch.nn.LayerNorm(H, eps=1e-5, bias=bias)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(H))
        if bias:
            ln.bias.copy_(torch.randn(H))
    ln = ln.to(mode.storage)  # the layer's parameters are what the DSL layer receives
    x = mode.inp(torch.randn(N, H) * 2 + 3)  # a non-zero mean, which must be removed
    if bias:
        (y,) = run("layer_norm", mode, {"x": x, "w": ln.weight.detach(), "b": ln.bias.detach()}, H=H)
    else:
        (y,) = run("layer_norm_nobias", mode, {"x": x, "w": ln.weight.detach()}, H=H)
    with torch.no_grad():
        want = ln.to(mode.ref)(mode.to_ref(x))
    assert_matches(y, want, mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H,G", [(1, 7, 1), (4, 12, 3), (2, 1536, 32), (3, 14, 7)])
def test_group_norm_matches_nn_GroupNorm_on_rows(mode, N, H, G):
    gn = torch.nn.GroupNorm(G, H, eps=1e-5)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(H))
        gn.bias.copy_(torch.randn(H))
    gn = gn.to(mode.storage)
    x = mode.inp(torch.randn(N, H) * 2 + torch.randn(1, H))
    (y,) = run("group_norm", mode, {"x": x, "w": gn.weight.detach(), "b": gn.bias.detach()}, H=H, G=G)
    with torch.no_grad():
        want = gn.to(mode.ref)(mode.to_ref(x))
    assert_matches(y, want, mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_group_norm_with_one_channel_per_group_outputs_the_bias(mode):
    # x - mean is exactly 0 for a group of one, whatever rsqrt(0 + eps) is. (nn.GroupNorm in
    # f32 is off by ~1e-4 here: it rounds x - mean to non-zero and multiplies by 316.)
    x, w, b = mode.inp(torch.randn(3, 8) * 5), mode.inp(torch.randn(8)), mode.inp(torch.randn(8))
    (y,) = run("group_norm", mode, {"x": x, "w": w, "b": b}, H=8, G=8)
    assert torch.equal(y, b.to(mode.out).expand(3, 8))


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H", ROWS)
def test_add_rms_norm_returns_norm_of_sum_and_the_sum(mode, N, H):
    x, res, w = mode.inp(torch.randn(N, H)), mode.inp(torch.randn(N, H) * 4), mode.inp(torch.randn(H))
    y, s = run("add_rms_norm", mode, {"x": x, "res": res, "w": w, "eps": 1e-6}, H=H)
    want_s = mode.to_ref(x) + mode.to_ref(res)  # bf16: the sum is rounded before the norm, as torch does
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    assert_matches(y, F.rms_norm(want_s, (H,), mode.to_ref(w), eps=1e-6), mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H", ROWS)
def test_add_layer_norm_returns_norm_of_sum_and_the_sum(mode, N, H):
    x, res = mode.inp(torch.randn(N, H) + 1), mode.inp(torch.randn(N, H) * 4)
    w, b = mode.inp(torch.randn(H)), mode.inp(torch.randn(H))
    y, s = run("add_layer_norm", mode, {"x": x, "res": res, "w": w, "b": b}, H=H)
    want_s = mode.to_ref(x) + mode.to_ref(res)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    want = F.layer_norm(want_s, (H,), mode.to_ref(w), mode.to_ref(b), eps=1e-5)  # the default eps
    assert_matches(y, want, mode)


# --------------------------------------------------------------------------- activations
GATED = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
PLAIN = {
    "silu_act": F.silu,
    "gelu_act": F.gelu,
    "gelu_tanh_act": lambda t: F.gelu(t, approximate="tanh"),
    "relu_act": F.relu,
}
WIDTHS = [(1, 7), (4, 64), (2, 1536)]  # (N, F)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,Fw", WIDTHS)
@pytest.mark.parametrize("name", list(GATED))
def test_gated_activation_is_act_of_first_half_times_second_half(mode, N, Fw, name):
    gu = mode.inp(torch.randn(N, 2 * Fw) * 3)
    (y,) = run(name, mode, {"gu": gu}, F=Fw)
    gate, up = mode.to_ref(gu).chunk(2, dim=-1)
    assert_matches(y, GATED[name](gate) * up, mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,Fw", WIDTHS)
@pytest.mark.parametrize("name", list(PLAIN))
def test_activation_matches_torch_function(mode, N, Fw, name):
    x = torch.randn(N, Fw) * 4
    x[0, 0] = 0.0
    x = mode.inp(x)
    (y,) = run(name, mode, {"x": x}, F=Fw)
    assert_matches(y, PLAIN[name](mode.to_ref(x)), mode)


def test_gelu_variants_match_their_textbook_formulas_in_float64():
    x = torch.linspace(-6, 6, 97).reshape(1, 97)
    xd = x.double()
    erf_form = 0.5 * xd * (1 + torch.erf(xd / math.sqrt(2)))
    tanh_form = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    (g,) = run("gelu_act", F64, {"x": x}, F=97)
    (gt,) = run("gelu_tanh_act", F64, {"x": x}, F=97)
    assert_matches(g, erf_form, F64, rtol=1e-12, atol=1e-14)
    assert_matches(gt, tanh_form, F64, rtol=1e-12, atol=1e-14)
    assert (g - gt).abs().max() > 1e-4  # the two forms are different functions


def test_relu_act_is_exact():
    x = torch.randn(3, 7)
    x[1, 2] = 0.0
    (y,) = run("relu_act", F32, {"x": x}, F=7)
    assert torch.equal(y, torch.relu(x))


# --------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,H", ROWS + [(2, 1)])
def test_softmax_rows_matches_torch_softmax(mode, N, H):
    x = mode.inp(torch.randn(N, H) * 5)
    (y,) = run("softmax_rows", mode, {"x": x}, H=H)
    assert_matches(y, torch.softmax(mode.to_ref(x), dim=-1), mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_softmax_rows_is_stable_for_large_logits(mode):
    x = torch.randn(3, 50) * 1000  # exp() of these overflows without the max shift
    x[1] = 5000.0                   # a constant row: uniform
    x = mode.inp(x)
    (y,) = run("softmax_rows", mode, {"x": x}, H=50)
    assert_finite(y)
    torch.testing.assert_close(y[1].double(), torch.full((50,), 1 / 50, dtype=torch.float64),
                               rtol=mode.rtol, atol=0)
    assert_matches(y, torch.softmax(mode.to_ref(x).double(), dim=-1).to(mode.out), mode)


# --------------------------------------------------------------------------- rotary embeddings
def rope_complex(x: torch.Tensor, pos: torch.Tensor, theta: float, rotary_dim: int, neox: bool) -> torch.Tensor:
    """x [N, Nh, D] rotated in float64 as complex numbers: channel pairs (i, i + rd/2) for
    GPT-NeoX, (2i, 2i + 1) for GPT-J, each multiplied by exp(1j * pos * theta^(-2i/rd))."""
    x = x.double()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    freqs = theta ** (-torch.arange(rotary_dim // 2, dtype=torch.float64) * 2 / rotary_dim)
    turn = torch.polar(torch.ones(len(pos), rotary_dim // 2, dtype=torch.float64), pos.double()[:, None] * freqs)
    turn = turn[:, None, :]
    if neox:
        z = torch.complex(rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]) * turn
        out = torch.cat([z.real, z.imag], dim=-1)
    else:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2).contiguous()) * turn
        out = torch.view_as_real(z).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def rope_tol(mode, max_pos: int, x: torch.Tensor) -> dict:
    """f32 angles pos * freq carry a relative error of a few 2^-24, i.e. an absolute error
    that grows with the position; widen the f32 tolerance by that much and no more."""
    if mode is F32:
        return {"rtol": mode.rtol, "atol": mode.atol + max_pos * 2.0 ** -24 * float(x.abs().max())}
    return {}


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("N,Nh,D,rotary_dim,theta", [
    (1, 1, 16, 16, 10000.0),     # one token
    (6, 4, 64, 64, 500000.0),    # Llama-3 theta
    (5, 3, 64, 32, 10000.0),     # partial rotary (GPT-NeoX rotary_pct = 0.5, GPT-J rotary_dim)
    (7, 2, 10, 4, 10000.0),      # a head dim that is not a power of two
])
def test_rope_rotates_channel_pairs_by_position(mode, neox, N, Nh, D, rotary_dim, theta):
    x = mode.inp(torch.randn(N, Nh, D))
    pos = torch.randperm(512)[:N].to(torch.int32)  # unordered, gapped, not 0..N-1
    (y,) = run("rope", mode, {"x": x, "pos": pos}, D=D, theta=theta, rotary_dim=rotary_dim, neox=neox)
    want = rope_complex(x, pos, theta, rotary_dim, neox)
    assert_matches(y, want, mode, **rope_tol(mode, 512, x))
    # channels past rotary_dim pass through unchanged, bit for bit
    assert torch.equal(y[..., rotary_dim:].to(x.dtype), x[..., rotary_dim:])


def test_rope_neox_and_gptj_pair_different_channels():
    x, pos = torch.randn(4, 2, 8), torch.tensor([3, 1, 4, 1], dtype=torch.int32)
    (a,) = run("rope", F32, {"x": x, "pos": pos}, D=8, neox=True)
    (b,) = run("rope", F32, {"x": x, "pos": pos}, D=8, neox=False)
    assert (a - b).abs().max() > 0.1


def test_rope_at_position_zero_is_identity():
    x = torch.randn(3, 2, 16)
    (y,) = run("rope", F32, {"x": x, "pos": torch.zeros(3, dtype=torch.int32)}, D=16)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rope_long_context_positions_in_float64(neox):
    x = torch.randn(6, 2, 128)
    pos = torch.tensor([0, 1, 4095, 32767, 131071, 1000003], dtype=torch.int32)
    (y,) = run("rope", F64, {"x": x, "pos": pos}, D=128, theta=500000.0, neox=neox)
    assert_matches(y, rope_complex(x, pos, 500000.0, 128, neox), F64, rtol=1e-9, atol=1e-9)


def test_rope_long_context_positions_in_f32_within_the_angle_error():
    x = torch.randn(6, 2, 128)
    pos = torch.tensor([0, 1, 4095, 8191, 16383, 32767], dtype=torch.int32)
    (y,) = run("rope", F32, {"x": x, "pos": pos}, D=128, theta=500000.0)
    assert_matches(y, rope_complex(x, pos, 500000.0, 128, True), F32, **rope_tol(F32, 32767, x))


# --------------------------------------------------------------------------- MoE routing
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,E,k", [(1, 8, 1), (5, 8, 2), (4, 8, 8), (3, 64, 8), (6, 60, 4)])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_moe_route_is_topk_of_softmax(mode, N, E, k, renormalize):
    logits = distinct_rows(N, E, mode.storage, scale=2.0)
    w, idx = run("moe_route", mode, {"logits": logits}, E=E, k=k, renormalize=renormalize)
    p = torch.softmax(logits.to(torch.float64 if mode is F64 else torch.float32), dim=-1)
    want_w, want_idx = torch.topk(p, k, dim=-1)
    if renormalize:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    assert idx.dtype == torch.int32
    assert torch.equal(idx.long(), want_idx)
    assert_matches(w, want_w, F32 if mode is not F64 else F64, dtype=mode.f32_out)
    if renormalize and k == 1:
        assert torch.equal(w, torch.ones_like(w))


def deepseek_v3_route(logits, bias, k, renormalize, scaling):
    """DeepSeek-V3 routing with one expert group: choose by sigmoid + correction bias, weigh by
    the sigmoid alone."""
    scores = logits.sigmoid()
    idx = torch.topk(scores + bias, k, dim=-1).indices
    w = scores.gather(-1, idx)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling, idx


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,E,k", [(1, 8, 1), (5, 8, 2), (4, 16, 8), (3, 256, 8)])
@pytest.mark.parametrize("renormalize,scaling", [(True, 1.0), (True, 2.5), (False, 2.5)])
def test_moe_route_sigmoid_matches_deepseek_v3_formula(mode, N, E, k, renormalize, scaling):
    logits = distinct_rows(N, E, mode.storage, scale=2.0)
    bias = torch.randn(E)  # as large as the scores: the choice differs from topk(sigmoid)
    w, idx = run("moe_route_sigmoid", mode, {"logits": logits, "bias": bias}, E=E, k=k,
                 renormalize=renormalize, scaling=scaling)
    cd = torch.float64 if mode is F64 else torch.float32
    want_w, want_idx = deepseek_v3_route(logits.to(cd), bias.to(cd), k, renormalize, scaling)
    assert torch.equal(idx.long(), want_idx)
    assert_matches(w, want_w, F32 if mode is not F64 else F64, dtype=mode.f32_out)


def test_moe_route_sigmoid_bias_changes_the_choice_but_not_the_weights():
    logits = torch.randn(8, 16)
    bias = torch.zeros(16)
    bias[[3, 11]] = 10.0  # forces experts 3 and 11 to be chosen
    w, idx = run("moe_route_sigmoid", F32, {"logits": logits, "bias": bias}, E=16, k=2, renormalize=False)
    assert torch.equal(idx.sort(dim=-1).values, torch.tensor([[3, 11]] * 8, dtype=torch.int32))
    torch.testing.assert_close(w, logits.sigmoid().gather(-1, idx.long()), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,I,R,O", [(1, 7, 2, 9), (5, 64, 8, 48), (3, 1536, 16, 96)])
def test_lora_matches_two_linear_layers(mode, N, I, R, O):
    shrink = torch.nn.Linear(I, R, bias=False)   # weight [R, I]: PEFT's lora_A
    expand = torch.nn.Linear(R, O, bias=False)   # weight [O, R]: PEFT's lora_B
    with torch.no_grad():
        expand.weight.normal_()
    x = torch.randn(N, I)
    a, b, x = mode.inp(shrink.weight.detach()), mode.inp(expand.weight.detach()), mode.inp(x)
    (y,) = run("lora", mode, {"x": x, "lora_a": a, "lora_b": b, "scale": 0.5}, I=I, R=R, O=O)
    # the DSL layer computes in f32 (f64) and rounds once; so do the linears here
    cd = torch.float64 if mode is F64 else torch.float32
    with torch.no_grad():
        shrink.weight.copy_(a.float()), expand.weight.copy_(b.float())
        want = 0.5 * expand.to(cd)(shrink.to(cd)(x.to(cd)))
    assert_matches(y, want.to(mode.out), mode)


# --------------------------------------------------------------------------- attention
SHAPES = [(2, 7, 7), (1, 1, 9), (3, 4, 9)]       # (B, S, Skv): prefill, decode step, chunked prefill
HEADS = [(4, 4), (8, 2), (4, 1)]                 # (Hq, Hkv): MHA, GQA 4:1, MQA
SHAPE_IDS = ["prefill", "decode", "chunk"]
HEAD_IDS = ["mha", "gqa4", "mqa"]


def qkv(mode, B, S, Skv, Hq, Hkv, D, q_scale=1.0):
    q = mode.inp(torch.randn(B, S, Hq, D) * q_scale)
    k = mode.inp(torch.randn(B, Skv, Hkv, D))
    v = mode.inp(torch.randn(B, Skv, Hkv, D))
    return q, k, v


def default_positions(B, S, Skv):
    """Queries sit at the end of the keys."""
    kv = torch.arange(Skv).expand(B, Skv)
    return kv[:, Skv - S:], kv


def rope_bshd(x, pos, theta):
    """x [B, S, H, D], pos [B, S]: GPT-NeoX rotation in float64 through rope_complex."""
    B, S, H, D = x.shape
    return rope_complex(x.reshape(B * S, H, D), pos.reshape(-1), theta, D, True).reshape(B, S, H, D)


def sdpa(mode, q, k, v, *, allowed=None, bias=None, scale=None):
    """F.scaled_dot_product_attention on [B, S, H, D] tensors with an explicit float mask
    (`bias` plus -inf where `allowed` is false; both broadcast to [B, Hq, S, Skv]) and
    enable_gqa for grouped heads. Computed in the mode's reference dtype."""
    q, k, v = (mode.to_ref(t).transpose(1, 2) for t in (q, k, v))
    B, Hq, S, _ = q.shape
    mask = torch.zeros(B, Hq, S, k.shape[2], dtype=q.dtype)
    if bias is not None:
        mask = mask + bias.to(q.dtype)
    if allowed is not None:
        mask = mask.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != Hq)
    return out.transpose(1, 2)


def causal(q_pos, kv_pos, window=None):
    """[B, 1, S, Skv] bool: key j visible from query i."""
    d = q_pos[:, None, :, None] - kv_pos[:, None, None, :]
    return (d >= 0) & (d < window) if window is not None else d >= 0


def attn_tol(mode):
    # bf16: scores of D products and a softmax before the one rounding of the output
    return {"rtol": 2e-2, "atol": 2e-2} if mode is BF16 else {}


def stored(mode, t):
    """A float64 result as the program stores it (rotated q and k are rounded to T)."""
    return t.to(mode.storage).to(mode.ref) if mode is not F64 else t


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("B,S,Skv", SHAPES, ids=SHAPE_IDS)
def test_llama_attn_matches_sdpa_with_rope_and_causal_mask(mode, B, S, Skv, Hq, Hkv):
    D, theta = 16, 500000.0
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    (o,) = run("llama_attn", mode, {"q": q, "k": k, "v": v}, Hq=Hq, Hkv=Hkv, D=D, theta=theta)
    qp, kp = default_positions(B, S, Skv)
    want = sdpa(mode, stored(mode, rope_bshd(q, qp, theta)), stored(mode, rope_bshd(k, kp, theta)), v,
                allowed=causal(qp, kp))
    assert_matches(o, want, mode, **attn_tol(mode))


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_llama_attn_uses_given_positions_for_rope_and_mask(mode):
    # a left-padded batch after some decoding: positions are gapped and differ per sequence
    B, S, Skv, Hq, Hkv, D = 2, 3, 6, 4, 2, 8
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    kp = torch.tensor([[100, 101, 102, 103, 104, 105], [0, 2, 4, 6, 8, 10]])
    qp = torch.tensor([[103, 104, 105], [5, 7, 9]])  # 5 sees keys 0,2,4; 9 sees 0..8
    (o,) = run("llama_attn", mode, {"q": q, "k": k, "v": v}, q_positions=qp, kv_positions=kp,
               Hq=Hq, Hkv=Hkv, D=D)
    want = sdpa(mode, stored(mode, rope_bshd(q, qp, 10000.0)), stored(mode, rope_bshd(k, kp, 10000.0)), v,
                allowed=causal(qp, kp))
    assert_matches(o, want, mode, **attn_tol(mode))


def test_llama_attn_gqa_shares_each_kv_head_with_consecutive_query_heads():
    # enable_gqa semantics: query head h reads KV head h // (Hq / Hkv); check against an explicit repeat
    B, S, Hq, Hkv, D = 1, 5, 8, 2, 8
    q, k, v = qkv(F32, B, S, S, Hq, Hkv, D)
    (o,) = run("llama_attn", F32, {"q": q, "k": k, "v": v}, Hq=Hq, Hkv=Hkv, D=D)
    qp, kp = default_positions(B, S, S)
    qr = rope_bshd(q, qp, 10000.0).float()
    kr = rope_bshd(k, kp, 10000.0).float().repeat_interleave(Hq // Hkv, dim=2)
    want = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2),
                                          v.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2), is_causal=True)
    assert_matches(o, want.transpose(1, 2), F32)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("B,S,Skv", SHAPES, ids=SHAPE_IDS)
def test_mistral_attn_sees_only_the_last_window_keys(mode, B, S, Skv, Hq, Hkv):
    D, window = 16, 3
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    (o,) = run("mistral_attn", mode, {"q": q, "k": k, "v": v}, Hq=Hq, Hkv=Hkv, D=D, window=window)
    qp, kp = default_positions(B, S, Skv)
    want = sdpa(mode, stored(mode, rope_bshd(q, qp, 10000.0)), stored(mode, rope_bshd(k, kp, 10000.0)), v,
                allowed=causal(qp, kp, window))
    assert_matches(o, want, mode, **attn_tol(mode))


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("S,Skv", [(7, 7), (1, 9), (4, 9)], ids=SHAPE_IDS)
def test_bert_attn_masks_padding_and_gives_zeros_for_an_empty_sequence(mode, S, Skv, Hq, Hkv):
    B, D = 3, 16
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    kv_len = torch.tensor([Skv, 3, 0], dtype=torch.int32)  # full, padded, nothing to attend to
    (o,) = run("bert_attn", mode, {"q": q, "k": k, "v": v, "kv_len": kv_len}, Hq=Hq, Hkv=Hkv, D=D)
    assert_finite(o)
    assert torch.equal(o[2], torch.zeros_like(o[2]))
    allowed = (torch.arange(Skv)[None, :] < kv_len[:, None].long())[:, None, None, :]  # [B, 1, 1, Skv]
    want = sdpa(mode, q[:2], k[:2], v[:2], allowed=allowed[:2])  # bidirectional, no rope
    assert_matches(o[:2], want, mode, **attn_tol(mode))


def softcapped_attention(q, k, v, allowed, scale, softcap):
    """Gemma-2 eager attention written out: scale, soft-cap, mask, softmax, weighted sum."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("B,S,Skv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("query_scalar", [0.0, 24.0], ids=["scale_head_dim", "scale_query_scalar"])
def test_gemma2_attn_soft_caps_scores_inside_a_causal_window(mode, B, S, Skv, Hq, Hkv, query_scalar):
    D, softcap, window, theta = 16, 5.0, 4, 10000.0
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D, q_scale=8.0)
    (o,) = run("gemma2_attn", mode, {"q": q, "k": k, "v": v}, Hq=Hq, Hkv=Hkv, D=D, theta=theta,
               softcap=softcap, window=window, query_scalar=query_scalar)
    qp, kp = default_positions(B, S, Skv)
    scale = (query_scalar if query_scalar else D) ** -0.5
    cd = torch.float64 if mode is F64 else torch.float32
    qr, kr = (stored(mode, rope_bshd(t, p, theta)).to(cd) for t, p in ((q, qp), (k, kp)))
    want = softcapped_attention(qr, kr, v.to(cd), causal(qp, kp, window), scale, softcap)
    raw = torch.einsum("bihd,bjhd->bhij", qr, kr.repeat_interleave(Hq // Hkv, dim=2)) * scale
    assert raw.abs().max() > 1.5 * softcap  # the inputs reach well into the cap
    assert_matches(o, want.to(mode.out), mode, **attn_tol(mode))


def alibi_slopes_mpt(n_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """ALiBi slopes as MPT's gen_slopes computes them (a different construction from BLOOM's
    for head counts that are not powers of two, with the same result)."""
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float64) * (max_bias / n)
    slopes = 1.0 / torch.pow(2, m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


@pytest.mark.parametrize("n", [1, 6, 8, 12, 16])
def test_alibi_slopes_of_mpt_match_bloom_for_any_head_count(n):
    # a check of the independent slope function used below, against BLOOM's published formula
    transformers_bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    torch.testing.assert_close(alibi_slopes_mpt(n).float(), transformers_bloom._get_alibi_slopes(n, "cpu"))


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (6, 6), (12, 4)], ids=["h8", "h6", "h12_gqa"])
@pytest.mark.parametrize("B,S,Skv", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("max_bias", [8.0, 4.0])
def test_bloom_attn_adds_alibi_bias_per_head(mode, B, S, Skv, Hq, Hkv, max_bias):
    D = 16
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    (o,) = run("bloom_attn", mode, {"q": q, "k": k, "v": v}, Hq=Hq, Hkv=Hkv, D=D, max_bias=max_bias)
    qp, kp = default_positions(B, S, Skv)
    dist = (kp[:, None, None, :] - qp[:, None, :, None]).double()   # [B, 1, S, Skv], <= 0 where visible
    bias = alibi_slopes_mpt(Hq, max_bias)[None, :, None, None] * dist
    want = sdpa(mode, q, k, v, allowed=causal(qp, kp), bias=bias)
    assert_matches(o, want, mode, **attn_tol(mode))


@pytest.mark.parametrize("name", ["bloom_attn", "falcon_alibi_attn"])
def test_alibi_block_of_a_ranks_heads_equals_those_heads_of_the_whole(name):
    """alibi_heads / alibi_first (a tensor-parallel rank's block: heads 4 .. 7 of 8, or 3 .. 5 of 6 with BLOOM's
    slopes for a head count not a power of two): its outputs are the whole block's for those heads; heads outside
    the model's are an error at specialisation."""
    D, mode = 16, F64
    for H, first, n in ((8, 4, 4), (6, 3, 3)):
        q, k, v = qkv(mode, 2, 7, 7, H, H, D)
        (whole,) = run(name, mode, {"q": q, "k": k, "v": v}, Hq=H, Hkv=H, D=D)
        part = {"q": q[:, :, first:first + n], "k": k[:, :, first:first + n], "v": v[:, :, first:first + n]}
        (o,) = run(name, mode, part, Hq=n, Hkv=n, D=D, alibi_heads=H, alibi_first=first)
        torch.testing.assert_close(o, whole[:, :, first:first + n], rtol=1e-12, atol=1e-12)
        (own,) = run(name, mode, part, Hq=n, Hkv=n, D=D)   # its own slopes: not the same (the test can tell)
        assert not torch.allclose(own, o)
    if name == "bloom_attn":
        with pytest.raises(lf.DSLError, match="must lie within the model's heads"):
            lf.stdlib().specialise(name, Hq=4, Hkv=4, D=D, dtype="f32", alibi_heads=6, alibi_first=4)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("B,S,Skv", SHAPES, ids=SHAPE_IDS)
def test_gpt2_attn_is_plain_causal_attention(mode, B, S, Skv, Hq, Hkv):
    D = 16
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    (o,) = run("gpt2_attn", mode, {"q": q, "k": k, "v": v}, Hq=Hq, Hkv=Hkv, D=D)
    if S == Skv:  # torch's own causal mask
        qt, kt, vt = (mode.to_ref(t).transpose(1, 2) for t in (q, k, v))
        want = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=Hq != Hkv).transpose(1, 2)
    else:
        qp, kp = default_positions(B, S, Skv)
        want = sdpa(mode, q, k, v, allowed=causal(qp, kp))
    assert_matches(o, want, mode, **attn_tol(mode))


def test_gpt2_attn_decode_step_attends_to_every_cached_key():
    q, k, v = qkv(F32, 2, 1, 9, 4, 4, 8)
    (o,) = run("gpt2_attn", F32, {"q": q, "k": k, "v": v}, Hq=4, Hkv=4, D=8)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert_matches(o, want, F32)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("B,S,Skv,NB,max_distance", [
    (2, 7, 7, 32, 128),     # all distances in the exact buckets
    (1, 1, 9, 32, 128),     # decode step
    (2, 40, 40, 8, 16),     # log-spaced buckets and the clamp at max_distance
    (1, 5, 40, 16, 20),
], ids=["short", "decode", "log_buckets", "chunk_log"])
def test_t5_attn_adds_relative_bias_from_t5_buckets(mode, bidirectional, B, S, Skv, NB, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    Hq, Hkv, D = 4, 4, 8
    q, k, v = qkv(mode, B, S, Skv, Hq, Hkv, D)
    rel_bias = torch.randn(NB, Hq) * 2
    (o,) = run("t5_attn", mode, {"q": q, "k": k, "v": v, "rel_bias": rel_bias}, Hq=Hq, Hkv=Hkv, D=D, NB=NB,
               bidirectional=bidirectional, max_distance=max_distance)
    qp, kp = default_positions(B, S, Skv)
    rel = kp[:, None, :] - qp[:, :, None]  # [B, S, Skv]: memory - query, as T5 defines it
    bucket = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=NB,
                                                      max_distance=max_distance)
    assert bucket.unique().numel() > (4 if S > 1 else 1)  # several buckets are exercised
    bias = rel_bias.double()[bucket].permute(0, 3, 1, 2)  # [B, Hq, S, Skv]
    allowed = None if bidirectional else causal(qp, kp)
    want = sdpa(mode, q, k, v, allowed=allowed, bias=bias, scale=1.0)  # T5 does not scale scores
    assert_matches(o, want, mode, **attn_tol(mode))
