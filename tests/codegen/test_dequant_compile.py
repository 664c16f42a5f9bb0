"""The dequantisation kernel (codegen/dequant.py) of every quantised layout compiles for sm_80 /
sm_90 (f8e4m3: sm_89+) without spills, reads 8 k of W a thread and writes them as one 16-byte
vector,
uses the small-token kernel's conversions, and bad plans are clear errors."""
import re

import pytest

from layerforge.codegen.dequant import THREADS, plan_dequant

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

LAYOUTS = [("u4", 32), ("u4", 64), ("u4", 128), ("i8", 0), ("i8", 32), ("i8", 128), ("f8e4m3", 0), ("f8e4m3", 128)]


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("wtype,group", LAYOUTS)
def test_dequant_compiles_with_wide_accesses(wtype, group, dtype):
    for arch in ("sm_80", "sm_89", "sm_90"):
        if wtype == "f8e4m3" and arch == "sm_80":
            continue
        plan = plan_dequant(dtype, wtype=wtype, group=group, n=3000, k=1152, arch=arch)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
        load = "ld.global.nc.u32" if wtype == "u4" else "ld.global.nc.v2.u32"
        assert load in res.ptx.replace(".b32", ".u32"), plan.key
        assert res.ptx.count("st.global.v4") == 1, plan.key
        if wtype == "u4":
            assert res.ptx.count("lop3.b32") >= 4   # 4 pairs: the gemv kernel's magic-number OR


def test_keys_grid_and_abi():
    p = plan_dequant("bf16", wtype="u4", group=128, n=14336, k=4096)
    assert p.key == "dequant_n14336_k4096_bf16_u4g128_sm90"
    assert p.abi.grid[0] == str(-(-14336 * 4096 // 8 // THREADS)) and p.abi.block[0] == THREADS
    assert [(a.name, a.ctype) for a in p.abi.args] == [
        ("w", "const unsigned* __restrict__"), ("wgroup", "const unsigned* __restrict__"),
        ("out", "__nv_bfloat16* __restrict__")]
    assert [a.name for a in plan_dequant("f16", wtype="i8", group=0, n=8, k=16).abi.args] == ["w", "wscale", "out"]
    f8 = plan_dequant("bf16", wtype="f8e4m3", group=128, n=7168, k=2048)
    assert f8.key == "dequant_n7168_k2048_bf16_f8e4m3b128_sm90"
    assert f8.abi.args[1].ctype == "const float* __restrict__"


def test_plan_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        plan_dequant("bf16", wtype="u4", group=32, n=8, k=48)
    with pytest.raises(ValueError, match="group size must be one of"):
        plan_dequant("bf16", wtype="u4", group=0, n=8, k=64)
    with pytest.raises(ValueError, match="sm_89"):
        plan_dequant("bf16", wtype="f8e4m3", group=0, n=8, k=64, arch="sm_80")
    with pytest.raises(ValueError, match="dtype"):
        plan_dequant("f32", wtype="i8", group=0, n=8, k=64)
    with pytest.raises(ValueError, match="divide K"):
        plan_dequant("bf16", wtype="i8", group=128, n=8, k=1040)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_activation_quantisation_compiles(dtype):
    from layerforge.codegen.dequant import ROW_WARPS, QuantRowsPlan
    for arch in ("sm_89", "sm_90"):
        for k in (1000, 4096, 14336, 40000):
            plan = QuantRowsPlan(dtype=dtype, k=k, arch=arch)
            res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
            (kr,) = res.resources.values()
            assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
            assert "cvt.rn.satfinite.e4m3x2.f32" in res.ptx and "shfl.sync.bfly" in res.ptx
            if k <= 32768:   # a CTA a token, the row in registers: 16-lane amax a block, 16-byte loads
                assert plan.abi.grid_for(M=300) == (300, 1, 1) and re.search(r"ld\.global(\.nc)?\.v4", res.ptx)
                assert "shfl.sync.bfly.b32" in res.ptx and "bar.sync" not in res.ptx
            else:            # past what a CTA's registers hold: a warp a (token, block)
                assert res.ptx.count("cvt.rn.satfinite.e4m3x2.f32") == 2
                assert plan.abi.grid_for(M=300) == (-(-300 * -(-k // 128) // ROW_WARPS), 1, 1)
    with pytest.raises(ValueError, match="sm_89"):
        QuantRowsPlan(dtype=dtype, k=64, arch="sm_80")
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantRowsPlan(dtype=dtype, k=100)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_per_token_quantisation_compiles(dtype):
    """group 0 (the Hopper FP8 GEMM's scales): a CTA a token, its row in registers (16-byte loads,
    token_threads threads), one scale a row; refused past what a CTA's registers hold."""
    from layerforge.codegen.dequant import TOKEN_CHUNKS, QuantRowsPlan, token_threads
    for k in (8, 3000, 4096, 14336, 28672):
        plan = QuantRowsPlan(dtype=dtype, k=k, group=0)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
        assert "cvt.rn.satfinite.e4m3x2.f32" in res.ptx and re.search(r"ld\.global(\.nc)?\.v4", res.ptx)
        assert "bar.sync" in res.ptx
        t = token_threads(k)
        assert t % 32 == 0 and 8 * TOKEN_CHUNKS * t >= k and plan.abi.grid_for(M=300) == (300, 1, 1)
        assert plan.abi.block == (t, 1, 1) and plan.key.endswith("_tok_sm90") and plan.describe()["block"] == "token"
    assert token_threads(4096) == 128 and token_threads(14336) == 448
    with pytest.raises(ValueError, match="registers"):
        QuantRowsPlan(dtype=dtype, k=8 * 1024 * TOKEN_CHUNKS + 8, group=0)
    with pytest.raises(ValueError, match="group"):
        QuantRowsPlan(dtype=dtype, k=64, group=64)
