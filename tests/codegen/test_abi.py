"""The kernel ABI: one object from which signatures, launch types, grids (Python and C++)
and the manifest come; malformed descriptions are errors at construction."""
import pytest

import layerforge as lf
from layerforge.codegen.abi import TENSOR_MAP_CTYPE, Arg, GridExprError, KernelABI, SharedLayout
from layerforge.codegen.attention_tc import plan_tc_attention, tile_candidates
from layerforge.codegen.families import plans_for_layer


def abi(**kw):
    base = dict(name="lf_k", args=(Arg("x", "const float* __restrict__", "input"), Arg("n", "long long", "dim", "rows")),
                grid=("cdiv(rows, 4)",), block=(128, 4), problem=("rows",))
    return KernelABI(**{**base, **kw})


def test_signature_launch_types_and_grid_come_from_one_object():
    a = abi()
    assert a.signature == "const float* __restrict__ x,\n    long long n"
    assert a.launch_types == ("ptr", "i64") and a.block == (128, 4, 1) and a.threads == 512
    assert a.grid_for(9) == a.grid_for(rows=9) == (3, 1, 1) and a.grid_for(0) == (0, 1, 1)
    assert a.grid_c == ("lf_cdiv(rows, 4)", "1", "1")


def test_a_tensor_map_argument_is_passed_by_value_as_tmap():
    a = abi(args=(Arg("x_map", TENSOR_MAP_CTYPE, "tmap", "x"), Arg("n", "long long", "dim", "rows")))
    assert a.launch_types == ("tmap", "i64") and not a.args[0].is_pointer
    assert a.signature.startswith("const __grid_constant__ lf_tensor_map x_map,")
    assert KernelABI.from_json(a.to_json()) == a
    with pytest.raises(ValueError, match="role 'tmap'"):
        Arg("x_map", TENSOR_MAP_CTYPE, "input")
    with pytest.raises(ValueError, match="role 'tmap'"):
        Arg("x", "const float* __restrict__", "tmap")


def test_grid_expressions_are_a_checked_subset():
    with pytest.raises(GridExprError, match="uses \\['tokens'\\]"):
        abi(grid=("tokens * 2",))
    for bad in ("rows / 4", "__import__('os')", "rows.real", "rows ** 2", "1.5 * rows"):
        with pytest.raises(GridExprError):
            abi(grid=(bad,))
    assert abi(grid=("max(rows, 1) * 2 - min(rows, 3)",)).grid_for(5) == (7, 1, 1)


def test_bad_args_are_errors():
    with pytest.raises(ValueError, match="role"):
        Arg("x", "int", "weird")
    with pytest.raises(ValueError, match="no launch type"):
        Arg("x", "short", "dim")
    with pytest.raises(ValueError, match="duplicate"):
        abi(args=(Arg("x", "int", "dim"), Arg("x", "int", "dim")))


def test_json_round_trip():
    a = abi(shared_bytes=4096)
    assert KernelABI.from_json(a.to_json()) == a


def test_shared_layout_aligns_each_buffer():
    lay = SharedLayout((("a", 100), ("b", 256), ("c", 4)))
    assert lay.offsets == {"a": 0, "b": 128, "c": 384} and lay.bytes == 388


def test_every_stdlib_kernel_renders_its_abi_signature():
    prog = lf.stdlib()
    layers = [prog.specialise("rms_norm", H=4096, dtype="bf16"), prog.specialise("swiglu", F=14336, dtype="bf16"),
              prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"),
              prog.specialise("t5_attn", Hq=8, Hkv=8, D=64, NB=32, dtype="f16")]
    for layer in layers:
        for plan in plans_for_layer(layer, "sm_90"):
            src = plan.source()
            for k in plan.kernels:
                assert f"{k.name}(\n    {k.signature}" in src, (plan.key, k.name)


def test_tc_attention_shared_memory_is_its_layout():
    layer = lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    plan = plan_tc_attention(layer, "sm_90", tiles=tile_candidates("prefill", 128, 4)[0])
    lay = plan.shared_layout
    assert plan.abi.shared_bytes == lay.bytes and f"lf_smem + {lay.offsets['sPg']}" in plan.source()
    assert plan.abi.grid_for(chunks=3, max_q_len=100, num_splits=2) == (3, -(-100 * 4 // plan.config.rows), 16)
