"""The scan kernels (codegen/scan.py; runtime/scan.py) without a GPU: the plans' keys, ABIs and
refusals; the decode update's state split and the prefill's chunked schedule as data (the
schedule run on the CPU against the recurrence's definition, lengths on and off chunk
boundaries); every kernel variant compiling for sm_90a and sm_80 without spills."""
import pytest
import torch

from layerforge.codegen.scan import (CONV_TILE, MAX_STATE, SCAN_ITEMS, SCAN_THREADS, UPDATE_THREADS, SelectiveScanPlan,
                                     chunked_scan, plan_conv, plan_conv_update, plan_selective_scan, plan_state_update,
                                     scan_tiles, state_split)
from layerforge.dsl.recurrences import linear_recurrence

from ..seeding import seeded_generator


# ---- plans -----------------------------------------------------------------------------------
def test_keys_spell_out_the_specialisation():
    assert plan_conv(channels=5120, width=4, dtype="bf16", bias="bf16").key == \
        "scan_conv_d5120_k4_bf16_wbf16_bbf16_silu_sm90"
    assert plan_conv(channels=64, width=2, dtype="f16", weight_dtype="f32", silu=False, initial=True, final=True,
                     arch="sm_80").key == "scan_conv_d64_k2_f16_wf32_init_final_sm80"
    assert plan_conv_update(channels=64, width=3, dtype="bf16", state_dtype="f32").key == \
        "scan_conv_update_d64_k3_bf16_sf32_wbf16_silu_sm90"
    assert plan_selective_scan(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32", bias_dtype="f32",
                               gate=True, initial=True, final=True).key == \
        "selective_scan_d5120_n16_bf16_af32_skipf32_bf32_z_sp_init_final_sm90"
    assert plan_selective_scan(channels=8, state=4, dtype="f32", softplus=False, threads=32, items=4).key == \
        "selective_scan_d8_n4_f32_af32_t32x4_sm90"
    assert plan_state_update(channels=8, state=16, dtype="f16", gate=True).key == \
        "selective_state_update_d8_n16_f16_af16_z_sp_sm90"


def test_abis():
    conv = plan_conv(channels=64, width=4, dtype="bf16", bias="f32", initial=True, final=True).abi
    assert [(a.name, a.role) for a in conv.args] == [
        ("x", "input"), ("weight", "input"), ("bias", "input"), ("initial_state", "input"), ("y", "output"),
        ("final_state", "output"), ("batch", "dim"), ("length", "dim")]
    assert conv.arg("bias").ctype == "const float* __restrict__"
    assert conv.grid_for(128, CONV_TILE + 1) == (128, 2, 1)
    step = plan_conv_update(channels=64, width=4, dtype="f16", state_dtype="f32").abi
    assert [a.name for a in step.args] == ["x", "conv_state", "weight", "y", "batch"]
    assert step.arg("conv_state").ctype == "float* __restrict__" and step.grid_for(129) == (2, 1, 1)
    scan = plan_selective_scan(channels=64, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32", bias_dtype="f32",
                               gate=True, initial=True, final=True)
    assert [a.name for a in scan.abi.args] == ["u", "delta", "A", "Bm", "Cm", "Dskip", "z", "delta_bias",
                                               "initial_state", "y", "final_state", "batch", "length"]
    assert scan.abi.grid_for(640) == (640, 1, 1) and scan.abi.block == (128, 1, 1)
    assert scan.abi.shared_bytes == scan.shared.bytes == 2 * 2 * 4 * 4 + 2 * 16 * 4
    update = plan_state_update(channels=64, state=16, dtype="bf16", bias_dtype="f32")
    assert [a.name for a in update.abi.args] == ["state", "x", "dt", "A", "Bm", "Cm", "dt_bias", "y", "batch"]
    assert update.abi.grid_for(1000) == (-(-1000 // (UPDATE_THREADS // 4)), 1, 1) and update.vector_state
    assert not plan_state_update(channels=64, state=6, dtype="bf16").vector_state


@pytest.mark.parametrize("make,match", [
    (lambda: plan_conv(channels=64, width=5, dtype="bf16"), "width must be one of"),
    (lambda: plan_conv(channels=0, width=4, dtype="bf16"), "positive int"),
    (lambda: plan_conv(channels=64, width=4, dtype="f64"), "dtype must be one of"),
    (lambda: plan_conv(channels=64, width=4, dtype="bf16", weight_dtype="f16"), "f32 or the input dtype bf16"),
    (lambda: plan_conv(channels=64, width=4, dtype="bf16", silu=1), "silu must be a bool"),
    (lambda: plan_conv_update(channels=64, width=4, dtype="f16", state_dtype="bf16"), "state_dtype must be f32"),
    (lambda: plan_selective_scan(channels=64, state=MAX_STATE + 1, dtype="bf16"), "carry up to"),
    (lambda: plan_selective_scan(channels=64, state=16, dtype="bf16", threads=96), "power of two"),
    (lambda: plan_state_update(channels=64, state=16, dtype="bf16", arch="sm_61"), "sm_70"),
])
def test_plan_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_plans_are_values():
    assert plan_selective_scan(channels=8, state=4, dtype="f32") == SelectiveScanPlan(channels=8, state=4, dtype="f32")
    assert len({plan_conv(channels=8, width=4, dtype="f16"), plan_conv(channels=8, width=4, dtype="f16")}) == 1


# ---- the work splits, as data ----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 100, 128, 256])
def test_state_split_covers_the_states_within_a_warp(n):
    lanes, per = state_split(n)
    assert lanes & (lanes - 1) == 0 and lanes <= 32 and 32 % lanes == 0   # xor shuffles within a warp
    assert lanes * per >= n and (lanes == 1 or (lanes // 2) * per < n)    # the fewest lanes that hold N
    assert state_split(16) == (4, 4)                                      # Mamba's N: 4 lanes of float4


@pytest.mark.parametrize("length,items", [(0, 1), (1, 1), (128, 1), (129, 2), (300, 4), (1000, 8), (1024, 8),
                                          (8192, 8)])
def test_scan_tiles_cover_short_sequences_with_one_chunk(length, items):
    threads, got = scan_tiles(length)
    assert (threads, got) == (SCAN_THREADS, items) and got <= SCAN_ITEMS
    assert threads * got >= min(length, SCAN_THREADS * SCAN_ITEMS)


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 128, 129, 300])
def test_chunked_schedule_equals_the_recurrence(length):
    gen = seeded_generator("chunked_scan", length)
    a = torch.rand(3, length, generator=gen, dtype=torch.float64) * 1.2
    b = torch.randn(3, length, generator=gen, dtype=torch.float64)
    h0 = torch.randn(3, generator=gen, dtype=torch.float64)
    want, last = linear_recurrence(a, b, -1, h0)
    got, carry = chunked_scan(a, b, h0, threads=8, items=4)   # chunks of 32 steps
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(carry, last, rtol=1e-12, atol=1e-12)


# ---- compilation -----------------------------------------------------------------------------
nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

PLANS = [
    lambda arch: plan_conv(channels=5120, width=4, dtype="bf16", bias="bf16", initial=True, final=True, arch=arch),
    lambda arch: plan_conv_update(channels=5120, width=3, dtype="f16", state_dtype="f32", weight_dtype="f32",
                                  silu=False, arch=arch),
    lambda arch: plan_selective_scan(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32",
                                     bias_dtype="f32", gate=True, initial=True, final=True, arch=arch),
    lambda arch: plan_selective_scan(channels=64, state=5, dtype="f32", softplus=False, items=2, arch=arch),
    lambda arch: plan_state_update(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32",
                                   bias_dtype="f32", gate=True, arch=arch),
    lambda arch: plan_state_update(channels=64, state=5, dtype="f16", arch=arch),
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("make", PLANS, ids=lambda m: m("sm_90").key.removesuffix("_sm90"))
def test_kernel_compiles_without_spills(make, arch):
    plan = make(arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
    assert res.cubin[:4] == b"\x7fELF"
    kr = res.resources[plan.kernel_name]
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    assert kr.registers <= 128, (plan.key, kr)   # 128 threads a block: at least 4 blocks an SM
    if plan.family == "selective_state_update" and plan.vector_state:
        assert res.ptx.count("ld.global.v4.f32") == 1 and res.ptx.count("st.global.v4.f32") == 1, plan.key
