"""The Hopper FP8 GEMM (codegen/gemm.py fp8, runtime/quant.fp8_gemm; sm_90 only) and the per-token
activation quantisation before it (codegen/dequant.QuantRowsPlan group 0).

The quantisation must make quantize_fp8_rows(x, K)'s bytes and scales exactly. The product is checked
against float64 of the same e4m3 operands and scales, outputs poisoned with NaN first: what is left is
the tensor cores' accumulation and the output's rounding, 1e-2 relative (bf16's half step is 2^-9 a
value). M from 1 to 8192, N and K off the tiles, bias, the gated activations, rows past M untouched,
graph capture, and the layer route (QuantLinear at prefill rows) against the unquantised product
within the format's error (e4m3: 3 mantissa bits, ~2.5 % RMS: 5e-2)."""
import dataclasses

import pytest
import torch

from layerforge.runtime.linear import LinearInputError
from layerforge.runtime.quant import (FP8_GEMM_MIN_ROWS, QuantLinear, dequantize, dequantize_fp8_rows, fp8_gemm,
                                     pack_fp8, quantize_fp8, quantize_fp8_rows, quantize_fp8_rows_cuda)

from ..seeding import seeded_generator
from .products import epilogue, replayed

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the FP8 wgmma GEMM needs an sm_90 GPU", allow_module_level=True)


def rel_err(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


def operands(m, n, k, gen, dtype=torch.bfloat16, scale_rows=True):
    """x with rows of very different sizes (each token's scale matters), W with per-row scales."""
    x = torch.randn(m, k, generator=gen)
    if scale_rows:
        x = x * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=gen) / k ** 0.5 * torch.logspace(-1, 1, n)[:, None]
    qw = pack_fp8(*quantize_fp8(w), None, dtype)
    return x.to(dtype).cuda(), on_gpu(qw)


def on_gpu(qw):
    return dataclasses.replace(qw, qweight=qw.qweight.cuda(), wscale=qw.wscale.cuda())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 127, 1000])
@pytest.mark.parametrize("k", [8, 3000, 4096, 14336, 28672])
def test_per_token_quantisation_is_the_reference_bytes(k, m, dtype):
    gen = seeded_generator("fp8-tok", k, m, str(dtype))
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    x[0, :] = 0   # an all-zero row: q 0 and scale 0
    q, s = quantize_fp8_rows_cuda(x.cuda(), group=0)
    rq, rs = quantize_fp8_rows(x, k)
    assert s.shape == (m, 1) and torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


def check(m, n, k, gated=None, bias=False, dtype=torch.bfloat16, bn=None):
    gen = seeded_generator("fp8-gemm", m, n, k, gated, bias, str(dtype), bn)
    x, qw = operands(m, n, k, gen, dtype, scale_rows=dtype == torch.bfloat16)   # (f16: 100 x 10 squared overflows)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    q, s = quantize_fp8_rows_cuda(x, group=0)
    n_out = n // 2 if gated else n
    buf = torch.full((m + 3, n_out), float("nan"), dtype=dtype, device="cuda")
    y = fp8_gemm(q, s, qw, b, gated=gated, out=buf[:m], bn=bn)
    assert y.data_ptr() == buf.data_ptr() and torch.isnan(buf[m:]).all()   # nothing past out's rows
    ref = epilogue(dequantize_fp8_rows(q, s, k) @ dequantize(qw).T, b, gated, None)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 3, 16, 127, 128, 1000, 8192])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 3008), (24, 16)])
def test_fp8_gemm_against_float64(m, n, k):
    check(m, n, k)


@pytest.mark.parametrize("gated", [None, "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m", [5, 300])
@pytest.mark.parametrize("n,k", [(2 * 1000, 3008), (2 * 5632, 2048), (48, 32)])
def test_fp8_gemm_epilogues(m, n, k, gated):
    check(m, n, k, gated=gated, bias=True)


@pytest.mark.parametrize("bn", [128, 192, 256])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_fp8_gemm_tile_widths(bn, gated):
    if gated and bn == 192:
        pytest.skip("gated tiles are BN 128 or 256")
    check(1000, 2 * 2816, 4096, gated=gated, bn=bn)


def test_fp8_gemm_f16():
    check(300, 2 * 1000, 3008, gated="silu", bias=True, dtype=torch.float16)


def test_fp8_gemm_graph_capture():
    gen = seeded_generator("fp8-gemm-graph")
    x, qw = operands(512, 4096, 4096, gen)
    y = replayed(lambda t: fp8_gemm(*quantize_fp8_rows_cuda(t, group=0), qw), x)
    q, s = quantize_fp8_rows(x.cpu(), 4096)   # of the refilled x the replay read
    ref = dequantize_fp8_rows(q, s, 4096).cuda() @ dequantize(qw).T
    assert rel_err(y, ref) < 1e-2


def test_fp8_gemm_bad_inputs_fail_before_launch():
    gen = seeded_generator("fp8-gemm-bad")
    x, qw = operands(64, 256, 512, gen)
    q, s = quantize_fp8_rows_cuda(x, group=0)
    with pytest.raises(LinearInputError, match="xscale"):
        fp8_gemm(q, s[:10], qw)
    with pytest.raises(LinearInputError, match="float8_e4m3fn"):
        fp8_gemm(x, s, qw)
    with pytest.raises(LinearInputError, match="bias"):
        fp8_gemm(q, s, qw, torch.zeros(255, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(LinearInputError, match="out"):
        fp8_gemm(q, s, qw, out=torch.empty(64, 255, dtype=torch.bfloat16, device="cuda"))
    w = torch.randn(256, 512, generator=gen)
    with pytest.raises(LinearInputError, match="one scale a row"):
        fp8_gemm(q, s, on_gpu(pack_fp8(*quantize_fp8(w, 128), 128)))


@pytest.mark.parametrize("m", [FP8_GEMM_MIN_ROWS, 1000])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_quant_linear_prefill_takes_the_fp8_gemm(m, gated):
    """QuantLinear at prefill rows: per-token W8A8 on the FP8 GEMM, the residual added after; against
    the per-token meaning (1e-2) and against the unquantised product (the format's error)."""
    gen = seeded_generator("fp8-gemm-layer", m, gated)
    n, k = 2 * 1408, 2048
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1
    lin = QuantLinear.from_float(w, 0, b, wtype="f8e4m3", dtype=torch.bfloat16).cuda()
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    n_out = n // 2 if gated else n
    r = torch.randn(m, n_out, generator=gen).to(torch.bfloat16).cuda()
    y = lin(x, gated=gated, residual=r)
    meaning = epilogue(dequantize_fp8_rows(*quantize_fp8_rows(x, k), k) @ dequantize(lin.qw).T, lin.bias, gated, r)
    assert rel_err(y, meaning) < 1e-2
    exact = epilogue(x.double() @ w.double().cuda().T, lin.bias, gated, r)
    assert rel_err(y, exact) < 5e-2
