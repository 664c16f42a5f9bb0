"""IR-to-IR rewrites that run before lowering: composite ops become primitives.

softmax(x)      -> e = exp(x - max(x)); e / sum(e)           (in f32, then cast)
var(x, corr)    -> mean((x - mean(x))^2) * W / (W - corr)     (two-pass, stable)
"""
from __future__ import annotations

import sympy

from ..dsl.ir import Function, Node, Op, ReduceArg, toposort
from ..dsl.types import DType


def _cast(x: Node, dt: DType) -> Node:
    return x if x.dtype == dt else Node(Op.CAST, dt, x.shape, (x,), None, x.span)


def _const(v: float) -> Node:
    return Node(Op.CONST, DType.f32, (), (), float(v))


def lower_composites(fn: Function) -> Function:
    memo: dict[int, Node] = {}

    def rw(n: Node) -> Node:
        if id(n) in memo:
            return memo[id(n)]
        src = tuple(rw(s) for s in n.src)
        if n.op is Op.SOFTMAX:
            out = _softmax(src[0], n)
        elif n.op is Op.REDUCE and n.arg.fn == "var":
            out = _var(src[0], n)
        elif src != n.src:
            out = Node(n.op, n.dtype, n.shape, src, n.arg, n.span)
        else:
            out = n
        memo[id(n)] = out
        return out

    for n in toposort(fn.outputs):
        rw(n)
    outputs = tuple(memo[id(o)] for o in fn.outputs)
    return Function(fn.name, fn.kind, fn.params, outputs, fn.span, fn.bindings)


def _reduce(x: Node, fn: str, axis: int) -> Node:
    shape = x.shape[:axis] + (sympy.Integer(1),) + x.shape[axis + 1:]
    return Node(Op.REDUCE, x.dtype, shape, (x,), ReduceArg(fn, axis, True), x.span)


def _squeeze_if(n: Node, keepdim: bool, axis: int) -> Node:
    if keepdim:
        return n
    return Node(Op.RESHAPE, n.dtype, n.shape[:axis] + n.shape[axis + 1:], (n,), None, n.span)


def _softmax(x: Node, n: Node) -> Node:
    axis = n.arg
    xf = _cast(x, DType.f32)
    m = _reduce(xf, "max", axis)
    e = Node(Op.UNARY, DType.f32, xf.shape, (Node(Op.BINARY, DType.f32, xf.shape, (xf, m), "sub", n.span),), "exp",
             n.span)
    s = _reduce(e, "sum", axis)
    return _cast(Node(Op.BINARY, DType.f32, xf.shape, (e, s), "div", n.span), n.dtype)


def _var(x: Node, n: Node) -> Node:
    r: ReduceArg = n.arg
    xf = _cast(x, DType.f32)
    mu = _reduce(xf, "mean", r.axis)
    d = Node(Op.BINARY, DType.f32, xf.shape, (xf, mu), "sub", n.span)
    sq = Node(Op.BINARY, DType.f32, xf.shape, (d, d), "mul", n.span)
    v = _reduce(sq, "mean", r.axis)
    w = x.shape[r.axis]
    if r.correction:
        v = Node(Op.BINARY, DType.f32, v.shape, (v, _const(float(w) / float(w - r.correction))), "mul", n.span)
    return _squeeze_if(_cast(v, n.dtype), r.keepdim, r.axis)
