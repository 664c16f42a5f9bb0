"""The SSD kernels (codegen/ssd.py; runtime/ssd.py) without a GPU: plan keys, ABIs and refusals;
the tile splits as data; every kernel compiling for sm_80 and sm_90a without spills at Mamba2-2.7B's
sizes and at a small configuration; the gated norm's standard-library layers on the row family
(and their reference against runtime/ssd.py's); the runtime's layout checks."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.plan import plan_layer
from layerforge.codegen.ssd import (ACC_FLOATS, MAX_CHUNK, SSDChunkScanPlan, cb_table_default, plan_ssd_chunk_cb,
                                    plan_ssd_chunk_scan, plan_ssd_chunk_state, plan_ssd_state_passing, plan_ssd_state_update, scan_rows,
                                    state_split, update_split)
from layerforge.runtime.ssd import SSDInputError, _strides, gated_rms_norm_reference

from ..seeding import seeded_generator

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

BIG = dict(heads=80, head_dim=64, groups=1, state=128)     # Mamba2-2.7B: d_model 2560, expand 2
SMALL = dict(heads=8, head_dim=16, groups=2, state=16)


# ---- plans -----------------------------------------------------------------------------------
def test_keys_spell_out_every_specialisation():
    assert plan_ssd_chunk_state(**BIG, chunk=256, dtype="bf16").key == \
        "ssd_chunk_state_h80_p64_g1_n128_q256_bf16_bias_softplus_sm90"
    assert plan_ssd_chunk_scan(**BIG, chunk=256, dtype="bf16", skip=True, arch="sm_80").key == \
        "ssd_chunk_scan_h80_p64_g1_n128_q256_bf16_bias_softplus_d_sm80"
    assert plan_ssd_chunk_scan(**SMALL, chunk=32, dtype="f32", dt_bias=False, softplus=False, gate=True).key == \
        "ssd_chunk_scan_h8_p16_g2_n16_q32_f32_z_sm90"
    assert plan_ssd_state_passing(heads=80, head_dim=64, state=128, dtype="f16", initial=True).key == \
        "ssd_state_passing_h80_p64_n128_f16_init_sm90"
    assert plan_ssd_state_update(**BIG, dtype="bf16", skip=True, gate=True, arch="sm_90a").key == \
        "ssd_state_update_h80_p64_g1_n128_bf16_bias_softplus_d_z_rb4_sm90a"   # 16 rows a block
    assert plan_ssd_state_update(**BIG, dtype="bf16", skip=True, params="bf16", a_log=True).key == \
        "ssd_state_update_h80_p64_g1_n128_bf16_bias_softplus_d_pbf16_alog_rb4_sm90"


def test_abis_order_the_arguments_and_size_the_grid():
    scan = plan_ssd_chunk_scan(**BIG, chunk=256, dtype="bf16", skip=True, gate=True).abi
    assert [a.name for a in scan.args] == [
        "x", "x_sb", "x_sl", "dt", "dt_sb", "dt_sl", "B", "B_sb", "B_sl", "C", "C_sb", "C_sl", "z", "z_sb", "z_sl",
        "A", "dt_bias", "dt_lo", "dt_hi", "D", "start", "y", "seqlen", "nc"]
    assert scan.grid_for(32, 1) == (32 * 4, 80, 1) and scan.block == (128, 1, 1)   # 4 row tiles of 64 a chunk
    state = plan_ssd_chunk_state(**BIG, chunk=256, dtype="bf16", dt_bias=False).abi
    assert [a.name for a in state.args] == ["x", "x_sb", "x_sl", "dt", "dt_sb", "dt_sl", "B", "B_sb", "B_sl", "A",
                                            "dt_lo", "dt_hi", "states", "s_last", "seqlen", "nc"]
    assert state.grid_for(32, 8) == (32, 80, 8)
    passing = plan_ssd_state_passing(heads=80, head_dim=64, state=128, dtype="bf16").abi
    assert [a.name for a in passing.args] == ["states", "s_last", "start", "final_state", "nc"]
    assert passing.grid_for(8) == (64 * 128 // 4 // 256, 80, 8)
    update = plan_ssd_state_update(**BIG, dtype="bf16").abi
    assert [a.name for a in update.args] == ["state", "x", "x_sb", "dt", "dt_sb", "B", "B_sb", "C", "C_sb", "A",
                                             "dt_bias", "dt_lo", "dt_hi", "y"]
    assert update.grid_for(64) == (80 * 4, 64, 1) and update.arg("state").ctype == "float* __restrict__"


@pytest.mark.parametrize("make,match", [
    (lambda: plan_ssd_chunk_scan(heads=80, head_dim=60, groups=1, state=128, chunk=256, dtype="bf16"), "head_dim = 60"),
    (lambda: plan_ssd_chunk_scan(heads=80, head_dim=64, groups=3, state=128, chunk=256, dtype="bf16"), "split evenly"),
    (lambda: plan_ssd_chunk_state(heads=8, head_dim=64, groups=1, state=24, chunk=64, dtype="bf16"), "state = 24"),
    (lambda: plan_ssd_chunk_state(heads=8, head_dim=64, groups=1, state=128, chunk=96, dtype="bf16"), "chunk = 96"),
    (lambda: plan_ssd_chunk_state(heads=8, head_dim=64, groups=1, state=128, chunk=2 * MAX_CHUNK, dtype="bf16"),
     "chunk = 512"),
    (lambda: plan_ssd_state_update(heads=8, head_dim=64, groups=1, state=128, dtype="f64"), "dtype"),
    (lambda: plan_ssd_state_update(heads=8, head_dim=64, groups=1, state=128, dtype="bf16", params="f16"),
     "params must be"),
    (lambda: plan_ssd_state_update(heads=8, head_dim=64, groups=1, state=128, dtype="bf16", arch="sm_75"), "sm_80"),
    (lambda: plan_ssd_state_passing(heads=8, head_dim=64, state=128, dtype="bf16", initial=1), "bool"),
    (lambda: plan_ssd_chunk_scan(heads=8, head_dim=128, groups=1, state=256, chunk=256, dtype="bf16", arch="sm_80"),
     "shared memory"),
])
def test_plans_refuse_what_the_kernels_cannot_do(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_plans_are_hashable_values():
    a = plan_ssd_chunk_scan(**BIG, chunk=256, dtype="bf16")
    assert a == SSDChunkScanPlan(**BIG, chunk=256, dtype="bf16", arch="sm_90") and len({a, a}) == 1
    assert a.source() == plan_ssd_chunk_scan(**BIG, chunk=256, dtype="bf16").source()


# ---- the tile splits, as data ----------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 96, 128])
@pytest.mark.parametrize("state", [16, 32, 64, 128, 256])
def test_state_split_covers_the_state_once_within_the_register_budget(head_dim, state):
    s = state_split(head_dim, state)
    assert s["wm"] * s["wn"] <= 4 and s["ntw"] % 2 == 0       # ldmatrix.x4 loads two 8-column tiles
    assert s["wm"] * s["mt"] * 16 == head_dim                  # every row of P once
    assert s["wn"] * s["ntw"] * 8 == s["nb"] and s["nb"] * s["nsplit"] == state
    assert s["mt"] * s["ntw"] * 4 <= ACC_FLOATS


@pytest.mark.parametrize("chunk", [16, 32, 48, 64, 128, 192, 256])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_scan_rows_divide_the_chunk(chunk, dtype):
    r = scan_rows(chunk, dtype)
    assert chunk % r == 0 and r % 16 == 0 and r <= (32 if dtype == "f32" else 64)


@pytest.mark.parametrize("state", [16, 32, 48, 64, 80, 128, 256])
def test_update_split_gives_each_lane_whole_vectors(state):
    s = update_split(state)
    assert s["lpr"] * s["vpl"] * 4 == state and 32 % s["lpr"] == 0 and s["rows_per_warp"] * s["lpr"] == 32


# ---- compiles --------------------------------------------------------------------------------
def _plans(dims, chunk, dtype, arch):
    return [plan_ssd_chunk_state(**dims, chunk=chunk, dtype=dtype, arch=arch),
            plan_ssd_state_passing(heads=dims["heads"], head_dim=dims["head_dim"], state=dims["state"], dtype=dtype,
                                   initial=True, arch=arch),
            plan_ssd_chunk_scan(**dims, chunk=chunk, dtype=dtype, skip=True, gate=True, arch=arch),
            plan_ssd_state_update(**dims, dtype=dtype, skip=True, gate=True, arch=arch),
            # the mixer's decode step: A_log, D and dt_bias in the model dtype
            plan_ssd_state_update(**dims, dtype=dtype, skip=True, gate=True, params=dtype, a_log=True, arch=arch)]


CASES = [(BIG, 256, "bf16", "sm_90a"), (BIG, 256, "bf16", "sm_80"), (SMALL, 32, "f16", "sm_80"),
         (SMALL, 32, "f32", "sm_90a")]


@pytest.mark.parametrize("dims,chunk,dtype,arch", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_every_ssd_kernel_compiles_without_spills(dims, chunk, dtype, arch):
    for plan in _plans(dims, chunk, dtype, arch):
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
        assert res.cubin[:4] == b"\x7fELF"
        kr = res.resources[plan.kernel_name]
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        if plan.family in ("ssd_chunk_state", "ssd_chunk_scan"):
            mma = res.ptx.count("mma.sync.aligned.m16n8k16")
            assert (mma > 0) == (dtype != "f32"), plan.key   # tensor cores for 2-byte inputs only
            assert "cp.async" in res.ptx


SCORE_CASES = [(BIG, 256, "bf16", "sm_90a"), (BIG, 256, "f16", "sm_80"), (SMALL, 32, "bf16", "sm_80"),
               (SMALL, 16, "f16", "sm_90a"), (dict(heads=16, head_dim=64, groups=8, state=128), 128, "bf16", "sm_90a"),
               (dict(heads=16, head_dim=32, groups=4, state=16), 64, "bf16", "sm_86")]


@pytest.mark.parametrize("dims,chunk,dtype,arch", SCORE_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_score_table_kernels_compile_without_spills(dims, chunk, dtype, arch):
    """LAYERFORGE_SSD_CB's pair: the scores' kernel (once per group) and the chunk scan reading its table (no B
    tiles, no score products: fewer mma than the scan that computes them), spill-free; sizes, ABI and grid."""
    cb = plan_ssd_chunk_cb(groups=dims["groups"], state=dims["state"], chunk=chunk, dtype=dtype, arch=arch)
    scan = plan_ssd_chunk_scan(**dims, chunk=chunk, dtype=dtype, skip=True, gate=True, cb_table=True, arch=arch)
    plain = plan_ssd_chunk_scan(**dims, chunk=chunk, dtype=dtype, skip=True, gate=True, arch=arch)
    assert [a.name for a in cb.abi.args] == ["B", "B_sb", "B_sl", "C", "C_sb", "C_sl", "cb", "seqlen", "nc"]
    tiles = chunk // scan_rows(chunk, dtype)
    assert cb.abi.grid_for(5, 2) == (5 * tiles, dims["groups"], 2)
    names = [a.name for a in scan.abi.args]
    assert "B" not in names and names[names.index("start") + 1] == "cb" and scan.key.endswith("_cb_" + arch.replace("_", ""))
    assert scan.shared.bytes < plain.shared.bytes   # no B tiles
    mma = {}
    for plan in (cb, scan, plain):
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
        kr = res.resources[plan.kernel_name]
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        mma[plan.family + ("_cb" if getattr(plan, "cb_table", False) else "")] = res.ptx.count("mma.sync.aligned")
    assert mma["ssd_chunk_cb"] > 0 and 0 < mma["ssd_chunk_scan_cb"] < mma["ssd_chunk_scan"], mma


def test_score_table_switch_and_refusals(monkeypatch):
    """On by default (measured faster), off with 0; f32 (CUDA cores) has no table; the computing scan's source
    names no table."""
    monkeypatch.delenv("LAYERFORGE_SSD_CB", raising=False)
    assert cb_table_default() is True
    monkeypatch.setenv("LAYERFORGE_SSD_CB", "0")
    assert cb_table_default() is False
    with pytest.raises(ValueError, match="not f32"):
        plan_ssd_chunk_scan(**SMALL, chunk=32, dtype="f32", cb_table=True)
    with pytest.raises(ValueError, match="not f32"):
        plan_ssd_chunk_cb(groups=2, state=16, chunk=32, dtype="f32")
    plain = plan_ssd_chunk_scan(**BIG, chunk=256, dtype="bf16", skip=True)
    assert "cb" not in [a.name for a in plain.abi.args] and "cbc" not in plain.source() and "_cb" not in plain.key


def test_f32_mamba2_sized_chunk_kernels_fit_an_sm80_block():
    for plan in _plans(BIG, 256, "f32", "sm_80")[0:3:2]:   # chunk state, chunk scan
        assert plan.shared.bytes <= 163 * 1024


# ---- the gated norm: standard-library layers on the row family --------------------------------
@pytest.mark.parametrize("name,groups", [("gated_rms_norm", 1), ("gated_grouped_rms_norm", 8)])
def test_gated_norm_layers_compile_for_the_row_family(name, groups):
    layer = lf.stdlib().specialise(name, H=5120, dtype="bf16", **({"G": groups} if groups > 1 else {}))
    plan = plan_layer(layer, "sm_90")
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0


@pytest.mark.parametrize("name,groups,gate", [("gated_rms_norm", 1, True), ("gated_grouped_rms_norm", 4, True),
                                              ("grouped_rms_norm", 4, False)])
def test_gated_norm_layers_evaluate_to_the_runtime_reference(name, groups, gate):
    g = seeded_generator("gated_norm_layer", name)
    layer = lf.stdlib().specialise(name, H=64, dtype="f32", **({"G": groups} if groups > 1 else {}))
    x, z, w = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(64, generator=g)
    args = {"x": x, **({"z": z} if gate else {}), "w": w, "eps": 1e-5}
    (got,) = lf.evaluate(layer.function, args)
    ref = gated_rms_norm_reference(x, z if gate else None, w, 1e-5, group_size=64 // groups)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


# ---- the runtime's layout checks -------------------------------------------------------------
def test_strides_accept_splits_of_a_wider_row_and_refuse_odd_layouts():
    wide = torch.zeros(2, 5, 3 * 64 + 8, dtype=torch.bfloat16)
    x = wide[..., :128].unflatten(-1, (2, 64))                    # [2, 5, 2, 64], rows 200 elements apart
    assert _strides("x", x, 2, True) == (5 * 200, 200)
    with pytest.raises(SSDInputError, match="contiguous past"):
        _strides("x", x.transpose(2, 3), 2, True)
    with pytest.raises(SSDInputError, match="16-byte"):
        _strides("x", wide[..., 4:132].unflatten(-1, (2, 64)), 2, True)
    assert _strides("x", x[:1, :1], 2, True) == (0, 0)            # size-1 dims: any stride
