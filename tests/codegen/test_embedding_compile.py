"""The embedding layers (dsl/stdlib/embedding.lf) render as one row-lookup kernel each and
compile with NVRTC (no GPU needed): 16-byte vector loads of the table row, one load of each
id per row, the prompt-tuning lookups predicated on which table a token takes."""
import re

import pytest

import layerforge as lf
from layerforge.codegen.plan import plan_layer

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

NAMES = ["embedding", "prompt_tuning_embedding"]
STORAGE = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float"}


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.mark.parametrize("width", [7, 100, 1000, 4096, 5120])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("name", NAMES)
def test_embedding_compiles(prog, name, dtype, width):
    plan = plan_layer(prog.specialise(name, V=32000, H=width, dtype=dtype), "sm_90")
    src = plan.source()
    assert src.count("__global__") == 1
    res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    assert res.cubin[:4] == b"\x7fELF"
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("name", NAMES)
def test_table_rows_load_as_16_byte_vectors(prog, name, dtype):
    src = plan_layer(prog.specialise(name, V=32000, H=4096, dtype=dtype), "sm_90").source()
    body = src.split("extern")[1]
    vec = 16 // {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    assert f"lf_load_vec<{STORAGE[dtype]}, {vec}>(p_w + " in body       # i32 ids do not narrow it
    assert f"lf_store_vec<{STORAGE[dtype]}, {vec}>" in body
    assert body.count("p_ids[") == 1                                      # one id load per row
    # the row number is clamped into the table (64-bit: V * H may pass 2^31)
    assert re.search(r"const long long g\d+ = min\(max\(\(long long\)\(v\d+\), 0LL\), \(long long\)\(31999\)\)", body)


def test_odd_widths_use_narrower_vectors(prog):
    body = plan_layer(prog.specialise("embedding", V=1000, H=4100, dtype="bf16"), "sm_90").source().split("extern")[1]
    assert "lf_load_vec<__nv_bfloat16, 4>(p_w + " in body
    body = plan_layer(prog.specialise("embedding", V=1000, H=7, dtype="bf16"), "sm_90").source().split("extern")[1]
    assert "lf_load_vec" not in body and "p_w[" in body


def test_loads_are_predicated_on_the_branch_taken(prog):
    body = plan_layer(prog.specialise("prompt_tuning_embedding", V=32000, H=4096, dtype="bf16"),
                      "sm_90").source().split("extern")[1]
    w_loads = re.findall(r"lf_load_vec<__nv_bfloat16, 8>\(p_w \+ [^;]*, \((ok_\w+) && (v\d+)\)\);", body)
    p_loads = re.findall(r"lf_load_vec<__nv_bfloat16, 8>\(p_prompt \+ [^;]*, \((ok_\w+) && \(!(v\d+)\) && \((v\d+)\)\)\);",
                         body)
    assert w_loads and p_loads and len(w_loads) == len(p_loads)
    assert {g for _, g in w_loads} == {g for _, g, _ in p_loads}    # the vocabulary test guards both
    assert body.count("p_ids[") == 1 and body.count("p_tasks[") == 1


def test_vector_width_follows_runtime_alignment(prog):
    src = plan_layer(prog.specialise("embedding", V=100, H=4096, dtype="bf16"), "sm_90", vec_bytes=4).source()
    assert "lf_load_vec<__nv_bfloat16, 2>(p_w + " in src.split("extern")[1]


def test_existing_kernels_unchanged_by_row_lookups(prog):
    # where() without row lookups keeps its plain select, and i32 inputs still bound the vectors
    src = plan_layer(prog.specialise("rope", D=128, dtype="bf16"), "sm_90").source()
    assert "lf_load_vec<__nv_bfloat16, 4>" in src
