"""Scalar C code for attention hooks: the `score`, `mask` and `scale` sub-graphs of an
attention block, with the attention variables bound to C names.

Every value becomes a `const` local (common sub-expressions are shared); indexing of extra
tensor inputs clamps each index into its dim, so a hook can never read out of bounds.
"""
from __future__ import annotations

import sympy

from ..dsl.numerics import alibi_slopes, t5_bucket_table
from ..dsl.ir import Node, Op, toposort, unary_name
from ..dsl.types import DType
from . import ops


class ScalarEmitter:
    """key_split (tile, off, size): kv_pos is `tile + off` with `tile` a multiple of `size` (a power of two) and
    0 <= off < size, two C names (a kernel's key tile start and a key's place in it, often a constant after
    unrolling): kv_pos // 2^j and kv_pos % 2^j for 2^j dividing `size` become `(tile >> j) + (off >> j)` and
    `off & (2^j - 1)`, which the compiler folds per unrolled key (`split_used` tells whether one did).
    unsigned_abs: |x| against an integral constant as one unsigned compare (_abs_compare); False: abs, then the
    compare."""

    def __init__(self, var_names: dict[str, str], tables: dict[str, "TableInfo"], dims: dict[str, str],
                 key_split: tuple[str, str, int] | None = None, unsigned_abs: bool = True):
        self.var_names = var_names      # attention variable -> C expression
        self.key_split = key_split
        self.unsigned_abs = unsigned_abs
        self.split_used = False
        self.tables = tables            # extra input name -> TableInfo
        self.dims = dims                # dynamic dim name -> C expression
        self.lines: list[str] = []
        self.cache: dict[int, str] = {}
        self.n = 0
        self.alibi: tuple[int, float] | None = None
        self.t5: set[tuple[int, int, bool]] = set()   # bucket tables used: (num_buckets, max_distance, bidirectional)
        self.ranges: dict[int, tuple[int, int]] = {}    # integer nodes' value intervals (narrower C types)
        self.int_of: dict[int, tuple[str, tuple[int, int]]] = {}   # f32 node -> an int it is the rounding of
        self.abs_of: dict[int, tuple[str, str]] = {}   # node (int, or f32 in int_of) -> (x, C type): it is abs(x)

    def fresh(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def emit(self, root: Node) -> str:
        """C of `root`; nodes already in `cache` (emitted, or given from outside: a tabulated
        distance term) are used as they are, their sources not visited."""
        for n in _toposort_past(root, self.cache):
            self.cache[id(n)] = self._node(n)
        return self.cache[id(root)]

    def _range(self, n: Node) -> tuple[int, int]:
        """The value interval of an integer node: computed where it was emitted, else its type's."""
        return self.ranges.get(id(n)) or TYPE_RANGE[n.dtype]

    def _note_int_valued(self, n: Node, a: list[str]) -> None:
        """f32 nodes that are an integer's rounding to f32 (a cast, and abs / neg of one): rounding is
        monotone and odd, so fabsf((float)x) is (float)abs(x), and _int_compare may compare the integer."""
        if n.op is Op.CAST and n.src[0].dtype.is_int:
            self.int_of[id(n)] = (a[0], self._range(n.src[0]))
        elif n.op is Op.UNARY and unary_name(n) in ("abs", "neg") and id(n.src[0]) in self.int_of:
            x, (lo, hi) = self.int_of[id(n.src[0])]
            r = (-hi, -lo) if unary_name(n) == "neg" else ((0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi)))
            ct = "int" if _fits(r, I32) and _fits((lo, hi), I32) else "long long"
            self.int_of[id(n)] = (self._let(ct, ops.UNARY_INT[unary_name(n)].format(x=f"({ct})({x})")), r)
            if unary_name(n) == "abs":
                self.abs_of[id(n)] = (x, ct)

    def _int_compare(self, n: Node, a: list[str]) -> str | None:
        """A comparison of an integer's f32 rounding with an integral constant c, |c| < 2^24, made on the
        integer: c is exact in f32 and so are its neighbours, so monotone rounding keeps every order
        (x <= c iff (float)x <= c). Both sides integers' roundings: the same where both lie within
        +-2^24 (exact). Else None."""
        sides = []
        for src, c in zip(n.src, a):
            if id(src) in self.int_of:
                sides.append(self.int_of[id(src)])
            elif src.op is Op.CONST and src.dtype is not DType.bool and float(src.arg).is_integer() \
                    and abs(float(src.arg)) < 2 ** 24:
                v = int(src.arg)
                sides.append((str(v), (v, v)))
            else:
                return None
        if not any(id(src) in self.int_of for src in n.src):
            return None
        if all(id(src) in self.int_of for src in n.src) and not all(_fits(r, EXACT_F32) for _, r in sides):
            return None
        return self._abs_compare(n) or self._let("bool", f"({sides[0][0]} {ops.COMPARE[n.arg]} {sides[1][0]})")

    def _abs_compare(self, n: Node) -> str | None:
        """|x| against an integer constant c as one unsigned compare: |x| <= c iff (unsigned)x + c <= 2c (modulo
        2^32, or 2^64 for a 64-bit x; exact for every x, INT_MIN too), where abs and a signed compare were two
        operations. |x| < c is |x| <= c - 1, >= / > their negations; a constant on the left mirrors them. Else
        None (== / !=, or no abs of an int against a constant)."""
        flip = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}
        if not self.unsigned_abs or n.arg not in flip:
            return None
        for side, op in ((0, n.arg), (1, flip[n.arg])):
            x, c = n.src[side], n.src[1 - side]
            if id(x) not in self.abs_of or c.op is not Op.CONST or c.dtype is DType.bool \
                    or not float(c.arg).is_integer():
                continue
            v, ct = self.abs_of[id(x)]
            bound = int(c.arg) - (op in ("lt", "ge"))   # le / lt: |x| <= bound; ge / gt: not that
            ut, suffix = ("unsigned", "u") if ct == "int" else ("unsigned long long", "ull")
            limit = (2 ** 31 if ct == "int" else 2 ** 63) - 1
            if bound < 0:
                inside = "false"
            elif bound > limit:
                inside = "true"
            else:
                inside = f"(({ut})({v}) + {bound}{suffix} <= {2 * bound}{suffix})"
            return self._let("bool", inside if op in ("le", "lt") else f"(!{inside})")
        return None

    def _key_split(self, n: Node, ct: str) -> str | None:
        """kv_pos // 2^j or kv_pos % 2^j over key_split's tile and offset (see the class), else None."""
        if self.key_split is None or n.arg not in ("floordiv", "mod") or n.src[0].op is not Op.ATTN_VAR \
                or n.src[0].arg != "kv_pos":
            return None
        d = ops.const_divisor(n)
        tile, off, size = self.key_split
        if d is None or d <= 0 or d & (d - 1) or size % d:
            return None
        self.split_used = True
        j = d.bit_length() - 1
        if n.arg == "mod":
            return f"(({ct})({off}) & ({ct})({d - 1}))"
        return f"((({ct})({tile}) >> {j}) + (({ct})({off}) >> {j}))"

    def _let(self, ctype: str, expr: str) -> str:
        name = self.fresh()
        self.lines.append(f"const {ctype} {name} = {expr};")
        return name

    def _dim(self, d) -> str:
        d = sympy.sympify(d)
        if d.is_Integer:
            return str(int(d))
        return "(" + str(d.subs({s: sympy.Symbol(self.dims[s.name]) for s in d.free_symbols})) + ")"

    def _node(self, n: Node) -> str:
        a = [self.cache[id(s)] for s in n.src]
        ct = ops.C_TYPE[n.dtype]
        if n.dtype.is_int:
            r = self.ranges[id(n)] = _int_range(n, self._range)
            if n.dtype is DType.i64 and _fits(r, I32) and all(_fits(self._range(s), I32) for s in n.src if s.dtype.is_int):
                ct = "int"   # a 64-bit value of the IR whose operands and result fit 32 bits: the same value
        elif n.op is Op.BINARY and n.arg in ops.COMPARE:
            narrow = self._int_compare(n, a)
            if narrow is not None:
                return narrow
        elif n.dtype is DType.f32:
            self._note_int_valued(n, a)
        if n.op is Op.ATTN_VAR:
            return self.var_names[n.arg]
        if n.op is Op.CONST:
            if n.dtype is DType.bool:
                return "true" if n.arg else "false"
            return str(int(n.arg)) if n.dtype.is_int else ops.float_literal(n.arg)
        if n.op is Op.SCALAR:
            return f"s_{n.arg}"
        if n.op is Op.DIM:
            return f"((long long){self._dim(n.arg)})"
        if n.op is Op.INPUT:
            return f"p_{n.arg}"
        if n.op is Op.CAST:
            if n.dtype.is_int and n.src[0].dtype.is_float:
                return self._let(ct, f"({ct})truncf({a[0]})")
            return self._let(ct, f"({ct})({a[0]})")
        if n.op is Op.UNARY:
            name = unary_name(n)
            if name == "alibi_slope":
                heads, max_bias = int(sympy.sympify(n.arg[1])), float(n.arg[2])
                self.alibi = (heads, max_bias)
                return self._let("float", f"lf_alibi_slopes[min(max((int)({a[0]}), 0), {heads - 1})]")
            if name == "t5_bucket":
                nb, md = (_build_time_int(x, "t5_bucket's num_buckets / max_distance") for x in n.arg[1:3])
                bd = bool(n.arg[3])
                self.t5.add((nb, md, bd))
                return self._let("int", f"{t5_bucket_name(nb, md, bd)}({a[0]})")
            if name == "tanh" and ct == "float":   # attention_hooks.cuh.jinja: on the SFU, within ~1e-7
                return self._let(ct, f"lf_tanh_sfu({a[0]})")
            if n.dtype.is_float:
                return self._let(ct, ops.UNARY_FLOAT[name].format(x=a[0]))
            if name == "relu":  # max(x, 0) with both sides of x's type
                return self._let(ct, f"max(({ct})({a[0]}), ({ct})0)")
            if name == "abs" and ct in ("int", "long long"):
                self.abs_of[id(n)] = (f"({ct})({a[0]})", ct)
            return self._let(ct, ops.UNARY_INT[name].format(x=a[0]))
        if n.op is Op.BINARY:
            if n.arg in ops.COMPARE:
                return self._abs_compare(n) or self._let("bool", f"({a[0]} {ops.COMPARE[n.arg]} {a[1]})")
            if n.arg in ops.LOGICAL:   # & / | on the two bools: both are computed values, and a short
                # circuit became a branch per score in the kernels' inner loops
                return self._let("bool", f"({a[0]} {'&' if n.arg == 'and' else '|'} {a[1]})")
            if n.dtype.is_float:   # integer operands (`kv_pos / 2` is f32) divide as floats, as in the reference
                x, y = (f"(float)({v})" if s.dtype.is_int else v for v, s in zip(a, n.src))
                return self._let(ct, ops.BINARY_FLOAT[n.arg].format(a=x, b=y))
            if n.arg == "pow":   # the checker allows integer powers with a constant exponent 0..64 only
                return self._let(ct, " * ".join([f"({ct})({a[0]})"] * int(n.src[1].arg)) or f"({ct})1")
            split = self._key_split(n, ct)
            if split is not None:
                return self._let(ct, split)
            return self._let(ct, ops.int_binary(n.arg, a[0], a[1], ct, ops.const_divisor(n)))
        if n.op is Op.WHERE:
            return self._let(ct, f"({a[0]} ? ({ct})({a[1]}) : ({ct})({a[2]}))")
        if n.op is Op.INDEX:
            t = self.tables[n.src[0].arg]
            idx = []
            for i, (x, size) in enumerate(zip(a[1:], t.sizes)):
                idx.append(f"min(max((long long)({x}), 0LL), (long long)({size}) - 1)")
            addr = " + ".join(f"{i} * {s}" for i, s in zip(idx, t.strides))
            return self._let(ct, ops.LOAD[t.dtype].format(f"p_{t.name}[{addr}]"))
        raise NotImplementedError(f"{n.op.value} in an attention hook")


I32 = (-2 ** 31, 2 ** 31 - 1)
I64 = (-2 ** 63, 2 ** 63 - 1)
EXACT_F32 = (-2 ** 24, 2 ** 24)   # integers f32 holds exactly
TYPE_RANGE = {DType.i32: I32, DType.i64: I64}


def _fits(r: tuple[int, int], within: tuple[int, int]) -> bool:
    return within[0] <= r[0] and r[1] <= within[1]


def _int_range(n: Node, range_of) -> tuple[int, int]:
    """Interval arithmetic over an integer node of a hook: the values it can take given its sources'
    intervals (the kernels' int arguments: any 32-bit value), clipped to its type's range where the
    operation could leave it (then it is the type's whole range: C wraps or the IR does)."""
    full = TYPE_RANGE[n.dtype]
    src = [range_of(s) if s.dtype.is_int else None for s in n.src]
    r = None
    if n.op is Op.CONST:
        r = (int(n.arg), int(n.arg))
    elif n.op is Op.DIM:
        r = (0, I64[1])
    elif n.op is Op.CAST and src and src[0] is not None:
        r = src[0]
    elif n.op is Op.WHERE and src[1] is not None and src[2] is not None:
        r = (min(src[1][0], src[2][0]), max(src[1][1], src[2][1]))
    elif n.op is Op.UNARY and src and src[0] is not None:
        lo, hi = src[0]
        name = unary_name(n)
        if name == "neg":
            r = (-hi, -lo)
        elif name == "abs":
            r = (0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
        elif name == "relu":
            r = (max(lo, 0), max(hi, 0))
    elif n.op is Op.BINARY and len(src) == 2 and src[0] is not None and src[1] is not None:
        (alo, ahi), (blo, bhi) = src
        d = ops.const_divisor(n)
        if n.arg == "add":
            r = (alo + blo, ahi + bhi)
        elif n.arg == "sub":
            r = (alo - bhi, ahi - blo)
        elif n.arg == "mul":
            c = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
            r = (min(c), max(c))
        elif n.arg == "min":
            r = (min(alo, blo), min(ahi, bhi))
        elif n.arg == "max":
            r = (max(alo, blo), max(ahi, bhi))
        elif n.arg == "floordiv" and d is not None and d > 0:
            r = (alo // d, ahi // d)
        elif n.arg == "mod" and d is not None and d > 0:
            r = (0, d - 1) if (ahi - alo >= d or alo // d != ahi // d) else (alo % d, ahi % d)
    if r is None or not _fits(r, full):
        return full
    return r


def _toposort_past(root: Node, done: dict) -> list[Node]:
    """The nodes under `root` that are not in `done`, sources first, as ir.toposort orders
    them, without descending into `done`."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        n, expanded = stack.pop()
        if expanded:
            order.append(n)
            continue
        if id(n) in seen or id(n) in done:
            continue
        seen.add(id(n))
        stack.append((n, True))
        for s in reversed(n.src):
            stack.append((s, False))
    return order


class TableInfo:
    """An extra tensor input indexed by attention hooks: sizes and strides as C expressions."""

    def __init__(self, name: str, dtype: DType, shape, dims: dict[str, str]):
        self.name, self.dtype = name, dtype
        em = ScalarEmitter({}, {}, dims)
        self.sizes = [em._dim(d) for d in shape]
        self.strides = []
        acc = "1"
        for s in reversed(self.sizes):
            self.strides.append(acc)
            acc = f"({acc} * {s})"
        self.strides.reverse()


def alibi_table(heads: int, max_bias: float) -> str:
    """The slopes of dsl/numerics, as C float literals."""
    return ", ".join(ops.float_literal(v) for v in alibi_slopes(heads, max_bias).tolist())


def t5_bucket_name(num_buckets: int, max_distance: int, bidirectional: bool) -> str:
    return f"lf_t5_bucket_{num_buckets}_{max_distance}_{'bi' if bidirectional else 'causal'}"


def t5_tables(uses) -> list[dict]:
    """Template data of the T5 bucket functions a kernel uses: each indexes the bucket table of
    dsl/numerics (distances 0 .. max_distance in one direction) with the clamped distance."""
    return [{"name": t5_bucket_name(nb, md, bd), "max_distance": md, "bidirectional": bd, "half": nb // 2,
             "table": ", ".join(str(b) for b in t5_bucket_table(nb, md, bd))} for nb, md, bd in sorted(uses)]


def _build_time_int(d, what: str) -> int:
    d = sympy.sympify(d)
    if not d.is_Integer:
        raise ValueError(f"{what} must be known when the kernel is generated, got '{d}'")
    return int(d)


def mask_bounds(mask: Node | None, emitter: ScalarEmitter) -> tuple[list[str], list[str]]:
    """Key-range bounds implied by a mask's conjuncts: (lower bounds, upper bounds), C ints.

    Recognised: q_pos >= kv_pos (causal), q_pos - kv_pos < W (window), kv_pos < X (length),
    where W and X depend on neither q_pos, kv_pos, h nor the score, so every bound is
    non-decreasing in q_pos and shared by a CTA's heads. Keys outside [max(lower), min(upper))
    are never visited; the mask is still applied unless `mask_is_exact` says it need not be."""
    lows: list[str] = []
    highs: list[str] = []
    for n in _conjuncts(mask):
        kind = _bound(n)
        if kind is None:
            continue
        side, op, x = kind
        if side == "causal":
            highs.append("qp + 1" if op == "ge" else "qp")
        elif side == "high":
            bound = emitter.emit(x)
            highs.append(f"(int)({bound}) + 1" if op == "ge" else f"(int)({bound})")
        else:
            w = emitter.emit(x)
            lows.append(f"qp - (int)({w}) + 1" if op == "gt" else f"qp - (int)({w})")
    return lows, highs


def mask_is_exact(mask: Node | None) -> bool:
    """True when the mask is nothing but the bounds `mask_bounds` finds (or constant true), so
    a tile of keys inside every row's bounds needs no per-element mask."""
    for n in _conjuncts(mask):
        if _bound(n) is None and not (n.op is Op.CONST and n.arg is True):
            return False
    return True


def mask_rest(mask: Node | None) -> Node | None:
    """The conjuncts of a mask that `mask_bounds` does not turn into key bounds, AND-ed (the kernels
    test the bounds with one unsigned compare a score and evaluate only this), or None when the mask
    has no bounds (nothing to split off) or is nothing but them (mask_is_exact)."""
    parts = list(_conjuncts(mask))
    if not any(_bound(n) is not None for n in parts):
        return None
    rest = [n for n in parts if _bound(n) is None and not (n.op is Op.CONST and n.arg is True)]
    if not rest:
        return None
    out = rest[0]
    for n in rest[1:]:
        out = Node(Op.BINARY, DType.bool, out.shape, (out, n), "and")
    return out


def _conjuncts(mask: Node | None):
    if mask is None:
        return
    if mask.op is Op.BINARY and mask.arg == "and":
        yield from _conjuncts(mask.src[0])
        yield from _conjuncts(mask.src[1])
    else:
        yield mask


def _is_var(n: Node, v: str) -> bool:
    return n.op is Op.ATTN_VAR and n.arg == v


def _free_of_rows(n: Node) -> bool:  # a bound shared by the CTA's keys, heads and query rows
    return not any(m.op is Op.ATTN_VAR and m.arg in ("kv_pos", "score", "h", "q_pos") for m in toposort([n]))


def _bound(n: Node):
    """('causal' | 'high' | 'low', op, expr) for a recognised conjunct, else None."""
    if n.op is not Op.BINARY or n.arg not in ("le", "lt", "ge", "gt"):
        return None
    x, y = n.src
    op = n.arg
    if op in ("le", "lt"):  # flip to ge/gt form: x >= y
        x, y, op = y, x, {"le": "ge", "lt": "gt"}[op]
    if _is_var(x, "q_pos") and _is_var(y, "kv_pos"):
        return "causal", op, None
    if _is_var(y, "kv_pos") and _free_of_rows(x):  # X >= kv_pos or X > kv_pos
        return "high", op, x
    if (y.op is Op.BINARY and y.arg == "sub" and _is_var(y.src[0], "q_pos") and _is_var(y.src[1], "kv_pos")
            and _free_of_rows(x)):  # W > q_pos - kv_pos  ->  kv_pos > q_pos - W
        return "low", op, x
    return None
