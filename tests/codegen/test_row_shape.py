"""The thread shape and statement order of generated row kernels (no GPU needed): what
benchmarks/NOTES.md measured for SwiGLU at Llama-3 8B/70B widths. The row-per-block plan
(split=1) is what wide rows without reductions had before they were split over blocks
(tests/codegen/test_row_split.py)."""
import pytest

import layerforge as lf
from layerforge.codegen.plan import plan_layer


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def lowered(prog, name, dtype="bf16", split=None, **dims):
    return plan_layer(prog.specialise(name, dtype=dtype, **dims), "sm_90", split=split).lowered()


@pytest.mark.parametrize("width,threads", [(28672, 512), (14336, 256), (4096, 128)])
def test_elementwise_rows_take_at_most_512_threads_and_whole_chunks(prog, width, threads):
    k = lowered(prog, "swiglu", F=width, split=1)
    assert (k.tpr, k.rpb) == (threads, 1)
    chunks = width // 8                       # 16-byte chunks of bf16
    assert chunks % k.tpr == 0                # no partial last chunk
    assert chunks // k.tpr <= 8


@pytest.mark.parametrize("width,threads", [(4096, 128), (8192, 256)])
def test_rows_with_reductions_keep_four_chunks_per_thread(prog, width, threads):
    assert lowered(prog, "rms_norm", H=width).tpr == threads


@pytest.mark.parametrize("split,chunks", [(1, 7), (None, 1)])   # 512 x 7 chunks; 14 blocks of 256 x 1
def test_elementwise_rows_return_early_and_load_full_chunks_unguarded(prog, split, chunks):
    body = lowered(prog, "swiglu", F=28672, split=split).body
    assert "if (row >= n_rows) return;" in body
    assert "const bool row_ok = true;" in body
    guards = [line for line in body if line.startswith("const bool ok_")]
    assert len(guards) == chunks and all(line.endswith("= row_ok;") for line in guards)   # full chunks


def test_rows_with_reductions_guard_rows_past_the_end(prog):
    body = lowered(prog, "rms_norm", H=4096).body
    assert "const bool row_ok = row < n_rows;" in body
    assert not any("return;" in line for line in body)


@pytest.mark.parametrize("split,threads", [(1, 512), (None, 256 * 14)])
def test_each_chunk_loads_gate_and_up_before_its_arithmetic(prog, split, threads):
    body = lowered(prog, "swiglu", F=28672, split=split).body
    chunks, current = [], []
    for line in body:
        current.append(line)
        if "lf_store_vec" in line:
            chunks.append(current)
            current = []
    assert len(chunks) == 28672 // 8 // threads
    for lines in chunks:
        loads = [i for i, l in enumerate(lines) if "lf_load_vec" in l]
        first_math = next(i for i, l in enumerate(lines) if "lf_silu" in l)
        assert len(loads) == 2 and max(loads) < first_math


def test_integer_floor_division_by_powers_of_two_is_a_shift():
    """Row kernels emit integer // and % as the attention hooks do (codegen/ops.int_binary): by a
    constant 2^k the arithmetic shift and the low bits, other divisors the floor helpers."""
    prog = lf.loads("dynamic N\ndims H\nlayer f(x: i32[N, H]) -> (i32[N, H], i32[N, H], i32[N, H]) {\n"
                    "    return x // 8, x % 8, x % 6\n}\n", "ints.lf", with_stdlib=False)
    src = plan_layer(prog.specialise("f", H=64), "sm_90").source()
    body = src[src.index('extern "C"'):]   # the helpers' definitions stay in the header
    assert "((int)(v2) >> 3)" in body and "& (int)(7))" in body and "lf_mod_floor((int)" in body, body
    assert "lf_floordiv(" not in body
