"""Index arithmetic for generated kernels.

Indices are sympy expressions over *index symbols* (row coordinates, column positions,
gathered indices), each with a known range, and *size symbols* (dynamic dims, passed to
the kernel at run time). Reshapes map a multi-index through the flat offset; `fdiv` and
`fmod` simplify exactly when the ranges prove it, so a reshape that only splits or merges
the last axis costs no division in the generated code.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy


class fdiv(sympy.Function):
    """Integer floor division of non-negative operands (C `/`)."""


class fmod(sympy.Function):
    """Remainder of non-negative operands (C `%`)."""


@dataclass(frozen=True)
class IndexSym:
    """Bookkeeping for an index symbol: its C spelling and its range [0, upper)."""

    c_name: str
    upper: sympy.Expr


class IndexSpace:
    def __init__(self):
        self.syms: dict[sympy.Symbol, IndexSym] = {}
        self.sizes: dict[str, sympy.Symbol] = {}

    def size(self, name: str) -> sympy.Symbol:
        if name not in self.sizes:
            self.sizes[name] = sympy.Symbol(name, integer=True, positive=True)
        return self.sizes[name]

    def index(self, name: str, c_name: str, upper) -> sympy.Symbol:
        s = sympy.Symbol(name, integer=True, nonnegative=True)
        self.syms[s] = IndexSym(c_name, sympy.sympify(upper))
        return s

    # ---- range reasoning
    def max_of(self, e: sympy.Expr):
        """An upper bound of a non-negative linear expression, or None."""
        e = sympy.expand(e)
        total = sympy.Integer(0)
        for term in sympy.Add.make_args(e):
            coeff, rest = term.as_coeff_Mul()
            if coeff < 0:
                return None
            idx = [s for s in rest.free_symbols if s in self.syms]
            if not idx:
                total += term
                continue
            if len(idx) != 1 or not rest.is_polynomial(idx[0]) or sympy.degree(rest, idx[0]) != 1:
                return None
            s = idx[0]
            total += term.subs(s, self.syms[s].upper - 1)
        return total

    def floordiv(self, e: sympy.Expr, d: sympy.Expr) -> sympy.Expr:
        if d == 1:
            return e
        exact, rest = self._split(e, d)
        mx = self.max_of(rest)
        if mx is not None and _provably_nonneg(d - 1 - mx):
            return sympy.expand(exact / d)
        return fdiv(e, d)

    def mod(self, e: sympy.Expr, d: sympy.Expr) -> sympy.Expr:
        if d == 1:
            return sympy.Integer(0)
        exact, rest = self._split(e, d)
        mx = self.max_of(rest)
        if mx is not None and _provably_nonneg(d - 1 - mx):
            return rest
        return fmod(e, d)

    @staticmethod
    def _split(e, d):
        exact, rest = sympy.Integer(0), sympy.Integer(0)
        for term in sympy.Add.make_args(sympy.expand(e)):
            q = sympy.simplify(term / d)
            if not q.has(sympy.Min, sympy.Max, fdiv, fmod) and q.is_polynomial() and \
                    sympy.fraction(sympy.together(q))[1] == 1:
                exact += term
            else:
                rest += term
        return exact, rest


def _provably_nonneg(e) -> bool:
    e = sympy.simplify(e)
    return bool(e.is_nonnegative) or (e.is_Integer and e >= 0)


def c_expr(e, space: IndexSpace, names: dict | None = None) -> str:
    """Print an index expression as C (64-bit integer arithmetic)."""
    names = names or {}
    e = sympy.sympify(e)
    if e.is_Integer:
        return str(int(e)) + ("LL" if abs(int(e)) > 2**31 - 1 else "")
    if e.is_Symbol:
        if e in space.syms:
            return space.syms[e].c_name
        return names.get(e.name, e.name)
    if isinstance(e, sympy.Add):
        parts = [c_expr(a, space, names) for a in sympy.Add.make_args(e)]
        return "(" + " + ".join(parts) + ")"
    if isinstance(e, sympy.Mul):
        return "(" + " * ".join(c_expr(a, space, names) for a in e.args) + ")"
    if isinstance(e, fdiv):
        return f"({c_expr(e.args[0], space, names)} / {c_expr(e.args[1], space, names)})"
    if isinstance(e, fmod):
        return f"({c_expr(e.args[0], space, names)} % {c_expr(e.args[1], space, names)})"
    if isinstance(e, (sympy.Min, sympy.Max)):
        fn = "min" if isinstance(e, sympy.Min) else "max"
        a, *rest = e.args
        out = c_expr(a, space, names)
        for r in rest:
            out = f"{fn}({out}, {c_expr(r, space, names)})"
        return out
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
        return "(" + " * ".join([c_expr(e.base, space, names)] * int(e.exp)) + ")"
    raise NotImplementedError(f"cannot print index expression {e}")
