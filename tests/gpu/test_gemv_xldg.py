"""u4's small-token product with x read from global memory instead of staged (codegen/gemv.py xldg: a stage holds W
alone) on the GPU against float64 of the dequantised weights: 1-16 tokens (the token rows past M read token M - 1
again: never stored), K not a multiple of the 256-k chunk (x past K zero), N not a multiple of a CTA's rows, every
group size, the splits the benchmark sweeps, the fused epilogues, f16, outputs poisoned with NaN first; the
runtime's route under LAYERFORGE_GEMV_XLDG=1 with CUDA-graph replay; bit-equal to itself across launches."""
import pytest
import torch

from layerforge.codegen.gemv import plan_gemv
from layerforge.runtime.quant import dequantize

from ..seeding import seeded_generator
from .products import reference, replayed
from .test_gemv_quant import quant_linear, rel_err
from .test_gemv_xshare import SHAPES, arch, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_xldg_against_float64(n, k, group, m):
    if k % group:
        pytest.skip("the group size must divide K")
    gen = seeded_generator("gemv-xldg", n, k, group, m)
    lin = quant_linear(n, k, "u4", group, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    ref = reference(x, dequantize(lin.qw), None, None, None)
    plan = plan_gemv("bf16", n=n, k=k, max_m=m, wtype="u4", group=group, arch=arch(), xldg=True)
    assert plan.xldg
    out = run(plan, lin, x)
    assert rel_err(out, ref) < 1e-2, plan.key
    assert torch.equal(run(plan, lin, x), out), plan.key   # the same bits every launch


# (rt, warps, stages, min_blocks) bench_gemv --xldg sweeps at 16 tokens (gated: the last two)
XLDG_SPLITS = [(2, 4, 4, 3), (2, 4, 3, 1), (1, 4, 4, 3), (1, 2, 4, 6), (2, 2, 6, 6), (1, 4, 6, 3), (1, 2, 4, 5),
               (1, 2, 6, 5)]


@pytest.mark.parametrize("split", XLDG_SPLITS)
def test_xldg_work_splits(split):
    rt, warps, stages, blocks = split
    n, k = 3000, 4096
    gen = seeded_generator("gemv-xldg-splits", *split)
    lin = quant_linear(n, k, "u4", 128, torch.bfloat16, gen)
    x = torch.randn(13, k, generator=gen).to(torch.bfloat16).cuda()
    plan = plan_gemv("bf16", n=n, k=k, max_m=16, wtype="u4", group=128, arch=arch(), rt=rt, warps=warps,
                     stages=stages, min_blocks=blocks, xldg=True)
    assert rel_err(run(plan, lin, x), reference(x, dequantize(lin.qw), None, None, None)) < 1e-2, plan.key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_xldg_epilogues(m, gated, dtype):
    """Bias, the gated activation over the two row halves, the residual add."""
    gen = seeded_generator("gemv-xldg-epi", m, gated, dtype)
    n, k = 2 * 1000, 3072
    n_out = n // 2 if gated else n
    lin = quant_linear(n, k, "u4", 128, dtype, gen, bias=True)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]).to(dtype).cuda()
    r = torch.randn(m, n_out, generator=gen).to(dtype).cuda()
    ref = reference(x, dequantize(lin.qw), lin.bias, gated, r)
    plan = plan_gemv("f16" if dtype == torch.float16 else "bf16", n=n, k=k, max_m=m, gated=gated, bias=True,
                     residual=True, wtype="u4", group=128, arch=arch(), xldg=True)
    assert rel_err(run(plan, lin, x, lin.bias, r), ref) < 1e-2


def test_xldg_route_and_graph_replay(monkeypatch):
    """LAYERFORGE_GEMV_XLDG=1: a u4 layer at 1-16 rows takes an xldg plan; under CUDA-graph replay with fresh x it
    matches the reference, at 12 rows and at 3."""
    from layerforge.runtime import linear
    monkeypatch.setenv("LAYERFORGE_GEMV_XLDG", "1")
    n, k = 2 * 2816, 2048
    gen = seeded_generator("gemv-xldg-route")
    lin = quant_linear(n, k, "u4", 128, torch.bfloat16, gen, bias=True)
    before = set(linear._KERNELS)
    for m in (12, 3):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        y = replayed(lambda t: lin(t, gated="silu"), x)
        assert rel_err(y, reference(x, dequantize(lin.qw), lin.bias, "silu", None)) < 1e-2, m
    new = [key for key in linear._KERNELS if key not in before]
    assert any(isinstance(key, tuple) and key[-1] is True for key in new), new   # an xldg plan's key
