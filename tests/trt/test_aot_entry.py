"""The AOT entry kernels: TensorRT launches `entry(inputs..., int32 extras..., outputs...)`,
and the entry must forward to the plan's own kernel body."""
import re

import pytest

from layerforge.codegen import trt_exprs
from layerforge.codegen.trt import plugin_specs
from layerforge.codegen.trt_render import aot_entry

from .pack import import_plugins


def entry_params(ptx: str, name: str) -> list[str]:
    """The PTX parameter types of `.entry name`: 'u64' (pointers) or 'u32' (32-bit ints)."""
    params = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S).group(1)
    return re.findall(r"\.param \.(\w+)", params)


def test_entry_ptx_takes_inputs_then_int32_extras_then_outputs(trt_pack, manifest):
    plugins = import_plugins(trt_pack)
    for key, p in plugins.PLUGINS.items():
        entry = next(e for e in manifest["kernels"] if e["key"] == key)
        # a layer's outputs; attention's out; the append's two caches, written in place
        n_out = {"row": len(entry.get("interface", {}).get("outputs", ())), "kv_append": 2}.get(entry["family"], 1)
        ptx = (trt_pack / "trt" / p["ptx"]).read_text()
        assert entry_params(ptx, p["kernel"]) == ["u64"] * len(p["inputs"]) + ["u32"] * len(p["extra_args"]) + ["u64"] * n_out, key


def test_entry_calls_the_plans_kernel_body(trt_pack):
    source = (trt_pack / "trt" / "rms_norm_h4096_bf16_sm90.trt.cu").read_text()
    assert "static __device__ __forceinline__ void lf_rms_norm_h4096_bf16_sm90_body(" in source
    assert 'extern "C" __global__ void __launch_bounds__(128)\nlf_rms_norm_h4096_bf16_sm90_trt(' in source
    # eps arrives as its bits, the long long dims as int32: the entry converts them back
    assert ("lf_rms_norm_h4096_bf16_sm90_body(p_x, p_w, __int_as_float(s_eps), o_0, (long long)d_N, "
            "(long long)n_rows);") in source


def test_entry_refuses_a_source_without_the_kernel(manifest):
    import layerforge as lf
    from layerforge.codegen.plan import plan_layer
    layer = lf.stdlib().specialise("rms_norm", H=64, dtype="bf16")
    (spec,), _ = plugin_specs([plan_layer(layer, "sm_90")])
    with pytest.raises(ValueError, match="expected one declaration"):
        aot_entry(spec, "// no kernel here\n")


@pytest.mark.parametrize("expr, python, c_int", [
    ("N * Nh", "(v_N * v_Nh)", "(v_N * v_Nh)"),
    ("cdiv(rows, 32)", "_cdiv(v_rows, 32)", "lf_cdiv(v_rows, int64_t(32))"),
    ("tokens * 8 - max(a, b) // 2", "((v_tokens * 8) - (_max(v_a, v_b) // 2))",
     "((v_tokens * int64_t(8)) - (lf_max(v_a, v_b) / int64_t(2)))"),
    # tensorrt.plugin's ShapeExprs take ints on their right only
    ("8 * N + 1 - N", "(((v_N * 8) + 1) - v_N)", "(((int64_t(8) * v_N) + int64_t(1)) - v_N)"),
    ("1 - N", "(_lit(1, v_N) - v_N)", "(int64_t(1) - v_N)"),
])
def test_size_expressions_print_in_each_dialect(expr, python, c_int):
    assert trt_exprs.python(expr) == python and trt_exprs.c_int(expr) == c_int
    assert trt_exprs.names(expr) <= {"N", "Nh", "rows", "tokens", "a", "b"}


def test_size_expression_builder_form():
    assert trt_exprs.c_expr("cdiv(N, 4)") == "eb.operation(DimensionOperation::kCEIL_DIV, *e_N, *eb.constant(4))"


@pytest.mark.parametrize("bad", ["N / 2", "N ** 2", "f(N)", "N.x", "1.5 * N"])
def test_size_expressions_outside_the_subset_are_refused(bad):
    with pytest.raises(trt_exprs.ExprError):
        trt_exprs.python(bad)
