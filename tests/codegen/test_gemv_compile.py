"""The small-token product kernel (codegen/gemv.py): every specialisation the models and the
benchmark use renders and compiles for sm_80 and sm_90 without register spills, streams W through
shared memory (no GPU needed), and bad plans are clear errors."""
import pytest

from layerforge.codegen.gemv import plan_gemv

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# Llama-3-8B (q/k/v, o, gate/up, down, lm_head), 70B gate/up, TinyLlama, odd sizes
SHAPES = [(6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None),
          (128256, 4096, None), (57344, 8192, "silu"), (11264, 2048, "gelu_tanh"), (1000, 3000, None),
          (3000, 1000, "gelu")]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("max_m", [8, 16, 32])
@pytest.mark.parametrize("n,k,gated", SHAPES)
def test_gemv_compiles_without_spills(n, k, gated, max_m, arch):
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemv(dtype, n=n, k=k, max_m=max_m, gated=gated, bias=bias, residual=residual, arch=arch)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_gemv_with_a_row_stride_compiles_and_reads_w_at_it(arch):
    """ldw: W a view of a wider buffer (LoRA's K-extended storage: rows K + slices x slots x rank
    apart): a plan of its own, W's rows addressed at the stride, nothing else changed."""
    for n, gated in ((6144, None), (28672, "silu")):
        plan = plan_gemv("bf16", n=n, k=4096, max_m=16, gated=gated, ldw=4224, arch=arch)
        assert "_ldw4224_" in plan.key and plan_gemv("bf16", n=n, k=4096, gated=gated, ldw=4096).ldw == 0
        assert "constexpr long long LDW = 4224;" in plan.source()
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_gemv_streams_w_through_shared_memory():
    """W and x reach the tensor cores through each warp's cp.async ring only (the bytes in flight
    cost no registers): no global loads in the kernel but the epilogue's (bias, residual), and
    the loop keeps STAGES - 1 chunks in flight (cp.async.wait_group STAGES - 1)."""
    for stages in (2, 4, 6):
        plan = plan_gemv("bf16", n=6144, k=4096, arch="sm_90", stages=stages)
        ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
        assert "ld.global" not in ptx and "cp.async.cg.shared.global" in ptx
        assert f"cp.async.wait_group {stages - 1};" in ptx and "cp.async.wait_group 0;" in ptx


def test_gemv_is_a_programmatic_dependent_launch_on_sm90():
    """On sm_90 the kernel is launched with programmatic stream serialisation (abi.pdl): it lets
    the next kernel launch, copies W's first chunks, then waits for the kernel before it
    (griddepcontrol.wait) before anything else; on sm_80 none of it."""
    p90 = plan_gemv("bf16", n=6144, k=4096, norm="rms", arch="sm_90")
    ptx = nvrtc.compile_cuda(p90.source(), p90.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
    assert p90.abi.pdl and "griddepcontrol.launch_dependents" in ptx
    before, after = ptx.split("griddepcontrol.wait", 1)
    assert "cp.async.cg.shared.global" in before and "st.global" not in before and "cp.async.commit_group" not in before
    assert "st.global" in after
    p80 = plan_gemv("bf16", n=6144, k=4096, norm="rms", arch="sm_80")
    assert not p80.abi.pdl and "griddepcontrol" not in p80.source()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_gemv_norm_prologue_compiles(arch):
    """RMSNorm fused in the prologue (Llama's gamma and Gemma's 1 + gamma), with every epilogue."""
    for gated, offset, max_m in ((None, 0.0, 8), ("silu", 0.0, 16), ("gelu_tanh", 1.0, 8), (None, 1.0, 16)):
        plan = plan_gemv("bf16", n=28672 if gated else 6144, k=4096, max_m=max_m, gated=gated, norm="rms",
                         norm_offset=offset, bias=True, residual=True, arch=arch)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
        assert [a.name for a in plan.abi.args][-3:] == ["out", "M", "eps"] and plan.abi.arg("gamma")
        assert plan.shared_bytes == plan.abi.shared_bytes == plan.warps * plan.stages * plan.stage_bytes


def test_gemv_plan_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_gemv("bf16", n=64, k=60)
    with pytest.raises(ValueError, match="1 to 64 tokens"):
        plan_gemv("bf16", n=64, k=64, max_m=65)
    with pytest.raises(ValueError, match="even number"):
        plan_gemv("bf16", n=63, k=64, gated="silu")
    with pytest.raises(ValueError, match="sm_80"):
        plan_gemv("bf16", n=64, k=64, arch="sm_75")
    with pytest.raises(ValueError, match="dtype"):
        plan_gemv("f32", n=64, k=64)
    with pytest.raises(ValueError, match="stages"):
        plan_gemv("bf16", n=64, k=64, stages=1)
    with pytest.raises(ValueError, match="norm"):
        plan_gemv("bf16", n=64, k=64, norm="layer")
    with pytest.raises(ValueError, match="norm_offset"):
        plan_gemv("bf16", n=64, k=64, norm="rms", norm_offset=0.5)
    with pytest.raises(ValueError, match="shared memory"):
        plan_gemv("bf16", n=64, k=64, gated="silu", rt=4, warps=8, stages=8)
    assert [plan_gemv("bf16", n=64, k=64, max_m=m).max_m for m in (1, 3, 8, 9, 16, 17, 33, 64)] == [
        8, 8, 8, 16, 16, 32, 64, 64]
