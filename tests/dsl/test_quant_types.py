"""The 8-bit storage types (i8, f8e4m3, f8e5m2) in the DSL: tensors of them are parameters and
cast results; arithmetic on them is an error pointing at the expression; a cast to them quantises
(nearest even, saturating); the stdlib's quantised layers (dsl/stdlib/quant.lf) mean what the
runtime's quantised products compute: int8 per-channel weights as runtime/quant.py's i8 layout, the
FP8 W8A8 per-token layer quantize_fp8_rows(x, K)'s bytes and scales exactly."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.runtime.quant import (dequantize, dequantize_fp8_rows, pack_i8, quantize_fp8, quantize_fp8_rows,
                                      quantize_i8)

from ..seeding import seeded_generator
from .test_errors import expect, load_error, src

DIMS = dict(I=256, O=96, H=256, F=64)


def evaluate(text_or_name: str, inputs: dict, *, stdlib: bool = False, precision: str = "program", **dims):
    prog = lf.stdlib() if stdlib else lf.loads(text_or_name, "q.lf")
    name = text_or_name if stdlib else prog.names[-1]
    layer = prog.specialise(name, dims=dims or None, dtype="bf16")
    out = lf.evaluate(layer.function, inputs, precision=precision)
    return out[0] if len(out) == 1 else out


# ---- check errors ----------------------------------------------------------------------------
def test_arithmetic_on_an_8_bit_tensor_is_an_error():
    err = load_error(src("""\
        dims I, O
        layer f(q: i8[O, I], s: f32[O]) -> f32[O, I] {
            return q * unsqueeze(s, 1)
        }
        """))
    expect(err, 3, 12, "operator '*' on an i8 value: the 8-bit types are storage", hint="f32(...)")


def test_reductions_and_products_of_8_bit_tensors_are_errors():
    err = load_error(src("""\
        dims I, O
        layer f(q: f8e4m3[O, I]) -> f8e4m3[O, 1] {
            return max(q, axis=-1)
        }
        """))
    expect(err, 3, 12, "max() on an f8e4m3 tensor: the 8-bit types are storage")
    err = load_error(src("""\
        dims I, O
        dynamic N
        layer f(x: T[N, I], q: f8e5m2[O, I]) -> T[N, O] {
            return linear(x, q)
        }
        """))
    expect(err, 4, 12, "linear(): x and the weight must be float tensors of one dtype")


def test_8_bit_scalars_are_not_a_type():
    err = load_error(src("""\
        dims I
        layer f(x: f32[I], s: i8) -> f32[I] {
            return x
        }
        """))
    expect(err, 2, 23, "unknown dtype 'i8'")


# ---- casts quantise --------------------------------------------------------------------------
def test_casts_to_8_bit_types_round_to_nearest_even_and_saturate():
    text = src("""\
        dims I
        layer f(x: f32[I]) -> (i8[I], f8e4m3[I], f8e5m2[I]) {
            return i8(x), f8e4m3(x), f8e5m2(x)
        }
        """)
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 127.6, -300.0, 500.0, 1.0e6, 0.3, -7.0])
    i8, e4, e5 = evaluate(text, {"x": x}, I=10)
    assert i8.dtype == torch.int8 and i8.tolist() == [0, 2, 2, -2, 127, -128, 127, 127, 0, -7]
    assert e4.dtype == torch.float8_e4m3fn and e4.float().tolist()[4:8] == [128.0, -288.0, 448.0, 448.0]
    assert e5.dtype == torch.float8_e5m2 and e5.float()[7].item() == 57344.0
    assert torch.equal(e4.float()[:4], torch.tensor([0.5, 1.5, 2.5, -2.5]))


# ---- the stdlib's quantised layers ------------------------------------------------------------
def test_int8_linear_is_the_kernels_i8_layout(precision):
    """W = T(q s): q int8 [O, I], s [O] in T, the product rounded once to T, as runtime/quant.py's
    i8 layout (group 0) and its float64 reference `dequantize`."""
    gen = seeded_generator("dsl-int8-linear", precision)
    w = torch.randn(DIMS["O"], DIMS["I"], generator=gen) / 16
    qw = pack_i8(*quantize_i8(w, 0), 0, torch.bfloat16)
    x = torch.randn(7, DIMS["I"], generator=gen).to(torch.bfloat16)
    y = evaluate("int8_linear", {"x": x, "wq": qw.qweight, "ws": qw.wscale}, stdlib=True, precision=precision,
                 I=DIMS["I"], O=DIMS["O"])
    ref = x.double() @ dequantize(qw).T
    assert y.dtype == (torch.bfloat16 if precision == "program" else torch.float64) and y.shape == (7, DIMS["O"])
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3


@pytest.fixture(params=["program", "float64"])
def precision(request):
    return request.param


def test_fp8_per_token_layer_makes_the_runtimes_bytes():
    """The W8A8 layer's quantisation (written in the DSL) gives quantize_fp8_rows(x, K)'s e4m3 bytes
    and scales bit for bit, a row of zeros included; the layer's output is the product of those
    operands (the runtime's fp8_gemm meaning) within bf16's rounding."""
    gen = seeded_generator("dsl-fp8-token")
    x = (torch.randn(6, 256, generator=gen) * torch.logspace(-3, 3, 6)[:, None]).to(torch.bfloat16)
    x[2] = 0
    text = src("""\
        dims I
        dynamic N
        layer quant(x: T[N, I]) -> (f8e4m3[N, I], f32[N, 1]) {
            xf = f32(x)
            amax = max(abs(xf), axis=-1)
            return f8e4m3(xf * where(amax > 0.0, 448.0 / amax, 0.0)), amax * (1.0 / 448.0)
        }
        """)
    q, s = evaluate(text, {"x": x}, I=256)
    rq, rs = quantize_fp8_rows(x, 256)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    w = torch.randn(96, 256, generator=gen) / 16
    wq, ws = quantize_fp8(w)
    ws = ws.reshape(96).float()
    y = evaluate("fp8_linear_per_token", {"x": x, "wq": wq, "ws": ws}, stdlib=True, I=256, O=96)
    ref = dequantize_fp8_rows(rq, rs, 256) @ (wq.double() * ws.double()[:, None]).T
    assert torch.isfinite(y).all() and y[2].abs().max() == 0
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3
