"""u4's small-token product in the shared-x layout (codegen/gemv.py xshare: the CTA's warps own different W rows
and stage x once a chunk together, K split over CTAs whose f32 sums the row block's last CTA adds) on the GPU
against float64 of the dequantised weights: 1-16 tokens, K not a multiple of the 256-k chunk, N not a multiple of
a CTA's rows, every group size, splits of 1 to all the chunks, the fused epilogues, f16, outputs poisoned with NaN
first; the counters left zero across launches and graph replays; the runtime's route under
LAYERFORGE_GEMV_XSHARE=1."""
import pytest
import torch

from layerforge.codegen.gemv import plan_gemv, xshare_split
from layerforge.runtime.quant import dequantize

from ..seeding import seeded_generator
from .products import reference, replayed
from .test_gemv_quant import quant_linear, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def launcher(plan):
    from layerforge.runtime.launch import load_plan
    from layerforge.runtime.linear import _SplitGemvLauncher
    launch = load_plan(plan, torch.device("cuda"))
    return _SplitGemvLauncher(plan, launch, torch.device("cuda")) if plan.xshare > 1 else launch


def run(plan, lin, x, bias=None, residual=None):
    from layerforge.runtime.launch import device_arch
    assert plan.arch == device_arch()
    m = x.shape[0]
    out = torch.full((m, plan.n_out), float("nan"), dtype=x.dtype, device="cuda")
    args = [x, *lin.qw.kernel_tensors] + ([bias] if bias is not None else []) + (
        [residual] if residual is not None else []) + [out, m]
    launcher(plan)((), args)
    return out


def arch():
    from layerforge.runtime.launch import device_arch
    return device_arch()


# (N, K): 8B qkv, odd N, K a multiple of 128 but not of the 256-k chunk, 8B down (56 chunks), tiny, N a multiple
# of 16 but not of a CTA's 64 rows (its last warp's rows past W)
SHAPES = [(6144, 4096), (1000, 3072), (3000, 1152), (4096, 14336), (24, 128), (1040, 2048)]


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_xshare_against_float64(n, k, group, m):
    if k % group:
        pytest.skip("the group size must divide K")
    gen = seeded_generator("gemv-xshare", n, k, group, m)
    lin = quant_linear(n, k, "u4", group, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    ref = reference(x, dequantize(lin.qw), None, None, None)
    chunks = -(-k // 256)
    for split in sorted({1, 2, 3, xshare_split(n, k), chunks} & set(range(1, chunks + 1))):
        plan = plan_gemv("bf16", n=n, k=k, max_m=m, wtype="u4", group=group, arch=arch(), xshare=split)
        assert rel_err(run(plan, lin, x), ref) < 1e-2, plan.key


@pytest.mark.parametrize("split", [(1, 4, 2, 4), (1, 4, 3, 4), (1, 8, 2, 2), (2, 4, 2, 2), (2, 2, 2, 6), (1, 2, 2, 8)])
def test_xshare_work_splits(split):
    """(rt, warps, stages, min_blocks) the benchmark sweeps, at 13 tokens with the default K split and twice it."""
    rt, warps, stages, blocks = split
    n, k = 3000, 4096
    gen = seeded_generator("gemv-xshare-splits", *split)
    lin = quant_linear(n, k, "u4", 128, torch.bfloat16, gen)
    x = torch.randn(13, k, generator=gen).to(torch.bfloat16).cuda()
    ref = reference(x, dequantize(lin.qw), None, None, None)
    auto = xshare_split(n, k, None, rt, warps)
    for ks in (auto, 2 * auto):
        plan = plan_gemv("bf16", n=n, k=k, max_m=16, wtype="u4", group=128, arch=arch(), rt=rt, warps=warps,
                         stages=stages, xshare=ks, min_blocks=blocks)
        assert rel_err(run(plan, lin, x), ref) < 1e-2, plan.key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_xshare_epilogues(m, gated, dtype):
    """Bias, the gated activation over the two row halves, the residual add."""
    gen = seeded_generator("gemv-xshare-epi", m, gated, dtype)
    n, k = 2 * 1000, 3072
    n_out = n // 2 if gated else n
    lin = quant_linear(n, k, "u4", 128, dtype, gen, bias=True)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]).to(dtype).cuda()
    r = torch.randn(m, n_out, generator=gen).to(dtype).cuda()
    ref = reference(x, dequantize(lin.qw), lin.bias, gated, r)
    plan = plan_gemv("f16" if dtype == torch.float16 else "bf16", n=n, k=k, max_m=m, gated=gated, bias=True,
                     residual=True, wtype="u4", group=128, arch=arch(), xshare=xshare_split(n, k, gated))
    assert plan.xshare > 1
    assert rel_err(run(plan, lin, x, lin.bias, r), ref) < 1e-2


def test_xshare_counters_left_zero_across_launches():
    """Many launches through one launcher (the counters the last CTA of each row block resets), fresh x each time."""
    n, k = 6144, 4096
    gen = seeded_generator("gemv-xshare-repeat")
    lin = quant_linear(n, k, "u4", 128, torch.bfloat16, gen)
    plan = plan_gemv("bf16", n=n, k=k, max_m=16, wtype="u4", group=128, arch=arch(), xshare=4)
    launch = launcher(plan)
    out = torch.empty(16, n, dtype=torch.bfloat16, device="cuda")
    for i in range(5):
        x = torch.randn(16 - i, k, generator=gen).to(torch.bfloat16).cuda()
        o = out[:x.shape[0]]
        o.fill_(float("nan"))
        launch((), [x, *lin.qw.kernel_tensors, o, x.shape[0]])
        assert rel_err(o, reference(x, dequantize(lin.qw), None, None, None)) < 1e-2, i
    assert int(launch.counts.abs().sum()) == 0


def test_xshare_route_and_graph_replay(monkeypatch):
    """LAYERFORGE_GEMV_XSHARE=1: a u4 layer at 9-16 rows takes the shared-x plan (its launcher holds the
    workspace); under CUDA-graph replay with fresh x it matches the reference; 8 rows keep the default plan."""
    from layerforge.runtime import linear
    monkeypatch.setenv("LAYERFORGE_GEMV_XSHARE", "1")
    n, k = 2 * 2816, 2048
    gen = seeded_generator("gemv-xshare-route")
    lin = quant_linear(n, k, "u4", 128, torch.bfloat16, gen, bias=True)
    x = torch.randn(12, k, generator=gen).to(torch.bfloat16).cuda()
    before = set(linear._KERNELS)
    y = replayed(lambda t: lin(t, gated="silu"), x)
    assert rel_err(y, reference(x, dequantize(lin.qw), lin.bias, "silu", None)) < 1e-2
    new = [v for key, v in linear._KERNELS.items() if key not in before]
    assert any(isinstance(v, linear._SplitGemvLauncher) for v in new), new
    x8 = torch.randn(8, k, generator=gen).to(torch.bfloat16).cuda()
    assert rel_err(lin(x8, gated="silu"), reference(x8, dequantize(lin.qw), lin.bias, "silu", None)) < 1e-2
