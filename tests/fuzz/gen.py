"""Hypothesis strategies that write well-typed DSL programs: row layers and attention blocks
with score/mask hooks. Used by tests/fuzz (render + NVRTC on the CPU) and tests/gpu/test_fuzz_gpu.py
(kernels against the reference evaluator).

    case = draw(row_layers())        # Case(source, name, bindings, dtype, kind)
    case = draw(attention_blocks())

Every expression is generated from its type: a dtype (T, f32, i32, i64, bool) and, in row
layers, a shape kind ("row" [N, H], "col" [H], "stat" [N, 1]; scalars adopt the tensor's
dtype). Programs are meant to type-check; a checker rejection is allowed only as a positioned
DSLError (the fuzz tests count how often that happens).

`gpu_safe=True` keeps the programs comparable with the reference on a device: no
discontinuity (comparison, `//`, `%`, truncating cast) is applied to a *computed* float, whose
last bit may differ between the kernel and the reference; only inputs and integers feed them.
Integer values stay small (inputs in [-40, 40], literal multipliers), so nothing overflows;
divisors are never zero; logs, roots and divisions take a value kept positive.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import strategies as st

FLOAT_UNARY = ["tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "relu", "abs", "cos", "sin", "erf", "-"]
GUARDED_UNARY = {  # functions whose domain is kept safe: written around a positive / bounded argument
    "exp": "exp(tanh({x}))",
    "log": "log(abs({x}) + 1.0)",
    "sqrt": "sqrt(abs({x}))",
    "rsqrt": "rsqrt(abs({x}) + 1.0)",
    "div": "{x} / (abs({y}) + 1.0)",
    "pow": "(abs({x}) + 1.0) ** 0.5",
}
INT_DIVISORS = ["2", "3", "5", "7", "-3", "-4"]
COMPARE = ["<", "<=", ">", ">=", "==", "!="]


@dataclass
class Case:
    source: str
    name: str
    bindings: dict          # dims and consts for Program.specialise
    dtype: str              # what T binds to
    kind: str               # "layer" | "attention"
    tables: dict = field(default_factory=dict)   # attention: extra table name -> (dtype, shape as dim names)

    def __repr__(self) -> str:   # hypothesis prints the falsifying example: show the program
        return f"Case({self.name}, {self.bindings}, T={self.dtype})\n{self.source}"


class _Expr:
    """Writes expressions of a requested type from `leaves` (text by (dtype, kind))."""

    def __init__(self, draw, gpu_safe: bool, max_depth: int):
        self.draw, self.gpu_safe, self.max_depth = draw, gpu_safe, max_depth
        self.leaves: dict[tuple[str, str], list[str]] = {}
        self.raw: set[str] = set()   # leaves that are inputs (exact in kernel and reference alike)

    def add(self, text: str, dtype: str, kind: str, raw: bool = False):
        self.leaves.setdefault((dtype, kind), []).append(text)
        if raw:
            self.raw.add(text)

    def pick(self, options):
        return options[self.draw(st.integers(0, len(options) - 1))]

    def chance(self, p: float) -> bool:
        return self.draw(st.integers(0, 99)) < int(p * 100)

    def leaf(self, dtype: str, kind: str, kinds_ok=None) -> str | None:
        opts = []
        for k in (kinds_ok or [kind]):
            opts += self.leaves.get((dtype, k), [])
        return self.pick(opts) if opts else None

    # what a smaller operand may be (it broadcasts against `kind`)
    SUB = {"row": ["row", "col", "stat"], "col": ["col"], "stat": ["stat"], "scalar": ["scalar"]}

    def raw_leaf(self, dtype: str, kind: str) -> str | None:
        opts = [x for k in self.SUB[kind] for x in self.leaves.get((dtype, k), []) if x in self.raw]
        return self.pick(opts) if opts else None


class RowExpr(_Expr):
    FLOATS = ("T", "f32")
    INTS = ("i32", "i64")

    def expr(self, dtype: str, kind: str, depth: int = 0) -> str:
        """An expression of `dtype` whose shape is `kind` (exactly: a "row" expression has a row operand)."""
        leaf = self.leaf(dtype, kind)
        if depth >= self.max_depth or (leaf is not None and self.chance(0.25)):
            if leaf is not None:
                return leaf
            return self.convert(dtype, kind, depth, force_leaf=True)
        if dtype == "bool":
            return self.bool_expr(kind, depth)
        if dtype in self.INTS:
            return self.int_expr(dtype, kind, depth)
        return self.float_expr(dtype, kind, depth)

    def operand(self, dtype: str, kind: str, depth: int) -> str:
        """An operand broadcasting to `kind` (maybe smaller, maybe a literal)."""
        r = self.draw(st.integers(0, 9))
        if r == 0:
            return self.literal(dtype)
        sub = self.pick(self.kinds(kind))
        return self.expr(dtype, sub, depth + 1)

    def literal(self, dtype: str) -> str:
        if dtype in self.INTS:
            return self.pick(["1", "2", "3", "-2", "7", "H", "c", "n", "n ** 2"])
        return self.pick(["0.5", "2.0", "-1.25", "s", "cf", "1e-3", "3", "(n / 2)", "(c / 4)"])

    def convert(self, dtype: str, kind: str, depth: int, force_leaf: bool = False) -> str:
        """A cast into `dtype` from another dtype (or a reduction for "stat")."""
        if kind == "stat" and dtype != "bool" and not force_leaf and self.chance(0.5):
            return self.reduction(dtype, depth)
        others = [d for d in ("T", "f32", "i32", "i64", "bool") if d != dtype]
        for _ in range(4):
            src = self.pick(others)
            if (src, kind) in self.leaves or not force_leaf:
                break
        if force_leaf:
            inner = self.leaf(src, kind) or self.leaf(dtype, kind, self.SUB[kind])
            if inner is None:
                return self.literal(dtype) if kind == "scalar" else self.any_leaf(dtype, kind)
        else:
            inner = self.expr(src, kind, depth + 1)
        if dtype in self.INTS and src in self.FLOATS:
            inner = self.float_for_int(src, kind, depth, inner)
        return f"{dtype}({inner})"

    def any_leaf(self, dtype, kind):
        order = ("i32", "i64", "T", "f32") if dtype in self.INTS else ("T", "f32", "i32", "i64")
        for src in order:
            x = self.leaf(src, kind)
            if x is not None:
                if dtype in self.INTS and src in self.FLOATS:
                    x = self.float_for_int(src, kind, 0, x)
                return f"{dtype}({x})"
        assert kind == "stat", kind   # a row always has x; operands pick only kinds that exist
        return f"{dtype}(max(x, axis=-1))"

    def kinds(self, kind: str) -> list[str]:
        """The kinds an operand broadcasting to `kind` may have (those with a leaf, and stat)."""
        have = {k for (_, k) in self.leaves}
        return [k for k in self.SUB[kind] if k in have or k in ("stat", kind)]

    def float_for_int(self, src: str, kind: str, depth: int, inner: str) -> str:
        """The float operand of a truncating cast: an input times a power of two on a device."""
        if not self.gpu_safe:
            return inner
        x = self.raw_leaf(src, kind)
        if x is None:   # no input of that type: a float of an integer input, or 0
            i = self.raw_leaf("i32", kind) or self.raw_leaf("i64", kind)
            return f"{src}({i})" if i is not None else "0.0"
        return f"{x} * {self.pick(['4.0', '8.0', '16.0', '1.0'])}"

    def reduction(self, dtype: str, depth: int) -> str:
        if dtype in self.INTS:
            op = self.pick(["sum", "max", "min"])
        else:
            op = self.pick(["sum", "mean", "max", "min", "var"])
        return f"{op}({self.expr(dtype, 'row', depth + 1)}, axis=-1)"

    def float_expr(self, dtype: str, kind: str, depth: int) -> str:
        r = self.draw(st.integers(0, 11))
        x = lambda: self.expr(dtype, kind, depth + 1)      # noqa: E731
        y = lambda: self.operand(dtype, kind, depth)       # noqa: E731
        if r <= 2:
            return f"({x()} {self.pick(['+', '-', '*'])} {y()})"
        if r == 3:
            return f"{self.pick(FLOAT_UNARY)}({x()})"
        if r == 4:
            g = self.pick(list(GUARDED_UNARY))
            return "(" + GUARDED_UNARY[g].format(x=x(), y=y()) + ")"
        if r == 5:
            return f"{self.pick(['max', 'min'])}({x()}, {y()})"
        if r == 6:
            return f"where({self.expr('bool', kind, depth + 1)}, {x()}, {y()})"
        if r == 7 and kind == "stat":
            return self.reduction(dtype, depth)
        if r == 8 and not self.gpu_safe:
            return f"({x()} {self.pick(['//', '%'])} {self.pick(['2.0', '0.75', '-1.5'])})"
        if r == 9:
            return f"({x()} if flag else {x()})"
        if r == 10 and kind == "row" and dtype == "f32":
            return f"softmax({x()}, axis=-1)"
        return self.convert(dtype, kind, depth)

    def int_expr(self, dtype: str, kind: str, depth: int) -> str:
        r = self.draw(st.integers(0, 10))
        x = lambda: self.expr(dtype, kind, depth + 1)      # noqa: E731
        y = lambda: self.operand(dtype, kind, depth)       # noqa: E731
        if r <= 1:
            return f"({x()} {self.pick(['+', '-'])} {y()})"
        if r == 2:   # keep products small: times a literal
            return f"({x()} * {self.pick(['2', '3', '-1'])})"
        if r == 3:
            return f"({x()} {self.pick(['//', '%'])} {self.divisor(dtype, kind, depth)})"
        if r == 4:
            return f"{self.pick(['max', 'min'])}({x()}, {y()})"
        if r == 5:
            return f"-({x()})"   # abs/relu take float tensors only
        if r == 6:
            return f"where({self.expr('bool', kind, depth + 1)}, {x()}, {y()})"
        if r == 7 and kind == "stat":
            return self.reduction(dtype, depth)
        return self.convert(dtype, kind, depth)

    def divisor(self, dtype, kind, depth) -> str:
        if self.chance(0.6):
            return self.pick(INT_DIVISORS)
        e = self.expr(dtype, self.pick(self.kinds(kind)), depth + 1)
        return self.pick([f"max({e}, 1)", f"min({e}, -1)", f"({e} % 5 + 1)"])

    def bool_expr(self, kind: str, depth: int) -> str:
        r = self.draw(st.integers(0, 5))
        if r <= 2:
            dt = self.pick(["T", "f32", "i32", "i64"])
            if self.gpu_safe and dt in self.FLOATS:
                a = self.raw_leaf(dt, kind) or self.any_leaf("i32", kind) and None
                if a is None:
                    dt = "i32"
                else:
                    return f"({a} {self.pick(COMPARE)} {self.pick(['0.0', '0.5', '-1.0'])})"
            return f"({self.expr(dt, kind, depth + 1)} {self.pick(COMPARE)} {self.operand(dt, kind, depth)})"
        if r == 3:
            return f"not {self.expr('bool', kind, depth + 1)}"
        if r == 4:
            return f"({self.expr('bool', kind, depth + 1)} {self.pick(['and', 'or'])} " \
                   f"{self.expr('bool', self.pick(self.kinds(kind)), depth + 1)})"
        return f"({self.expr('bool', kind, depth + 1)} != {self.pick(['true', 'false'])})" \
            if not self.chance(0.5) else f"(true if flag else {self.expr('bool', kind, depth + 1)})"


# the parameters a row layer may take: name -> (type text, dtype, kind)
ROW_PARAMS = {
    "x": ("T[N, H]", "T", "row"),
    "y": ("T[N, H]", "T", "row"),
    "xf": ("f32[N, H]", "f32", "row"),
    "idx": ("i32[N, H]", "i32", "row"),
    "big": ("i64[N, H]", "i64", "row"),
    "w": ("T[H]", "T", "col"),
    "wf": ("f32[H]", "f32", "col"),
    "iw": ("i32[H]", "i32", "col"),
    "stat": ("f32[N, 1]", "f32", "stat"),
    "istat": ("i64[N, 1]", "i64", "stat"),
}


@st.composite
def row_layers(draw, gpu_safe: bool = False, max_depth: int = 3) -> Case:
    names = ["x"] + [n for n in ROW_PARAMS if n != "x" and draw(st.booleans())]
    g = RowExpr(draw, gpu_safe, max_depth)
    for n in names:
        _, dt, kind = ROW_PARAMS[n]
        g.add(n, dt, kind, raw=True)
    # runtime scalar `s`, consts `c`, `cf`, `flag` (always declared: literals use them)
    g.add("s", "f32", "scalar")
    g.add("c", "i32", "scalar")
    params = [f"{n}: {ROW_PARAMS[n][0]}" for n in names]
    params += ["s: f32 = 0.5", "n: i32 = 3", "const c: int = 3", "const cf: f32 = 1.5", "const flag: bool = true"]
    stmts = []
    for i in range(draw(st.integers(0, 3))):
        dt = g.pick(["T", "f32", "i32", "i64", "bool"])
        kind = g.pick(["row"] + g.kinds("row"))
        stmts.append(f"t{i} = {g.expr(dt, kind)}")
        g.add(f"t{i}", dt, kind)
    outs, types = [], []
    for _ in range(draw(st.integers(1, 3))):
        dt = g.pick(["T", "T", "f32", "i32", "i64", "bool"])
        outs.append(_row_shaped(g, dt))
        types.append(f"{dt}[N, H]")
    ret = types[0] if len(types) == 1 else "(" + ", ".join(types) + ")"
    body = "\n".join(f"    {s}" for s in stmts + ["return " + ", ".join(outs)])
    src = (f"dims H\ndynamic N\nlayer fz({', '.join(params)}) -> {ret} {{\n{body}\n}}\n")
    h = draw(st.sampled_from([1, 3, 7, 8, 32, 130, 1024]))
    binds = {"H": h}
    if draw(st.booleans()):
        binds.update(c=draw(st.sampled_from([-2, 0, 5])), cf=draw(st.sampled_from([0.25, -3.0])),
                     flag=draw(st.booleans()))
    return Case(src, "fz", binds, draw(st.sampled_from(["bf16", "f32", "f16"])), "layer")


def _row_shaped(g: RowExpr, dt: str) -> str:
    """An expression of shape [N, H] exactly: if it might be smaller, add a row operand."""
    e = g.expr(dt, "row")
    row_leaf = g.leaf(dt, "row")
    if row_leaf is None:
        conv = g.leaf("T", "row") or "x"
        row_leaf = f"{dt}({conv})" if dt != "T" else conv
    if dt == "bool":
        return f"({e} or {row_leaf})"
    return f"max({e}, {row_leaf})"


# ---- attention blocks ------------------------------------------------------------------

# extra tables: name -> (dtype, dims); the index each dim takes (B: b; Skv: a position; static: any int)
TABLES = {
    "bias": ("f32", ("NB", "Hq")),
    "kv_len": ("i32", ("B",)),
    "lim": ("i64", ("B",)),
    "doc": ("i32", ("B", "Skv")),
    "wt": ("f32", ("B", "Skv")),
    "slope": ("bf16", ("Hq",)),
    "reb": ("i64", ("NB",)),
}


class HookExpr(_Expr):
    """Scalar expressions over score, b, h, kv_h, q_pos, kv_pos, dims, consts and tables."""

    def __init__(self, draw, gpu_safe, max_depth, tables):
        super().__init__(draw, gpu_safe, max_depth)
        self.tables = tables

    def expr(self, dtype: str, depth: int = 0) -> str:
        if depth >= self.max_depth or self.chance(0.2):
            return self.leafy(dtype)
        return {"f32": self.float_expr, "i32": self.int_expr, "i64": self.int_expr,
                "bool": self.bool_expr}[dtype](dtype, depth)

    def leafy(self, dtype: str) -> str:
        if dtype == "bool":
            return self.pick(["true", "(q_pos >= kv_pos)", "(kv_pos != 0)"])
        opts = list(self.leaves.get((dtype, "scalar"), []))
        opts += [t for t in self.table_reads(dtype)]
        return self.pick(opts)

    def table_reads(self, dtype):
        out = []
        for name in self.tables:
            tdt, dims = TABLES[name]
            if (tdt == dtype) or (dtype == "f32" and tdt == "bf16"):
                out.append(self.table_read(name))
        return out

    def table_read(self, name: str) -> str:
        _, dims = TABLES[name]
        idx = []
        for d in dims:
            if d == "B":
                idx.append("b")
            elif d == "Skv":
                idx.append(self.pick(["kv_pos", "q_pos"]))
            elif d == "Hq":
                idx.append(self.pick(["h", "h", "kv_h", "(h + 1) % Hq"]))
            else:   # a static dim: any int (clamped by the kernels and the reference alike)
                idx.append(self.pick(["q_pos - kv_pos", "kv_pos // 3", "min(kv_pos, NB - 1)", "h", "kv_pos % W",
                                      "i64(q_pos) - i64(kv_pos) + 2"]))
        return f"{name}[{', '.join(idx)}]"

    def float_expr(self, dtype, depth):
        r = self.draw(st.integers(0, 9))
        x = lambda: self.expr("f32", depth + 1)    # noqa: E731
        if r <= 2:
            return f"({x()} {self.pick(['+', '-', '*'])} {self.pick([x(), '0.5', '2.0', 'cf'])})"
        if r == 3:
            return f"{self.pick(['tanh', 'sigmoid', 'abs', '-', 'relu'])}({x()})"
        if r == 4:
            return f"(cf * tanh({x()} / cf))"
        if r == 5:
            return f"{self.pick(['max', 'min'])}({x()}, {x()})"
        if r == 6:
            return f"where({self.expr('bool', depth + 1)}, {x()}, {x()})"
        if r == 7:
            return self.pick([f"f32({self.expr(self.pick(['i32', 'i64']), depth + 1)})",
                              f"({self.expr(self.pick(['i32', 'i64']), depth + 1)} / {self.pick(['3', 'W', 'c'])})",
                              f"f32({self.expr(self.pick(['i32', 'i64']), depth + 1)} ** 2) / 64.0"])
        if r == 8:
            return "(" + GUARDED_UNARY[self.pick(["exp", "log", "div", "sqrt", "pow"])].format(x=x(), y=x()) + ")"
        return self.leafy("f32")

    def int_expr(self, dtype, depth):
        r = self.draw(st.integers(0, 9))
        other = self.pick(["i32", "i64"])
        x = lambda: self.expr(dtype, depth + 1)    # noqa: E731
        y = lambda: self.expr(other, depth + 1)    # noqa: E731   (mixed widths: scalars promote)
        if r <= 1:
            return f"({x()} {self.pick(['+', '-'])} {y()})"
        if r == 2:
            return f"({x()} * {self.pick(['2', '3', '-1'])})"
        if r == 3:
            div = self.pick(INT_DIVISORS + ["W", "Hq", "max(" + y() + ", 1)", "c"])
            return f"({x()} {self.pick(['//', '%'])} {div})"
        if r == 4:
            return f"{self.pick(['max', 'min'])}({x()}, {y()})"
        if r == 5:
            return f"where({self.expr('bool', depth + 1)}, {x()}, {y()})"
        if r == 6:
            return f"{dtype}({self.expr(self.pick(['i32', 'i64']), depth + 1)})"
        if r == 7:
            return f"{self.pick(['abs', '-'])}({x()})"
        if r == 8 and not self.gpu_safe:
            return f"{dtype}({self.expr('f32', depth + 1)})"
        return self.leafy(dtype)

    def bool_expr(self, dtype, depth):
        r = self.draw(st.integers(0, 6))
        if r <= 2:
            a, b = self.pick(["i32", "i64"]), self.pick(["i32", "i64"])
            return f"({self.expr(a, depth + 1)} {self.pick(COMPARE)} {self.expr(b, depth + 1)})"
        if r == 3 and not self.gpu_safe:
            return f"({self.expr('f32', depth + 1)} {self.pick(COMPARE)} {self.pick(['0.0', '1.5'])})"
        if r == 4:
            return f"not {self.expr('bool', depth + 1)}"
        if r == 5:
            return f"({self.expr('bool', depth + 1)} {self.pick(['and', 'or'])} {self.expr('bool', depth + 1)})"
        return self.leafy("bool")

    def bound(self) -> str:
        """A mask conjunct of the forms the kernels turn into key-range bounds."""
        r = self.draw(st.integers(0, 4))
        if r == 0:
            return self.pick(["q_pos >= kv_pos", "kv_pos <= q_pos", "q_pos > kv_pos"])
        if r == 1:
            return f"q_pos - kv_pos < {self.pick(['W', 'c', 'W * 2', 'i64(W) + 1', 'max(W, c)'])}"
        lim = ["kv_len[b]", "lim[b]", "i64(kv_len[b]) + 1", "min(kv_len[b], W * 3)", "lim[b] // 2"]
        lim = [x for x in lim if any(t in x for t in self.tables) or "[" not in x] or ["W * 2"]
        return f"kv_pos {self.pick(['<', '<='])} {self.pick(lim)}"


@st.composite
def attention_blocks(draw, gpu_safe: bool = False, max_depth: int = 3) -> Case:
    tables = [t for t in TABLES if draw(st.booleans())]
    g = HookExpr(draw, gpu_safe, max_depth, tables)
    for v in ("b", "h", "kv_h", "q_pos", "kv_pos"):
        g.add(v, "i32", "scalar")
    for v in ("W", "NB", "Hq", "c"):
        g.add(v, "i64", "scalar")
    g.add("score", "f32", "scalar")
    g.add("cf", "f32", "scalar")
    params = ["q: T[B, S, Hq, D]", "k: T[B, Skv, Hkv, D]", "v: T[B, Skv, Hkv, D]"]
    params += [f"{t}: {TABLES[t][0]}[{', '.join(TABLES[t][1])}]" for t in tables]
    params += ["const c: int = 3", "const cf: f32 = 20.0"]
    body = []
    if draw(st.integers(0, 3)) == 0:
        body.append(f"rope(theta = 10000.0, style = {g.pick(['neox', 'gptj'])})")
    elif draw(st.integers(0, 5)) == 0:
        body.append("alibi(max_bias = 8.0)")
    if draw(st.integers(0, 3)) == 0:
        body.append(f"scale = {g.pick(['1.0', 'rsqrt(f32(D))', '0.5 * rsqrt(f32(D))', 'cf / 100.0'])}")
    if draw(st.booleans()):
        body.append(f"rel = {g.expr('i32')}")
        g.add("rel", "i32", "scalar")
        uses_rel = True
    else:
        uses_rel = False
    score = None
    if draw(st.integers(0, 4)) > 0:
        score = g.expr("f32")
    mask_parts = [g.bound() for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()) or not mask_parts:
        mask_parts.append(g.expr("bool"))
    mask = " and ".join(f"({m})" for m in mask_parts) if draw(st.integers(0, 5)) > 0 else None
    if uses_rel and not re.search(r"\brel\b", (score or "") + (mask or "")):   # an unused local is an error
        score = f"{score or 'score'} + f32(rel)"
    if score is not None:
        body.append(f"score = {score}")
    if mask is not None:
        body.append(f"mask = {mask}")
    src = ("dims Hq, Hkv, D, NB, W\ndynamic B, S, Skv\n"
           f"attention fz({', '.join(params)}) -> T[B, S, Hq, D] {{\n"
           + "\n".join(f"    {s}" for s in body) + "\n}\n")
    hq, hkv = draw(st.sampled_from([(4, 4), (4, 1), (8, 2)]))
    binds = {"Hq": hq, "Hkv": hkv, "D": draw(st.sampled_from([64, 128])), "NB": draw(st.sampled_from([1, 5, 32])),
             "W": draw(st.sampled_from([1, 4, 37]))}
    return Case(src, "fz", binds, draw(st.sampled_from(["bf16", "f16"])), "attention",
                {t: TABLES[t] for t in tables})


def random_tensor(dtype, shape, gen):
    """A random input of a generated program's parameter (CPU; small ints, floats around 0)."""
    import torch
    if dtype.is_float:
        return (torch.randn(shape, generator=gen) * 2).to(dtype.torch)
    if dtype.name == "bool":
        return torch.rand(shape, generator=gen) < 0.5
    return torch.randint(-40, 41, shape, generator=gen).to(dtype.torch)
