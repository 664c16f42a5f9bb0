"""Size expressions (shapes, problem sizes, grids) printed for the TensorRT plugin sources.

One checked subset, the grid's (codegen/abi.py): names, integer literals, `+ - * //`,
`cdiv(a, b)`, `min(a, b)`, `max(a, b)`; a DSL shape such as `N*Nh` is in it too. Three
dialects print it:

    python(e)   v_N * v_Nh        plain ints in tests, tensorrt.plugin ShapeExprs under TensorRT
                                  (an int left of a name moves right, or becomes `_lit(c, name)`)
    c_int(e)    (v_N * v_Nh)      int64 values in the C++ plugin's enqueue
    c_expr(e)   eb.operation(DimensionOperation::kPROD, *e_N, *e_Nh)   IExprBuilder, for getOutputShapes

Names print with a prefix (`v_`, `e_`), so a DSL name never meets a keyword of either language.
"""
from __future__ import annotations

import ast

__all__ = ["python", "c_int", "c_expr", "names"]

_FUNCS = {"cdiv": "kCEIL_DIV", "min": "kMIN", "max": "kMAX"}
_OPS = {ast.Add: ("+", "kSUM"), ast.Sub: ("-", "kSUB"), ast.Mult: ("*", "kPROD"), ast.FloorDiv: ("//", "kFLOOR_DIV")}


class ExprError(ValueError):
    """An expression outside the subset."""


def _parse(expr: str) -> ast.expr:
    try:
        tree = ast.parse(str(expr), mode="eval").body
    except SyntaxError:
        raise ExprError(f"{expr!r} is not a size expression") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.BinOp, ast.Name, ast.Load, ast.Call, *_OPS)) or (
            isinstance(node, ast.Constant) and type(node.value) is int)
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _FUNCS and len(node.args) == 2 and not node.keywords
        if not ok:
            raise ExprError(f"{expr!r}: {type(node).__name__} is outside the size expressions TensorRT gets")
    return tree


def names(expr: str) -> set[str]:
    tree = _parse(expr)
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in calls}


def python(expr: str) -> str:
    """tensorrt.plugin's ShapeExprs take ints on their right only: an int left of a name is moved
    right (+, *) or made a ShapeExpr like its partner (`_lit`, the module's; -, //)."""
    def p(n):
        if isinstance(n, ast.BinOp):
            left, right = n.left, n.right
            if isinstance(left, ast.Constant) and not isinstance(right, ast.Constant):
                if isinstance(n.op, (ast.Add, ast.Mult)):
                    left, right = right, left
                else:
                    return f"(_lit({left.value}, {p(right)}) {_OPS[type(n.op)][0]} {p(right)})"
            return f"({p(left)} {_OPS[type(n.op)][0]} {p(right)})"
        if isinstance(n, ast.Call):
            return f"_{n.func.id}({p(n.args[0])}, {p(n.args[1])})"
        return f"v_{n.id}" if isinstance(n, ast.Name) else str(n.value)
    return p(_parse(expr))


def c_int(expr: str) -> str:
    def c(n):
        if isinstance(n, ast.BinOp):   # sizes are non-negative: C's / is floor division here
            return f"({c(n.left)} {_OPS[type(n.op)][0].replace('//', '/')} {c(n.right)})"
        if isinstance(n, ast.Call):
            return f"lf_{n.func.id}({c(n.args[0])}, {c(n.args[1])})"
        return f"v_{n.id}" if isinstance(n, ast.Name) else f"int64_t({n.value})"
    return c(_parse(expr))


def c_expr(expr: str, builder: str = "eb") -> str:
    def c(n):
        if isinstance(n, ast.BinOp):
            return f"{builder}.operation(DimensionOperation::{_OPS[type(n.op)][1]}, *{c(n.left)}, *{c(n.right)})"
        if isinstance(n, ast.Call):
            return f"{builder}.operation(DimensionOperation::{_FUNCS[n.func.id]}, *{c(n.args[0])}, *{c(n.args[1])})"
        return f"e_{n.id}" if isinstance(n, ast.Name) else f"{builder}.constant({n.value})"
    return c(_parse(expr))
