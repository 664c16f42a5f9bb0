"""Every row/pointwise layer of the standard library renders deterministically and compiles
with NVRTC for sm_80 and sm_90 without register spills (no GPU needed)."""
import pytest

import layerforge as lf
from layerforge.codegen.plan import LoweringError, plan_layer

from ..row_cases import ROW_LAYERS, bindings

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", ROW_LAYERS)
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_row_layer_compiles_without_spills(prog, name, arch, dtype):
    width = 4096 if not name.startswith(("moe", "rope")) else 128
    plan = plan_layer(prog.specialise(name, dtype=dtype, **bindings(name, width)), arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert res.cubin[:4] == b"\x7fELF"
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
    assert kr.registers <= 128


@pytest.mark.parametrize("width", [7, 8, 1536, 5120, 14336])
@pytest.mark.parametrize("name", ["add_rms_norm", "swiglu", "layer_norm", "softmax_rows"])
def test_any_width_compiles(prog, name, width):
    plan = plan_layer(prog.specialise(name, dtype="f16", **bindings(name, width)), "sm_90")
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0


@pytest.mark.parametrize("groups", [1, 4])
def test_group_norm_lowers_with_any_group_count(prog, groups):
    # one group: the grouped rows' lead dim of size 1 has one row index (codegen/row.py)
    plan = plan_layer(prog.specialise("group_norm", H=1536, G=groups, dtype="bf16"), "sm_90")
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0


def test_plan_key_is_readable(prog):
    plan = plan_layer(prog.specialise("add_rms_norm", H=4096, dtype="bf16"), "sm_90")
    assert plan.key == "add_rms_norm_h4096_bf16_sm90"


def test_source_is_deterministic(prog):
    a = plan_layer(prog.specialise("rope", D=128, dtype="bf16"), "sm_90").source()
    b = plan_layer(lf.stdlib().specialise("rope", D=128, dtype="bf16"), "sm_90").source()
    assert a == b


def test_sixteen_byte_vectors_for_aligned_widths(prog):
    src = plan_layer(prog.specialise("rms_norm", H=4096, dtype="bf16"), "sm_90").source()
    assert "lf_load_vec<__nv_bfloat16, 8>" in src and "lf_store_vec<__nv_bfloat16, 8>" in src
    src = plan_layer(prog.specialise("rms_norm", H=4096, dtype="bf16"), "sm_90", vec_bytes=2).source()
    assert "lf_load_vec" not in src.split("extern")[1]


def test_whole_layer_is_one_kernel(prog):
    src = plan_layer(prog.specialise("add_rms_norm", H=4096, dtype="bf16"), "sm_90").source()
    assert src.count("__global__") == 1


def test_matmul_layers_are_not_row_kernels(prog):
    with pytest.raises(LoweringError, match="not lowered"):
        plan_layer(prog.specialise("lora", I=64, O=64, R=8, dtype="bf16"), "sm_90")
