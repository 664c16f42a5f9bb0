"""The row kernels store and load the 8-bit storage types i8 and f8e4m3 (codegen/row.py, codegen/ops.py
ROW_*, templates/cuda/quant8.cuh): the fused per-token FP8 layers of dsl/stdlib/quant.lf
(rms_norm_fp8_per_token, swiglu_fp8_per_token) lower to one kernel each, which compiles with NVRTC
for sm_80 (software e4m3 rounding) and sm_90 (cvt.rn.satfinite.e4m3x2.f32) without spills, storing
the e4m3 rows with vectors as wide as the T rows' and the f32 scale once a row; layers with an i8
output or an f8e4m3 input lower too; the packed 4-bit types and f8e5m2 stay LoweringErrors, as
before this (their layers run the reference evaluator). No GPU needed."""
from __future__ import annotations

import re

import pytest

import layerforge as lf
from layerforge.codegen.plan import LoweringError, plan_layer

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

FUSED = ["rms_norm_fp8_per_token", "swiglu_fp8_per_token"]
SMALL = """
# dequantise per-token e4m3 rows: the e4m3 value times its row's scale
layer deq_rows(q: f8e4m3[N, H], s: f32[N]) -> T[N, H] { return T(f32(q) * unsqueeze(s, -1)) }
# int8 with a static scale a channel (nearest even, saturating)
layer quant_i8(x: T[N, H], s: f32[H]) -> i8[N, H] { return i8(f32(x) / s) }
# i8 in, every conversion out
layer from_i8(q: i8[N, H]) -> (f8e4m3[N, H], i32[N, H], i8[N, H], f32[N, H]) {
    return f8e4m3(q), i32(q), q, f32(q)
}
layer to_e5m2(x: T[N, H]) -> f8e5m2[N, H] { return f8e5m2(f32(x)) }
layer from_i4(x: i4[N, H]) -> f32[N, H] { return f32(x) }
layer to_u4(x: T[N, H]) -> u4[N, H] { return u4(f32(x)) }
layer through_u4(x: T[N, H]) -> T[N, H] { return T(f32(u4(f32(x)))) }
"""


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(scope="module")
def small():
    return lf.loads(SMALL)


def width(name: str, w: int) -> dict:
    return {"F": w} if name.startswith("swiglu") else {"H": w}


def compiled(plan, ptx=False):
    return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=ptx)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("w", [1000, 4096, 5120, 14336])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name", FUSED)
def test_fused_fp8_layers_compile_without_spills(prog, name, dtype, w, arch):
    plan = plan_layer(prog.specialise(name, dtype=dtype, **width(name, w)), arch)
    (kr,) = compiled(plan).resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
    assert kr.registers <= 128


@pytest.mark.parametrize("name", FUSED)
def test_fused_fp8_layer_is_one_kernel_with_full_vectors(prog, name):
    """Two reductions (the norm's / none, then amax) and the stores in one kernel; the f32 scale output
    (one a row) does not narrow the vectors: 16-byte bf16 loads, 8-byte e4m3 stores, one scale store by
    the row's first thread."""
    plan = plan_layer(prog.specialise(name, dtype="bf16", **width(name, 4096)), "sm_90")
    k = plan.lowered()
    assert [a.ctype for a in plan.abi.args if a.role == "output"] == ["unsigned char* __restrict__",
                                                                       "float* __restrict__"]
    body = "\n".join(k.body)
    assert "lf_load_vec<__nv_bfloat16, 8>" in body and "lf_store_vec<unsigned char, 8>(o_0" in body
    assert re.search(r"if \(ok_1_1_0\) o_1\[r0\] = ", body) and "ok_1_1_0 = row_ok && (cb1 + 0 < 1)" in body
    assert body.count("lf_row_reduce<") == (2 if name.startswith("rms") else 1)
    src = plan.source()
    assert "lf_float_to_e4m3_soft" in src and "cvt.rn.satfinite.e4m3x2.f32" in src and "lf_e4m3_to_float" in src


@pytest.mark.parametrize("arch,hardware", [("sm_80", False), ("sm_89", True), ("sm_90", True)])
def test_e4m3_rounding_instruction_by_arch(prog, arch, hardware):
    """sm_89+ rounds with the fp8 cvt; sm_80 has none and runs the software rounding."""
    plan = plan_layer(prog.specialise("swiglu_fp8_per_token", dtype="bf16", F=1024), arch)
    ptx = compiled(plan, ptx=True).ptx
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == hardware
    assert re.search(r"st\.global\.v\d\.u\d+|st\.global\.u64|st\.global\.v\d\.b\d+", ptx)   # vector byte stores


def test_row_kernels_without_8bit_types_render_without_the_helpers(prog):
    src = plan_layer(prog.specialise("rms_norm", dtype="bf16", H=4096), "sm_90").source()
    assert "lf_float_to_e4m3" not in src and "lf_e4m3_to_float" not in src


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", ["deq_rows", "quant_i8", "from_i8"])
def test_i8_and_f8e4m3_layers_lower_and_compile(small, name, arch):
    plan = plan_layer(small.specialise(name, dtype="bf16", H=4096), arch)
    (kr,) = compiled(plan).resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
    body = "\n".join(plan.lowered().body)
    if name == "deq_rows":   # e4m3 bytes in, widened exactly (NaN codes NaN)
        assert "const unsigned char* __restrict__ p_q" in plan.abi.signature and "lf_e4m3_value(" in body
    if name == "quant_i8":
        assert "signed char* __restrict__ o_0" in plan.abi.signature and "lf_float_to_i8(" in body
    if name == "from_i8":   # i8 -> e4m3 through its f32 value; i8 -> i8 is the value itself
        assert "lf_float_to_e4m3((float)(" in body and "lf_store_vec<signed char, " in body


@pytest.mark.parametrize("name,what", [("to_e5m2", "an output is f8e5m2"), ("from_i4", "'x' is i4"),
                                       ("to_u4", "an output is u4")])
def test_other_quantised_types_stay_lowering_errors(small, name, what):
    with pytest.raises(LoweringError, match=what + ": the quantised types lower only as the weight of a product"):
        plan_layer(small.specialise(name, dtype="bf16", H=256), "sm_90")


def test_a_packed_type_inside_a_row_layer_is_a_lowering_error(small):
    with pytest.raises(LoweringError, match="u4 values are not lowered to row kernels"):
        plan_layer(small.specialise("through_u4", dtype="bf16", H=256), "sm_90")
