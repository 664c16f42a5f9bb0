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

from layerforge.runtime import quant
from layerforge.runtime.linear import LinearInputError
from layerforge.runtime.quant import (FP8_GEMM_MIN_ROWS, QuantLinear, dequantize, dequantize_fp8_rows,
                                     fp8_activation_group, fp8_gemm, pack_fp8, quantize_fp8, quantize_fp8_rows,
                                     quantize_fp8_rows_cuda)

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


def operands(m, n, k, gen, dtype=torch.bfloat16, scale_rows=True, blocks=False):
    """x with rows of very different sizes (each token's scale matters), W with per-row scales (or
    per 128 x 128 block) of different sizes."""
    x = torch.randn(m, k, generator=gen)
    if scale_rows:
        x = x * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=gen) / k ** 0.5 * torch.logspace(-1, 1, n)[:, None]
    qw = pack_fp8(*quantize_fp8(w, 128 if blocks else None), 128 if blocks else None, dtype)
    return x.to(dtype).cuda(), on_gpu(qw)


SCALES = ["token", "k128", "blocks"]   # x per token / per token and 128 k (W per row) / and W per 128 x 128 block


def quantised(x, scales):
    """x's e4m3 bytes and scales for the kernel of `scales`, and group: their k per scale."""
    k = x.shape[-1]
    q, s = quantize_fp8_rows_cuda(x, group=0 if scales == "token" else 128)
    return q, s, k if scales == "token" else 128


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


def check(m, n, k, gated=None, bias=False, dtype=torch.bfloat16, bn=None, scales="token"):
    gen = seeded_generator("fp8-gemm", m, n, k, gated, bias, str(dtype), bn, scales)
    x, qw = operands(m, n, k, gen, dtype, scale_rows=dtype == torch.bfloat16,   # (f16: 100 x 10 squared overflows)
                     blocks=scales == "blocks")
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    q, s, group = quantised(x, scales)
    n_out = n // 2 if gated else n
    buf = torch.full((m + 3, n_out), float("nan"), dtype=dtype, device="cuda")
    y = fp8_gemm(q, s, qw, b, gated=gated, out=buf[:m], bn=bn)
    assert y.data_ptr() == buf.data_ptr() and torch.isnan(buf[m:]).all()   # nothing past out's rows
    ref = epilogue(dequantize_fp8_rows(q, s, group) @ dequantize(qw).T, b, gated, None)
    err = rel_err(y, ref)
    assert err < 1e-2
    return err


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("m", [1, 3, 16, 127, 128, 1000, 8192])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 3008), (24, 16), (1000, 3072), (24, 128)])
def test_fp8_gemm_against_float64(m, n, k, scales):
    if scales == "blocks" and k % 128:
        pytest.skip("128 x 128 W blocks need K a multiple of 128")
    check(m, n, k, scales=scales)


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("gated", [None, "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m", [5, 300])
@pytest.mark.parametrize("n,k", [(2 * 1024, 3072), (2 * 5632, 2048), (2 * 64, 128)])
def test_fp8_gemm_epilogues(m, n, k, gated, scales):
    check(m, n, k, gated=gated, bias=True, scales=scales)


def test_promoted_sums_keep_f32_accuracy():
    """The k128 kernels add each 128-k slice's sums into f32 totals: at K = 28672 their error is the
    output's rounding, where the tensor cores' own sums ("token") lose more (DeepSeek-V3's finding)."""
    errs = {sc: check(256, 1024, 28672, scales=sc) for sc in SCALES}
    print(errs)
    assert errs["k128"] < 2.5e-3 and errs["blocks"] < 2.5e-3 and errs["k128"] < errs["token"]


@pytest.mark.parametrize("bn", [128, 192, 256])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_fp8_gemm_tile_widths(bn, gated):
    if gated and bn == 192:
        pytest.skip("gated tiles are BN 128 or 256")
    check(1000, 2 * 2816, 4096, gated=gated, bn=bn)


@pytest.mark.parametrize("scales", SCALES)
def test_fp8_gemm_f16(scales):
    check(300, 2 * 1024, 3072, gated="silu", bias=True, dtype=torch.float16, scales=scales)


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
    with pytest.raises(LinearInputError, match="128 x 128 W blocks only"):   # blocks want x per 128 k
        fp8_gemm(q, s, on_gpu(pack_fp8(*quantize_fp8(w, 128), 128)))
    with pytest.raises(LinearInputError, match="blocks: 64"):
        w2 = torch.randn(2 * 96, 512, generator=gen)
        fp8_gemm(*quantised(x, "blocks")[:2], on_gpu(pack_fp8(*quantize_fp8(w2, 128), 128)), gated="silu")


@pytest.mark.parametrize("route", [("token", 0), ("k128", 0), ("k128", 128)])
@pytest.mark.parametrize("m", [FP8_GEMM_MIN_ROWS, 1000])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_quant_linear_prefill_takes_the_fp8_gemm(m, gated, route, monkeypatch):
    """QuantLinear at prefill rows: W8A8 on the FP8 GEMM (x per token, or per token and 128 k; W per
    row or 128 x 128 block), the residual added after; against the meaning fp8_activation_group
    states (1e-2) and against the unquantised product (the format's error)."""
    scales, block = route
    monkeypatch.setattr(quant, "FP8_GEMM_SCALES", scales)
    gen = seeded_generator("fp8-gemm-layer", m, gated, scales, block)
    n, k = 2 * 1408, 2048
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1
    lin = QuantLinear.from_float(w, block, b, wtype="f8e4m3", dtype=torch.bfloat16).cuda()
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    n_out = n // 2 if gated else n
    r = torch.randn(m, n_out, generator=gen).to(torch.bfloat16).cuda()
    quant._DEQUANT.clear()
    if block:   # cuBLAS's blockwise product takes 128 x 128 blocks where it can: as where it cannot
        monkeypatch.setitem(quant._BLOCKWISE, x.device.index, False)
    y = lin(x, gated=gated, residual=r)
    assert any(key[0] == "fp8_gemm" for key in quant._DEQUANT)
    group = fp8_activation_group(x, lin.qw, gated=gated)
    assert group == (k if scales == "token" and not block else 128)
    meaning = epilogue(dequantize_fp8_rows(*quantize_fp8_rows(x, group), group) @ dequantize(lin.qw).T, lin.bias,
                       gated, r)
    assert rel_err(y, meaning) < 1e-2
    exact = epilogue(x.double() @ w.double().cuda().T, lin.bias, gated, r)
    assert rel_err(y, exact) < 5e-2
