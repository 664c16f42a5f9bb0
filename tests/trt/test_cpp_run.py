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


def _field(attr, value) -> str:
    if attr.dtype == "f32":
        return (f"PluginField(\"{attr.name}\", new float({'std::numeric_limits<float>::infinity()' if value == float('inf') else repr(float(value)) + 'f'}), "
                f"PluginFieldType::kFLOAT32, 1)")
    return f"PluginField(\"{attr.name}\", new int32_t({int(value)}), PluginFieldType::kINT32, 1)"


def test_plugins_run_through_their_creators_and_launch_what_the_runtime_does(cases, specs, rendered, tmp_path):
    folder, _, _ = rendered
    for key in specs:
        (tmp_path / f"{key}.cubin.inc").write_text("0x00,\n")
    calls = []
    for c in cases:
        spec = specs[c.plan.key]
        fields = ", ".join(_field(a, c.attributes[a.name]) for a in spec.attributes)
        shapes = ", ".join("{" + ", ".join(map(str, c.inputs[t.name][0])) + "}" for t in spec.inputs)
        calls.append(f"    run(\"{c.id}\", \"{c.plan.key}\", \"{_kinds(spec.kernel)}\", {{{fields}}}, {{{shapes}}}, "
                     f"{len(spec.outputs)});\n")
    gemv = next(c for c in cases if c.id == "gemv_bias_res_m8")   # 9 rows for a kernel of 8
    calls.append(f"    run(\"gemv_past_m\", \"{gemv.plan.key}\", \"{_kinds(gemv.plan.abi)}\", {{}}, "
                 "{{9, 512}, {256, 512}, {256}, {9, 256}}, 1);\n")
    (tmp_path / "harness.cpp").write_text(HARNESS + "int main() {\n" + "".join(calls) + "    return 0;\n}\n")
    exe = tmp_path / "harness"
    cmd = [CXX, "-std=c++17", "-O0", "-w", "-isystem", os.environ["TENSORRT_INCLUDE_DIR"], "-isystem",
           cuda_toolkit_include(), "-I", str(folder), "-I", str(tmp_path), "-o", str(exe), str(tmp_path / "harness.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    lines: dict[str, list[list[str]]] = {}
    for line in out:
        case, what, *rest = line.split()
        lines.setdefault(case, []).append([what, *rest])

    trt_types = {"bf16": 7, "f16": 1, "f32": 0, "i32": 3, "i8": 2, "fp8_e4m3": 6, "i64": 8, "bool": 4}   # DataType
    for c in cases:
        spec, abi = specs[c.plan.key], c.plan.abi
        got = {what: rest for what, *rest in lines[c.id]}
        assert got["shape_change"] == ["0"] and got["enqueue"] == ["0"], (c.id, got)
        # getOutputShapes: the runtime's output shapes (where the case has them), in order
        shapes = " ".join(got["outputs"][1:]).split(" rc ")
        assert got["outputs"][0] == str(len(spec.outputs)) and shapes[1] == "0", c.id
        out_shapes = [tuple(int(x) for x in s.split()) for s in shapes[0].split("|")[1:]]
        for a in abi.args:
            kind, ref = spec.source_of(a)
            if kind == "output" and c.tensors:
                assert out_shapes[ref] == c.tensors[a.name][0], (c.id, a.name)
        types = got["types"]
        n = len(spec.outputs)
        assert [int(t) for t in types[:n]] == [trt_types[t.dtype] for t in spec.outputs], c.id
        assert types[n] == "aliases" and [int(x) for x in types[n + 1:2 * n + 1]] == \
            (list(spec.aliases) or [-1] * n), c.id
        assert types[2 * n + 1:] == ["configure", "0"], c.id
        # the launch: grid, block, shared memory, and each parameter
        gx, gy, gz, bx, by, bz, smem, *params = got["launch"]
        assert (int(gx), int(gy), int(gz)) == c.grid and (int(bx), int(by), int(bz)) == abi.block, c.id
        assert int(smem) == abi.shared_bytes, c.id
        if abi.shared_bytes > 48 * 1024:
            assert got["smem_attribute"] == ["1", str(abi.shared_bytes)], c.id
        for a, p in zip(abi.args, params, strict=True):
            kind, ref = spec.source_of(a)
            if a.is_pointer:
                want = {"input": 4096 * (ref + 1) if kind == "input" else None,
                        "output": 1048576 * (ref + 1) if kind == "output" else None, "null": 0}[kind]
                assert p == f"p{want}", (c.id, a.name, p)
            else:
                v = c.values[a.name]
                assert p[1:] == str(f32_bits(v) if isinstance(v, float) else v), (c.id, a.name, p)
        if c.tensors:   # pointers: each to the tensor the runtime passes there
            for a in abi.args:
                kind, ref = spec.source_of(a)
                if kind == "input":
                    assert c.tensors[a.name] == c.inputs[spec.inputs[ref].name], (c.id, a.name)
    assert lines["gemv_past_m"][-1] == ["enqueue", "-1"] and not any(w == "launch" for w, *_ in lines["gemv_past_m"])
