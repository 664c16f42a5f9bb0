"""The Hopper GEMM (codegen/gemm.py): every specialisation the benchmark and the tests use
renders and compiles for sm_90a without register spills, serialised wgmma or ignored
setmaxnreg (no GPU needed); bad plans are clear errors."""
import pytest

from layerforge.codegen.gemm import plan_gemm

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# Llama-3-8B (q/k/v, o, gate/up, down), 70B gate/up, odd sizes
SHAPES = [(6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None),
          (57344, 8192, "silu"), (11264, 2048, "gelu_tanh"), (1000, 3000, None), (3000, 1000, "gelu")]


@pytest.mark.parametrize("bn", [128, 256])
@pytest.mark.parametrize("n,k,gated", SHAPES)
def test_gemm_compiles_clean(n, k, gated, bn):
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemm(dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, bn=bn)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):   # setmaxnreg ignored, wgmma serialised
            assert code not in res.log, (plan.key, res.log)
        assert plan.abi.grid_for(1000)[1] == 8 and plan.abi.shared_bytes == plan.shared_bytes


def test_gemm_plan_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_gemm("bf16", n=64, k=60)
    with pytest.raises(ValueError, match="sm_90a"):
        plan_gemm("bf16", n=64, k=64, arch="sm_90")
    with pytest.raises(ValueError, match="even number"):
        plan_gemm("bf16", n=63, k=64, gated="silu")
    with pytest.raises(ValueError, match="bn must be"):
        plan_gemm("bf16", n=64, k=64, bn=96)
    with pytest.raises(ValueError, match="shared memory"):
        plan_gemm("bf16", n=64, k=64, bn=256, stages=6)
    with pytest.raises(ValueError, match="dtype"):
        plan_gemm("f32", n=64, k=64)
    p = plan_gemm("bf16", n=28672, k=4096, gated="silu")
    assert p.key == "gemm_n28672_k4096_bf16_silu_bn256s4_sm90a" and p.bn_out == 128 and p.stages == 4
