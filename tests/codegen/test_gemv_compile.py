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
    """The loads of an unrolled step are unconditional (a load behind a branch kept ptxas from
    having more than one chunk's loads in flight), once in the prologue and once in the loop
    (the next step's, issued before the current step's tensor-core ops)."""
    plan = plan_gemv("bf16", n=6144, k=4096, arch="sm_90", unroll=4)
    ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
    loads = [line.strip() for line in ptx.splitlines() if "ld.global.nc.v4" in line]
    assert len(loads) == 2 * 3 * plan.unroll and not any(line.startswith("@") for line in loads)
    body = ptx.split("mma.sync", 1)[0].rsplit("ld.global.nc.v4", 1)[0]
    assert body.count("ld.global.nc.v4") == 2 * 3 * plan.unroll - 1   # all before the first mma


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
