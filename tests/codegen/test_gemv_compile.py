"""The small-token product kernel (codegen/gemv.py): every specialisation the models and the
benchmark use renders and compiles for sm_80 and sm_90 without register spills, keeps its
loads in flight (no GPU needed), and bad plans are clear errors."""
import pytest

from layerforge.codegen.gemv import plan_gemv

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# Llama-3-8B (q/k/v, o, gate/up, down, lm_head), 70B gate/up, TinyLlama, odd sizes
SHAPES = [(6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None),
          (128256, 4096, None), (57344, 8192, "silu"), (11264, 2048, "gelu_tanh"), (1000, 3000, None),
          (3000, 1000, "gelu")]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("max_m", [8, 16])
@pytest.mark.parametrize("n,k,gated", SHAPES)
def test_gemv_compiles_without_spills(n, k, gated, max_m, arch):
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemv(dtype, n=n, k=k, max_m=max_m, gated=gated, bias=bias, residual=residual, arch=arch)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_gemv_loads_are_unconditional():
    """The loads of an unrolled step do not sit behind branches (which kept ptxas from having
    more than one chunk's loads in flight): the PTX has no branch inside the K loop."""
    plan = plan_gemv("bf16", n=6144, k=4096, arch="sm_90")
    ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
    body = ptx.split("ld.global.nc.v4", 1)[1].rsplit("mma.sync", 1)[0]
    assert "bra" not in body and body.count("ld.global.nc.v4") == 3 * plan.unroll - 1


def test_gemv_plan_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_gemv("bf16", n=64, k=60)
    with pytest.raises(ValueError, match="1 to 16 tokens"):
        plan_gemv("bf16", n=64, k=64, max_m=17)
    with pytest.raises(ValueError, match="even number"):
        plan_gemv("bf16", n=63, k=64, gated="silu")
    with pytest.raises(ValueError, match="sm_80"):
        plan_gemv("bf16", n=64, k=64, arch="sm_75")
    with pytest.raises(ValueError, match="dtype"):
        plan_gemv("f32", n=64, k=64)
    assert plan_gemv("bf16", n=64, k=64, max_m=3).max_m == 8 and plan_gemv("bf16", n=64, k=64, max_m=9).max_m == 16
