"""W prefetched into L2 ahead of the small-token products' rings (codegen/gemv.py GemvPlan.prefetch, the template's
PREFETCH; LAYERFORGE_GEMV_L2_PREFETCH): every kind of plan compiles without spills for sm_80 and sm_90 with it, the
prefetch is one per-lane line prefetch a W row of a chunk (never sm_90's bulk prefetch, whose uniform address made a
32-issue loop), nothing else in the kernel changes without it, the switch reaches the planner, and bad values are clear
errors."""
import re

import pytest

from layerforge.codegen.gemv import GEMV_PREFETCH_CHUNKS, GemvPlan, plan_gemv

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

CASES = [  # (dtype, n, k, max_m, extra): bf16 / u4 / i8 / f8e4m3, gated, bias + residual, a norm, K and N off the tiles,
    # an expert product (its W a stack)
    ("bf16", 6144, 4096, 8, {}),
    ("bf16", 28672, 4096, 16, dict(gated="silu")),
    ("f16", 2000, 3000, 8, dict(bias=True, residual=True, norm="rms")),
    ("bf16", 6144, 4096, 16, dict(wtype="u4", group=128)),
    ("bf16", 6144, 4096, 1, dict(wtype="u4", group=128)),
    ("bf16", 57344, 8192, 16, dict(wtype="u4", group=128, gated="silu")),
    ("bf16", 2000, 3072, 8, dict(wtype="u4", group=64, gated="gelu_tanh", norm="rms", bias=True)),
    ("bf16", 4096, 14336, 16, dict(wtype="i8")),
    ("bf16", 4000, 4128, 8, dict(wtype="i8", group=32)),
    ("bf16", 2816, 2048, 8, dict(gated="silu", experts=8, gather=True)),
]


def compiled(plan, ptx=False):
    return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=ptx)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefetch_plans_compile_without_spills(case, arch):
    dtype, n, k, m, extra = CASES[case]
    plan = plan_gemv(dtype, n=n, k=k, max_m=m, arch=arch, prefetch=2, **extra)
    assert plan.prefetch == 2 and plan.key.split("_")[-2].endswith("l2"), plan.key
    res = compiled(plan, ptx=True)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
    # one line prefetch in the loop (and the prologue's), never the bulk form
    assert "prefetch.global.L2" in res.ptx and "cp.async.bulk.prefetch" not in res.ptx


def test_without_prefetch_the_source_is_unchanged():
    """prefetch 0 renders no prefetch at all (the kernels timed before it are the ones built without it)."""
    for dtype, n, k, m, extra in CASES:
        plain = plan_gemv(dtype, n=n, k=k, max_m=m, prefetch=0, **extra)
        src = plain.source()
        assert "prefetch" not in src.lower() and plain.prefetch == 0 and not re.search(r"s\d+l\d+_", plain.key)


def test_the_switch_reaches_the_planner(monkeypatch):
    monkeypatch.delenv("LAYERFORGE_GEMV_L2_PREFETCH", raising=False)
    assert plan_gemv("bf16", n=6144, k=4096, wtype="u4", group=128).prefetch == 0
    monkeypatch.setenv("LAYERFORGE_GEMV_L2_PREFETCH", "1")
    on = plan_gemv("bf16", n=6144, k=4096, wtype="u4", group=128)
    assert on.prefetch == GEMV_PREFETCH_CHUNKS and on.key.endswith(f"l{GEMV_PREFETCH_CHUNKS}_sm90")
    # the shared-x layout takes none, and an explicit value wins over the switch
    assert plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="u4", group=128, xshare=2).prefetch == 0
    assert plan_gemv("bf16", n=6144, k=4096, wtype="u4", group=128, prefetch=0).prefetch == 0
    monkeypatch.setenv("LAYERFORGE_GEMV_L2_PREFETCH", "maybe")
    with pytest.raises(ValueError, match="LAYERFORGE_GEMV_L2_PREFETCH"):
        plan_gemv("bf16", n=6144, k=4096)


@pytest.mark.parametrize("bad", [-1, 9, True, 1.5])
def test_bad_prefetch_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="prefetch"):
        GemvPlan(dtype="bf16", n=6144, k=4096, prefetch=bad)


def test_prefetch_with_the_shared_x_layout_is_an_error():
    with pytest.raises(ValueError, match="prefetch"):
        GemvPlan(dtype="bf16", n=6144, k=4096, max_m=16, wtype="u4", group=128, rt=1, warps=4, stages=2, xshare=2,
                 prefetch=2)
