"""Attention hooks that the DSL types and the reference runs also compile with NVRTC: integer
`min`/`max`, `//` and `%` of mixed widths (an i32 position against an i64 dim) are emitted
with both operands in the result's type, in the CUDA-core paged kernel and in both
tensor-core kernels (no GPU needed)."""
import pytest

import layerforge as lf
from layerforge.codegen.attention import plan_paged_attention
from layerforge.codegen.attention_tc import plan_tc_attention, tile_candidates

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

MIXED_WIDTHS = """
dims Hq, Hkv, D, NR, W
dynamic B, S, Skv
attention mixed(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], rel: f32[NR]) -> T[B, S, Hq, D] {
    score = score + rel[min(q_pos - kv_pos, NR - 1)] + f32(max(q_pos // W, 6)) + f32(kv_pos % W)
    mask = q_pos >= kv_pos and max(kv_pos, NR) >= min(W, q_pos)
}
"""


@pytest.fixture(scope="module")
def layer():
    return lf.loads(MIXED_WIDTHS).specialise("mixed", Hq=8, Hkv=8, D=64, NR=32, W=4, dtype="bf16")


def compiles(plan, arch="sm_90"):
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}


def test_mixed_width_min_max_compile_in_the_paged_kernel(layer):
    compiles(plan_paged_attention(layer, "sm_90"))


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_mixed_width_min_max_compile_in_the_tensor_core_kernels(layer, mode):
    plan = plan_tc_attention(layer, "sm_90", mode=mode, tiles=tile_candidates(mode, 64, 1)[0])
    compiles(plan)
    assert "min((long long)(" in plan.source()   # both operands of the i64 min in one type


def test_table_sized_by_a_dynamic_dim_other_than_b_compiles_with_its_dim_argument():
    from tests.runtime.test_attention_tables import DOC_MASK
    doc = lf.loads(DOC_MASK).specialise("doc_attn", Hq=4, Hkv=2, D=64, dtype="bf16")
    for plan in (plan_paged_attention(doc, "sm_90"),
                 plan_tc_attention(doc, "sm_90", mode="decode", tiles=tile_candidates("decode", 64, 2)[0])):
        compiles(plan)
        assert [a.name for a in plan.kernels[0].args if a.ref in ("B", "Skv")] == ["d_B", "d_Skv"]


def test_tc_scale_fold_compiles_without_spills():
    """TCAttentionPlan.fold (LAYERFORGE_TC_FOLD=1): one FFMA a score into the exponent on the mma.sync tiles,
    prefill and decode, sm_80 and sm_90, its own key; a block with a score hook never takes it."""
    from layerforge.codegen.attention_tc import plan_tc_attention
    from layerforge.runtime.nvrtc import CompileOptions, compile_cuda
    prog = lf.stdlib()
    for arch in ("sm_80", "sm_90"):
        for mode in ("prefill", "decode"):
            plan = plan_tc_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), arch, mode=mode,
                                     fold=True, top_rows=False)
            assert plan.fold and plan.key.endswith(f"_f_{arch.replace('_', '')}")
            assert "lf_ex2(fmaf(s[mt][nt][half * 2], scale2, -mu_p))" in plan.source()
            for kr in compile_cuda(plan.source(), plan.kernel_name, CompileOptions(arch)).resources.values():
                assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
            hooked = plan_tc_attention(prog.specialise("bloom_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), arch,
                                       mode=mode, fold=True)
            assert not hooked.fold and "fmaf(s[" not in hooked.source()
