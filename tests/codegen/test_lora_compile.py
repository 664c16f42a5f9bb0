"""The multi-LoRA decode kernels (codegen/lora.py) without a GPU: the plans of Llama-3-8B's
projections (q/k/v and gate/up as slices of the fused ones, o, down) and odd shapes compile for
sm_80 and sm_90 without spills, with the 16-byte accesses they promise; the keys, ABIs and grids;
the plans that make no sense are clear errors."""
import re

import pytest

from layerforge.codegen.lora import LoraExpandPlan, plan_lora_expand, plan_lora_mask, plan_lora_shrink

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# (K, slices): Llama-3-8B's qkv, o, gate_up, down; a small odd model
PROJECTIONS = [(4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,)),
               (1000, (200, 40, 40))]


def _compile(plan, arch, ptx=False):
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=ptx)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    return res


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype,rank", [("bf16", 16), ("bf16", 128), ("f16", 8)])
@pytest.mark.parametrize("k,slices", PROJECTIONS)
def test_kernels_compile_without_spills(k, slices, dtype, rank, arch):
    _compile(plan_lora_shrink(dtype, k=k, rank=rank, slices=len(slices), arch=arch), arch)
    for bias in (False, True):
        _compile(plan_lora_expand(dtype, slices=slices, rank=rank, bias=bias, arch=arch), arch)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype,slots,rank,slices", [("bf16", 4, 16, 3), ("f16", 7, 8, 1), ("bf16", 16, 64, 2)])
def test_mask_compiles_to_one_16_byte_load_and_store(dtype, slots, rank, slices, arch):
    plan = plan_lora_mask(dtype, slots=slots, rank=rank, slices=slices, arch=arch)
    ptx = _compile(plan, arch, ptx=True).ptx
    assert ptx.count("ld.global.nc.v4.u32") == 1 and ptx.count("st.global.v4.u32") == 1, plan.key
    assert plan.key == f"lora_mask_e{slots}_r{rank}x{slices}_{dtype}_{arch.replace('_', '')}"
    assert [a.name for a in plan.abi.args] == ["v", "ldv", "slot", "scales", "vm", "ldvm", "n_tokens"]
    assert plan.abi.grid_for(300) == (-(-300 * slices * slots * rank // 8 // 256), 1, 1)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mask_with_x_copies_it_in_16_byte_vectors(arch):
    """copy_k: the K-extended operand [x | vm] in one launch, a thread one 16-byte vector of either."""
    plan = plan_lora_mask("bf16", slots=4, rank=16, slices=3, copy_k=4096, arch=arch)
    ptx = _compile(plan, arch, ptx=True).ptx
    assert ptx.count("ld.global.nc.v4.u32") == 2 and ptx.count("st.global.v4.u32") == 2, plan.key
    assert plan.key == f"lora_mask_e4_r16x3_x4096_bf16_{arch.replace('_', '')}"
    assert [a.name for a in plan.abi.args] == ["v", "ldv", "slot", "scales", "x", "vm", "ldvm", "n_tokens"]
    assert plan.abi.grid_for(300) == (-(-300 * (4096 + 3 * 4 * 16) // 8 // 256), 1, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_lora_mask("bf16", slots=4, rank=16, copy_k=12)


def test_the_shrink_reads_16_byte_vectors_and_reduces_by_halving():
    plan = plan_lora_shrink("bf16", k=4096, rank=16, slices=3, arch="sm_90")
    ptx = _compile(plan, "sm_90", ptx=True).ptx
    assert ptx.count("ld.global.nc.v4.u32") == plan.rows_per_cta + plan.tokens_per_cta   # a step's loads
    assert "ld.global.nc.u16" not in ptx and "ld.local" not in ptx
    assert ptx.count("shfl.sync") == 31                  # 32 sums across a warp's lanes, one left a lane
    src = plan.source()
    assert "const int live = min(RB, ranks[e * S + r0 / R] - r0 % R);" in src and "if (live <= 0) return;" in src


def test_the_expand_reads_y_and_b_and_writes_out_in_16_byte_vectors():
    plan = plan_lora_expand("bf16", slices=(4096, 1024, 1024), rank=16, arch="sm_90")
    ptx = _compile(plan, "sm_90", ptx=True).ptx
    MB = plan.tokens_per_cta
    assert ptx.count("ld.global.v4.u32") == MB and ptx.count("st.global.v4.u32") == MB   # y in, out
    assert ptx.count("ld.global.nc.v4.u32") == plan.chunk                                # b's rows in flight
    assert not re.search(r"\b(atom|red)\.", ptx)   # no atomics: each output is one thread's
    assert "return 0 + (n >= 4096) + (n >= 5120);" in plan.source()


def test_keys_abis_and_grids():
    shrink = plan_lora_shrink("bf16", k=4096, rank=16, slices=3)
    assert shrink.key == "lora_shrink_k4096_r16x3_bf16_w8_sm90"
    assert [a.name for a in shrink.abi.args] == ["x", "a", "ranks", "offsets", "src", "v", "n_tokens"]
    assert shrink.abi.arg("v").ctype == "__nv_bfloat16* __restrict__"
    assert shrink.abi.grid_for(4, 64) == (6, 4, 16) and shrink.abi.block == (256, 1, 1)
    assert plan_lora_shrink("bf16", k=14336, rank=16).warps == 16 and plan_lora_shrink("f16", k=1000, rank=8).warps == 4
    expand = plan_lora_expand("f16", slices=[4096, 1024, 1024], rank=16, arch="sm_80")
    assert expand.key == "lora_expand_o4096x1024x1024_r16_f16_t64m8_sm80"
    assert [a.name for a in expand.abi.args] == ["y", "ldy", "v", "ldv", "vslot", "b", "ranks", "scales", "offsets",
                                                 "src", "out", "n_tokens", "slots"]
    assert "__restrict__" not in expand.abi.arg("y").ctype + expand.abi.arg("out").ctype   # out may be y
    assert expand.abi.grid_for(5, 64) == (12, 5, 8) and expand.abi.block == (64, 1, 1)
    assert expand.starts == (0, 4096, 5120) and expand.out == 6144 and expand.chunk == 16
    assert expand == LoraExpandPlan(dtype="f16", slices=(4096, 1024, 1024), rank=16, arch="sm_80")
    biased = plan_lora_expand("bf16", slices=(4096,), rank=24, bias=True)
    assert biased.key == "lora_expand_o4096_r24_bf16_bias_t64m8_sm90" and biased.chunk == 8
    assert [a.name for a in biased.abi.args][10:12] == ["bias", "out"]


@pytest.mark.parametrize("make,match", [
    (lambda: plan_lora_shrink("f32", k=64, rank=8), "dtype"),
    (lambda: plan_lora_shrink("bf16", k=60, rank=8), "multiple of 8"),
    (lambda: plan_lora_shrink("bf16", k=64, rank=12), "rank = 12 must be a multiple of 8"),
    (lambda: plan_lora_shrink("bf16", k=64, rank=264), "up to 256"),
    (lambda: plan_lora_shrink("bf16", k=64, rank=8, slices=5), "5 slices"),
    (lambda: plan_lora_shrink("bf16", k=64, rank=8, warps=33), "warps = 33"),
    (lambda: plan_lora_shrink("bf16", k=64, rank=8, arch="sm_75"), "sm_80"),
    (lambda: plan_lora_expand("bf16", slices=(60, 8), rank=8), "multiples of 8"),
    (lambda: plan_lora_expand("bf16", slices=(), rank=8), "at least one slice"),
    (lambda: plan_lora_expand("bf16", slices=(64,), rank=8, threads=48), "multiple of 32"),
    (lambda: plan_lora_expand("bf16", slices=(64,), rank=8, tokens_per_cta=17), "1 to 16"),
    (lambda: plan_lora_expand("bf16", slices=(64,), rank=8, bias=1), "bias must be a bool"),
    (lambda: plan_lora_mask("bf16", slots=0, rank=8), "slots must be a positive int"),
    (lambda: plan_lora_mask("bf16", slots=4, rank=12), "multiple of 8"),
])
def test_plan_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
