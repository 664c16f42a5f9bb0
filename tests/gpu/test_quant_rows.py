"""Quantised products past the small-token kernel's rows (prefill sizes) on the GPU: W
dequantised by the generated kernel (codegen/dequant.py), then cuBLAS. The dequantised W against
the float64 reference `dequantize` (u4 and i8 bit for bit: (q - z) * s is exact before its one
rounding to T, as the reference's; f8e4m3 within one double rounding), products of 17-1000 rows
against float64 with outputs poisoned, graph capture at 64 rows (a batch-64 decode step of a
quantised model), and the small-token kernel's 32-row plans (QUANT_KERNEL_MAX_ROWS raised) so a
measured threshold can move onto a checked kernel (u4's 64-row plans do not fit shared memory:
a stage holds 256 k of x a token)."""
import pytest
import torch

from layerforge.runtime import quant
from layerforge.runtime.quant import (QuantLinear, dequantize, dequantize_cuda, dequantize_fp8_rows, fp8_activation_group,
                                     gemv_quant, quantize_fp8_rows)

from ..seeding import seeded_generator
from .products import epilogue, replayed
from .test_gemv_quant import quant_linear, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
WTYPES = [("u4", 32), ("u4", 128), ("i8", 0), ("i8", 64)] + ([("f8e4m3", 0), ("f8e4m3", 128)] if FP8 else [])
SHAPES = [(4096, 14336), (1000, 3072), (3000, 1152), (24, 128)]


def meaning(x, lin, gated=None, bias=None, r=None):
    """float64 of the product's meaning (W8A8: x quantised per token and 128 k, as the kernel does;
    per token where the call takes the Hopper FP8 GEMM)."""
    if lin.qw.wtype == "f8e4m3":
        group = fp8_activation_group(x, lin.qw, gated=gated)
        xd = dequantize_fp8_rows(*quantize_fp8_rows(x, group), group)
    else:
        xd = x.double()
    return epilogue(xd @ dequantize(lin.qw).T, bias, gated, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wtype,group", WTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantised_weight_is_the_reference(n, k, wtype, group, dtype):
    gen = seeded_generator("dequant", n, k, wtype, group, str(dtype))
    lin = quant_linear(n, k, wtype, group, dtype, gen)
    out = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
    w = dequantize_cuda(lin.qw, out=out)
    assert w.data_ptr() == out.data_ptr() and not torch.isnan(w).any()
    ref = dequantize(lin.qw)
    if wtype == "f8e4m3":   # f32 product then T: at most one T step off the reference rounded once
        tiny = 2.0 ** -24 if dtype == torch.float16 else 1e-30   # f16's subnormal step
        assert ((w.double() - ref).abs() <= ref.abs() * 2 ** -7 + tiny).all()
    else:
        assert torch.equal(w, ref.to(dtype))


@pytest.mark.parametrize("m", [17, 64, 100, 1000])
@pytest.mark.parametrize("wtype,group", WTYPES)
@pytest.mark.parametrize("n,k", SHAPES[:3])
def test_prefill_rows_against_float64(n, k, wtype, group, m):
    gen = seeded_generator("quant-rows", n, k, wtype, group, m)
    lin = quant_linear(n, k, wtype, group, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = gemv_quant(x, lin.qw, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, meaning(x, lin)) < 1e-2


@pytest.mark.parametrize("wtype,group", WTYPES)
def test_prefill_rows_with_epilogue(wtype, group):
    gen = seeded_generator("quant-rows-epi", wtype, group)
    lin = quant_linear(2048, 1024, wtype, group, torch.bfloat16, gen, bias=True)
    x = torch.randn(3, 77, 1024, generator=gen).to(torch.bfloat16).cuda()
    r = torch.randn(3, 77, 1024, generator=gen).to(torch.bfloat16).cuda()
    y = lin(x, gated="silu", residual=r)
    assert y.shape == (3, 77, 1024)
    assert rel_err(y, meaning(x, lin, "silu", lin.bias, r)) < 1e-2


@pytest.mark.parametrize("wtype,group", WTYPES)
def test_graph_capture_at_64_rows(wtype, group):
    gen = seeded_generator("quant-rows-graph", wtype, group)
    lin = quant_linear(4096, 4096, wtype, group, torch.bfloat16, gen, bias=True)
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    y = replayed(lin, x)
    assert rel_err(y, meaning(x, lin, None, lin.bias)) < 1e-2


@pytest.mark.parametrize("m", [17, 32])
@pytest.mark.parametrize("wtype,group", WTYPES)
def test_small_token_kernel_to_32_rows(monkeypatch, wtype, group, m):
    monkeypatch.setattr(quant, "QUANT_KERNEL_MAX_ROWS", 32)
    monkeypatch.setattr(quant, "FP8_KERNEL_MAX_ROWS", 32)
    gen = seeded_generator("quant-kernel-64", wtype, group, m)
    lin = quant_linear(3000, 1152, wtype, group, torch.bfloat16, gen)
    x = torch.randn(m, 1152, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, 3000), float("nan"), dtype=torch.bfloat16, device="cuda")
    gemv_quant(x, lin.qw, out=out)
    assert rel_err(out, meaning(x, lin)) < 1e-2
    y = lin(x, gated="gelu_tanh")
    assert rel_err(y, meaning(x, lin, "gelu_tanh")) < 1e-2


@pytest.mark.parametrize("m", [1, 16, 100])
def test_gptq_act_order_on_the_gpu(m):
    """An act-order GPTQ weight (columns sorted by group, x gathered to match) through the
    small-token kernel (1, 16 rows), the dequantised path (100) and the fused norm prologue."""
    from ..runtime.quant_formats import gptq_tensors, random_u4
    from layerforge.runtime.quant import dequantize_gptq
    gen = seeded_generator("gpu-act-order", m)
    k, n, group = 1024, 384, 128
    q, z, s = random_u4(k, n, group, gen)
    qweight, qzeros, scales, g_idx = gptq_tensors(q, z, s, group)
    g_act = g_idx[torch.randperm(k, generator=gen)]
    want = dequantize_gptq(qweight, qzeros, scales, g_act, group).cuda()
    lin = QuantLinear.from_gptq(qweight, qzeros, scales, g_act, group, dtype=torch.float16).cuda()
    x = torch.randn(m, k, generator=gen).half().cuda()
    assert rel_err(lin(x), x.double() @ want.T) < 1e-2
    gamma = (torch.rand(k, generator=gen) + 0.5).half().cuda()
    xd = x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
    assert rel_err(lin(x, norm=(gamma, 1e-5)), xn @ want.T) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="cuBLAS's blockwise-scaled fp8 product is an sm_90 feature")
@pytest.mark.parametrize("block", [0, 128])
def test_fp8_prefill_runs_on_the_fp8_tensor_cores(block, monkeypatch):
    """Past 16 rows on sm_90 the W8A8 product runs on the fp8 tensor cores, not a dequantised W: a
    row-scaled W on the Hopper FP8 GEMM with x per token (FP8_GEMM_MIN_ROWS rows and more), else
    cuBLAS's blockwise-scaled fp8 GEMM on the same e4m3 operands (x per token and 128 k, W per row or
    128 x 128 block)."""
    gen = seeded_generator("fp8-blockwise", block)
    lin = quant_linear(2048, 4096, "f8e4m3", block, torch.bfloat16, gen)
    x = torch.randn(300, 4096, generator=gen).to(torch.bfloat16).cuda()
    quant._BLOCKWISE.clear()
    quant._DEQUANT.clear()
    y = lin(x)
    gemm = any(key[0] == "fp8_gemm" for key in quant._DEQUANT)
    assert gemm == (block == 0) and quant._BLOCKWISE.get(x.device.index) is (None if block == 0 else True)
    assert rel_err(y, meaning(x, lin)) < 1e-2
    if block == 0:   # the GEMM's route off: cuBLAS's blockwise product, the 128-k groups
        monkeypatch.setattr(quant, "FP8_GEMM_MIN_ROWS", 1 << 62)
        assert fp8_activation_group(x, lin.qw) == 128
        assert rel_err(lin(x), meaning(x, lin)) < 1e-2 and quant._BLOCKWISE.get(x.device.index) is True


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("gated", [None, "silu"])
@pytest.mark.parametrize("wtype,group", [("u4", 128), ("i8", 0)])
@pytest.mark.parametrize("split", [(2, 4, 4), (4, 4, 3), (2, 8, 2), (2, 8, 3), (1, 4, 2), (2, 4, 2), (1, 2, 6), (4, 2, 4)])
def test_swept_quant_splits_are_correct(split, wtype, group, gated, m):
    """Work splits of the quantised kernel the benchmark sweeps (`bench_gemv --quant --sweep`:
    16-column tiles per CTA, warps, stages), launched directly on odd N and K: a split the sweep
    finds fastest may become a default only if it is right."""
    from layerforge.codegen.gemv import plan_gemv
    from layerforge.runtime.launch import compile_plan, device_arch, load_kernels
    rt, warps, stages = split
    n, k = (2 * 1000, 3072) if gated else (1000, 3072)
    try:
        plan = plan_gemv("bf16", n=n, k=k, max_m=m, gated=gated, arch=device_arch(), rt=rt, warps=warps,
                         stages=stages, wtype=wtype, group=group)
    except ValueError as e:   # more shared memory than a CTA has: the sweep skips it too
        pytest.skip(str(e))
    launch = load_kernels(compile_plan(plan).cubin, plan.kernels, torch.device("cuda"))[plan.kernel_name]
    gen = seeded_generator("quant-split", split, wtype, gated, m)
    lin = quant_linear(n, k, wtype, group, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, n // 2 if gated else n), float("nan"), dtype=torch.bfloat16, device="cuda")
    launch((), [x, *lin.qw.kernel_tensors, out, m])
    assert rel_err(out, meaning(x, lin, gated)) < 1e-2


@pytest.mark.skipif(not FP8, reason="e4m3 conversion needs an sm_89+ GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 4096), (300, 1000), (77, 1152), (1024, 14336), (5, 8), (2, 28672), (3, 40000)])
def test_activation_quantisation_kernel_makes_the_reference_bytes(m, k, dtype):
    """The one-pass activation quantisation (codegen/dequant.QuantRowsPlan) gives
    quantize_fp8_rows's e4m3 bytes and scales exactly: blocks past K, an all-zero block, values
    spanning the range."""
    from layerforge.runtime.quant import quantize_fp8_rows_cuda
    gen = seeded_generator("quant-rows-kernel", m, k, str(dtype))
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, k)).to(dtype).cuda()
    x[0, :128] = 0
    q0 = torch.full((m, k), 0x7f, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    q, s = quantize_fp8_rows_cuda(x)
    rq, rs = quantize_fp8_rows(x)
    assert q.shape == q0.shape and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s, rs)
