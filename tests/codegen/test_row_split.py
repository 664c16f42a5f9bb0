"""Wide rows without reductions split over several consecutive blocks (no GPU needed): the plan
and its ABI, NVRTC compiles without spills, and, by running the generated column
statements in Python for every (block y, thread), each output element of a row stored
exactly once, every load and store inside the row, at odd widths and narrowed vectors too."""
import math
import re

import pytest

import layerforge as lf
from layerforge.codegen import trt_exprs
from layerforge.codegen.abi import KernelABI
from layerforge.codegen.plan import LoweringError, plan_layer

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# Outputs that permute and interleave their columns (a block's columns read other blocks' inputs),
# two output widths in one kernel
SRC = """
layer swap_sum(x: T[N, 2*F]) -> (T[N, 2*F], T[N, F], T[N, 2*F]) {
    a, b = split(x, 2, axis=-1)
    return concat(b, a), T(f32(a) + f32(b)), interleave(b, a)
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.loads(SRC)


def plan(prog, name, dtype="bf16", vec_bytes=16, split=None, **dims):
    return plan_layer(prog.specialise(name, dtype=dtype, **dims), "sm_90", vec_bytes=vec_bytes, split=split)


@pytest.mark.parametrize("name,F,threads,blocks", [
    ("swiglu", 28672, 256, 14),    # 3584 chunks of 8 bf16: 256 threads x 1 chunk x 14 blocks
    ("swiglu", 14336, 256, 7),     # 1792: 256 x 1 x 7
    ("geglu", 28672, 256, 14),
    ("geglu_tanh", 14336, 256, 7),
    ("silu_act", 28672, 256, 14),
    ("swiglu", 10000, 256, 5),     # 1250 chunks: 256 x 1 x 5 (1280 slots)
    ("swiglu", 4097, 128, 3),      # odd: 4097 chunks of one element, 128 x 11 x 3
    ("swiglu", 4096, 256, 2),      # 512 chunks: 2 blocks of 256 x 1
])
def test_wide_rows_without_reductions_split_over_consecutive_blocks(prog, name, F, threads, blocks):
    p = plan(prog, name, F=F)
    k = p.lowered()
    assert (k.tpr, k.rpb, k.split) == (threads, 1, blocks)
    assert p.abi.grid == (f"rows * {blocks}", "1", "1") and p.abi.block == (threads, 1, 1)
    assert p.abi.grid_for(4096) == (4096 * blocks, 1, 1) and p.abi.grid_for(rows=1) == (blocks, 1, 1)
    assert p.abi.problem == ("rows",)
    # every consumer of the grid reads it from the ABI: the manifest, the TensorRT plugins
    assert KernelABI.from_json(p.abi.to_json()) == p.abi
    assert [trt_exprs.c_int(g) for g in p.abi.grid] == [f"(v_rows * int64_t({blocks}))", "int64_t(1)", "int64_t(1)"]
    assert trt_exprs.python(p.abi.grid[0]) == f"(v_rows * {blocks})"
    src = p.source()
    assert f"// grid.x = rows x {blocks}:" in src and f"blockIdx.x % {blocks}u" in src and "blockIdx.y" not in src
    # the signature is the row-per-block kernel's
    assert p.abi.signature == plan(prog, name, F=F, split=1).abi.signature


@pytest.mark.parametrize("name,dims", [
    ("swiglu", dict(F=1536)),      # narrower than SPLIT_MIN_WIDTH
    ("rms_norm", dict(H=28672)),   # reductions: never split
    ("add_rms_norm", dict(H=16384)),
    ("softmax_rows", dict(H=32768)),
])
def test_narrow_rows_and_rows_with_reductions_keep_one_block_per_row(prog, name, dims):
    auto, one = plan(prog, name, **dims), plan(prog, name, split=1, **dims)
    assert auto.lowered().split == 1
    assert auto.abi.grid[1:] == ("1", "1")
    assert (auto.lowered().tpr, auto.lowered().body) == (one.lowered().tpr, one.lowered().body)
    assert "const int part" not in auto.source() and "grid.x = rows x" not in auto.source()


def test_split_is_a_plan_field(prog):
    p = plan(prog, "swiglu", F=14336, split=4)
    assert p.key == "swiglu_f14336_bf16_s4_sm90" and p.lowered().split == 4 and p.abi.grid[0] == "rows * 4"
    assert plan(prog, "swiglu", F=28672, split=1).key.endswith("_s1_sm90")
    assert plan(prog, "swiglu", F=28672).key == "swiglu_f28672_bf16_sm90"
    with pytest.raises(LoweringError, match="without reductions"):
        plan(prog, "rms_norm", H=28672, split=2)
    with pytest.raises(LoweringError, match="at most 65535"):
        plan(prog, "swiglu", F=28672, split=70000)


# ---- running the column statements on the CPU ------------------------------------------------
_DECL = re.compile(r"^const (?:int|bool) ((?:cb|ok_|c_)\w+) = (.*);$")


def _py(expr: str) -> str:
    expr = expr.replace("part", "by").replace("&&", "and").replace("true", "True")
    return re.sub(r"(?<!/)/(?!/)", "//", expr)   # C's / on non-negative ints


def _operand(line: str, start: int) -> str:
    """The bracketed expression that starts at line[start] ('(' or '['), brackets included."""
    depth = 0
    for i in range(start, len(line)):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(line[i], 0)
        if depth == 0:
            return line[start:i + 1]
    raise AssertionError(line)


def accesses(body: list[str], tpr: int, split: int):
    """For every (block y, thread) of row 0: the element offsets each output stores and each
    input loads (guarded-off accesses left out)."""
    decls = [m.groups() for m in map(_DECL.match, body) if m]
    stores, loads = {}, {}
    for by in range(split):
        for tid in range(tpr):
            env = {"by": by, "tid": tid, "row_ok": True, "r0": 0}
            for name, expr in decls:
                env[name] = eval(_py(expr), {}, env)
            for line in body:
                for m in re.finditer(r"lf_(load|store)_vec<[^,]+, (\d+)>\((p_\w+|o_\d+) \+ ", line):
                    # a bracketed address, or one name (a row-broadcast weight: its column alone)
                    addr = _operand(line, m.end()) if line[m.end()] in "([" else re.match(r"\w+", line[m.end():])[0]
                    rest = line[m.end() + len(addr):]
                    ok = (re.match(r", (\w+)\)", rest).group(1) if m.group(1) == "load"
                          else re.match(r"if \((\w+)\)", line).group(1))
                    if env[ok]:
                        at = eval(_py(addr), {}, env)
                        (loads if m.group(1) == "load" else stores).setdefault(m.group(3), []).extend(
                            range(at, at + int(m.group(2))))
                for m in re.finditer(r"\((\w+) \? (p_\w+)\[", line):   # scalar loads
                    if env[m.group(1)]:
                        loads.setdefault(m.group(2), []).append(eval(_py(_operand(line, m.end() - 1)[1:-1]), {}, env))
                m = re.match(r"if \((\w+)\) (o_\d+)\[", line)   # scalar stores
                if m and env[m.group(1)]:
                    stores.setdefault(m.group(2), []).append(eval(_py(_operand(line, m.end() - 1)[1:-1]), {}, env))
    return stores, loads


@pytest.mark.parametrize("name,dtype,vec_bytes,split,F", [
    ("swiglu", "bf16", 16, None, 28672),
    ("swiglu", "bf16", 16, None, 14336),
    ("swiglu", "bf16", 2, None, 14336),     # vectors narrowed by alignment
    ("swiglu", "bf16", 4, None, 28672),
    ("geglu", "bf16", 16, None, 28672),
    ("swiglu", "bf16", 16, None, 10000),    # last block partly past the row end
    ("swiglu", "bf16", 16, None, 4097),     # odd width: one element a chunk
    ("swiglu", "bf16", 16, 3, 5000),        # 625 chunks over 3 blocks of 256 threads
    ("swiglu", "f32", 16, None, 5000),
    ("swiglu", "f16", 8, 5, 4097),
    ("swap_sum", "bf16", 16, None, 8192),   # permuted and interleaved columns, two output widths
    ("swap_sum", "bf16", 16, None, 4099),
    ("swap_sum", "f32", 2, None, 4099),
])
def test_split_rows_store_each_element_once_and_stay_inside_the_row(prog, name, dtype, vec_bytes, split, F):
    p = plan(prog, name, dtype=dtype, vec_bytes=vec_bytes, split=split, F=F)
    k = p.lowered()
    assert k.split > 1
    stores, loads = accesses(k.body, k.tpr, k.split)
    widths = {"swiglu": [F], "geglu": [F], "swap_sum": [2 * F, F, 2 * F]}[name]
    assert sorted(stores) == [f"o_{i}" for i in range(len(widths))]
    for i, w in enumerate(widths):
        assert sorted(stores[f"o_{i}"]) == list(range(w)), f"output {i}: not each of its {w} columns once"
    assert loads and all(0 <= a < 2 * F for addrs in loads.values() for a in addrs)
    assert set().union(*map(set, loads.values())) == set(range(2 * F))


@pytest.mark.parametrize("name,dtype,vec_bytes,F", [
    ("swiglu", "bf16", 16, 28672), ("swiglu", "bf16", 16, 14336), ("geglu", "bf16", 16, 28672),
    ("geglu", "bf16", 16, 14336), ("geglu_tanh", "bf16", 16, 28672), ("swiglu", "f32", 16, 28672),
    ("swiglu", "bf16", 2, 28672), ("swiglu", "bf16", 16, 4097), ("swiglu", "bf16", 16, 10000),
    ("swap_sum", "bf16", 16, 8192),
])
def test_split_kernels_compile_without_spills(prog, name, dtype, vec_bytes, F):
    split, one = (plan(prog, name, dtype=dtype, vec_bytes=vec_bytes, F=F, split=s) for s in (None, 1))
    assert split.lowered().split > 1
    regs = []
    for p in (split, one):
        res = nvrtc.compile_cuda(p.source(), p.kernel_name, nvrtc.CompileOptions("sm_90"))
        regs.append(res.resources[p.kernel_name])
    assert regs[0].spill_stores == 0 and regs[0].spill_loads == 0, regs[0]
    # a block's share of the row needs no more registers than the whole row in one block
    # (SwiGLU F 28672 bf16: 34 against 38)
    assert regs[0].registers <= regs[1].registers, regs


def test_split_shapes_have_few_idle_threads(prog):
    """Across bf16 widths 4096..32768: split rows take blocks of 128 or 256 threads with 1 to 4
    16-byte chunks each and leave no more chunk slots idle than one block per row did."""
    def idle(k, chunks):
        slots = k.split * k.tpr * math.ceil(chunks / (k.tpr * k.split))
        return (slots - chunks) / slots

    splits = 0
    for F in range(4096, 32769, 8 * 37):
        k, one = plan(prog, "swiglu", F=F).lowered(), plan(prog, "swiglu", F=F, split=1).lowered()
        chunks = F // 8
        if k.split == 1:
            assert (k.tpr, k.body) == (one.tpr, one.body)
            continue
        splits += 1
        assert k.tpr in (128, 256) and 1 <= math.ceil(chunks / (k.tpr * k.split)) <= 4, (F, k.tpr, k.split)
        assert idle(k, chunks) <= idle(one, chunks), (F, k.tpr, k.split)
    assert splits > 70
