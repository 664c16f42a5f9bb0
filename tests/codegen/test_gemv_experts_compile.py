"""The expert form of the small-token product (codegen/gemv.py `experts`, the MoE decode path):
the plans of the MoE blocks compile for sm_80 and sm_90 without spills, one launch spans every
expert (grid y), the CTAs of an expert no token chose return before reading anything, and the
plans that make no sense are clear errors."""
import pytest

from layerforge.codegen.gemv import plan_gemv

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# Mixtral-8x7B gate/up and down, Qwen1.5-MoE-A2.7B, DeepSeek-V3 (256 experts), an odd size
SHAPES = [(8, 2 * 14336, 4096, "silu", True), (8, 4096, 14336, None, False), (60, 2 * 1408, 2048, "silu", True),
          (60, 2048, 1408, None, False), (256, 2 * 2048, 7168, "silu", True), (256, 7168, 2048, None, False),
          (5, 2 * 200, 1000, "gelu_tanh", True)]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("max_m", [8, 16])
@pytest.mark.parametrize("e,n,k,gated,gather", SHAPES)
def test_expert_products_compile_without_spills(e, n, k, gated, gather, max_m, arch):
    for dtype in ("bf16", "f16"):
        plan = plan_gemv(dtype, n=n, k=k, max_m=max_m, gated=gated, arch=arch, experts=e, gather=gather)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_expert_plan_shape_and_arguments():
    plan = plan_gemv("bf16", n=2 * 14336, k=4096, max_m=8, gated="silu", arch="sm_90", experts=8, gather=True)
    assert plan.key == "gemv_n28672_k4096_m8_bf16_silu_e8gx_r1w2s3_sm90"
    assert plan.abi.grid[:2] == ("cdiv(14336, 16)", "8")
    names = [a.name for a in plan.abi.args]
    assert names[-2:] == ["offsets", "src"] and names[:2] == ["x", "w"]
    assert not plan.abi.pdl   # its first reads are the permutation the kernel before wrote
    down = plan_gemv("bf16", n=4096, k=14336, max_m=8, arch="sm_90", experts=8)
    assert [a.name for a in down.abi.args][-1] == "offsets"
    src = down.source()
    assert "rows_e <= 0) return;" in src and "14336LL * 4096" not in src and "58720256LL * ex" in src
    # the expert's rows: x row row0 + m without gather, its token src[row0 + m] with it (read once a CTA)
    assert "(long long)(row0 + m) * K" in src and "xrow_s[m] = m < rows_e ? src[row0 + m]" in plan.source()


def test_expert_products_read_weights_only_after_the_emptiness_check():
    """The first global access of an expert CTA is the permutation's offsets; W is read only after
    the branch that returns for an expert with no rows."""
    plan = plan_gemv("bf16", n=4096, k=14336, max_m=8, arch="sm_90", experts=8)
    ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
    body = ptx.split(".entry", 1)[1]
    first_ld = body.index("ld.global")
    assert body.index("cp.async") > body.index("bra") > first_ld


@pytest.mark.parametrize("kw,match", [
    (dict(gather=True), "gather reads x through an expert product's src"),
    (dict(experts=8, residual=True), "an expert product has no residual or norm"),
    (dict(experts=8, norm="rms"), "an expert product has no residual or norm"),
    (dict(experts=-1), "experts must be a non-negative int"),
])
def test_bad_expert_plans(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_gemv("bf16", n=256, k=512, arch="sm_90", **kw)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fixed_expert_plans_compile_without_spills(arch):
    """A shared expert's slices as the last experts of the launch (Qwen1.5-MoE: 60 + 4, DeepSeek-V3:
    256 + 1), their W from a second stack (w_fixed after w), with the align and combine plans that
    feed and finish them."""
    from layerforge.codegen.moe import plan_moe_align, plan_moe_combine
    plans = [plan_gemv("bf16", n=2 * 1408, k=2048, max_m=8, gated="silu", arch=arch, experts=64, fixed=4, gather=True),
             plan_gemv("bf16", n=2048, k=1408, max_m=16, arch=arch, experts=64, fixed=4),
             plan_gemv("f16", n=2 * 2048, k=7168, max_m=8, gated="silu", arch=arch, experts=257, fixed=1, gather=True),
             plan_moe_align(experts=60, k=4, fixed=4, arch=arch), plan_moe_align(experts=256, k=8, fixed=1, arch=arch),
             plan_moe_combine(hidden=2048, k=4, dtype="bf16", fixed=4, shared_gate=True, arch=arch),
             plan_moe_combine(hidden=7168, k=8, dtype="f16", fixed=1, arch=arch)]
    for plan in plans:
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
    assert [a.name for a in plans[0].abi.args][:3] == ["x", "w", "w_fixed"]
    assert plans[0].key == f"gemv_n2816_k2048_m8_bf16_silu_e64f4gx_r1w2s3_{arch.replace('_', '')}"
    with pytest.raises(ValueError, match="unquantised weights only"):
        plan_gemv("bf16", n=256, k=512, arch=arch, experts=8, fixed=2, wtype="u4", group=128)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compact_expert_plans(arch):
    """compact: grid y spans min(experts, rows) CTAs, CTA y serving the expert active[y] of the
    permutation's list (no CTAs for experts without rows); CTAs past the list's length return."""
    from layerforge.codegen.moe import plan_moe_align
    plans = [plan_gemv("bf16", n=2 * 1408, k=2048, max_m=8, gated="silu", arch=arch, experts=64, fixed=4, gather=True,
                       compact=True),
             plan_gemv("f16", n=7168, k=2048, max_m=16, arch=arch, experts=257, fixed=1, compact=True),
             plan_gemv("bf16", n=4096, k=14336, max_m=8, arch=arch, experts=8, compact=True, wtype="u4", group=128),
             plan_moe_align(experts=60, k=4, fixed=4, active=True, arch=arch)]
    for plan in plans:
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
    g = plans[0]
    assert g.abi.grid[1] == "min(64, rows)" and g.abi.problem == ("rows",) and g.abi.args[-1].name == "active"
    assert g.abi.grid_for(rows=5) == (88, 5, 1) and g.abi.grid_for(rows=1000) == (88, 64, 1)
    assert "if ((int)blockIdx.y >= active[64]) return;" in g.source()
    assert [a.name for a in plans[3].abi.args][-2:] == ["active", "n_pairs"]
    with pytest.raises(ValueError, match="compact lists an expert product's experts"):
        plan_gemv("bf16", n=256, k=512, arch=arch, compact=True)
