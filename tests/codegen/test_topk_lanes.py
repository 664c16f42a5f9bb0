"""The sub-warp top-k (codegen/topk.py, RowLowering._topk_phase_lanes) on the CPU: the
generated top-k statements are run line by line for every lane of a row in lock step (the
butterfly reads the other lanes), on rows with ties, NaN, infinities and signed zeros, and
must pick what torch.topk's order picks (value desc, NaN largest, ties to the lowest index)."""
import math
import random
import re
import struct

import pytest

import layerforge as lf
from layerforge.codegen.plan import plan_layer
from layerforge.codegen.topk import index_of, key_of, sort_ops, value_of

from ..seeding import stable_seed

SRC = """
layer tk(x: f32[N, E], const k: int = 2) -> (f32[N, k], i32[N, k]) {
    v, i = topk(x, k)
    return v, i
}
"""
M64 = (1 << 64) - 1


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def reference(row: list[float], k: int) -> list[tuple[float, int]]:
    order = sorted(range(len(row)), key=lambda c: (0 if row[c] != row[c] else 1, -row[c] if row[c] == row[c] else 0, c))
    return [(row[c], c) for c in order[:k]]


def run_generated(body: list[str], row: list[float], tpr: int, k: int, name: str):
    """Run the top-k statements of `body` for lanes 0..tpr-1; return each lane's (values, indices)."""
    envs = [{"tid": t} for t in range(tpr)]
    width = len(row)

    def ev(expr: str, env: dict):
        expr = expr.strip()
        m = re.fullmatch(r"\((.*)\)", expr)
        if m and _balanced(m.group(1)):
            return ev(m.group(1), env)
        if re.fullmatch(r"-?\d+", expr):
            return int(expr)
        if expr == "0ull":
            return 0
        if expr == "row_ok":
            return True
        if re.fullmatch(r"\w+", expr):
            return env[expr]
        m = re.fullmatch(r"(\w+) \? (.+) : (.+)", expr)
        if m:
            return ev(m.group(2), env) if ev(m.group(1), env) else ev(m.group(3), env)
        m = re.fullmatch(r"(\w+) > (\w+)", expr)
        if m:
            return env[m.group(1)] > env[m.group(2)]
        m = re.fullmatch(r"\(unsigned\)(\w+) == \(unsigned\)(\w+)", expr)
        if m:
            return (env[m.group(1)] & 0xFFFFFFFF) == (env[m.group(2)] & 0xFFFFFFFF)
        m = re.fullmatch(r"tid \* (\d+)", expr)
        if m:
            return env["tid"] * int(m.group(1))
        m = re.fullmatch(r"(\d+) \+ (\w+)", expr)
        if m:
            return int(m.group(1)) + env[m.group(2)]
        m = re.fullmatch(r"(\w+) \+ (\d+)", expr)
        if m:
            return env[m.group(1)] + int(m.group(2))
        m = re.fullmatch(r"row_ok && \((\w+) \+ (\d+) < (\d+)\)", expr)
        if m:
            return env[m.group(1)] + int(m.group(2)) < int(m.group(3))
        raise AssertionError(f"unhandled expression {expr!r}")

    for line in body:
        m = re.fullmatch(r"const (?:bool|int) (\w+) = (.+);", line)
        if m and (m.group(1).startswith(("ok_", "c_", "cb")) or m.group(1).startswith(name)):
            for env in envs:
                env[m.group(1)] = ev(m.group(2), env)
            continue
        m = re.fullmatch(r"const unsigned long long (\w+) = (?:(\w+) \? )?lf_topk_key\(\(float\)\(\w+\), (.+?)\)(?: : 0ull)?;",
                         line)
        if m:
            for env in envs:
                c = ev(m.group(3), env)
                ok = ev(m.group(2), env) if m.group(2) else True
                assert ok == (c < width), "a column past the row must be key 0"
                env[m.group(1)] = key_of(row[c], c) if ok else 0
            continue
        m = re.fullmatch(r"const unsigned long long (\w+) = lf_topk_best<(\d+)>\((\w+)\);", line)
        if m:
            assert int(m.group(2)) == tpr
            vals = [env[m.group(3)] for env in envs]
            o = tpr // 2
            while o:
                vals = [max(vals[t], vals[t ^ o]) for t in range(tpr)]
                o //= 2
            for env, v in zip(envs, vals):
                env[m.group(1)] = v
            continue
        m = re.fullmatch(r"const unsigned long long (\w+) = (.+);", line)
        if m:
            for env in envs:
                env[m.group(1)] = ev(m.group(2), env) & M64
            continue
        m = re.fullmatch(r"const float (\w+) = lf_topk_value\((\w+)\); const int (\w+) = lf_topk_index\((\w+)\);", line)
        if m:
            for env in envs:
                env[m.group(1)] = value_of(env[m.group(2)])
                env[m.group(3)] = index_of(env[m.group(4)])
    return [([env[f"{name}_v{r}"] for r in range(k)], [env[f"{name}_i{r}"] for r in range(k)]) for env in envs]


def _balanced(s: str) -> bool:
    d = 0
    for ch in s:
        d += ch == "("
        d -= ch == ")"
        if d < 0:
            return False
    return d == 0


def rows_for(width: int, rng: random.Random):
    pool = [0.5, 0.25, -1.0, 3.0]
    yield [f32(rng.gauss(0, 1)) for _ in range(width)]
    yield [rng.choice(pool) for _ in range(width)]                      # many ties
    yield [1.0] * width                                                # all equal
    yield [float("-inf")] * width                                      # all -inf
    r = [rng.choice(pool + [0.0, -0.0, float("inf"), float("-inf")]) for _ in range(width)]
    r[rng.randrange(width)] = float("nan")
    yield r                                                            # NaN ranks first
    yield [-0.0 if c % 2 else 0.0 for c in range(width)]               # -0.0 ties with +0.0


def same(a: float, b: float) -> bool:
    return (a != a and b != b) or a == b


@pytest.mark.parametrize("width,k,tpr", [(8, 2, None), (8, 8, None), (8, 8, 2), (64, 2, None), (64, 8, None),
                                         (64, 8, 8), (64, 1, 2), (128, 2, None), (128, 8, None), (128, 8, 16),
                                         (60, 8, None), (24, 5, 4), (3, 3, None), (128, 32, None)])
def test_generated_topk_matches_torch_order(width, k, tpr):
    prog = lf.loads(SRC)
    plan = plan_layer(prog.specialise("tk", E=width, k=k, dtype="f32"), "sm_90", tpr=tpr)
    low = plan.lowered()
    assert low.tpr <= 32 and not low.topk_smem, "expected the sub-warp path"
    assert "__syncthreads" not in "\n".join(low.body)
    name = next(re.match(r"const unsigned long long (tk\d+)_k0", l).group(1) for l in low.body
                if re.match(r"const unsigned long long tk\d+_k0 ", l))
    rng = random.Random(stable_seed(width, k))
    for row in rows_for(width, rng):
        want = reference(row, k)
        for vals, idxs in run_generated(low.body, row, low.tpr, k, name):
            assert idxs == [c for _, c in want], (row, idxs, want)
            assert all(same(a, b) for a, b in zip(vals, [v for v, _ in want]))


def test_keys_order_like_value_then_lowest_index():
    vals = [float("nan"), float("inf"), 3.0, 1e-30, 0.0, -0.0, -1e-30, -2.0, float("-inf")]
    keys = [key_of(v, 5) for v in vals]
    assert keys == sorted(keys, reverse=True)
    assert key_of(0.0, 5) == key_of(-0.0, 5)
    assert key_of(1.0, 3) > key_of(1.0, 4) > 0
    assert key_of(float("-inf"), 2**31 - 2) > 0          # key 0 stays below every real key
    for v in vals[1:]:
        assert same(value_of(key_of(v, 7)), 0.0 if v == 0 else f32(v)) and index_of(key_of(v, 7)) == 7


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 12, 16, 24, 32])
@pytest.mark.parametrize("keep", [1, 2, 4, 8])
def test_sort_ops_keep_the_largest_sorted(m, keep):
    keep = min(keep, m)
    rng = random.Random(stable_seed(m, keep))
    n = 1 << math.ceil(math.log2(m)) if m > 1 else 1
    ops = sort_ops(m, keep)
    for _ in range(200):
        keys = [rng.randrange(1, 6) for _ in range(m)]
        w = keys + [0] * (n - m)
        for op, i, j in ops:
            a, b = w[i], w[j]
            if op == "swap":
                w[i], w[j] = b, a
            if op in ("cas", "max"):
                w[i] = max(a, b)
            if op in ("cas", "min"):
                w[j] = min(a, b)
        assert w[:keep] == sorted(keys, reverse=True)[:keep]


@pytest.mark.parametrize("width,k", [(8, 8), (64, 8), (128, 8), (256, 8), (2048, 4)])
def test_topk_kernels_compile_without_spills(width, k):
    """Both paths (sub-warp up to 512 wide, shared memory past it) compile for sm_90."""
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    plan = plan_layer(lf.loads(SRC).specialise("tk", E=width, k=k, dtype="f32"), "sm_90")
    assert bool(plan.lowered().topk_smem) == (width > 512)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
