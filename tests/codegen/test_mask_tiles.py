"""Block sparsity of attention masks (codegen/mask_tiles.py), no GPU needed: the tile classifier
says "empty" only where the mask is false on every element of the tile and "full" only where it
is true on every one, checked element by element with the reference evaluator's own mask, for
the FlexAttention-style masks and for the fuzzer's random hooks."""
from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import layerforge as lf
from layerforge.codegen.mask_tiles import EMPTY, FULL, PARTIAL, python_classifier, tile_context
from layerforge.codegen.scalar_expr import TableInfo
from layerforge.dsl.attention_ref import _subgraph
from layerforge.dsl.evaluator import _Evaluator, bind_inputs

from ..fuzz.gen import attention_blocks, random_tensor

MASKS = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention prefix_lm(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const P: int = 40) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos or kv_pos < P
}
attention sinks(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const W: int = 64) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and (q_pos - kv_pos < W or kv_pos < 4)
}
attention dilated(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and q_pos - kv_pos < 128 and (q_pos - kv_pos) % 2 == 0
}
attention natten(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const G: int = 32) -> T[B, S, Hq, D] {
    mask = abs(q_pos // G - kv_pos // G) <= 2 and abs(q_pos % G - kv_pos % G) <= 2
}
attention causal(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos
}
attention doc(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], ids: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = ids[b, kv_pos] == ids[b, q_pos]
}
attention by_head(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = h < 2 or kv_pos <= q_pos
}
attention prefix_table(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], prefix: i32[B]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos or kv_pos < prefix[b]
}
attention head_window(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], win: i32[Hq]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and q_pos - kv_pos < win[h] * 2
}
"""


class _Dims(dict):
    def __missing__(self, name):   # every dynamic dim by its kernel argument's name (the C sizes)
        return f"d_{name}"


DIMS = _Dims()


def mask_of(layer):
    return layer.function.outputs[0].arg.mask


def exact_grid(layer, q_len: int, kv_len: int, tables: dict, batch: int = 2):
    """The mask over b < batch, every head, q_pos < q_len, kv_pos < kv_len: bool [B, Hq, Q, K]."""
    fn = layer.function
    spec = fn.outputs[0].arg
    hq, hkv, d = int(spec.num_q_heads), int(spec.num_kv_heads), int(spec.head_dim)
    dt = fn.params[0].dtype.torch
    inputs = {"q": torch.zeros(batch, q_len, hq, d, dtype=dt), "k": torch.zeros(batch, kv_len, hkv, d, dtype=dt),
              "v": torch.zeros(batch, kv_len, hkv, d, dtype=dt), **tables}
    ev = _Evaluator(fn, inputs, bind_inputs(fn, inputs), True, None, None)
    h = torch.arange(hq).view(1, hq, 1, 1).int()
    env = {"b": torch.arange(batch).view(batch, 1, 1, 1).int(), "h": h, "kv_h": h // (hq // hkv),
           "q_pos": torch.arange(q_len).view(1, 1, q_len, 1).int(), "kv_pos": torch.arange(kv_len).view(1, 1, 1, kv_len).int(),
           "score": torch.randn(batch, hq, q_len, kv_len, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    return _subgraph(ev, spec.mask, env).expand(batch, hq, q_len, kv_len).bool(), hq, hkv


def check_sound(layer, tables=None, q_len=160, kv_len=160, tiles=200, seed=0, scalars=None, ranges=False):
    """Random tiles (and aligned ones): EMPTY only over all-false elements, FULL over all-true.
    ranges: the classifier as the block-mask pre-pass runs it (codegen/block_mask.py)."""
    grid, hq, hkv = exact_grid(layer, q_len, kv_len, tables or {})
    params = {p.name: p for p in layer.function.params}
    infos = {n: TableInfo(n, params[n].dtype, params[n].shape, DIMS) for n in (tables or {})}
    classify = python_classifier(mask_of(layer), tables=infos, ranges=ranges)
    scalars = {**(scalars or {}), **{f"p_{n}": t for n, t in (tables or {}).items()}}
    rng = random.Random(seed)
    group = hq // hkv
    seen = set()
    for i in range(tiles):
        if i % 2:
            q0, k0 = rng.randrange(0, q_len, 16), rng.randrange(0, kv_len, 16)
            q1, k1 = min(q_len, q0 + 16) - 1, min(kv_len, k0 + 16) - 1
        else:
            q0, k0 = rng.randrange(q_len), rng.randrange(kv_len)
            q1, k1 = rng.randrange(q0, q_len), rng.randrange(k0, kv_len)
        b, kvh = rng.randrange(2), rng.randrange(hkv)
        h0 = kvh * group + rng.randrange(group)
        h1 = rng.randrange(h0, kvh * group + group)
        got = classify(q0, q1, k0, k1, h0, h1, kvh, b, **(scalars or {}))
        block = grid[b, h0:h1 + 1, q0:q1 + 1, k0:k1 + 1]
        if got == EMPTY:
            assert not block.any(), (q0, q1, k0, k1, h0, h1, b)
        elif got == FULL:
            assert block.all(), (q0, q1, k0, k1, h0, h1, b)
        seen.add(got)
    return seen


@pytest.fixture(scope="module")
def prog():
    return lf.loads(MASKS, "masks.lf", with_stdlib=False)


TABLES = {"prefix_table": lambda: {"prefix": torch.tensor([40, 100], dtype=torch.int32)},
          "head_window": lambda: {"win": torch.tensor([4, 16, 64, 1000], dtype=torch.int32)}}


@pytest.mark.parametrize("name", ["prefix_lm", "sinks", "dilated", "natten", "by_head", "prefix_table", "head_window"])
def test_position_masks_get_empty_and_full_tiles(prog, name):
    layer = prog.specialise(name, Hq=4, Hkv=2, D=64, dtype="bf16")
    tables = TABLES.get(name, dict)()
    params = {p.name: p for p in layer.function.params}
    infos = {n: TableInfo(n, params[n].dtype, params[n].shape, DIMS) for n in tables}
    ctx = tile_context(mask_of(layer), {}, exact=False, tables=infos)
    # dilated: beside its causal and window bounds, `% 2` leaves every tile partial, so the
    # kernel gets no classifier (it only cost time)
    assert bool(ctx and ctx["tile_lines"]) == (name != "dilated")
    seen = check_sound(layer, tables, q_len=256, kv_len=256, tiles=400)
    assert EMPTY in seen, name                       # the point: tiles skipped
    if name not in ("dilated", "natten"):            # every 2nd key, a 5 x 5 neighbourhood: no tile is full
        assert FULL in seen, name


def test_exact_tiles(prog):
    prefix = python_classifier(mask_of(prog.specialise("prefix_lm", Hq=4, Hkv=2, D=64, dtype="bf16")))
    assert prefix(0, 63, 64, 127, 0, 3, 0, 0) == EMPTY      # above the diagonal and past the prefix
    assert prefix(0, 63, 0, 31, 0, 3, 0, 0) == FULL         # inside the prefix
    assert prefix(0, 63, 32, 63, 0, 3, 0, 0) == PARTIAL
    assert prefix(128, 191, 32, 95, 0, 3, 0, 0) == FULL     # below the diagonal
    natten = python_classifier(mask_of(prog.specialise("natten", Hq=4, Hkv=2, D=64, dtype="bf16")))
    assert natten(0, 31, 512, 575, 0, 3, 0, 0) == EMPTY     # grid rows 0 and 16-17: far apart


def test_no_classifier_where_it_cannot_help(prog):
    causal = prog.specialise("causal", Hq=4, Hkv=2, D=64, dtype="bf16")
    assert tile_context(mask_of(causal), {}, exact=True) == {}          # key bounds already do it
    doc = prog.specialise("doc", Hq=4, Hkv=2, D=64, dtype="bf16")
    assert tile_context(mask_of(doc), {}, exact=False) == {}            # tables only: unknown
    assert tile_context(None, {}, exact=False) == {}


FUZZ = dict(derandomize=True, deadline=None, database=None, max_examples=int(os.environ.get("LF_TILE_EXAMPLES", 120)),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@settings(**FUZZ)
@given(case=attention_blocks())
def test_fuzzed_masks_are_classified_soundly(case):
    try:
        layer = lf.loads(case.source, "fuzz.lf", with_stdlib=False).specialise(case.name, dtype=case.dtype,
                                                                                 **case.bindings)
    except lf.DSLError:
        return
    if mask_of(layer) is None:
        return
    spec = layer.function.outputs[0].arg
    if int(spec.num_q_heads) % int(spec.num_kv_heads):
        return
    params = {p.name: p for p in layer.function.params}
    gen = torch.Generator().manual_seed(1)
    sizes = {"B": 2, "Skv": 96, **{k: v for k, v in case.bindings.items() if isinstance(v, int)}}
    tables = {name: random_tensor(params[name].dtype, [sizes[x] for x in dims], gen)
              for name, (_, dims) in case.tables.items()}
    check_sound(layer, tables, q_len=96, kv_len=96, tiles=60)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", ["prefix_lm", "natten", "prefix_table", "head_window"])
def test_classified_kernels_compile_without_spills(prog, name, mode):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    from layerforge.codegen.attention_tc import plan_tc_attention
    plan = plan_tc_attention(prog.specialise(name, Hq=32, Hkv=8, D=128, dtype="bf16"), "sm_90", mode=mode)
    src = plan.source()
    assert "lf_mask_tile(" in src and "if (tile_cls == 0) continue;" in src
    if name in TABLES:   # one run-time load per lookup, at a clamped index
        assert f"p_{next(iter(TABLES[name]()))}[" in src.split("lf_mask_tile(long long")[1].split("}")[0]
    res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr


def test_floor_division_by_powers_of_two_is_a_shift(prog):
    """Integer // and % by a constant 2^k in a hook are the arithmetic shift and the low bits (no
    division sequence per score): the floor semantics of the reference for negative operands too.
    Other divisors keep the floor helpers."""
    from layerforge.codegen.attention_wgmma import plan_wgmma_attention
    src = plan_wgmma_attention(prog.specialise("natten", Hq=4, Hkv=2, D=64, dtype="bf16")).source()
    mask = src[src.index("bool lf_mask("):].split("\n}\n")[0]
    assert "(int)(q_pos) >> 5" in mask and "& (int)(31)" in mask, mask
    assert "lf_floordiv" not in mask and "lf_mod_floor" not in mask, mask
    dilated = plan_wgmma_attention(prog.specialise("dilated", Hq=4, Hkv=2, D=64, dtype="bf16")).source()
    assert "& (int)(1))" in dilated[dilated.index("bool lf_mask("):].split("\n}\n")[0]
    for x in range(-300, 300):   # what the C expressions compute, in Python's floor semantics
        for k in range(8):
            assert x >> k == x // 2 ** k and x & (2 ** k - 1) == x % 2 ** k
    odd = lf.loads(MASKS.replace("const G: int = 32", "const G: int = 24"), "masks.lf", with_stdlib=False)
    src = plan_wgmma_attention(odd.specialise("natten", Hq=4, Hkv=2, D=64, dtype="bf16")).source()
    assert "lf_floordiv" in src[src.index("bool lf_mask("):].split("\n}\n")[0]


def test_hook_integers_narrow_and_compare_as_integers(prog):
    """A hook's 64-bit integer values that fit 32 bits (by interval arithmetic from the kernels' int
    arguments) are computed as int, and an integer's f32 rounding compared with an integral constant
    below 2^24 (NATTEN's abs(q // G - k // G) <= 2, the DSL's abs being f32) is compared as integers:
    no 64-bit or int-to-float instructions a score."""
    from layerforge.codegen.attention_wgmma import plan_wgmma_attention
    src = plan_wgmma_attention(prog.specialise("natten", Hq=4, Hkv=2, D=64, dtype="bf16")).source()
    mask = src[src.index("bool lf_mask("):].split("\n}\n")[0]
    assert "long long" not in mask, mask
    ret = mask.split("return ")[1].split(";")[0]
    used = {ret}
    for line in reversed(mask.splitlines()):   # the values the result depends on
        if "const " in line and line.split("=")[0].split()[-1] in " ".join(used):
            used.add(line)
    assert not any("fabsf" in line or "(float)" in line for line in used), used
    assert "abs((int)(" in mask


def test_int_ranges_are_sound():
    """_int_range's intervals hold every value the expression takes (random trees over int32 / int64
    inputs and constants, exact Python integers), so a node narrowed to int never wraps."""
    from layerforge.codegen.scalar_expr import I32, _fits, _int_range
    from layerforge.dsl.ir import Node, Op
    from layerforge.dsl.types import DType
    rng = random.Random(7)
    ops_ = ["add", "sub", "mul", "min", "max", "floordiv", "mod"]

    def tree(depth):
        if depth == 0 or rng.random() < 0.25:
            if rng.random() < 0.5:
                v = rng.choice([1, 2, 3, 7, 32, 64, 100, -5, 2 ** 20])
                return Node(Op.CONST, DType.i64, (), (), v), (lambda env, v=v: v)
            name = rng.choice(["q_pos", "kv_pos", "h"])
            return Node(Op.ATTN_VAR, DType.i32, (), (), name), (lambda env, name=name: env[name])
        if rng.random() < 0.2:
            (a, fa) = tree(depth - 1)
            u = rng.choice(["neg", "abs"])
            dt = a.dtype
            return wrap(Node(Op.UNARY, dt, (), (a,), u), lambda env: (-fa(env) if u == "neg" else abs(fa(env))))
        op = rng.choice(ops_)
        a, fa = tree(depth - 1)
        if op in ("floordiv", "mod"):
            d = rng.choice([1, 2, 3, 8, 64, 100])
            b, fb = Node(Op.CONST, DType.i64, (), (), d), (lambda env, d=d: d)
        else:
            b, fb = tree(depth - 1)
        dt = DType.i64 if DType.i64 in (a.dtype, b.dtype) else DType.i32
        f = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "min": min,
             "max": max, "floordiv": lambda x, y: x // y, "mod": lambda x, y: x % y}[op]
        return wrap(Node(Op.BINARY, dt, (), (a, b), op), lambda env: f(fa(env), fb(env)))

    def wrap(n, f):   # C's two's-complement value of the node's type (an int expression that overflows)
        bits = 32 if n.dtype is DType.i32 else 64
        return n, (lambda env: (f(env) + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1))

    ranges = {}

    def range_of(n):
        if id(n) not in ranges:
            for s in n.src:
                range_of(s)
            ranges[id(n)] = _int_range(n, lambda s: ranges[id(s)])
        return ranges[id(n)]

    checked = 0
    for _ in range(400):
        root, f = tree(4)
        ranges.clear()   # keyed by id(): the last tree's nodes are gone
        r = range_of(root)
        for _ in range(30):
            env = {k: rng.choice([0, 1, 63, 64, 4095, rng.randrange(2 ** 31), -rng.randrange(2 ** 31), 2 ** 31 - 1,
                                  -2 ** 31]) for k in ("q_pos", "kv_pos", "h")}
            v = f(env)
            assert r[0] <= v <= r[1], (root, r, v)
            checked += int(_fits(r, I32))
    assert checked > 3000


def test_f32_roundings_compare_as_integers():
    """The exactness _int_compare relies on: for an integral constant c with |c| < 2^24 and any
    integer x, (float)x <op> c equals x <op> c (f32 rounding is monotone and c's neighbours are exact)."""
    import numpy as np
    xs = np.array([0, 1, -1, 3, 4, -3, -4, 2 ** 24 - 1, 2 ** 24, 2 ** 24 + 1, -2 ** 24 - 1, 2 ** 31 - 1, -2 ** 31,
                   2 ** 40 + 3, -2 ** 40 - 3, 16777217, 16777219], dtype=np.int64)
    xs = np.concatenate([xs, np.random.default_rng(0).integers(-2 ** 33, 2 ** 33, 20000)])
    xf = xs.astype(np.float32)
    for c in [0, 3, -3, 2 ** 24 - 1, -(2 ** 24 - 1), 1000]:
        for op in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"):
            assert (getattr(xf, op)(np.float32(c)) == getattr(xs, op)(c)).all(), (c, op)


def test_local_tiles_counts_what_does_not_grow_with_the_length():
    """local_tiles: the key tiles the last row block visits where that count is the same at 4096 and 16384 positions
    (a 2-D neighbourhood, windows), against the mask evaluated element by element; None where it grows (causal,
    prefix-LM, a head that sees everything) or the mask reads tables."""
    from layerforge.codegen.mask_tiles import local_tiles
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    masks = {"natten": lambda q, k: abs(q // 32 - k // 32) <= 2 and abs(q % 32 - k % 32) <= 2,
             "sinks": lambda q, k: k <= q and (q - k < 64 or k < 4),
             "dilated": lambda q, k: k <= q and q - k < 128 and (q - k) % 2 == 0}
    for name, mod in masks.items():
        mask = prog.specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16").function.outputs[0].arg.mask
        rows = range(4096 - 128, 4096)
        exact = sum(any(mod(q, k) for q in rows for k in range(k0, k0 + 128)) for k0 in range(0, 4096, 128))
        assert local_tiles(mask) == exact, name
    for name in ("causal", "prefix_lm", "by_head", "doc", "head_window", "prefix_table"):
        assert local_tiles(prog.specialise(name, Hq=8, Hkv=8, D=64, dtype="bf16").function.outputs[0].arg.mask) is None


def test_persist_for_short_local_masks_only_where_asked(monkeypatch):
    """The persistent wgmma prefill is a block-mask block's default; a short local mask's (NATTEN) only with
    LAYERFORGE_WGMMA_PERSIST_LOCAL=1 (not yet measured); LAYERFORGE_WGMMA_PERSIST sets it for every block."""
    from layerforge.codegen.attention_wgmma import persist_default, short_local_mask
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    layer = {n: prog.specialise(n, Hq=8, Hkv=8, D=64, dtype="bf16") for n in ("natten", "causal", "doc", "sinks")}
    assert short_local_mask(layer["natten"]) and not short_local_mask(layer["causal"])
    assert [persist_default(layer[n]) for n in layer] == [False, False, True, False]
    monkeypatch.setenv("LAYERFORGE_WGMMA_PERSIST_LOCAL", "1")
    assert [persist_default(layer[n]) for n in layer] == [True, False, True, short_local_mask(layer["sinks"])]
    monkeypatch.setenv("LAYERFORGE_WGMMA_PERSIST", "0")
    assert not any(persist_default(layer[n]) for n in layer) and not persist_default()
