"""The generated tensorrt.plugin module: it compiles, imports with or without TensorRT, serves
or names every kernel of the example pack, and asks TensorRT for what the runtime launches."""
import os
import py_compile

import pytest

from .pack import (expected_launch, f32_bits, import_plugins, input_shapes, row_input_shapes, run_symbolic_check,
                   run_tensorrt_validators)

ROW_DIMS = [{"N": 1, "Nh": 1}, {"N": 7, "Nh": 32}, {"N": 300, "Nh": 8}]


@pytest.fixture(scope="module")
def plugins(trt_pack):
    return import_plugins(trt_pack)


def test_module_compiles_and_imports_without_tensorrt(trt_pack, plugins):
    py_compile.compile(str(trt_pack / "trt" / "layerforge_trt_plugins.py"), doraise=True)
    try:
        import tensorrt.plugin  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    assert (plugins.trtp is not None) == has_trt


def test_every_kernel_is_a_plugin_or_excluded_with_its_reason(manifest, plugins):
    keys = {e["key"]: e for e in manifest["kernels"]}
    assert set(plugins.PLUGINS) | set(plugins.EXCLUDED) == set(keys)
    assert not set(plugins.PLUGINS) & set(plugins.EXCLUDED)
    served = {keys[k]["family"] for k in plugins.PLUGINS}
    assert served == {"row", "paged_attention", "kv_append"}
    for key, why in plugins.EXCLUDED.items():
        assert keys[key]["family"] in ("tc_attention", "wgmma_attention"), key   # sm_90: the wgmma prefill
        want = {"prefill": "max_q_len", "decode": "shared memory", "decode_many": "grids past one wave"}
        assert want[keys[key]["mode"]] in why, (key, why)   # decode_many: a plugin launches the default decode


def test_ptx_of_every_plugin_is_beside_the_module_and_declares_its_entry(trt_pack, plugins):
    for key, p in plugins.PLUGINS.items():
        ptx = (trt_pack / "trt" / p["ptx"]).read_text()
        assert f".visible .entry {p['kernel']}(" in ptx, key


@pytest.mark.parametrize("dims", ROW_DIMS, ids=lambda d: f"N{d['N']}")
def test_row_plugins_ask_for_the_runtime_launch(trt_pack, manifest, plugins, dims):
    rows = [e for e in manifest["kernels"] if e["family"] == "row"]
    assert rows and all(e["key"] in plugins.PLUGINS for e in rows)   # every row kernel has a plugin
    for e in rows:
        p = plugins.PLUGINS[e["key"]]
        shapes = row_input_shapes(e, dims)
        want = expected_launch(trt_pack, e, shapes)
        scalars = [want.args[f"s_{n}"] for n in p["attributes"]]
        got = p["launch"](*shapes, *scalars)
        assert (got.grid, got.block, got.shared_mem) == (want.grid, want.block, want.shared_mem), e["key"]
        expected_extras = tuple(f32_bits(v) if isinstance(v, float) else v for v in want.args.values())
        assert got.extra_args == expected_extras, e["key"]
        assert [(tuple(s), d) for s, d in p["shapes"](*shapes)] == [(s, "bfloat16") for s in want.outputs], e["key"]


@pytest.mark.parametrize("case", [0, 1, 2])
def test_attention_and_append_plugins_ask_for_the_runtime_launch(trt_pack, manifest, plugins, case):
    entries = [e for e in manifest["kernels"] if e["family"] in ("paged_attention", "kv_append")]
    assert entries and all(e["key"] in plugins.PLUGINS for e in entries)
    for e in entries:
        p = plugins.PLUGINS[e["key"]]
        shapes = input_shapes(e, case)
        want = expected_launch(trt_pack, e, shapes)
        got = p["launch"](*shapes, *[want.args[f"s_{n}"] for n in p["attributes"]])
        assert (got.grid, got.block, got.shared_mem) == (want.grid, want.block, want.shared_mem), e["key"]
        assert got.extra_args == tuple(f32_bits(v) if isinstance(v, float) else v for v in want.args.values())
        assert [tuple(s) for s, _ in p["shapes"](*shapes)] == want.outputs


@pytest.mark.skipif(not os.environ.get("TENSORRT_PLUGIN_SRC"),
                    reason="TENSORRT_PLUGIN_SRC is not set (a folder holding TensorRT's tensorrt/plugin/ Python "
                           "sources, e.g. python/packaging/bindings_wheel of github.com/NVIDIA/TensorRT)")
def test_tensorrt_plugin_validators_accept_the_module(trt_pack, plugins, tmp_path):
    """tensorrt.plugin's own register/autotune/aot_impl decorators check each function's
    signature against the documented schema; they run here over a stand-in C extension."""
    registered = run_tensorrt_validators(trt_pack / "trt" / "layerforge_trt_plugins.py", tmp_path)
    assert set(registered) == {f"layerforge::{k}" for k in plugins.PLUGINS}
    for key, p in plugins.PLUGINS.items():
        assert registered[f"layerforge::{key}"] == ["True", "True", ",".join(p["inputs"])]


@pytest.mark.skipif(not os.environ.get("TENSORRT_PLUGIN_SRC"),
                    reason="TENSORRT_PLUGIN_SRC is not set (a folder holding TensorRT's tensorrt/plugin/ Python "
                           "sources, e.g. python/packaging/bindings_wheel of github.com/NVIDIA/TensorRT)")
def test_shape_and_launch_functions_run_on_tensorrt_shape_expressions(trt_pack, manifest, plugins, tmp_path):
    """register and aot_impl evaluate them on tensorrt.plugin's ShapeExprs: the same values as on ints."""
    entries = {e["key"]: e for e in manifest["kernels"]}
    cases = []
    for key, p in plugins.PLUGINS.items():
        defaults = {s["name"]: s["default"] for s in entries[key].get("interface", {}).get("scalars", [])}
        defaults |= {q["name"]: q["default"] for q in entries[key].get("interface", {}).get("params", [])
                     if q["kind"] == "scalar"}
        cases += [[key, [list(s) for s in input_shapes(entries[key], case)], [defaults[a] for a in p["attributes"]]]
                  for case in (1, 2)]
    result = run_symbolic_check(trt_pack / "trt" / "layerforge_trt_plugins.py", cases, tmp_path)
    assert result["checked"] == 2 * len(cases) and not result["mismatches"], result["mismatches"][:3]


def test_shapes_refuse_an_input_the_kernel_was_not_generated_for(plugins):
    rms_norm = next(p for k, p in plugins.PLUGINS.items() if k.startswith("rms_norm_h4096"))
    with pytest.raises(ValueError, match="x dim 1 is 4095; the kernel was generated for 4096"):
        rms_norm["shapes"]((7, 4095), (4096,))
