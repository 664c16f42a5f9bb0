"""linear(x, w[, b]): torch.nn.functional.linear in the DSL (weight [out, in]); its check
errors point at the call, and the reference (every stdlib product layer) matches F.linear and
the epilogue written here in torch, in float64 and in bf16 storage."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .reference_checks import BF16, F32, F64, MODES, assert_matches, run
from .test_errors import expect, load_error, src


# ---- check errors --------------------------------------------------------------------------
def test_linear_inner_dims_differ():
    err = load_error(src("""\
        dims I, O, K
        dynamic N
        layer f(x: T[N, I], w: T[O, K]) -> T[N, O] {
            return linear(x, w)
        }
        """))
    expect(err, 4, 12, "linear(): x's last dim I differs from the weight's in-features K",
           hint="the weight is [out, in]")


def test_linear_dtypes_differ():
    err = load_error(src("""\
        dims I, O
        dynamic N
        layer f(x: T[N, I], w: f32[O, I]) -> T[N, O] {
            return linear(x, w)
        }
        """))
    expect(err, 4, 12, "linear(): x and the weight must be float tensors of one dtype")


def test_linear_bias_shape():
    err = load_error(src("""\
        dims I, O
        dynamic N
        layer f(x: T[N, I], w: T[O, I], b: T[I]) -> T[N, O] {
            return linear(x, w, b)
        }
        """))
    expect(err, 4, 25, "linear(): the bias must be [O] (the weight's out-features), got T[I]")


def test_linear_bias_dtype():
    err = load_error(src("""\
        dims I, O
        dynamic N
        layer f(x: T[N, I], w: T[O, I], b: f32[O]) -> T[N, O] {
            return linear(x, w, b)
        }
        """))
    expect(err, 4, 25, "the bias must be T like x, got f32")


def test_linear_weight_rank():
    err = load_error(src("""\
        dims I
        dynamic N
        layer f(x: T[N, I], w: T[I]) -> T[N, I] {
            return linear(x, w)
        }
        """))
    expect(err, 4, 22, "linear(): the weight must be [out, in], got T[I]", hint="torch.nn.Linear's layout")


def test_linear_result_shape_is_checked_against_the_declaration():
    err = load_error(src("""\
        dims I, O
        dynamic N
        layer f(x: T[N, I], w: T[O, I]) -> T[N, I] {
            return linear(x, w)
        }
        """))
    expect(err, 4, 12, "returned value has shape [N, O] but the signature declares [N, I]")


# ---- the reference against torch -----------------------------------------------------------
N_K_O = [(1, 8, 24), (5, 64, 48), (16, 96, 160)]


def _rms(x, g, eps, offset=0.0):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (g + offset)


def _gated(y, act):
    g, u = y.chunk(2, dim=-1)
    return act(g) * u


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,K,O", N_K_O)
def test_linear_layer_matches_F_linear(mode, N, K, O):
    x, w = mode.inp(torch.randn(N, K)), mode.inp(torch.randn(O, K) / K ** 0.5)
    (y,) = run("linear_layer", mode, {"x": x, "w": w}, I=K, O=O)
    want = F.linear(mode.to_ref(x).double(), mode.to_ref(w).double())
    assert_matches(y, want.to(mode.out), mode)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("N,K,O", N_K_O)
def test_linear_bias_matches_F_linear(mode, N, K, O):
    x, w, b = mode.inp(torch.randn(N, K)), mode.inp(torch.randn(O, K) / K ** 0.5), mode.inp(torch.randn(O))
    (y,) = run("linear_bias", mode, {"x": x, "w": w, "b": b}, I=K, O=O)
    want = F.linear(*(mode.to_ref(t).double() for t in (x, w, b)))
    assert_matches(y, want.to(mode.out), mode)


def test_linear_accumulates_in_f32_and_rounds_once():
    """bf16 inputs: the product of f32 accumulation rounded once to bf16, bias added before the
    rounding (F.linear's meaning), not a bf16 running sum."""
    x = torch.randn(4, 512).to(torch.bfloat16)
    w = torch.randn(8, 512).to(torch.bfloat16)
    b = torch.randn(8).to(torch.bfloat16)
    (y,) = run("linear_bias", BF16, {"x": x, "w": w, "b": b}, I=512, O=8)
    want = (x.float() @ w.float().T + b.float()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


@pytest.mark.parametrize("mode", [F32, F64], ids=str)
@pytest.mark.parametrize("N,K,O", N_K_O)
def test_linear_residual(mode, N, K, O):
    x, w, r = mode.inp(torch.randn(N, K)), mode.inp(torch.randn(O, K) / K ** 0.5), mode.inp(torch.randn(N, O))
    (y,) = run("linear_residual", mode, {"x": x, "w": w, "res": r}, I=K, H=O)
    want = mode.to_ref(r).double() + F.linear(mode.to_ref(x).double(), mode.to_ref(w).double())
    assert_matches(y, want.to(mode.out), mode)


@pytest.mark.parametrize("mode", [F32, F64], ids=str)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("N,K,O", N_K_O)
def test_rms_norm_linear(mode, N, K, O, gemma):
    x, g, w = mode.inp(torch.randn(N, K) * 3), mode.inp(torch.randn(K)), mode.inp(torch.randn(O, K) / K ** 0.5)
    name = "gemma_rms_norm_linear" if gemma else "rms_norm_linear"
    (y,) = run(name, mode, {"x": x, "gamma": g, "w": w, "eps": 1e-5}, H=K, O=O)
    xr, gr, wr = (mode.to_ref(t).double() for t in (x, g, w))
    want = F.linear(_rms(xr, gr, 1e-5, 1.0 if gemma else 0.0), wr)
    assert_matches(y, want.to(mode.out), mode)


GATED = [("gate_up_swiglu", F.silu, False, False), ("rms_norm_gate_up_swiglu", F.silu, True, False),
         ("gemma_rms_norm_gate_up_geglu", lambda t: F.gelu(t, approximate="tanh"), True, True)]


@pytest.mark.parametrize("mode", [F32, F64], ids=str)
@pytest.mark.parametrize("name,act,norm,gemma", GATED, ids=[g[0] for g in GATED])
@pytest.mark.parametrize("N,K,O", N_K_O)
def test_gated_products(mode, name, act, norm, gemma, N, K, O):
    Fo = O // 2
    x, g, w = mode.inp(torch.randn(N, K) * 2), mode.inp(torch.randn(K)), mode.inp(torch.randn(2 * Fo, K) / K ** 0.5)
    inputs = {"x": x, "w": w, **({"gamma": g, "eps": 1e-6} if norm else {})}
    (y,) = run(name, mode, inputs, H=K, F=Fo)
    xr, gr, wr = (mode.to_ref(t).double() for t in (x, g, w))
    if norm:
        xr = _rms(xr, gr, 1e-6, 1.0 if gemma else 0.0)
    want = _gated(F.linear(xr, wr), act)
    assert_matches(y, want.to(mode.out), mode)
