"""Plugins of the kernel families beyond the example pack's (products, dequantisation, the fp8
row quantiser, scans, SSD, MoE, LoRA, MLA, the grouped router, fp8 KV caches): for the plans the
runtime picks (tests/trt/families.py records its launches on meta tensors), the Python AOT
module and the C++ enqueue compute the runtime's grid and int/float arguments from the input
shapes alone, wire every pointer to the tensor the runtime passes there (shape and dtype), and
shape the outputs as the runtime allocates them; the C++ compiles against TensorRT's headers;
the AOT entries' PTX takes TensorRT's argument order."""
import os
import re
import subprocess

import pytest

from layerforge.codegen import trt_exprs
from layerforge.codegen.trt import TRT_DTYPES, plugin_specs
from layerforge.codegen.trt_render import CPP_SOURCE, PYTHON_MODULE

from .families import excluded_plans, gemv_plan
from .pack import ARCH, f32_bits, run_symbolic_check, run_tensorrt_validators
from .test_aot_entry import entry_params
from .test_cpp_plugins import CXX, HARNESS, cuda_toolkit_include, enqueue_statements, needs_cxx


def _extras(spec, case) -> tuple:
    """The runtime's int/float arguments where the plugin fills them (sizes, attributes), in the
    ABI's order, as TensorRT's int32 extras carry them (floats as their bits)."""
    out = []
    for a in spec.kernel.args:
        if spec.source_of(a)[0] in ("size", "attribute"):
            v = case.values[a.name]
            out.append(f32_bits(v) if isinstance(v, float) else v)
    return tuple(out)


def _evaluate(spec, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """The spec's dims and sizes for concrete input shapes, by its own expressions."""
    env = {f"v_{d}": shapes[i][axis] for d, i, axis in spec.dims}
    funcs = {"_cdiv": lambda a, b: -(-a // b), "_min": min, "_max": max}
    for name, expr in spec.sizes:
        env[f"v_{name}"] = eval(trt_exprs.python(expr), {"__builtins__": {}, **funcs}, env)
    return {**env, **funcs}


def test_every_case_plan_is_served_and_the_families_are_covered(cases, specs):
    families = {s.family for s in specs.values()}
    assert families >= {"gemv", "gemm", "dequant", "quant_rows", "scan_conv", "scan_conv_update", "selective_scan",
                        "selective_state_update", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan",
                        "ssd_state_update", "moe_align", "moe_gather", "moe_combine", "moe_route", "lora_shrink",
                        "lora_expand", "mla_decode", "mla_append", "paged_attention", "tc_attention", "kv_append"}
    fp8 = [s for s in specs.values() if "kvfp8" in s.name]
    assert {s.family for s in fp8} == {"paged_attention", "tc_attention", "kv_append"}
    for s in fp8:   # the cache as FP8 tensors, the layer's scales as float32 inputs
        dtypes = {t.name: t.dtype for t in s.inputs}
        assert dtypes["k_cache"] == dtypes["v_cache"] == "fp8_e4m3" and dtypes["k_scale"] == dtypes["v_scale"] == "f32"
    assert TRT_DTYPES["fp8_e4m3"] == ("fp8", "FP8", "kFP8")


def test_spec_expressions_give_the_runtime_launch(cases, specs):
    """Grid, int/float arguments, pointer wiring and output shapes from the spec's own
    expressions, against the runtime's launch (every case, served by the Python module or not)."""
    for case in cases:
        _check_spec_against_runtime(specs[case.plan.key], case)


def _check_spec_against_runtime(spec, case) -> None:
    abi = case.plan.abi
    shapes = [case.inputs[t.name][0] for t in spec.inputs]
    assert [case.inputs[t.name][1] for t in spec.inputs] == [t.dtype for t in spec.inputs], case.id
    env = _evaluate(spec, shapes)
    value = lambda e: eval(trt_exprs.python(e), {"__builtins__": {}}, env)   # noqa: E731
    assert tuple(value(g) for g in abi.grid) == case.grid, case.id
    extras = [value(ref) if kind == "size" else case.attributes[ref]
              for kind, ref in (spec.source_of(a) for a in abi.args) if kind in ("size", "attribute")]
    assert tuple(f32_bits(v) if isinstance(v, float) else v for v in extras) == _extras(spec, case), case.id
    for expr, least, most in spec.limits:
        assert least <= value(expr) and (most is None or value(expr) <= most), case.id
    for a in abi.args:   # each pointer is the tensor (shape, dtype) the runtime passes there
        kind, ref = spec.source_of(a)
        if not case.tensors or kind not in ("input", "output", "null"):
            continue
        got = case.tensors[a.name]
        if kind == "null":
            assert got is None, (case.id, a.name)
        elif kind == "input":
            assert got == case.inputs[spec.inputs[ref].name], (case.id, a.name)
        else:
            out = spec.outputs[ref]
            assert got == (tuple(value(e) for e in out.shape), out.dtype), (case.id, a.name)


def test_python_module_asks_tensorrt_for_the_runtime_launch(cases, specs, rendered):
    _, module, entries = rendered
    served = [c for c in cases if c.plan.key in entries]
    assert len({c.plan.family for c in served}) >= 15
    for case in served:
        spec, plugin = specs[case.plan.key], module.PLUGINS[case.plan.key]
        shapes = [case.inputs[t.name][0] for t in spec.inputs]
        got = plugin["launch"](*shapes, *[case.attributes[a.name] for a in spec.attributes])
        abi = spec.kernel
        assert (got.grid, got.block, got.shared_mem) == (case.grid, abi.block, abi.shared_bytes), case.id
        assert got.extra_args == _extras(spec, case), case.id
        want = {a.name: case.tensors.get(a.name) for a in abi.args}
        for i, (shape, dtype) in enumerate(plugin["shapes"](*shapes)):
            out_arg = next((a for a in abi.args if spec.source_of(a) == ("output", i)), None)
            if case.tensors and out_arg is not None:
                assert (tuple(shape), dtype) == (want[out_arg.name][0], TRT_DTYPES[want[out_arg.name][1]][0]), case.id


def test_python_module_excludes_what_needs_more_shared_memory_than_a_launch_gets(specs, rendered):
    _, module, _ = rendered
    for key, s in specs.items():
        assert (key in module.EXCLUDED) == (s.kernel.shared_bytes > 48 * 1024), key
        assert (key in module.PLUGINS) != (key in module.EXCLUDED)


def test_python_plugins_refuse_rows_past_the_kernels_token_tiles(cases, rendered):
    _, module, _ = rendered
    plugin = module.PLUGINS[next(c.plan.key for c in cases if c.id == "gemv_bias_res_m8")]
    assert plugin["launch"]((8, 512), (256, 512), (256,), (8, 256)).extra_args == (8,)
    with pytest.raises(ValueError, match="M is 9; the kernel serves 0 to 8"):
        plugin["shapes"]((9, 512), (256, 512), (256,), (9, 256))
    with pytest.raises(ValueError, match="the kernel was generated for 512"):
        plugin["shapes"]((8, 256), (256, 512), (256,), (8, 256))


def _harness_program(cases, specs, statements, extra_calls=()) -> str:
    functions, calls = [], []
    for key, body in statements.items():
        shows = "".join(f"    show({k}, a{k});\n" for k in
                        (int(m) for m in re.findall(r"^\s*(?:int|long long|float) a(\d+) =", body, re.M)))
        functions.append(
            f"int run_{key}(PluginTensorDesc const* inputDesc, std::vector<Attr> mAttrs) {{\n"
            f"    void const* in_[16] = {{}}; void* out_[4] = {{}};\n"
            f"    void const* const* inputs = in_; void* const* outputs = out_; (void)inputs; (void)outputs;\n"
            f"{body}"
            f"    std::printf(\"{key} %lld %lld %lld\", (long long)grid[0], (long long)grid[1], (long long)grid[2]);\n"
            f"{shows}    std::printf(\"\\n\");\n    return 0;\n}}\n")

    def literal(v):
        return "std::numeric_limits<double>::infinity()" if v == float("inf") else repr(float(v))

    for case in cases:
        spec = specs[case.plan.key]
        descs = ", ".join(f"{{{{{len(s)}, {{{', '.join(map(str, s))}}}}}}}"
                          for s in (case.inputs[t.name][0] for t in spec.inputs))
        attrs = ", ".join(f"{{{literal(case.attributes[a.name])}}}" for a in spec.attributes)
        calls.append(f"    {{ PluginTensorDesc d[] = {{{descs}}}; if (run_{case.plan.key}(d, {{{attrs}}})) "
                     f"std::printf(\"refused\\n\"); }}\n")
    calls += list(extra_calls)
    return ("#include <limits>\n" + HARNESS + "".join(functions) + "int main() {\n" + "".join(calls)
            + "    return 0;\n}\n")


@needs_cxx
def test_cpp_enqueue_computes_the_runtime_launch(cases, specs, rendered, tmp_path):
    folder, _, _ = rendered
    statements = enqueue_statements((folder / CPP_SOURCE).read_text())
    assert set(statements) == set(specs)
    gemv = next(c for c in cases if c.id == "gemv_bias_res_m8")
    past = f"    {{ PluginTensorDesc d[] = {{{{2, {{9, 512}}}}, {{2, {{256, 512}}}}, {{1, {{256}}}}, {{2, {{9, 256}}}}}}; " \
           f"if (run_{gemv.plan.key}(d, {{}})) std::printf(\"refused\\n\"); }}\n"
    program = tmp_path / "harness.cpp"
    program.write_text(_harness_program(cases, specs, statements, [past]))
    subprocess.run([CXX, "-std=c++17", "-O0", "-o", str(tmp_path / "harness"), str(program)], check=True)
    lines = subprocess.run([str(tmp_path / "harness")], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases) + 1
    assert lines[-1] == "refused"   # 9 rows for a kernel of 8: refused before the launch
    for line, case in zip(lines, cases):
        key, gx, gy, gz, *args = line.split()
        spec = specs[case.plan.key]
        assert key == case.plan.key and (int(gx), int(gy), int(gz)) == case.grid, (case.id, line)
        got = {spec.kernel.args[int(k)].name: int(v.lstrip("f")) for k, v in (a.split(":") for a in args)}
        want = {a.name: case.values[a.name] for a in spec.kernel.args if not a.is_pointer}
        assert got == {n: f32_bits(v) if isinstance(v, float) else v for n, v in want.items()}, case.id


@needs_cxx
@pytest.mark.skipif(cuda_toolkit_include() is None, reason="no CUDA toolkit headers (cuda.h, crt/) found: set "
                                                           "CUDA_INCLUDE_DIR")
@pytest.mark.skipif(not os.environ.get("TENSORRT_INCLUDE_DIR"),
                    reason="TENSORRT_INCLUDE_DIR is not set (TensorRT's public headers, e.g. the include/ folder "
                           "of github.com/NVIDIA/TensorRT)")
def test_cpp_plugins_compile_against_tensorrt_headers(specs, rendered, tmp_path):
    """-fsyntax-only: the cubins' bytes do not matter to the syntax, so each include holds one byte."""
    folder, _, _ = rendered
    for key in specs:
        (tmp_path / f"{key}.cubin.inc").write_text("0x00,\n")
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
           "-isystem", os.environ["TENSORRT_INCLUDE_DIR"], "-isystem", cuda_toolkit_include(),
           "-I", str(tmp_path), str(folder / CPP_SOURCE)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(not os.environ.get("TENSORRT_PLUGIN_SRC"),
                    reason="TENSORRT_PLUGIN_SRC is not set (a folder holding TensorRT's tensorrt/plugin/ Python "
                           "sources, e.g. python/packaging/bindings_wheel of github.com/NVIDIA/TensorRT)")
def test_tensorrt_plugin_validators_accept_the_module(rendered, tmp_path):
    """tensorrt.plugin's register/autotune/aot_impl decorators check each function's signature
    (in-place outputs, attributes, fp8 and int8 tensors included)."""
    folder, module, _ = rendered
    registered = run_tensorrt_validators(folder / PYTHON_MODULE, tmp_path)
    assert set(registered) == {f"layerforge::{k}" for k in module.PLUGINS}
    for key, p in module.PLUGINS.items():
        assert registered[f"layerforge::{key}"] == ["True", "True", ",".join(p["inputs"])]


needs_plugin_src = pytest.mark.skipif(
    not os.environ.get("TENSORRT_PLUGIN_SRC"),
    reason="TENSORRT_PLUGIN_SRC is not set (a folder holding TensorRT's tensorrt/plugin/ Python sources, e.g. "
           "python/packaging/bindings_wheel of github.com/NVIDIA/TensorRT)")


@needs_plugin_src
def test_shape_and_launch_functions_run_on_tensorrt_shape_expressions(cases, specs, rendered, tmp_path):
    """What register and aot_impl hand TensorRT: the same functions on tensorrt.plugin's ShapeExprs
    (dims known at build time, and symbolic ones) give what they give on ints."""
    folder, module, _ = rendered
    served = [[c.plan.key, [list(c.inputs[t.name][0]) for t in specs[c.plan.key].inputs],
               [c.attributes[a.name] for a in specs[c.plan.key].attributes]] for c in cases if c.plan.key in module.PLUGINS]
    result = run_symbolic_check(folder / PYTHON_MODULE, served, tmp_path)
    assert result["checked"] == 2 * len(served) and not result["mismatches"], result["mismatches"][:3]


# one entry a family that the Python module serves: each is one NVRTC compile
ENTRY_FAMILIES = ("gemv", "quant_rows", "scan_conv_update", "ssd_state_update", "moe_combine", "lora_expand",
                  "kv_append", "paged_attention")


def test_entry_ptx_takes_inputs_then_int32_extras_then_outputs(specs, rendered):
    from layerforge.runtime.nvrtc import CompileOptions, compile_cuda
    _, module, entries = rendered
    for family in ENTRY_FAMILIES:
        key = next(k for k, s in specs.items() if s.family == family and k in entries)
        spec, entry = specs[key], entries[key]
        ptx = compile_cuda(entry.source, entry.name, CompileOptions(ARCH), want_ptx=True, want_cubin=False).ptx
        p = module.PLUGINS[key]
        want = ["u64"] * len(spec.inputs) + ["u32"] * len(p["extra_args"]) + ["u64"] * len(spec.outputs)
        assert entry_params(ptx, entry.name) == want, key


@pytest.mark.parametrize("why", ["tensor maps", "SM count", "max_q_len", "is a TMA tensor map"])
def test_kernels_tensorrt_cannot_serve_are_excluded_with_the_reason(why):
    plans = excluded_plans()
    specs, excluded = plugin_specs([plans[why]])
    assert not specs and why in excluded[plans[why].key]


def test_expert_product_plugins_bound_the_sorted_rows_by_the_token_tiles():
    (spec,), _ = plugin_specs([gemv_plan(max_m=16, experts=8, gather=True)])
    assert spec.limits == (("M", 0, 16),) and [t.name for t in spec.inputs] == ["x", "w", "offsets", "src"]
    assert [t.shape for t in spec.inputs[1:3]] == [("8", "256", "512"), ("9",)]
