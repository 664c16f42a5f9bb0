"""The fp8 W8A8 small-token product (wtype f8e4m3) on an sm_89+ GPU, outputs poisoned with NaN
first, against float64 of the dequantised W and of x quantised by runtime/quant.quantize_fp8_rows
(the kernel's own activation numerics: it must make the same e4m3 bytes), so what is left is the
f32 accumulation and the output's rounding: 1e-2 relative (bf16's half step is 2^-9 = 2e-3 a value;
the fp8 mma's internal sums of 32 products are the rest). Against the unquantised x the error is
the format's: e4m3 keeps 3 mantissa bits, a relative error up to 2^-4 a value, about 2.5% RMS over
a random x, so 5e-2 relative is checked there. Per row and 128 x 128 block scales, 1-16 tokens,
N and K off the tiles, the fused epilogues and the norm prologue, from_fp8, graph capture."""
import pytest
import torch

from layerforge.runtime.quant import (QuantLinear, dequantize, dequantize_fp8_rows, fp8_activation_group, gemv_quant,
                                     quantize_fp8_rows)

from ..seeding import seeded_generator
from .products import epilogue, replayed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an sm_89+ GPU")]

# (N, K): 8B qkv, 8B down, odd N, K a multiple of 128 but not of 256, DeepSeek-V3-like, tiny
SHAPES = [(6144, 4096), (4096, 14336), (1000, 3072), (3000, 1152), (7168, 2048), (24, 128)]


def fp8_linear(n, k, block, gen, dtype=torch.bfloat16, bias=False):
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_float(w, block, b, wtype="f8e4m3", dtype=dtype).cuda()


def rel_err(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


def w8a8_reference(x, lin, gated=None, bias=None, r=None, norm=None, offset=0.0):
    """float64 of the kernel's meaning: x (times gamma + offset) quantised per token and 128 k (per
    token where the call takes the Hopper FP8 GEMM: fp8_activation_group)."""
    u = x
    if norm is not None:
        u = (x.float() * (norm[0].float() + offset)).to(x.dtype)
    group = fp8_activation_group(x, lin.qw, gated=gated, norm=norm)
    y = dequantize_fp8_rows(*quantize_fp8_rows(u, group), group) @ dequantize(lin.qw).T
    if norm is not None:
        xd = x.double()
        y = y * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm[1])
    return epilogue(y, bias, gated, r)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_gemv_against_float64(n, k, block, m):
    if block and k % 128:
        pytest.skip("block scales need K a multiple of 128")
    gen = seeded_generator("gemv-fp8", n, k, block, m)
    lin = fp8_linear(n, k, block, gen)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]).to(torch.bfloat16).cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = gemv_quant(x, lin.qw, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(out, w8a8_reference(x, lin)) < 1e-2
    assert rel_err(out, x.double() @ dequantize(lin.qw).T) < 5e-2     # fp8's own error on x


@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("block", [0, 128])
def test_fp8_gemv_f16(block, m):
    gen = seeded_generator("gemv-fp8-f16", block, m)
    lin = fp8_linear(5632, 2048, block, gen, dtype=torch.float16)
    x = torch.randn(m, 2048, generator=gen).half().cuda()
    out = torch.full((m, 5632), float("nan"), dtype=torch.float16, device="cuda")
    gemv_quant(x, lin.qw, out=out)
    assert rel_err(out, w8a8_reference(x, lin)) < 1e-2


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("block", [0, 128])
def test_fp8_gemv_epilogues(block, m, gated, norm):
    """Bias, act(gate) * up over W's halves, the residual and the RMSNorm prologue (Gemma's 1 + gamma)."""
    gen = seeded_generator("gemv-fp8-epi", block, m, gated, norm)
    n, k = 2 * 1024, 3072
    n_out = n // 2 if gated else n
    lin = fp8_linear(n, k, block, gen, bias=True)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]).to(torch.bfloat16).cuda()
    r = torch.randn(m, n_out, generator=gen).to(torch.bfloat16).cuda()
    nrm = ((torch.randn(k, generator=gen) * 0.5).to(torch.bfloat16).cuda(), 1e-5) if norm else None
    out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    out.copy_(lin(x, gated=gated, residual=r, norm=nrm, norm_offset=1.0 if norm else 0.0))
    ref = w8a8_reference(x, lin, gated, lin.bias, r, nrm, 1.0)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("gated,bias,res", [(None, False, False), ("silu", True, True), ("gelu_tanh", False, True)])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize("n,k", [(6144, 4096), (2048, 3072), (7168, 2048), (1000, 1152)])
def test_fp8_gemv_x_quantised_first(monkeypatch, tuning_table, n, k, block, m, gated, bias, res):
    """LAYERFORGE_FP8_QUANT_X_FIRST=1: x quantised by the row kernel (a token and 128 k), then the small-token
    kernel over those bytes and scales (runtime/quant.fp8_gemv, codegen/gemv.py x_e4m3 x_group 128): against
    float64, and equal to the kernel that quantises x in its registers (the same bytes, scales and sums: both paths
    run one work split here, the x-first rules', through a tuning table of this problem; their own rules differ, and
    another split of K over warps sums in another order)."""
    if block and (k % 128 or n % 256):
        pytest.skip("block scales: K a multiple of 128, gate and up halves of whole blocks")
    from layerforge.codegen import tuning
    from layerforge.codegen.gemv import plan_gemv
    from layerforge.runtime import quant
    bucket = 8 if m <= 8 else 16
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    rules = plan_gemv("bf16", n=n, k=k, max_m=bucket, gated=gated, arch=arch, wtype="f8e4m3", group=block,
                      x_e4m3=True, x_group=128, tuned=False)
    for family in ("gemv", "gemv_x8"):
        tuning.write_entry(tuning_table, family, {"rt": rules.rt, "warps": rules.warps, "stages": rules.stages},
                           arch=arch, dtype="bf16", wtype="f8e4m3", group=block, gated=gated, n=n, k=k, bucket=bucket)
    gen = seeded_generator("gemv-fp8-xfirst", n, k, block, m, gated, bias, res)
    lin = fp8_linear(n, k, block, gen, bias=bias)
    n_out = n // 2 if gated else n
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]).to(torch.bfloat16).cuda()
    r = torch.randn(m, n_out, generator=gen).to(torch.bfloat16).cuda() if res else None
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "0")
    in_registers = lin(x, gated=gated, residual=r)
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1")
    seen = []
    real = quant.fp8_gemv

    def spy(q, xscale, qw, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(xscale.shape)))
        return real(q, xscale, qw, *args, **kwargs)
    monkeypatch.setattr(quant, "fp8_gemv", spy)
    out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = gemv_quant(x, lin.qw, lin.bias, gated=gated, residual=r, out=out)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr() and seen == [((m, k), (m, -(-k // 128)))]
    assert rel_err(out, w8a8_reference(x, lin, gated, lin.bias, r)) < 1e-2
    assert torch.equal(out, in_registers)


@pytest.mark.parametrize("m", [1, 16])
def test_kernel_and_torch_paths_agree(m):
    """The kernel (<= 16 rows) and the torch path (CPU) quantise x alike: same meaning."""
    gen = seeded_generator("gemv-fp8-paths", m)
    lin = fp8_linear(2048, 4096, 128, gen)
    x = torch.randn(m, 4096, generator=gen).to(torch.bfloat16)
    y_gpu = lin(x.cuda()).cpu()
    y_cpu = lin.cpu()(x)
    assert rel_err(y_gpu, y_cpu.double()) < 1e-2


def test_deepseek_style_checkpoint():
    """weight float8_e4m3fn with weight_scale_inv [N / 128, K / 128] (block 128)."""
    gen = seeded_generator("gemv-fp8-ds")
    n, k = 1536, 7168
    q = (torch.randn(n, k, generator=gen) * 30).clamp(-448, 448).to(torch.float8_e4m3fn)
    inv = torch.rand(n // 128, k // 128, generator=gen) * 1e-3
    lin = QuantLinear.from_fp8(q.cuda(), inv.cuda(), block=[128, 128])
    x = torch.randn(4, k, generator=gen).to(torch.bfloat16).cuda()
    want = x.double() @ (q.double() * inv.double().repeat_interleave(128, 0).repeat_interleave(128, 1)).cuda().T
    assert rel_err(lin(x), want) < 5e-2
    assert rel_err(lin(x), w8a8_reference(x, lin)) < 1e-2


def test_more_rows_run_torch_with_same_meaning():
    gen = seeded_generator("gemv-fp8-rows")
    lin = fp8_linear(512, 1024, 0, gen)
    for rows in (16, 17, 100):
        x = torch.randn(rows, 1024, generator=gen).to(torch.bfloat16).cuda()
        assert rel_err(lin(x), w8a8_reference(x, lin)) < 1e-2


def test_graph_capture():
    gen = seeded_generator("gemv-fp8-graph")
    lin = fp8_linear(4096, 4096, 128, gen, bias=True)
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    y = replayed(lin, x)
    assert rel_err(y, w8a8_reference(x, lin, bias=lin.bias)) < 1e-2
