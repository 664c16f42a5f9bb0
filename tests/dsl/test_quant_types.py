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
    expect(err, 3, 12, "operator '*' on an i8 value: the quantised types are storage", hint="f32(...)")


def test_reductions_and_products_of_8_bit_tensors_are_errors():
    err = load_error(src("""\
        dims I, O
        layer f(q: f8e4m3[O, I]) -> f8e4m3[O, 1] {
            return max(q, axis=-1)
        }
        """))
    expect(err, 3, 12, "max() on an f8e4m3 tensor: the quantised types are storage")
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


# ---- 4-bit types: u4 / i4 packed two a byte --------------------------------------------------
def test_4_bit_packing_is_two_a_byte_low_nibble_first():
    from layerforge.dsl.types import DType, pack_4bit, unpack_4bit
    b = torch.tensor([[0x21, 0xF8]], dtype=torch.uint8)
    assert unpack_4bit(b, DType.u4).tolist() == [[1, 2, 8, 15]]
    assert unpack_4bit(b, DType.i4).tolist() == [[1, 2, -8, -1]]
    g = seeded_generator("pack_4bit")
    for dt, lo, hi in ((DType.u4, 0, 16), (DType.i4, -8, 8)):
        v = torch.randint(lo, hi, (3, 5, 10), generator=g)
        packed = pack_4bit(v)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 5)
        assert torch.equal(unpack_4bit(packed, dt).long(), v)


def test_4_bit_inputs_are_packed_bytes_and_casts_saturate():
    text = src("""\
        dims I
        layer f(q: i4[I], x: f32[I]) -> (f32[I], u4[I], i4[I]) {
            return f32(q), u4(x), i4(x)
        }
        """)
    x = torch.tensor([0.4, 0.6, 2.5, -1.0, 15.4, 99.0, -7.6, -100.0])
    q = torch.tensor([0x7F, 0x08, 0x10, 0xEE], dtype=torch.uint8)   # nibbles 15 7 | 8 0 | 0 1 | 14 14
    deq, u4, i4 = evaluate(text, {"q": q, "x": x}, I=8)
    assert deq.tolist() == [-1, 7, -8, 0, 0, 1, -2, -2]
    from layerforge.dsl.types import DType, unpack_4bit
    assert u4.dtype == torch.uint8 and u4.shape == (4,)   # outputs packed as inputs are
    assert unpack_4bit(u4, DType.u4).tolist() == [0, 1, 2, 0, 15, 15, 0, 0]
    assert unpack_4bit(i4, DType.i4).tolist() == [0, 1, 2, -1, 7, 7, -8, -8]


def test_4_bit_inputs_are_checked_as_packed():
    text = src("""\
        dims I
        layer f(q: u4[I]) -> f32[I] {
            return f32(q)
        }
        """)
    prog = lf.loads(text, "q.lf")
    layer = prog.specialise("f", dims={"I": 8}, dtype="bf16")
    with pytest.raises(lf.LayerInputError, match=r"must be u4 \(torch.uint8, packed two a byte\)"):
        lf.evaluate(layer.function, {"q": torch.zeros(4, dtype=torch.int8)})
    with pytest.raises(lf.LayerInputError, match="dim 0 must be 8, got 16"):   # 8 bytes hold 16 values
        lf.evaluate(layer.function, {"q": torch.zeros(8, dtype=torch.uint8)})
    assert lf.evaluate(layer.function, {"q": torch.zeros(4, dtype=torch.uint8)})[0].shape == (8,)


def test_4_bit_arithmetic_is_an_error():
    err = load_error(src("""\
        dims I
        layer f(q: u4[I]) -> u4[I] {
            return q + q
        }
        """))
    expect(err, 3, 12, "operator '+' on an u4 value: the quantised types are storage", hint="f32(...)")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_u4_group_quantiser_is_the_runtimes(group):
    """quantize_u4_groups (f64 reference) gives runtime/quant.py quantize_u4's q, zeros and scales."""
    from layerforge.dsl.types import DType, unpack_4bit
    from layerforge.runtime.quant import quantize_u4
    w = torch.randn(40, 256, generator=seeded_generator("u4_groups", group))
    layer = lf.stdlib().specialise("quantize_u4_groups", dims={"O": 40, "I": 256, "G": group}, dtype="f32")
    q, s, z = lf.evaluate(layer.function, {"w": w}, precision="float64")
    rq, rz, rs = quantize_u4(w, group)
    assert torch.equal(unpack_4bit(q, DType.u4).long(), rq) and torch.equal(unpack_4bit(z, DType.u4).long(), rz)
    torch.testing.assert_close(s.double(), rs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("precision", ["program", "float64"])
def test_u4_linear_is_the_awq_checkpoints_meaning(precision):
    """An AWQ (GEMM) checkpoint's int32 words, unpacked (runtime/quant.py unpack_awq) and packed two a
    byte, through the stdlib's u4_linear: x @ W.T with W = T((q - z) s), as dequantize_awq defines W."""
    from layerforge.dsl.types import pack_4bit
    from layerforge.runtime.quant import _words, dequantize_awq, unpack_awq, AWQ_ORDER
    g = seeded_generator("u4_awq", precision)
    K, N, G, M = 256, 64, 64, 3
    qv = torch.randint(0, 16, (K, N), generator=g)
    zv = torch.randint(0, 16, (K // G, N), generator=g)
    scales = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).bfloat16()
    order = list(AWQ_ORDER)
    qweight = _words(qv.view(K, N // 8, 8)[..., order])
    qzeros = _words(zv.view(K // G, N // 8, 8)[..., order])
    q, z, s = unpack_awq(qweight, qzeros, scales, G)
    assert torch.equal(q, qv.T) and torch.equal(z, zv.T)
    x = torch.randn(M, K, generator=g).bfloat16()
    layer = lf.stdlib().specialise("u4_linear", dims={"O": N, "I": K, "G": G}, dtype="bf16")
    y, = lf.evaluate(layer.function, {"x": x, "wq": pack_4bit(q), "ws": s, "wz": pack_4bit(z)}, precision=precision)
    w = dequantize_awq(qweight, qzeros, scales, G)
    if precision == "float64":
        torch.testing.assert_close(y, x.double() @ w.T, rtol=1e-12, atol=1e-12)
    else:   # W rounded once to bf16, the product summed in f32 and rounded to bf16
        want = (x.float() @ w.bfloat16().float().T).bfloat16()
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_i4_linear_is_symmetric_group_scales():
    from layerforge.dsl.types import pack_4bit
    g = seeded_generator("i4_linear")
    K, N, G = 128, 32, 32
    q = torch.randint(-8, 8, (N, K), generator=g)
    s = torch.rand(N, K // G, generator=g).bfloat16()
    x = torch.randn(4, K, generator=g).bfloat16()
    layer = lf.stdlib().specialise("i4_linear", dims={"O": N, "I": K, "G": G}, dtype="bf16")
    y, = lf.evaluate(layer.function, {"x": x, "wq": pack_4bit(q), "ws": s}, precision="float64")
    torch.testing.assert_close(y, x.double() @ (q.double() * s.double().repeat_interleave(G, 1)).T, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("name", ["fp8_block_linear"])
def test_fp8_weight_layers_are_the_runtimes_fp8_layouts(name):
    """e4m3 weights with 128 x 128 block scales (DeepSeek-V3's) mean what runtime/quant.py's pack_fp8
    block layout dequantises to (float64: x = I gives W^T)."""
    from layerforge.runtime.quant import dequantize, pack_fp8
    g = seeded_generator("fp8-weight-layers", name)
    O, I = 256, 384
    q = (torch.randn(O, I, generator=g) * 40).to(torch.float8_e4m3fn)
    block = name == "fp8_block_linear"
    s = torch.rand(*((O // 128, I // 128) if block else (O,)), generator=g) + 0.01
    layer = lf.stdlib().specialise(name, dims={"O": O, "I": I, "G": 128}, dtype="bf16")
    (wt,) = lf.evaluate(layer.function, {"x": torch.eye(I, dtype=torch.bfloat16), "wq": q, "ws": s},
                        precision="float64")
    want = dequantize(pack_fp8(q, s, 128 if block else None))
    torch.testing.assert_close(wt.T, want, rtol=0, atol=0)


def test_int8_group_linear_is_the_i8_group_layout():
    from layerforge.runtime.quant import dequantize, pack_i8
    g = seeded_generator("int8-group")
    q = torch.randint(-128, 128, (64, 256), generator=g).to(torch.int8)
    s = (torch.rand(64, 4, generator=g) / 100).to(torch.bfloat16)
    layer = lf.stdlib().specialise("int8_group_linear", dims={"O": 64, "I": 256, "G": 64}, dtype="bf16")
    (wt,) = lf.evaluate(layer.function, {"x": torch.eye(256, dtype=torch.bfloat16), "wq": q, "ws": s},
                        precision="float64")
    torch.testing.assert_close(wt.T, dequantize(pack_i8(q, s, 64)), rtol=0, atol=0)
