"""The fused per-token FP8 row kernels (dsl/stdlib/quant.lf rms_norm_fp8_per_token, swiglu_fp8_per_token;
codegen/row.py storing e4m3 bytes) against the float64 reference evaluator, on fresh random inputs with
an all-zero row, a row with one outlier (the others quantise into e4m3's subnormals) and a row of large
values (its amax element rounds to 448 or just past it: satfinite), outputs poisoned first (e4m3 NaN
bytes 0x7f, NaN scales): every byte and scale written, never a NaN; the scales within 1e-5 relative
(the row's amax in f32 against float64); dequantised q * scale within one e4m3 step of the reference's
(2^-3 of the value, 2^-9 of the scale in the subnormals) and the codes equal for all but a few (the f32
row against float64 crossing a rounding midpoint). sm_80 / sm_86 run the software e4m3 rounding,
sm_89+ cvt.rn.satfinite. On sm_90 the outputs are fp8_gemm's per-token operands as they are. The
i8 and f8e4m3 round trip layers of tests/codegen/test_row_quant8.py against the evaluator, bit for bit."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.layers import LayerModule

from ..seeding import seeded_generator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FUSED = ["rms_norm_fp8_per_token", "swiglu_fp8_per_token"]
ROWS = [1, 7, 128, 1000]
WIDTHS = [4096, 5120, 1000]
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def fused_module(prog, name, dtype, w):
    dims = {"F": w} if name.startswith("swiglu") else {"H": w}
    return LayerModule(prog.specialise(name, dtype=dtype, **dims), device="cuda")


def inputs(name, rows, w, dtype, gen):
    """x [rows, H] (or gate_up [rows, 2F]) ~ N(0, 4); row 1 zeros, row 2 one outlier 1e3 times the
    others, row 3 values ~1e4 (their squares and products stay far inside f32)."""
    cols = 2 * w if name.startswith("swiglu") else w
    x = torch.randn(rows, cols, generator=gen) * 2
    if rows > 1:
        x[1] = 0
    if rows > 2:
        x[2] *= 1e-3
        x[2, cols // 3] = 5.0
    if rows > 3:
        x[3] = torch.randn(cols, generator=gen) * 1e4
    return x.to(DTYPES[dtype]).cuda()


def poisoned(rows, w):
    q = torch.full((rows, w), 0x7f, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)   # e4m3 NaN
    return q, torch.full((rows,), float("nan"), dtype=torch.float32, device="cuda")


def check_quantised(q, s, q_ref, s_ref):
    """q (float8_e4m3fn [N, W]) and s (f32 [N]) against the reference's (s_ref in float64)."""
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and q.shape == q_ref.shape
    qv, qr = q.double().cpu(), q_ref.double().cpu()
    s, s_ref = s.double().cpu(), s_ref.double().cpu()
    assert not torch.isnan(qv).any(), "a NaN byte: an element unwritten (poisoned 0x7f) or a NaN code"
    assert torch.isfinite(s).all(), "a scale unwritten (poisoned NaN) or not finite"
    assert ((s - s_ref).abs() <= 1e-5 * s_ref.abs()).all(), (s - s_ref).abs().div(s_ref.abs()).nan_to_num().max()
    assert (s[s_ref == 0] == 0).all() and (qv[s_ref == 0] == 0).all()   # a row of zeros: zeros
    assert (qv.abs() <= 448).all()
    got, ref = qv * s[:, None], qr * s_ref[:, None]
    step = 2.0 ** -3 * ref.abs() + 2.0 ** -9 * s_ref[:, None] + 1e-5 * ref.abs()   # one e4m3 step (+ the scale's)
    bad = (got - ref).abs() > step
    assert not bad.any(), f"{int(bad.sum())} elements past one e4m3 step, worst {((got - ref).abs() / step).max():.3g}"
    differ = int((qv != qr).sum())
    assert differ <= max(2, qv.numel() // 1000), f"{differ} of {qv.numel()} codes differ from the reference's"


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", FUSED)
def test_fused_fp8_kernel_against_float64(prog, name, dtype, w, rows):
    mod = fused_module(prog, name, dtype, w)
    assert mod.kernel_reason is None
    gen = seeded_generator("row-fp8", name, dtype, w, rows)
    x = inputs(name, rows, w, dtype, gen)
    tensors = {mod.input_names[0]: x}
    if name.startswith("rms"):
        with torch.no_grad():
            mod.gamma.copy_((torch.randn(w, generator=gen) * 0.5 + 1).to(DTYPES[dtype]))
        tensors["gamma"] = mod.gamma
    q_ref, s_ref = lf.evaluate(mod.function, {**tensors, **mod._scalars}, precision="float64")
    out = poisoned(rows, w)
    q, s = mod(x, out=out)
    torch.cuda.synchronize()
    assert q.data_ptr() == out[0].data_ptr() and s.data_ptr() == out[1].data_ptr()
    check_quantised(q, s, q_ref, s_ref)
    q2, s2 = mod(x)   # outputs it allocates: the same bytes
    assert q2.dtype == torch.float8_e4m3fn and s2.shape == (rows,)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_unaligned_tensors_take_the_narrow_plan(prog, dtype):
    """Outputs at odd byte offsets: the 1-byte plan's element stores, the same values."""
    mod = fused_module(prog, "swiglu_fp8_per_token", dtype, 1000)
    x = inputs("swiglu_fp8_per_token", 7, 1000, dtype, seeded_generator("row-fp8-odd", dtype))
    q_ref, s_ref = lf.evaluate(mod.function, {"gate_up": x}, precision="float64")
    qb = torch.full((7 * 1000 + 1,), 0x7f, dtype=torch.uint8, device="cuda")[1:].view(torch.float8_e4m3fn)
    q, s = mod(x, out=(qb.view(7, 1000), torch.full((7,), float("nan"), device="cuda")))
    torch.cuda.synchronize()
    check_quantised(q, s, q_ref, s_ref)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the FP8 wgmma GEMM needs an sm_90 GPU")
@pytest.mark.parametrize("name", FUSED)
def test_outputs_feed_the_per_token_fp8_gemm(prog, name):
    """q [N, K] and s [N] go to runtime/quant.py fp8_gemm ("token" scaling) as they are: its product is
    float64 of the same dequantised operands within the GEMM's own 1e-2 (tests/gpu/test_fp8_gemm.py)."""
    import dataclasses

    from layerforge.runtime.quant import dequantize, fp8_gemm, pack_fp8, quantize_fp8
    k, n, rows = 4096, 1024, 128
    mod = fused_module(prog, name, "bf16", k)
    gen = seeded_generator("row-fp8-gemm", name)
    x = inputs(name, rows, k, "bf16", gen)
    q, s = mod(x)
    qw = pack_fp8(*quantize_fp8(torch.randn(n, k, generator=gen) / k ** 0.5), None, torch.bfloat16)
    qw = dataclasses.replace(qw, qweight=qw.qweight.cuda(), wscale=qw.wscale.cuda())
    y = fp8_gemm(q, s, qw)
    ref = (q.double() * s.double()[:, None]) @ dequantize(qw).T.cuda()
    assert not torch.isnan(y).any()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


SMALL = """
layer deq_rows(q: f8e4m3[N, H], s: f32[N]) -> f32[N, H] { return f32(q) * unsqueeze(s, -1) }
layer quant_i8(x: T[N, H], s: f32[H]) -> i8[N, H] { return i8(f32(x) / s) }
layer from_i8(q: i8[N, H]) -> (f8e4m3[N, H], i32[N, H], f32[N, H]) { return f8e4m3(q), i32(q), f32(q) }
"""


@pytest.mark.parametrize("name", ["deq_rows", "quant_i8", "from_i8"])
def test_i8_and_f8e4m3_round_trips_are_bit_exact(name):
    """Loads of i8 / e4m3 (every code, NaN codes as NaN) and casts to them (nearest even, saturating),
    against the evaluator in its program precision (f32, as the kernel computes), bit for bit."""
    layer = lf.loads(SMALL).specialise(name, dtype="bf16", H=256)
    mod = LayerModule(layer, device="cuda")
    gen = seeded_generator("row-q8", name)
    if name == "deq_rows":
        codes = torch.arange(256, dtype=torch.int32).repeat(1, 9)[:, :2048].reshape(8, 256).to(torch.uint8)
        args = (codes.view(torch.float8_e4m3fn).cuda(), (torch.rand(8, generator=gen) + 0.5).cuda())
    elif name == "quant_i8":   # ties at +-0.5 steps, values past +-128
        x = torch.cat([torch.arange(-160, 160, 0.5)[:512].reshape(2, 256), torch.randn(6, 256, generator=gen) * 90])
        args = (x.to(torch.bfloat16).cuda(),)
        with torch.no_grad():
            mod.s.copy_(torch.ones(256))
    else:
        args = (torch.arange(-128, 128, dtype=torch.int32).to(torch.int8).repeat(8, 1).cuda(),)
    inputs_ = dict(zip(mod.input_names, args))
    inputs_.update({k: getattr(mod, a) for k, a in mod._weights.items()})
    ref = lf.evaluate(mod.function, inputs_)
    got = mod(*args)
    got = got if isinstance(got, tuple) else (got,)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype
        if g.dtype == torch.float8_e4m3fn:
            g, r = g.view(torch.uint8), r.view(torch.uint8)
        assert torch.equal(g.cpu(), r.cpu()) if not g.is_floating_point() else \
            torch.equal(g.cpu().nan_to_num(7.0), r.cpu().nan_to_num(7.0))
