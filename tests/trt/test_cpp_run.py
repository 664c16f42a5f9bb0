"""The C++ plugin library run without TensorRT's libraries or a GPU: a harness includes the
generated source with TensorRT's public headers, builds each plugin through its creator (with
its attributes as plugin fields), and calls what TensorRT would: getOutputShapes over an
IExprBuilder whose dims carry values, configurePlugin, supportsFormatCombination,
getAliasedInput and enqueue, whose driver calls (cuModuleLoadData, cuFuncSetAttribute,
cuLaunchKernel) are stubs that record the launch: grid, block, shared memory and every kernel
parameter. The launch is held to the runtime's (tests/trt/families.py), each pointer parameter
to the plugin input or output the runtime passes there.

Needs TensorRT's headers (TENSORRT_INCLUDE_DIR) and the CUDA toolkit's (cuda.h): skips without."""
import os
import subprocess

import pytest

from .pack import f32_bits
from .test_cpp_plugins import CXX, cuda_toolkit_include, needs_cxx

pytestmark = [needs_cxx,
              pytest.mark.skipif(cuda_toolkit_include() is None,
                                 reason="no CUDA toolkit headers (cuda.h, crt/) found: set CUDA_INCLUDE_DIR"),
              pytest.mark.skipif(not os.environ.get("TENSORRT_INCLUDE_DIR"),
                                 reason="TENSORRT_INCLUDE_DIR is not set (TensorRT's public headers, e.g. the "
                                        "include/ folder of github.com/NVIDIA/TensorRT)")]

HARNESS = r"""
#include "layerforge_plugins.cpp"

#include <cstdio>
#include <memory>
#include <string>

using namespace nvinfer1;

// ---- the driver, recorded ----------------------------------------------------------------------
static char const* gKinds = "";   // the kernel's parameters: p pointer, i int, l long long, f float
static char const* gCase = "";
extern "C" CUresult CUDAAPI cuModuleLoadData(CUmodule* m, void const*) { *m = reinterpret_cast<CUmodule>(16); return CUDA_SUCCESS; }
extern "C" CUresult CUDAAPI cuModuleGetFunction(CUfunction* f, CUmodule, char const*) { *f = reinterpret_cast<CUfunction>(32); return CUDA_SUCCESS; }
extern "C" CUresult CUDAAPI cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
extern "C" CUresult CUDAAPI cuFuncSetAttribute(CUfunction, CUfunction_attribute a, int v) {
    std::printf("%s smem_attribute %d %d\n", gCase, int(a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), v);
    return CUDA_SUCCESS;
}
extern "C" CUresult CUDAAPI cuLaunchKernel(CUfunction, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                          unsigned bz, unsigned smem, CUstream, void** params, void**) {
    std::printf("%s launch %u %u %u %u %u %u %u", gCase, gx, gy, gz, bx, by, bz, smem);
    for (int k = 0; gKinds[k]; ++k) {
        switch (gKinds[k]) {
        case 'p': std::printf(" p%llu", (unsigned long long)*static_cast<uintptr_t*>(params[k])); break;
        case 'i': std::printf(" i%d", *static_cast<int*>(params[k])); break;
        case 'l': std::printf(" l%lld", *static_cast<long long*>(params[k])); break;
        case 'f': { int32_t b; std::memcpy(&b, params[k], 4); std::printf(" f%d", b); break; }
        }
    }
    std::printf("\n");
    return CUDA_SUCCESS;
}

// ---- dims that carry their values ----------------------------------------------------------------
struct DimImpl : apiv::VDimensionExpr {
    int64_t v = 0;
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return v; }
    bool isSizeTensor() const override { return false; }
};
struct Dim : IDimensionExpr {
    DimImpl impl;
    explicit Dim(int64_t v) { impl.v = v; mImpl = &impl; }
};
struct BuilderImpl : apiv::VExprBuilder {
    std::vector<std::unique_ptr<Dim>> dims;
    IDimensionExpr const* constant(int64_t v) override { dims.emplace_back(new Dim(v)); return dims.back().get(); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        int64_t x = a.getConstantValue(), y = b.getConstantValue(), r = 0;
        switch (op) {
        case DimensionOperation::kSUM: r = x + y; break;
        case DimensionOperation::kPROD: r = x * y; break;
        case DimensionOperation::kMAX: r = x > y ? x : y; break;
        case DimensionOperation::kMIN: r = x < y ? x : y; break;
        case DimensionOperation::kSUB: r = x - y; break;
        case DimensionOperation::kEQUAL: r = x == y; break;
        case DimensionOperation::kLESS: r = x < y; break;
        case DimensionOperation::kFLOOR_DIV: r = x / y; break;
        case DimensionOperation::kCEIL_DIV: r = (x + y - 1) / y; break;
        }
        return constant(r);
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override { return nullptr; }
};
struct Builder : IExprBuilder {
    BuilderImpl impl;
    Builder() { mImpl = &impl; }
};

static IPluginCreatorV3One* creator(char const* name) {
    int32_t n = 0;
    IPluginCreatorInterface* const* all = getCreators(n);
    for (int32_t i = 0; i < n; ++i) {
        auto* c = static_cast<IPluginCreatorV3One*>(all[i]);
        if (std::string(c->getPluginName()) == name) return c;
    }
    return nullptr;
}

// One case: the plugin `name` built with `fields`, inputs of `shapes`; pointers are 4096 (i + 1) for
// input i and 1048576 (j + 1) for output j.
static void run(char const* id, char const* name, char const* kinds, std::vector<PluginField> fields,
                std::vector<std::vector<int64_t>> shapes, int32_t nbOutputs) {
    gCase = id;
    gKinds = kinds;
    IPluginCreatorV3One* c = creator(name);
    if (!c) { std::printf("%s no_creator\n", id); return; }
    PluginFieldCollection fc{int32_t(fields.size()), fields.data()};
    IPluginV3* plugin = c->createPlugin(name, &fc, TensorRTPhase::kBUILD);
    if (!plugin) { std::printf("%s no_plugin\n", id); return; }
    auto* build = static_cast<IPluginV3OneBuildV2*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    int32_t nbInputs = int32_t(shapes.size());
    Builder eb;
    std::vector<DimsExprs> in(nbInputs), out(nbOutputs);
    std::vector<PluginTensorDesc> inDesc(nbInputs), outDesc(nbOutputs);
    std::vector<DynamicPluginTensorDesc> dyn(nbInputs + nbOutputs);
    for (int32_t i = 0; i < nbInputs; ++i) {
        in[i].nbDims = int32_t(shapes[i].size());
        inDesc[i].dims.nbDims = in[i].nbDims;
        for (int32_t a = 0; a < in[i].nbDims; ++a) {
            in[i].d[a] = eb.constant(shapes[i][a]);
            inDesc[i].dims.d[a] = shapes[i][a];
        }
        dyn[i].min = dyn[i].max = dyn[i].opt = inDesc[i].dims;
    }
    std::printf("%s outputs %d", id, build->getNbOutputs());
    int rc = build->getOutputShapes(in.data(), nbInputs, nullptr, 0, out.data(), nbOutputs, eb);
    for (int32_t j = 0; j < nbOutputs; ++j) {
        std::printf(" |");
        for (int32_t a = 0; a < out[j].nbDims; ++a) std::printf(" %lld", (long long)out[j].d[a]->getConstantValue());
        outDesc[j].dims.nbDims = out[j].nbDims;
        for (int32_t a = 0; a < out[j].nbDims; ++a) outDesc[j].dims.d[a] = out[j].d[a]->getConstantValue();
    }
    std::printf(" rc %d\n", rc);
    std::vector<DataType> types(nbOutputs);
    build->getOutputDataTypes(types.data(), nbOutputs, nullptr, 0);
    std::printf("%s types", id);
    for (int32_t j = 0; j < nbOutputs; ++j) std::printf(" %d", int(types[j]));
    std::printf(" aliases");
    for (int32_t j = 0; j < nbOutputs; ++j) std::printf(" %d", build->getAliasedInput(j));
    std::printf(" configure %d\n", build->configurePlugin(dyn.data(), nbInputs, dyn.data() + nbInputs, nbOutputs));
    std::vector<void const*> inPtr(nbInputs);
    std::vector<void*> outPtr(nbOutputs);
    for (int32_t i = 0; i < nbInputs; ++i) inPtr[i] = reinterpret_cast<void const*>(uintptr_t(4096) * (i + 1));
    for (int32_t j = 0; j < nbOutputs; ++j) outPtr[j] = reinterpret_cast<void*>(uintptr_t(1048576) * (j + 1));
    std::printf("%s shape_change %d\n", id, rt->onShapeChange(inDesc.data(), nbInputs, outDesc.data(), nbOutputs));
    rc = rt->enqueue(inDesc.data(), outDesc.data(), inPtr.data(), outPtr.data(), nullptr, nullptr);
    std::printf("%s enqueue %d\n", id, rc);
    delete plugin;
}
"""

KINDS = {"int": "i", "long long": "l", "float": "f"}


def _kinds(abi) -> str:
    return "".join("p" if a.is_pointer else KINDS[a.ctype.replace("const ", "").strip()] for a in abi.args)


def _field(name: str, dtype: str, value) -> str:
    """A plugin field holding one attribute value (the harness never frees it: it ends)."""
    if dtype == "f32":
        v = "std::numeric_limits<float>::infinity()" if value == float("inf") else repr(float(value)) + "f"
        return f"PluginField(\"{name}\", new float({v}), PluginFieldType::kFLOAT32, 1)"
    return f"PluginField(\"{name}\", new int32_t({int(value)}), PluginFieldType::kINT32, 1)"


def run_harness(folder, tmp_path, keys, calls: list[str]) -> dict[str, dict[str, list[str]]]:
    """Compile the harness over `folder`'s plugin library with `calls` (run(...) statements) and
    run it: case id -> what -> the printed values."""
    for key in keys:
        (tmp_path / f"{key}.cubin.inc").write_text("0x00,\n")
    (tmp_path / "harness.cpp").write_text(HARNESS + "int main() {\n" + "".join(calls) + "    return 0;\n}\n")
    exe = tmp_path / "harness"
    cmd = [CXX, "-std=c++17", "-O0", "-w", "-isystem", os.environ["TENSORRT_INCLUDE_DIR"], "-isystem",
           cuda_toolkit_include(), "-I", str(folder), "-I", str(tmp_path), "-o", str(exe), str(tmp_path / "harness.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    lines: dict[str, dict[str, list[str]]] = {}
    for line in out:
        case, what, *rest = line.split()
        lines.setdefault(case, {})[what] = rest
    return lines


def call(id: str, key: str, abi, attributes: list[tuple[str, str, object]], shapes, nb_outputs: int) -> str:
    """One run(...) statement; attributes (name, "f32" | "i32", value)."""
    fields = ", ".join(_field(*a) for a in attributes)
    dims = ", ".join("{" + ", ".join(map(str, s)) + "}" for s in shapes)
    return f"    run(\"{id}\", \"{key}\", \"{_kinds(abi)}\", {{{fields}}}, {{{dims}}}, {nb_outputs});\n"


def check_run(got: dict[str, list[str]], abi, grid, values: dict, out_shapes: list | None, what) -> list[str]:
    """The launch against the runtime's: grid, block, shared memory, the int/float parameters,
    the output shapes where given. Returns the pointer parameters, as printed."""
    assert got["shape_change"] == ["0"] and got["enqueue"] == ["0"], (what, got)
    shapes, rc = " ".join(got["outputs"][1:]).split(" rc ")
    assert rc == "0", what
    if out_shapes is not None:
        assert [tuple(int(x) for x in s.split()) for s in shapes.split("|")[1:]] == [tuple(s) for s in out_shapes], what
    gx, gy, gz, bx, by, bz, smem, *params = got["launch"]
    assert (int(gx), int(gy), int(gz)) == tuple(grid) and (int(bx), int(by), int(bz)) == tuple(abi.block), what
    assert int(smem) == abi.shared_bytes, what
    if abi.shared_bytes > 48 * 1024:
        assert got["smem_attribute"] == ["1", str(abi.shared_bytes)], what
    pointers = []
    for a, p in zip(abi.args, params, strict=True):
        if a.is_pointer:
            pointers.append(p)
        else:
            v = values[a.name]
            assert p[1:] == str(f32_bits(v) if isinstance(v, float) else v), (what, a.name, p)
    return pointers


TRT_TYPES = {"bf16": 7, "f16": 1, "f32": 0, "i32": 3, "i8": 2, "fp8_e4m3": 6, "i64": 8, "bool": 4}   # DataType


def test_plugins_run_through_their_creators_and_launch_what_the_runtime_does(cases, specs, rendered, tmp_path):
    folder, _, _ = rendered
    calls = [call(c.id, c.plan.key, c.plan.abi, [(a.name, a.dtype, c.attributes[a.name])
                                                  for a in specs[c.plan.key].attributes],
                  [c.inputs[t.name][0] for t in specs[c.plan.key].inputs], len(specs[c.plan.key].outputs))
             for c in cases]
    gemv = next(c for c in cases if c.id == "gemv_bias_res_m8")   # 9 rows for a kernel of 8
    calls.append(call("gemv_past_m", gemv.plan.key, gemv.plan.abi, [], [(9, 512), (256, 512), (256,), (9, 256)], 1))
    lines = run_harness(folder, tmp_path, specs, calls)
    for c in cases:
        spec, abi = specs[c.plan.key], c.plan.abi
        got = lines[c.id]
        outs = None
        if c.tensors:   # the runtime's output tensors by output index (one written in place: its input's)
            outs = [next((c.tensors[a.name][0] for a in abi.args if spec.source_of(a) == ("output", j)), None)
                    or c.inputs[spec.inputs[spec.aliases[j]].name][0] for j in range(len(spec.outputs))]
        pointers = iter(check_run(got, abi, c.grid, c.values, outs, c.id))
        n = len(spec.outputs)
        types = got["types"]
        assert [int(t) for t in types[:n]] == [TRT_TYPES[t.dtype] for t in spec.outputs], c.id
        assert types[n] == "aliases" and [int(x) for x in types[n + 1:2 * n + 1]] == (list(spec.aliases) or [-1] * n)
        assert types[2 * n + 1:] == ["configure", "0"], c.id
        for a in abi.args:   # each pointer is the plugin's tensor the runtime passes there
            if not a.is_pointer:
                continue
            kind, ref = spec.source_of(a)
            want = {"input": lambda: 4096 * (ref + 1), "output": lambda: 1048576 * (ref + 1), "null": lambda: 0}[kind]()
            assert next(pointers) == f"p{want}", (c.id, a.name)
            if c.tensors and kind == "input":
                assert c.tensors[a.name] == c.inputs[spec.inputs[ref].name], (c.id, a.name)
    assert lines["gemv_past_m"]["enqueue"] == ["-1"] and "launch" not in lines["gemv_past_m"]


def test_example_pack_plugins_run_through_their_creators_and_launch_what_the_runtime_does(trt_pack, manifest,
                                                                                         tmp_path):
    """The same over the example pack's library: rows (attributes from the layers' defaults),
    decode-form attention and the KV append, against pack.py's yardstick."""
    from layerforge.codegen.abi import KernelABI
    from .pack import expected_launch, input_shapes
    source = (trt_pack / "trt" / "layerforge_plugins.cpp").read_text()
    served = [e for e in manifest["kernels"] if f"class Plugin_{e['key']} final" in source]
    calls, expected = [], {}
    for e in served:
        abi = KernelABI.from_json(e["kernels"][0])
        for case in (0, 1, 2):
            shapes = input_shapes(e, case)
            want = expected_launch(trt_pack, e, shapes)
            attributes = [(a.ref, "f32" if a.ctype.strip() == "float" else "i32", want.args[a.name])
                          for a in abi.args if a.role == "scalar"]
            id = f"{e['key']}_{case}"
            calls.append(call(id, e["key"], abi, attributes, shapes, len(want.outputs)))
            expected[id] = (abi, want)
    lines = run_harness(trt_pack / "trt", tmp_path, [e["key"] for e in served], calls)
    for id, (abi, want) in expected.items():
        check_run(lines[id], abi, want.grid, want.args, want.outputs, id)
