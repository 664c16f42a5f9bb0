"""The weight-only quantised small-token product (u4 per-group, i8 per-row and per-group) on the
GPU against float64 of the dequantised weights: 1-16 tokens, K and N not multiples of the tiles,
the fused epilogues and the norm prologue, outputs poisoned with NaN first; AWQ- and GPTQ-loaded
weights against the formats' own dequantisation; CUDA-graph capture."""
import pytest
import torch

from layerforge.runtime.quant import QuantLinear, dequantize, gemv_quant

from ..runtime.quant_formats import awq_tensors, format_dequant, gptq_tensors, random_u4
from ..seeding import seeded_generator
from .products import reference, replayed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (N, K): 8B down, TinyLlama gate, odd N, K a multiple of 128 but not of u4's 256-k chunk, tiny
SHAPES = [(4096, 14336), (5632, 2048), (1000, 3072), (3000, 1152), (24, 128), (6144, 4096)]
WTYPES = [("u4", 32), ("u4", 64), ("u4", 128), ("i8", 0), ("i8", 32), ("i8", 128)]


def quant_linear(n, k, wtype, group, dtype, gen, bias=False):
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_float(w, group, b, wtype=wtype, dtype=dtype).cuda()


def rel_err(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize("wtype,group", WTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_quant_gemv_against_float64(n, k, wtype, group, m):
    gen = seeded_generator("gemv-quant", n, k, wtype, group, m)
    lin = quant_linear(n, k, wtype, group, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = gemv_quant(x, lin.qw, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, reference(x, dequantize(lin.qw), None, None, None)) < 1e-2


@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("wtype,group", WTYPES)
@pytest.mark.parametrize("n,k", [(5632, 2048), (3000, 1152), (40, 96)])
def test_quant_gemv_f16(n, k, wtype, group, m):
    if group and k % group:
        pytest.skip("the group size must divide K")
    gen = seeded_generator("gemv-quant-f16", n, k, wtype, group, m)
    lin = quant_linear(n, k, wtype, group, torch.float16, gen)
    x = torch.randn(m, k, generator=gen).half().cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    gemv_quant(x, lin.qw, out=out)
    assert rel_err(out, reference(x, dequantize(lin.qw), None, None, None)) < 1e-2


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("wtype,group", [("u4", 128), ("u4", 32), ("i8", 0), ("i8", 64)])
def test_quant_gemv_epilogues(wtype, group, m, gated, norm):
    """Bias, the gated activation over the two row halves, the residual add and the RMSNorm
    prologue (Gemma's 1 + gamma), with a quantised W."""
    gen = seeded_generator("gemv-quant-epi", wtype, group, m, gated, norm)
    n, k = 2 * 1000, 3072
    n_out = n // 2 if gated else n
    lin = quant_linear(n, k, wtype, group, torch.bfloat16, gen, bias=True)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]).to(torch.bfloat16).cuda()
    r = torch.randn(m, n_out, generator=gen).to(torch.bfloat16).cuda()
    nrm = ((torch.randn(k, generator=gen) * 0.5).to(torch.bfloat16).cuda(), 1e-5) if norm else None
    out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = lin(x, gated=gated, residual=r, norm=nrm, norm_offset=1.0 if norm else 0.0)
    out.copy_(y)
    ref = reference(x, dequantize(lin.qw), lin.bias, gated, r, nrm, 1.0)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("group", [32, 128])
def test_awq_checkpoint(group, m):
    gen = seeded_generator("awq", group, m)
    k, n = 2048, 1536
    q, z, s = random_u4(k, n, group, gen)
    qweight, qzeros, scales = awq_tensors(q, z, s)
    lin = QuantLinear.from_awq(qweight.cuda(), qzeros.cuda(), scales.cuda(), group, dtype=torch.float16)
    x = torch.randn(m, k, generator=gen).half().cuda()
    assert rel_err(lin(x), x.double() @ format_dequant(q, z, s, group).cuda().T) < 1e-2


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_checkpoint(dtype, m):
    gen = seeded_generator("gptq", m, dtype)
    k, n, group = 3072, 1024, 128
    q, z, s = random_u4(k, n, group, gen)
    qweight, qzeros, scales, g_idx = gptq_tensors(q, z, s, group)
    lin = QuantLinear.from_gptq(qweight, qzeros, scales, g_idx, group, dtype=dtype).cuda()
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    assert rel_err(lin(x), x.double() @ format_dequant(q, z, s, group).cuda().T) < 1e-2


def test_more_rows_run_torch_with_same_meaning():
    gen = seeded_generator("gemv-quant-rows")
    lin = quant_linear(512, 1024, "u4", 64, torch.bfloat16, gen)
    for rows in (16, 17, 100):
        x = torch.randn(rows, 1024, generator=gen).to(torch.bfloat16).cuda()
        assert rel_err(lin(x), x.double() @ lin.dequantized().T) < 1e-2


def test_graph_capture():
    gen = seeded_generator("gemv-quant-graph")
    lin = quant_linear(4096, 4096, "u4", 128, torch.bfloat16, gen, bias=True)
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    y = replayed(lin, x)
    assert rel_err(y, reference(x, lin.dequantized(), lin.bias, None, None)) < 1e-2


def test_misaligned_views_are_refused_or_copied():
    """W views at an odd offset never reach a kernel that reads them 16 bytes at a time: pack_i8 / pack_fp8 copy them,
    a QuantWeight built from one directly is refused, and dequantize_cuda refuses an `out` that is (no
    misaligned-address fault, which would end the process's CUDA context)."""
    import dataclasses
    from layerforge.runtime.linear import LinearInputError
    from layerforge.runtime.quant import dequantize_cuda, pack_i8, quantize_i8
    gen = seeded_generator("misaligned")
    q, s = quantize_i8(torch.randn(64, 256, generator=gen), 0)
    buf = torch.zeros(q.numel() + 1, dtype=torch.int8, device="cuda")
    buf[1:] = q.to(torch.int8).reshape(-1).cuda()
    qw = pack_i8(buf[1:].view(64, 256), s.cuda(), 0, dtype=torch.bfloat16)
    assert qw.qweight.data_ptr() % 16 == 0
    torch.testing.assert_close(dequantize_cuda(qw), dequantize(qw).to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="qweight must start at a 16-byte aligned address"):
        dataclasses.replace(qw, qweight=buf[1:].view(64, 256))
    out = torch.empty(64 * 256 + 1, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(LinearInputError, match="16-byte aligned"):
        dequantize_cuda(qw, out=out[1:].view(64, 256))
