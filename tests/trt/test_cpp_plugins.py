"""The generated C++ plugin library: it compiles against TensorRT's public headers, and each
plugin's enqueue computes the grid and the int/float arguments the runtime launches with.

The compile check needs TensorRT's headers: set TENSORRT_INCLUDE_DIR (e.g. the include/
folder of github.com/NVIDIA/TensorRT); without it the test skips and says so. The launch check
needs only a C++ compiler: it compiles each plugin's own enqueue statements (cut from the
generated file) into a harness that prints what they compute for given input shapes.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

from layerforge.codegen.abi import KernelABI

from .pack import expected_launch, f32_bits, input_shapes

CXX = shutil.which("g++") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or clang++) on this machine")


def write_cubin_includes(pack, folder):
    """What the CMakeLists.txt writes at configure time: each cubin as a C byte list."""
    folder.mkdir(exist_ok=True)
    for cubin in pack.glob("*.cubin"):
        data = cubin.read_bytes()
        (folder / f"{cubin.name}.inc").write_text(",".join(f"0x{b:02x}" for b in data) + ",\n")


def cuda_toolkit_include() -> str | None:
    """A folder with the CUDA headers host code includes (cuda.h, cuda_runtime_api.h and its
    crt/ headers, which the runtime wheel lacks): $CUDA_INCLUDE_DIR, $CUDA_HOME or $CUDA_PATH,
    then an installed toolkit."""
    candidates = [os.environ.get("CUDA_INCLUDE_DIR")]
    candidates += [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)
    return next((c for c in candidates if c and os.path.exists(os.path.join(c, "crt", "host_defines.h"))
                 and os.path.exists(os.path.join(c, "cuda.h"))), None)


@needs_cxx
@pytest.mark.skipif(cuda_toolkit_include() is None, reason="no CUDA toolkit headers (cuda.h, crt/) found: set "
                                                           "CUDA_INCLUDE_DIR")
@pytest.mark.skipif(not os.environ.get("TENSORRT_INCLUDE_DIR"),
                    reason="TENSORRT_INCLUDE_DIR is not set (TensorRT's public headers, e.g. the include/ folder "
                           "of github.com/NVIDIA/TensorRT)")
def test_plugin_library_compiles_against_tensorrt_headers(trt_pack, tmp_path):
    write_cubin_includes(trt_pack, tmp_path / "cubins")
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
           "-isystem", os.environ["TENSORRT_INCLUDE_DIR"], "-isystem", cuda_toolkit_include(),
           "-I", str(tmp_path / "cubins"), str(trt_pack / "trt" / "layerforge_plugins.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_plugin_library_declares_a_plugin_per_served_kernel(manifest, trt_pack):
    source = (trt_pack / "trt" / "layerforge_plugins.cpp").read_text()
    served = set(re.findall(r"class Plugin_(\w+) final", source))
    families = {e["key"]: (e["family"], e.get("mode")) for e in manifest["kernels"]}
    want = {k for k, (f, mode) in families.items() if f in ("row", "paged_attention", "kv_append") or mode == "decode"}
    assert served == want
    assert source.count("static lf_trt::Creator<") == len(want)


HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
struct Dims { int32_t nbDims; int64_t d[8]; };
struct PluginTensorDesc { Dims dims; };
struct Attr { double v; double value() const { return v; } };
inline int64_t lf_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t lf_min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t lf_max(int64_t a, int64_t b) { return a > b ? a : b; }
static void show(int k, int v) { std::printf(" %d:%d", k, v); }
static void show(int k, long long v) { std::printf(" %d:%lld", k, v); }
static void show(int k, float v) { int32_t b; std::memcpy(&b, &v, 4); std::printf(" %d:f%d", k, b); }
"""


def enqueue_statements(source: str) -> dict[str, str]:
    """Each plugin's enqueue body up to its argument array, by kernel key."""
    out = {}
    for chunk in source.split("class Plugin_")[1:]:
        key = chunk.split(" ", 1)[0]
        body = chunk.split("cudaStream_t stream) noexcept override {", 1)[1]
        out[key] = body.split("        void* args[]", 1)[0]
    return out


@needs_cxx
def test_enqueue_computes_the_runtime_launch(manifest, trt_pack, tmp_path):
    statements = enqueue_statements((trt_pack / "trt" / "layerforge_plugins.cpp").read_text())
    cases, functions, calls = [], [], []
    for e in manifest["kernels"]:
        if e["key"] not in statements:
            continue
        cases += [(e, input_shapes(e, case)) for case in (0, 1, 2)]
        body = statements[e["key"]]
        shows = "".join(f"    show({k}, a{k});\n" for k in
                        (int(m) for m in re.findall(r"^\s*(?:int|long long|float) a(\d+) =", body, re.M)))
        functions.append(
            f"int run_{e['key']}(PluginTensorDesc const* inputDesc, std::vector<Attr> mAttrs) {{\n"
            f"    void const* in_[16] = {{}}; void* out_[4] = {{}};\n"
            f"    void const* const* inputs = in_; void* const* outputs = out_; (void)inputs; (void)outputs;\n"
            f"{body}"
            f"    std::printf(\"{e['key']} %lld %lld %lld\", (long long)grid[0], (long long)grid[1], (long long)grid[2]);\n"
            f"{shows}    std::printf(\"\\n\");\n    return 0;\n}}\n")
    for e, shapes in cases:
        abi = KernelABI.from_json(e["kernels"][0])
        want = expected_launch(trt_pack, e, shapes)
        descs = ", ".join(f"{{{{{len(s)}, {{{', '.join(map(str, s))}}}}}}}" for s in shapes)
        attrs = ", ".join(f"{{{want.args[a.name]!r}}}" for a in abi.args if a.role == "scalar")
        calls.append(f"    {{ PluginTensorDesc d[] = {{{descs}}}; if (run_{e['key']}(d, {{{attrs}}})) return 1; }}\n")
    program = tmp_path / "harness.cpp"
    program.write_text(HARNESS + "".join(functions) + "int main() {\n" + "".join(calls) + "    return 0;\n}\n")
    subprocess.run([CXX, "-std=c++17", "-O0", "-o", str(tmp_path / "harness"), str(program)], check=True)
    lines = subprocess.run([str(tmp_path / "harness")], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases)
    for line, (e, shapes) in zip(lines, cases):
        key, gx, gy, gz, *args = line.split()
        abi = KernelABI.from_json(e["kernels"][0])
        want = expected_launch(trt_pack, e, shapes)
        assert key == e["key"] and (int(gx), int(gy), int(gz)) == want.grid, (key, shapes)
        got = {abi.args[int(k)].name: int(v.lstrip("f")) for k, v in (a.split(":") for a in args)}
        assert got == {n: f32_bits(v) if isinstance(v, float) else v for n, v in want.args.items()}, (key, shapes)
