"""Block sparsity of an attention mask, decided per tile from position ranges.

A tensor-core CTA covers a range of query positions and heads and walks key tiles. For a tile of
keys [k_lo, k_hi] and the CTA's query positions [q_lo, q_hi] and heads [h_lo, h_hi], the mask is
evaluated over intervals with three-valued logic: every integer sub-expression becomes a range
that holds all its values over the tile, every boolean one a pair (may be true, may be false).
A tile whose mask cannot be true is skipped (no loads, no MMAs); one whose mask cannot be false
runs without evaluating the mask per element; the others evaluate it per element as before.
This serves any mask over positions, heads, constants and scalars (prefix-LM, sinks plus a
window, dilated windows, 2-D neighbourhoods through `//` and `%`), and integer table lookups
whose indices are one value over the tile (`prefix[b]`, `window[h]` with one head a row,
`kv_len[b]`): those are loaded at run time (clamped as the hooks clamp them); a lookup over a
range of indices is unknown, i.e. [-2^36, 2^36] (i32 tables only, so that bound holds), and
so is what derives from it by multiplication other than by a small constant. What it cannot bound (the score, float arithmetic) is "unknown" too, so the
classification stays sound: a tile is only skipped or unmasked when that holds for every
element.

`classify(mask)` gives the lines of a C function body and, for tests, the same computation as
Python source; both compute `may_true`, `may_false` from q_lo, q_hi, k_lo, k_hi, h_lo, h_hi,
kv_h, b and the kernel's scalars, dims and tables (Python: a dict of them, tables as tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..dsl.ir import Node, Op, toposort, unary_name
from ..dsl.types import DType
from .scalar_expr import ScalarEmitter, _bound, _conjuncts

EMPTY, PARTIAL, FULL = 0, 1, 2
RANGE_CAP = 1 << 12   # the longest index range a pre-pass lookup scans (tiles are far shorter)
WIDE = 1 << 36   # the bounds of an i32 table value not known over the tile (with the small constants
#                  below, sums of thousands of such terms stay in 64 bits)

_RANGES = {"q_pos": ("q_lo", "q_hi"), "kv_pos": ("k_lo", "k_hi"), "h": ("h_lo", "h_hi"),
           "kv_h": ("kv_h", "kv_h"), "b": ("b", "b")}


@dataclass
class TileClassifier:
    """C lines (and twin Python lines) bounding a mask over a tile; `classify` gives the names of
    (may_true, may_false)."""
    dims: dict[str, str]                 # dynamic dim name -> C name of its kernel argument
    tables: dict = field(default_factory=dict)   # extra input name -> scalar_expr.TableInfo (C sizes, strides)
    c: list[str] = field(default_factory=list)
    py: list[str] = field(default_factory=list)
    n: int = 0
    useful: bool = False                 # some sub-expression was bounded from the positions
    ranges: bool = False                 # a lookup over a range of one index takes the table's least and
    #                                      greatest element over it (the run-time block-mask pre-pass)

    def _let(self, ctype: str, c_expr: str, py_expr: str) -> str:
        self.n += 1
        name = f"t{self.n}"
        self.c.append(f"const {ctype} {name} = {c_expr};")
        self.py.append(f"{name} = {py_expr}")
        return name

    def _int(self, c_expr: str, py_expr: str | None = None) -> str:
        return self._let("long long", c_expr, c_expr if py_expr is None else py_expr)

    def _bool(self, c_expr: str, py_expr: str) -> str:
        return self._let("bool", c_expr, py_expr)

    # ---- helpers over (lo, hi) ranges and (may_true, may_false) pairs
    def _min(self, a, b):
        return self._int(f"min({a}, {b})")

    def _max(self, a, b):
        return self._int(f"max({a}, {b})")

    def _and(self, a, b):
        return self._bool(f"({a} && {b})", f"({a} and {b})")

    def _or(self, a, b):
        return self._bool(f"({a} || {b})", f"({a} or {b})")

    def _not(self, a):
        return self._bool(f"(!{a})", f"(not {a})")

    def _cmp(self, a, op, b):
        return self._bool(f"({a} {op} {b})", f"({a} {op} {b})")

    def classify(self, mask: Node) -> tuple[str, str]:
        vals: dict[int, object] = {}
        for n in toposort([mask]):
            srcs = [vals[id(s)] for s in n.src]
            v = self._node(n, srcs)
            if _known_int(v) and any(_wide(x) for x in srcs):   # derived from a table value: maybe WIDE
                v = ("int", v[1], v[2], True)
            vals[id(n)] = v
        v = vals[id(mask)]
        return v if isinstance(v, tuple) and v[0] != "int" else ("true", "true")

    # value forms: ("int", lo, hi) | ("int", None) unknown | (t, f) booleans | "float"
    def _node(self, n: Node, a: list):
        if n.op is Op.ATTN_VAR:
            if n.arg in _RANGES:
                if n.arg in ("q_pos", "kv_pos", "h"):
                    self.useful = True
                return ("int",) + _RANGES[n.arg]
            return "float"                                   # the score
        if n.op is Op.CONST:
            if n.dtype is DType.bool:
                return ("true", "false") if n.arg else ("false", "true")
            if n.dtype.is_int or float(n.arg).is_integer() and abs(n.arg) < 2 ** 24:   # an integral float too
                return ("int", f"{int(n.arg)}LL", f"{int(n.arg)}LL")
            return "float"
        if n.op is Op.SCALAR:
            if n.dtype.is_int:
                return ("int", f"(long long)s_{n.arg}", f"(long long)s_{n.arg}")
            if n.dtype is DType.bool:
                t = self._bool(f"(bool)s_{n.arg}", f"bool(s_{n.arg})")
                return (t, self._not(t))
            return "float"
        if n.op is Op.DIM:
            d = sympy.sympify(n.arg)
            if d.is_Integer:
                return ("int", f"{int(d)}LL", f"{int(d)}LL")
            if all(s.name in self.dims for s in d.free_symbols):   # the hooks' own rendering of a dim
                x = self._int(f"(long long){ScalarEmitter({}, {}, self.dims)._dim(d)}")
                return ("int", x, x)
            return ("int", None)
        if n.op is Op.CAST:
            src = a[0]
            if (n.dtype.is_int or n.dtype.is_float) and _known_int(src):
                return src          # int widths: positions never wrap; to float: exact below 2^24
            if n.dtype.is_float:
                return "float"
            if n.dtype.is_int and isinstance(src, tuple) and src[0] != "int":    # bool -> 0/1
                lo = self._int(f"({src[1]} ? 0LL : 1LL)", f"(0 if {src[1]} else 1)")
                hi = self._int(f"({src[0]} ? 1LL : 0LL)", f"(1 if {src[0]} else 0)")
                return ("int", lo, hi)
            if n.dtype is DType.bool and isinstance(src, tuple) and src[0] == "int" and src[1] is not None:
                zero_in = self._bool(f"({src[1]} <= 0LL && {src[2]} >= 0LL)", f"({src[1]} <= 0 and {src[2]} >= 0)")
                nonzero = self._bool(f"({src[1]} != 0LL || {src[2]} != 0LL)", f"({src[1]} != 0 or {src[2]} != 0)")
                return (nonzero, zero_in)
            return ("int", None) if n.dtype.is_int else ("true", "true")
        if n.op is Op.UNARY:
            name, x = unary_name(n), a[0]
            if n.dtype is DType.bool and name == "not" and isinstance(x, tuple) and x[0] != "int":
                return (x[1], x[0])
            if not _known_int(x) or name not in ("neg", "abs", "relu"):
                return _unknown(n)
            lo, hi = x[1], x[2]
            if name == "neg":
                return ("int", self._int(f"(-{hi})"), self._int(f"(-{lo})"))
            if name == "abs":
                alo = self._int(f"({lo} >= 0LL ? {lo} : ({hi} <= 0LL ? -{hi} : 0LL))",
                                f"({lo} if {lo} >= 0 else (-{hi} if {hi} <= 0 else 0))")
                return ("int", alo, self._max(f"(-{lo})", hi))
            return ("int", self._max(lo, "0LL"), self._max(hi, "0LL"))   # relu
        if n.op is Op.BINARY:
            return self._binary(n, a)
        if n.op is Op.WHERE:
            c, x, y = a
            if not (isinstance(c, tuple) and c[0] != "int"):
                c = ("true", "true")
            if n.dtype is DType.bool:
                if not all(isinstance(v, tuple) and v[0] != "int" for v in (x, y)):
                    return ("true", "true")
                t = self._or(self._and(c[0], x[0]), self._and(c[1], y[0]))
                f = self._or(self._and(c[0], x[1]), self._and(c[1], y[1]))
                return (t, f)
            if not (_known_int(x) and _known_int(y)):
                return _unknown(n)
            lo = self._int(f"({c[0]} ? ({c[1]} ? min({x[1]}, {y[1]}) : {x[1]}) : {y[1]})",
                           f"((min({x[1]}, {y[1]}) if {c[1]} else {x[1]}) if {c[0]} else {y[1]})")
            hi = self._int(f"({c[0]} ? ({c[1]} ? max({x[2]}, {y[2]}) : {x[2]}) : {y[2]})",
                           f"((max({x[2]}, {y[2]}) if {c[1]} else {x[2]}) if {c[0]} else {y[2]})")
            return ("int", lo, hi)
        if n.op is Op.INDEX:
            return self._lookup(n, a[1:])
        return _unknown(n)   # INPUT and anything else

    def _lookup(self, n: Node, idx: list):
        """An integer table element: loaded where every index is one value over the tile (each
        clamped into its dim, as the hooks index), else [-WIDE, WIDE]."""
        t = self.tables.get(n.src[0].arg)
        if t is None or n.dtype is not DType.i32 or not all(_known_int(i) for i in idx):
            return _unknown(n)
        axis = range_axis(n) if self.ranges else None
        if axis is not None:
            return self._range_lookup(n, t, idx, axis)
        conds = [f"{i[1]} == {i[2]}" for i in idx]
        single = self._bool("(" + " && ".join(conds) + ")", "(" + " and ".join(conds) + ")")
        at = [self._int(f"min(max({i[1]}, 0LL), (long long)({size}) - 1)", f"min(max({i[1]}, 0), {{SIZE{k}}})")
              for k, (i, size) in enumerate(zip(idx, t.sizes))]
        addr = " + ".join(f"{x} * {st}" for x, st in zip(at, t.strides))
        name = f"p_{t.name}"
        py_at = ", ".join(at)
        # the Python twin clamps with the tensor's own sizes: {SIZEk} -> name.shape[k] - 1
        for k in range(len(at)):
            self.py[-len(at) + k] = self.py[-len(at) + k].replace(f"{{SIZE{k}}}", f"{name}.shape[{k}] - 1")
        v = self._int(f"({single} ? (long long)({name}[{addr}]) : 0LL)", f"(int({name}[{py_at}]) if {single} else 0)")
        lo = self._int(f"({single} ? {v} : -{WIDE}LL)", f"({v} if {single} else -{WIDE})")
        hi = self._int(f"({single} ? {v} : {WIDE}LL)", f"({v} if {single} else {WIDE})")
        self.useful = True
        return ("int", lo, hi, True)

    def _range_lookup(self, n: Node, t, idx: list, axis: int):
        """A table element whose index along `axis` ranges over the tile (`doc[b, kv_pos]`): the
        least and greatest element over the clamped range (the hooks clamp each index, and
        clamping is monotone), read at run time; unknown where another index is not one value
        or the range is longer than RANGE_CAP."""
        name = f"p_{t.name}"
        others = [f"{i[1]} == {i[2]}" for k, i in enumerate(idx) if k != axis]
        at, py_at = [], []
        for k, (i, size) in enumerate(zip(idx, t.sizes)):
            for bound in ((1, 2) if k == axis else (1,)):
                at.append(self._int(f"min(max({i[bound]}, 0LL), (long long)({size}) - 1)",
                                    f"min(max({i[bound]}, 0), {name}.shape[{k}] - 1)"))
            py_at.append("None" if k == axis else at[-1])
        rlo, rhi = at[axis], at[axis + 1]
        base = [x for k, x in enumerate(at) if k not in (axis, axis + 1)]
        strides = [st for k, st in enumerate(t.strides) if k != axis]
        ok = self._bool("(" + " && ".join(others + [f"{rhi} - {rlo} < {RANGE_CAP}LL"]) + ")",
                        "(" + " and ".join(others + [f"{rhi} - {rlo} < {RANGE_CAP}"]) + ")")
        addr = " + ".join(f"{x} * {st}" for x, st in zip(base, strides)) or "0LL"
        r = self._let("lf_range", f"lf_table_range({name} + ({addr}), {t.strides[axis]}, {rlo}, {rhi}, {ok})",
                      f"lf_table_range({name}, ({', '.join(py_at)},), {rlo}, {rhi}, {ok})")
        self.useful = True
        return ("int", f"{r}.lo", f"{r}.hi", True)

    def _binary(self, n: Node, a: list):
        op = n.arg
        x, y = a
        if op in ("and", "or"):
            if not all(isinstance(v, tuple) and v[0] != "int" for v in (x, y)):
                return ("true", "true")
            if op == "and":
                return (self._and(x[0], y[0]), self._or(x[1], y[1]))
            return (self._or(x[0], y[0]), self._and(x[1], y[1]))
        known = _known_int(x) and _known_int(y)
        if op in ("eq", "ne", "lt", "le", "gt", "ge"):
            if not known:
                return ("true", "true")
            (alo, ahi), (blo, bhi) = x[1:3], y[1:3]
            if op in ("eq", "ne"):
                overlap = self._and(self._cmp(alo, "<=", bhi), self._cmp(blo, "<=", ahi))
                single = self._bool(f"({alo} == {ahi} && {blo} == {bhi} && {alo} == {blo})",
                                    f"({alo} == {ahi} and {blo} == {bhi} and {alo} == {blo})")
                differ = self._not(single)
                return (overlap, differ) if op == "eq" else (differ, overlap)
            if op == "lt":
                return (self._cmp(alo, "<", bhi), self._cmp(ahi, ">=", blo))
            if op == "le":
                return (self._cmp(alo, "<=", bhi), self._cmp(ahi, ">", blo))
            if op == "gt":
                return (self._cmp(ahi, ">", blo), self._cmp(alo, "<=", bhi))
            return (self._cmp(ahi, ">=", blo), self._cmp(alo, "<", bhi))          # ge
        # floats: only sums and extremes of integers (exact in f32 for positions below 2^22)
        if not known or not (n.dtype.is_int or op in ("add", "sub", "min", "max")):
            return _unknown(n)
        (alo, ahi), (blo, bhi) = x[1:3], y[1:3]
        if op == "add":
            return ("int", self._int(f"({alo} + {blo})"), self._int(f"({ahi} + {bhi})"))
        if op == "sub":
            return ("int", self._int(f"({alo} - {bhi})"), self._int(f"({ahi} - {blo})"))
        if op == "mul":
            # products with WIDE bounds stay in 64 bits only against a small constant
            if (_wide(x) or _wide(y)) and not any(_small_const(v) for v in (x, y)):
                return _unknown(n)
            ps = [self._int(f"({p} * {q})") for p in (alo, ahi) for q in (blo, bhi)]
            lo = self._min(self._min(ps[0], ps[1]), self._min(ps[2], ps[3]))
            hi = self._max(self._max(ps[0], ps[1]), self._max(ps[2], ps[3]))
            return ("int", lo, hi)
        if op == "min":
            return ("int", self._min(alo, blo), self._min(ahi, bhi))
        if op == "max":
            return ("int", self._max(alo, blo), self._max(ahi, bhi))
        const = y[1] if y[1] == y[2] and y[1].endswith("LL") and y[1][:-2].lstrip("-").isdigit() else None
        if op in ("floordiv", "mod") and const is not None and int(const[:-2]) > 0:
            c = const
            lo = self._int(f"lf_floordiv({alo}, {c})", f"({alo} // {c[:-2]})")
            hi = self._int(f"lf_floordiv({ahi}, {c})", f"({ahi} // {c[:-2]})")
            if op == "floordiv":            # non-decreasing in the dividend
                return ("int", lo, hi)
            one = self._bool(f"({lo} == {hi})", f"({lo} == {hi})")   # one period: mod is increasing on it
            mlo = self._int(f"({one} ? lf_mod_floor({alo}, {c}) : 0LL)", f"(({alo} % {c[:-2]}) if {one} else 0)")
            mhi = self._int(f"({one} ? lf_mod_floor({ahi}, {c}) : {c} - 1LL)",
                            f"(({ahi} % {c[:-2]}) if {one} else {c[:-2]} - 1)")
            return ("int", mlo, mhi)
        return _unknown(n)


def range_axis(n: Node) -> int | None:
    """The one index of a table lookup that reads the query or key position (`doc[b, kv_pos]`:
    1), or None where none or several do."""
    axes = [k for k, i in enumerate(n.src[1:]) if any(m.op is Op.ATTN_VAR and m.arg in ("q_pos", "kv_pos")
                                                       for m in toposort([i]))]
    return axes[0] if len(axes) == 1 else None


def _known_int(v) -> bool:
    return isinstance(v, tuple) and v[0] == "int" and v[1] is not None


def _small_const(v) -> bool:
    lo = v[1] if _known_int(v) and v[1] == v[2] else ""
    return lo.endswith("LL") and lo[:-2].lstrip("-").isdigit() and abs(int(lo[:-2])) < 1 << 16


def _wide(v) -> bool:
    return isinstance(v, tuple) and len(v) == 4 and v[3]


def _unknown(n: Node):
    if n.dtype is DType.bool:
        return ("true", "true")
    return ("int", None) if n.dtype.is_int else "float"


def tile_context(mask: Node | None, dims: dict[str, str], exact: bool, tables: dict | None = None) -> dict:
    """Template data of a kernel's tile classifier: {'tile_lines': [...], 'tile_true': C bool,
    'tile_false': C bool}, or {} where it cannot help (no mask, a mask of key bounds only, which
    the key range already covers, or nothing bounded from positions or heads)."""
    if mask is None or exact:
        return {}
    tc = TileClassifier(dims, dict(tables or {}))
    t, f = tc.classify(mask)
    if not tc.useful or (t == "true" and f == "true") or _never_decides(mask):
        return {}
    return {"tile_lines": tc.c, "tile_true": t, "tile_false": f}


def _never_decides(mask: Node, tile: int = 64, extent: int = 2048, heads: int = 8) -> bool:
    """True when the conjuncts that are not key bounds (which the key range already applies)
    leave no sampled tile empty or full: 64 x 64 tiles over 2048 positions, head 0 and heads
    0-7, batch 0. A dilated window (`(q_pos - kv_pos) % 2 == 0` beside causal and window
    bounds) is such a mask: classifying its tiles only cost time (6% on the H200). Masks whose
    residue reads tables, scalars or dims are kept (their values are not known here)."""
    rest = [n for n in _conjuncts(mask) if _bound(n) is None]
    if not rest:
        return True
    residue = rest[0]
    for n in rest[1:]:
        residue = Node(Op.BINARY, DType.bool, (), (residue, n), "and", n.span)
    if any(m.op in (Op.INDEX, Op.INPUT, Op.SCALAR, Op.DIM) for m in toposort([residue])):
        return False
    try:
        classify = python_classifier(residue)
        for q0 in range(0, extent, tile):
            for k0 in range(0, extent, tile):
                for h0, h1 in ((0, heads - 1), (0, 0)):
                    if classify(q0, q0 + tile - 1, k0, k0 + tile - 1, h0, h1, 0, 0) != PARTIAL:
                        return False
    except (NameError, ZeroDivisionError, TypeError):
        return False
    return True


def local_tiles(mask: Node | None, rows: int = 128, keys: int = 128, lengths: tuple[int, ...] = (4096, 16384),
                heads: int = 8) -> int | None:
    """The key tiles a row block visits under a mask whose visited tiles do not grow with the sequence (a 2-D
    neighbourhood, a window with sinks), sampled at the last row block of each of `lengths` (heads 0-7, batch 0): that
    count where it is the same at every length, else None (causal, prefix-LM, full: the count grows). Masks that read
    tables, scalars or dims give None (their values are not known here), as does a mask the classifier cannot bound."""
    if mask is None or any(m.op in (Op.INDEX, Op.INPUT, Op.SCALAR, Op.DIM) for m in toposort([mask])):
        return None
    try:
        classify = python_classifier(mask)
        counts = {sum(classify(n - rows, n - 1, k0, k0 + keys - 1, 0, heads - 1, 0, 0) != EMPTY
                      for k0 in range(0, n, keys)) for n in lengths}
    except (NameError, ZeroDivisionError, TypeError):
        return None
    return counts.pop() if len(counts) == 1 else None


def python_classifier(mask: Node, dims: dict[str, str] | None = None, tables: dict | None = None,
                      ranges: bool = False):
    """The classifier as a Python function of (q_lo, q_hi, k_lo, k_hi, h_lo, h_hi, kv_h, b,
    **env) -> EMPTY / PARTIAL / FULL: the same interval computation as the C lines (tests).
    env holds the scalars (s_name), dims (d_name) and tables (p_name: tensors). ranges: as the
    block-mask pre-pass classifies (lookups over a range of positions read the range's extremes)."""
    tc = TileClassifier(dict(dims or {}), dict(tables or {}), ranges=ranges)
    t, f = tc.classify(mask)
    py_t, py_f = ({"true": "True", "false": "False"}.get(v, v) for v in (t, f))
    body = "\n".join("    " + line.replace("LL", "").replace("(long long)", "") for line in tc.py)
    src = (f"def classify(q_lo, q_hi, k_lo, k_hi, h_lo, h_hi, kv_h, b, **env):\n"
           f"    globals().update(env)\n    true, false = True, False\n{body}\n"
           f"    return {EMPTY} if not {py_t} else ({FULL} if not {py_f} else {PARTIAL})\n")
    ns: dict = {"lf_table_range": _table_range}
    exec(compile(src, "<tile classifier>", "exec"), ns)
    return ns["classify"]


@dataclass(frozen=True)
class _Range:
    lo: int
    hi: int


def _table_range(table, at: tuple, lo: int, hi: int, ok: bool) -> _Range:
    """The Python twin of the pre-pass's lf_table_range: the extremes of table[at] along the
    axis marked None, over indices lo..hi (both already clamped), or unknown."""
    if not ok:
        return _Range(-WIDE, WIDE)
    axis = at.index(None)
    line = table[tuple(slice(lo, hi + 1) if k == axis else i for k, i in enumerate(at))]
    return _Range(int(line.min()), int(line.max()))
