"""Type and shape checking: AST -> IR.

One builder serves both checking stages: with no bindings it checks the generic program
(symbolic dims, dtype parameter T); with bindings (dims, T, const parameters) it re-checks
everything with numbers, so a dim that does not divide or is left unbound is caught there.
Calls to other layers are inlined; every mistake becomes a diagnostic and checking goes on.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

import sympy

from . import ast
from .builtins import BuiltinRules
from .errors import DiagnosticSink
from .ir import ATTN_VARS, Function, Node, Op, Param, toposort
from .signatures import ATTENTION_ONLY, BUILTINS, REQUIRED, UNARY_MATH
from .source import Span
from .values import _CAST_NAMES, ERR, _Tuple
from .types import (DSL_DTYPES, SCALAR_TYPES, DType, broadcast_shapes, dim_str, dim_symbol, dims_equal,
                    shape_str, type_str)

MAX_INLINE_DEPTH = 32
_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "%": "mod", "**": "pow",
           "==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "and": "and", "or": "or"}




@dataclass
class Bindings:
    """What specialisation fixes: dim sizes, the dtype parameter, const parameters."""

    dims: dict[str, int] = field(default_factory=dict)
    dtype: DType | None = None
    consts: dict[str, Any] = field(default_factory=dict)
    # the model's RoPE frequency scaling (dsl/numerics), applied by a rope(...) directive that
    # sets none itself; from a config's rope_parameters / rope_scaling
    rope_scaling: Any = None

    @property
    def specialised(self) -> bool:
        return self.dtype is not None or bool(self.dims) or bool(self.consts) or self.rope_scaling is not None


@dataclass
class _Scope:
    vars: dict[str, Any]
    dims: dict[str, sympy.Expr]
    dtype_T: DType
    in_attention: bool = False
    callstack: tuple[str, ...] = ()
    attn_heads: Any = None  # number of query heads, inside attention blocks
    attn_main: tuple[str, ...] = ()  # an attention block's q, k, v: its hooks may not index them
    states: dict = field(default_factory=dict)  # state parameter name -> its declared (dtype, shape)


def _declare_dim_hint(name: str, leading: bool) -> str:
    """Both declarations, the likelier first: a tensor's leading dim is usually a run-time size."""
    static = f"`dims {name}` if each model fixes it (e.g. from config.json)"
    dynamic = f"`dynamic {name}` if it is known only at run time (tokens, batch)"
    return f"declare it with {dynamic}, or {static}" if leading else f"declare it with {static}, or {dynamic}"


class ModuleInfo:
    """The top-level declarations of one program (possibly several files)."""

    def __init__(self, program: ast.Program, sink: DiagnosticSink, shadowed: dict | None = None):
        # name -> (a definition a later file shadows, the files loaded before that one): calls
        # from those files still resolve to it
        self.shadowed: dict[str, tuple[Any, frozenset[str]]] = dict(shadowed or {})
        self.static_dims: dict[str, ast.Name] = {}
        self.dynamic_dims: dict[str, ast.Name] = {}
        self.consts: dict[str, ast.ConstDecl] = {}
        self.defs: dict[str, ast.LayerDef | ast.AttentionDef] = {}
        for item in program.items:
            if isinstance(item, ast.DimsDecl):
                for n in item.names:
                    prev = self.static_dims.get(n.id) or self.dynamic_dims.get(n.id)
                    if prev is not None and (prev.span.file == n.span.file or
                                             (n.id in self.dynamic_dims) != item.dynamic):
                        sink.error(n.span, f"dim '{n.id}' is declared twice")
                    elif n.id in DSL_DTYPES:
                        sink.error(n.span, f"'{n.id}' is a dtype name and cannot be a dim")
                    (self.dynamic_dims if item.dynamic else self.static_dims)[n.id] = n
            elif isinstance(item, ast.ConstDecl):
                if item.name in self.consts:
                    sink.error(item.span, f"constant '{item.name}' is defined twice")
                self.consts[item.name] = item
            else:
                if item.name in self.defs:
                    prev = self.defs[item.name].name_span
                    sink.error(item.name_span, f"'{item.name}' is already defined at line {prev.line}")
                elif item.name in BUILTINS or item.name in _CAST_NAMES:
                    sink.error(item.name_span, f"'{item.name}' is a builtin and cannot be redefined")
                else:
                    self.defs[item.name] = item

    @property
    def all_dims(self) -> set[str]:
        return set(self.static_dims) | set(self.dynamic_dims)


class Checker(BuiltinRules):
    def __init__(self, info: ModuleInfo, sink: DiagnosticSink):
        self.info = info
        self.sink = sink
        self._const_cache: dict[str, Node] = {}
        self.bindings = Bindings()

    def unbound(self, name: str, span: Span) -> bool:
        """In a specialised build, a static dim left unbound is an error at its use."""
        if self.bindings.specialised and name in self.info.static_dims and name not in self.bindings.dims:
            self.error(span, f"dim '{name}' is unbound", f"pass {name}=... (or a model config) when specialising")
            return True
        return False

    # ---- errors --------------------------------------------------------------------
    def error(self, span: Span, msg: str, hint: str | None = None) -> Node:
        self.sink.error(span, msg, hint)
        return ERR

    def unknown_name(self, name: ast.Name, scope: _Scope, what: str = "name") -> Node:
        candidates = list(scope.vars) + list(scope.dims) + list(self.info.consts) + list(self.info.defs)
        candidates += list(BUILTINS) + list(_CAST_NAMES)
        if scope.in_attention:
            candidates += list(ATTN_VARS)
        close = difflib.get_close_matches(name.id, candidates, n=1)
        hint = f"did you mean '{close[0]}'?" if close else None
        return self.error(name.span, f"unknown {what} '{name.id}'", hint)

    # ---- node construction -----------------------------------------------------------
    @staticmethod
    def const(value, span: Span = None) -> Node:
        if isinstance(value, bool):
            dt = DType.bool
        elif isinstance(value, int):
            dt = DType.i64
        else:
            dt = DType.f32
        return Node(Op.CONST, dt, (), (), value, span or Span("<const>", 0, 0, 0, 0))

    def dim_node(self, d: sympy.Expr, span: Span) -> Node:
        """A size used as a value. It stays a DIM (not a CONST) so that size / size is a size."""
        return Node(Op.DIM, DType.i64, (), (), sympy.sympify(d), span)

    # ---- entry points ----------------------------------------------------------------
    def build(self, name: str, bindings: Bindings | None = None) -> Function | None:
        d = self.info.defs[name]
        bindings = bindings or Bindings()
        self.bindings = bindings
        dims: dict[str, sympy.Expr] = {}
        for n in self.info.all_dims:
            dims[n] = sympy.Integer(bindings.dims[n]) if n in bindings.dims else dim_symbol(n)
        scope = _Scope({}, dims, bindings.dtype or DType.T, callstack=(name,))
        params = self.bind_params(d, scope, bindings)
        if isinstance(d, ast.LayerDef):
            outputs = self.layer_body(d, scope)
        else:
            outputs = self.attention_body(d, scope, params)
        if outputs is None or any(o.op is Op.ERROR for o in outputs):
            return None
        updates = self.state_updates(d, scope)
        if updates is None or any(n.op is Op.ERROR for n in toposort(list(outputs) + [n for _, n in updates])):
            return None
        return Function(name, "layer" if isinstance(d, ast.LayerDef) else "attention", tuple(params),
                        tuple(outputs), d.span, tuple(sorted(bindings.dims.items())), tuple(updates))

    def state_updates(self, d, scope: _Scope) -> list[tuple[str, Node]] | None:
        """Each state parameter's new value: its name's value when the body ends. A state the
        body never reassigns is an error (it would be a plain input)."""
        out = []
        for p in d.params:
            if p.name not in scope.states:
                continue
            v = scope.vars.get(p.name, ERR)
            if v.op is Op.INPUT and v.arg == p.name:
                self.error(p.span, f"state '{p.name}' is never reassigned",
                           f"give it its new value in the body (`{p.name} = ...`), or declare it as a plain tensor "
                           "parameter")
                return None
            out.append((p.name, v))
        return out

    # ---- parameters and types --------------------------------------------------------
    def resolve_dtype(self, name: str, span: Span, scope: _Scope, scalar: bool = False) -> DType | None:
        table = SCALAR_TYPES if scalar else DSL_DTYPES
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1)
            self.error(span, f"unknown dtype '{name}'", f"did you mean '{close[0]}'?" if close else
                       "dtypes are f32, f16, bf16, i32, i64, bool, the parameter T and the storage types "
                       "i8, f8e4m3, f8e5m2, u4, i4")
            return None
        dt = table[name]
        return scope.dtype_T if dt is DType.T else dt

    def resolve_dim(self, d: ast.DimExpr, scope: _Scope, free: dict | None = None, *,
                    leading: bool = False) -> sympy.Expr | None:
        """AST dim -> sympy; unknown names are errors unless `free` collects them as unknowns.
        `leading`: the dim is a tensor's first of several (where token counts go), which orders
        the hint for an undeclared name."""
        if isinstance(d, ast.DimInt):
            if d.value <= 0:
                self.error(d.span, "a dim must be a positive integer")
                return None
            return sympy.Integer(d.value)
        if isinstance(d, ast.DimName):
            if d.name in scope.dims:
                if free is None and scope.dims[d.name] == dim_symbol(d.name) and self.unbound(d.name, d.span):
                    return None
                return scope.dims[d.name]
            if free is not None and d.name in free:
                return free[d.name]
            cval = self.const_param_dim(d.name, scope)
            if cval is not None:
                return cval
            if free is not None and (d.name in self.info.all_dims):
                free[d.name] = sympy.Symbol("_u_" + d.name, integer=True, positive=True)
                return free[d.name]
            close = difflib.get_close_matches(d.name, list(scope.dims), n=1)
            self.error(d.span, f"unknown dim '{d.name}'",
                       f"did you mean '{close[0]}'?" if close else _declare_dim_hint(d.name, leading))
            return None
        a = self.resolve_dim(d.left, scope, free, leading=leading)
        b = self.resolve_dim(d.right, scope, free, leading=leading)
        if a is None or b is None:
            return None
        if d.op == "+":
            return a + b
        if d.op == "-":
            r = a - b
            if r.is_Integer and r <= 0:
                self.error(d.span, f"dim expression evaluates to {r}, which is not positive")
                return None
            return r
        if d.op == "*":
            return a * b
        r = a / b
        if r.is_Rational and not r.is_Integer:
            self.error(d.span, f"dim {a} / {b} does not divide evenly")
            return None
        return r

    def const_param_dim(self, name: str, scope: _Scope):
        v = scope.vars.get(name)
        if isinstance(v, Node) and v.op is Op.CONST and isinstance(v.arg, int) and not isinstance(v.arg, bool):
            return sympy.Integer(v.arg)
        if isinstance(v, Node) and v.op is Op.DIM:
            return v.arg
        return None

    def bind_params(self, d, scope: _Scope, bindings: Bindings) -> list[Param]:
        params: list[Param] = []
        seen: set[str] = set()
        for p in d.params:
            if p.name in seen:
                self.error(p.span, f"parameter '{p.name}' is declared twice")
                continue
            seen.add(p.name)
            if p.name in scope.dims:
                self.error(p.span, f"parameter '{p.name}' shadows the dim of the same name")
                continue
            if p.is_state and not isinstance(p.type, ast.TensorTypeExpr):
                self.error(p.span, f"state '{p.name}' must be a tensor", "e.g. `state conv: T[B, F, KW - 1]`")
                continue
            if p.is_state and isinstance(d, ast.AttentionDef):
                self.error(p.span, "attention blocks cannot carry state; their cache is the KV cache")
                continue
            if isinstance(p.type, ast.TensorTypeExpr):
                if p.is_const:
                    self.error(p.span, "only scalars can be const parameters")
                if p.default is not None:
                    self.error(p.default.span, f"{'a state' if p.is_state else 'tensor parameters'} cannot have "
                                               "defaults")
                dt = self.resolve_dtype(p.type.dtype, p.type.span, scope)
                shape = [self.resolve_dim(x, scope, leading=i == 0 and len(p.type.dims) > 1)
                         for i, x in enumerate(p.type.dims)]
                if dt is None or any(s is None for s in shape):
                    scope.vars[p.name] = ERR
                    continue
                node = Node(Op.INPUT, dt, tuple(shape), (), p.name, p.span)
                params.append(Param(p.name, "state" if p.is_state else "tensor", dt, tuple(shape)))
                scope.vars[p.name] = node
                if p.is_state:
                    scope.states[p.name] = (dt, tuple(shape))
                continue
            dt = self.resolve_dtype(p.type.name, p.type.span, scope, scalar=True)
            if dt is None:
                scope.vars[p.name] = ERR
                continue
            default = None
            default_node = None
            if p.default is not None:
                dv = self.expr(p.default, _Scope({}, scope.dims, scope.dtype_T))
                if dv.op is Op.CONST:
                    default = self.coerce_scalar(dv.arg, dt, p.default.span)
                elif dv.op is Op.DIM and p.is_const and dt.is_int:
                    default_node = dv  # a symbolic size, e.g. `const rotary_dim: int = D`
                elif dv.op is not Op.ERROR:
                    self.error(p.default.span, "a default must be a constant")
            if p.is_const:
                if p.name in bindings.consts:
                    value = self.coerce_scalar(bindings.consts[p.name], dt, p.span)
                    scope.vars[p.name] = self.const(value, p.span)
                elif default is not None:
                    scope.vars[p.name] = Node(Op.CONST, dt, (), (), default, p.span)
                elif default_node is not None:
                    scope.vars[p.name] = default_node
                elif bindings.specialised:
                    self.error(p.span, f"const parameter '{p.name}' has no default and was not given",
                               f"pass {p.name}=... when specialising")
                    scope.vars[p.name] = ERR
                elif dt.is_int:
                    scope.vars[p.name] = Node(Op.DIM, DType.i64, (), (), dim_symbol(p.name), p.span)
                else:
                    scope.vars[p.name] = Node(Op.SCALAR, dt, (), (), p.name, p.span)
                params.append(Param(p.name, "const", dt, (), default))
            else:
                params.append(Param(p.name, "scalar", dt, (), default))
                scope.vars[p.name] = Node(Op.SCALAR, dt, (), (), p.name, p.span)
        return params

    def coerce_scalar(self, value, dt: DType, span: Span):
        try:
            if dt is DType.bool:
                if not isinstance(value, bool):
                    raise TypeError
                return value
            if dt.is_int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                return int(value)
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            self.error(span, f"value {value!r} does not fit type {dt}")
            return None

    def return_types(self, types, scope: _Scope) -> list[tuple[DType, tuple]] | None:
        out = []
        for t in types:
            if isinstance(t, ast.ScalarTypeExpr):
                dt = self.resolve_dtype(t.name, t.span, scope, scalar=True)
                out.append((dt, ()) if dt else None)
                continue
            dt = self.resolve_dtype(t.dtype, t.span, scope)
            shape = [self.resolve_dim(x, scope, leading=i == 0 and len(t.dims) > 1) for i, x in enumerate(t.dims)]
            out.append(None if dt is None or any(s is None for s in shape) else (dt, tuple(shape)))
        return None if any(o is None for o in out) else out

    # ---- layer bodies ------------------------------------------------------------------
    def layer_body(self, d: ast.LayerDef, scope: _Scope) -> list[Node] | None:
        declared = self.return_types(d.returns, scope)
        result: list[Node] | None = None
        for i, st in enumerate(d.body):
            if result is not None:
                self.error(st.span, "unreachable statement after 'return'")
                break
            if isinstance(st, ast.Assign):
                self.assign(st, scope)
            elif isinstance(st, ast.Return):
                vals: list[Node] = []
                for e in st.values:
                    v = self.expr(e, scope)
                    vals.extend(v if isinstance(v, _Tuple) else [v])
                result = vals
                if declared is not None and len(vals) != len(declared):
                    self.error(st.span, f"'{d.name}' returns {len(vals)} value{'s' * (len(vals) != 1)} "
                               f"but its signature declares {len(declared)}")
                    return None
                if declared is not None:
                    result = [self.check_return(v, want, st.values[min(j, len(st.values) - 1)].span)
                              for j, (v, want) in enumerate(zip(vals, declared))]
            else:
                self.error(st.span, f"'{st.name}(...)' is only allowed inside an attention block")
        if result is None:
            self.error(d.name_span, f"layer '{d.name}' never returns a value",
                       "end the body with `return ...`")
            return None
        return result

    def check_return(self, v: Node, want, span: Span) -> Node:
        if v.op is Op.ERROR:
            return v
        dt, shape = want
        if v.shape == () and shape != () and v.op in (Op.CONST, Op.SCALAR, Op.DIM):
            return self.error(span, f"returns a scalar where {type_str(dt, shape)} is declared")
        if len(v.shape) != len(shape) or not all(dims_equal(a, b) for a, b in zip(v.shape, shape)):
            return self.error(span, f"returned value has shape {shape_str(v.shape)} but the signature "
                                    f"declares {shape_str(shape)}")
        if v.dtype != dt:
            if v.shape == () and v.op is Op.CONST:
                return self.cast(v, dt, span)
            return self.error(span, f"returned value has dtype {v.dtype} but the signature declares {dt}",
                              f"cast it: {dt}(...)")
        return v

    def assign(self, st: ast.Assign, scope: _Scope) -> None:
        v = self.expr(st.value, scope)
        targets = st.targets
        for t in targets:
            if t.id in scope.dims or t.id in BUILTINS or t.id in _CAST_NAMES:
                self.error(t.span, f"cannot assign to '{t.id}': it names a "
                           f"{'dim' if t.id in scope.dims else 'builtin'}")
        if len(targets) == 1:
            if isinstance(v, _Tuple):
                self.error(st.span, f"expression gives {len(v)} values; unpack them: "
                           f"`{', '.join('v%d' % i for i in range(len(v)))} = ...`")
                v = ERR
            scope.vars[targets[0].id] = self.state_value(targets[0], v, scope, st.span)
            return
        if not isinstance(v, _Tuple):
            if v.op is not Op.ERROR:
                self.error(st.span, f"cannot unpack one value into {len(targets)} names")
            for t in targets:
                scope.vars[t.id] = ERR
            return
        if len(v) != len(targets):
            self.error(st.span, f"expression gives {len(v)} values but {len(targets)} names are assigned")
            v = _Tuple([ERR] * len(targets))
        for t, x in zip(targets, v):
            scope.vars[t.id] = self.state_value(t, x, scope, st.span)

    def state_value(self, target: ast.Name, v: Node, scope: _Scope, span: Span) -> Node:
        """A value assigned to a state parameter keeps the state's declared dtype and shape."""
        if target.id not in scope.states or v.op is Op.ERROR:
            return v
        dt, shape = scope.states[target.id]
        if v.dtype != dt or len(v.shape) != len(shape) or not all(dims_equal(a, b) for a, b in zip(v.shape, shape)):
            return self.error(span, f"state '{target.id}' is {type_str(dt, shape)}; the new value is "
                                    f"{type_str(v.dtype, v.shape)}",
                              "a state keeps its declared type across calls" + (f": cast it, {dt}(...)"
                                                                               if v.dtype != dt else ""))
        return v

    # ---- expressions -------------------------------------------------------------------
    def expr(self, e: ast.Expr, scope: _Scope):
        m = getattr(self, "expr_" + type(e).__name__)
        return m(e, scope)

    def value(self, e: ast.Expr, scope: _Scope) -> Node:
        v = self.expr(e, scope)
        if isinstance(v, _Tuple):
            return self.error(e.span, f"expression gives {len(v)} values where one is expected")
        return v

    def expr_IntLit(self, e, scope):
        return self.const(e.value, e.span)

    def expr_FloatLit(self, e, scope):
        return self.const(e.value, e.span)

    def expr_BoolLit(self, e, scope):
        return self.const(e.value, e.span)

    def expr_ListLit(self, e, scope):
        return self.error(e.span, "a list is only allowed as the sections of split(...)")

    def expr_Name(self, e: ast.Name, scope: _Scope):
        if e.id in scope.vars:
            return scope.vars[e.id]
        if e.id in scope.dims:
            if scope.dims[e.id] == dim_symbol(e.id) and self.unbound(e.id, e.span):
                return ERR
            return self.dim_node(scope.dims[e.id], e.span)
        if e.id in self.info.consts:
            return self.module_const(e.id, scope)
        if e.id in BUILTINS or e.id in self.info.defs or e.id in _CAST_NAMES:
            return self.error(e.span, f"'{e.id}' is a function; call it: {e.id}(...)")
        if e.id in ATTN_VARS and not scope.in_attention:
            return self.error(e.span, f"'{e.id}' is only defined inside an attention block")
        return self.unknown_name(e, scope)

    def module_const(self, name: str, scope: _Scope) -> Node:
        if name not in self._const_cache:
            c = self.info.consts[name]
            self._const_cache[name] = ERR  # guards self-reference
            v = self.value(c.value, _Scope({}, scope.dims, scope.dtype_T))
            dt = self.resolve_dtype(c.type.name, c.type.span, scope, scalar=True)
            if v.op is Op.ERROR or dt is None:
                node = ERR
            elif v.op is not Op.CONST:
                node = self.error(c.value.span, f"constant '{name}' must be known at build time")
            else:
                val = self.coerce_scalar(v.arg, dt, c.value.span)
                node = ERR if val is None else Node(Op.CONST, dt, (), (), val, c.span)
            self._const_cache[name] = node
        return self._const_cache[name]

    def expr_UnaryOp(self, e: ast.UnaryOp, scope):
        x = self.value(e.operand, scope)
        if x.op is Op.ERROR:
            return x
        if e.op == "not":
            if x.dtype is not DType.bool:
                return self.error(e.span, f"'not' needs a bool operand, got {x.dtype}")
            if x.op is Op.CONST:
                return self.const(not x.arg, e.span)
            return Node(Op.UNARY, DType.bool, x.shape, (x,), "not", e.span)
        if x.dtype is DType.bool:
            return self.error(e.span, "cannot negate a bool")
        if x.op is Op.CONST:
            return self.const(-x.arg, e.span)
        if x.op is Op.DIM:
            return Node(Op.DIM, DType.i64, (), (), -x.arg, e.span)
        return Node(Op.UNARY, x.dtype, x.shape, (x,), "neg", e.span)

    def expr_IfExp(self, e: ast.IfExp, scope):
        c = self.value(e.cond, scope)
        if c.op is Op.ERROR:
            return c
        if c.dtype is DType.bool and c.op is not Op.CONST and not self.bindings.specialised \
                and self._build_time_only(c):
            # generic check of a condition on unbound const parameters: both branches must
            # check and agree in type; specialisation binds the consts and picks one
            a, b = self.value(e.then, scope), self.value(e.other, scope)
            if a is ERR or b is ERR:
                return ERR
            if a.dtype != b.dtype or len(a.shape) != len(b.shape) or \
                    not all(dims_equal(x, y) for x, y in zip(a.shape, b.shape)):
                return self.error(e.span, f"the branches of 'a if c else b' differ: {type_str(a.dtype, a.shape)} "
                                          f"and {type_str(b.dtype, b.shape)}")
            return a
        if c.op is not Op.CONST or c.dtype is not DType.bool:
            return self.error(e.cond.span, "the condition of 'a if c else b' must be a bool known at build "
                              "time (a const parameter)", "for a run-time choice use where(c, a, b)")
        return self.expr(e.then if c.arg else e.other, scope)

    def _build_time_only(self, n: Node) -> bool:
        """True if `n` depends only on sizes and const parameters (no tensors, no run-time scalars)."""
        consts = {p.name for d in self.info.defs.values() for p in d.params if p.is_const}
        for m in toposort([n]):
            if m.op in (Op.INPUT, Op.ATTN_VAR, Op.INDEX) or (m.op is Op.SCALAR and m.arg not in consts):
                return False
        return True

    def expr_BinOp(self, e: ast.BinOp, scope):
        a = self.value(e.left, scope)
        b = self.value(e.right, scope)
        if e.op == "@":
            return self.matmul(a, b, e.span)
        return self.binary(_BINOPS[e.op], a, b, e.span)

    def expr_Attr(self, e: ast.Attr, scope):
        x = self.value(e.base, scope)
        if e.name == "T":
            return self.transpose(x, e.span)
        if x.op is Op.ERROR:
            return x
        return self.error(e.span, f"unknown attribute '.{e.name}' (only '.T', the transpose, exists)")

    def expr_Index(self, e: ast.Index, scope):
        table = self.value(e.base, scope)
        if table.op is Op.ERROR:
            return table
        if not scope.in_attention:
            return self._row_index(table, e, scope)
        if table.op is not Op.INPUT:
            return self.error(e.base.span, "only tensor parameters can be indexed")
        if table.arg in scope.attn_main:  # the kernels stream q, k, v in tiles; hooks see one score element
            return self.error(e.base.span, f"'{table.arg}' is one of the block's q, k, v; hooks can index only "
                                           f"its extra tensor parameters",
                              "pass what the hook needs as an extra parameter, e.g. `bias: f32[Hq]` and `bias[h]`")
        if len(e.indices) != table.rank:
            return self.error(e.span, f"'{table.arg}' has {table.rank} dims but {len(e.indices)} "
                                      f"indices were given")
        idx = [self.value(i, scope) for i in e.indices]
        for i, n in zip(e.indices, idx):
            if n.op is Op.ERROR:
                return n
            if not n.dtype.is_int or n.shape != ():
                return self.error(i.span, f"an index must be an integer scalar, got {type_str(n.dtype, n.shape)}")
        return Node(Op.INDEX, table.dtype, (), (table, *idx), None, e.span)

    def _row_index(self, table: Node, e: ast.Index, scope):
        """`table[i, ...]` in a layer: integer index tensors for the leading axes of a tensor
        parameter (an embedding's `w[ids]`). The result is the indices' broadcast shape followed
        by the axes left; each index is clamped into its axis, [0, size - 1], as hooks' are."""
        if table.op is not Op.INPUT:
            return self.error(e.base.span, "only tensor parameters can be indexed",
                              "use slice(...), split(...) or gather(...) on computed tensors")
        if len(e.indices) > table.rank:
            return self.error(e.span, f"'{table.arg}' has {table.rank} dims but {len(e.indices)} "
                                      f"indices were given")
        idx = [self.value(i, scope) for i in e.indices]
        shape: tuple | None = ()
        for i, n in zip(e.indices, idx):
            if n.op is Op.ERROR:
                return n
            if not n.dtype.is_int:
                return self.error(i.span, f"an index must be an integer tensor or scalar, got "
                                          f"{type_str(n.dtype, n.shape)}")
            shape = broadcast_shapes(shape, n.shape)
            if shape is None:
                return self.error(e.span, "the indices' shapes " + ", ".join(shape_str(n.shape) for n in idx)
                                  + " do not broadcast")
        return Node(Op.INDEX, table.dtype, tuple(shape) + table.shape[len(idx):], (table, *idx), None, e.span)

    # ---- typing rules ------------------------------------------------------------------
    def unify_dtypes(self, a: Node, b: Node, span: Span, what: str) -> DType | None:
        if a.dtype == b.dtype:
            return a.dtype
        sa, sb = a.shape == (), b.shape == ()
        if sa and not sb:
            a, b, sa, sb = b, a, sb, sa
        # now `a` is the tensor (or both scalars)
        if sb and not sa:  # scalar adopts the tensor's dtype within its kind
            if a.dtype.is_float and (b.dtype.is_float or b.dtype.is_int):
                return a.dtype
            if a.dtype.is_int and b.dtype.is_int:
                return a.dtype
            if a.dtype.is_int and b.dtype.is_float:
                self.error(span, f"{what}: cannot combine an {a.dtype} tensor with a float scalar",
                           "cast the tensor first: f32(...)")
                return None
        elif sa and sb:
            if a.dtype.is_float and b.dtype.is_float:
                return DType.f32 if DType.f32 in (a.dtype, b.dtype) else a.dtype
            if a.dtype.is_float and b.dtype.is_int:
                return a.dtype
            if b.dtype.is_float and a.dtype.is_int:
                return b.dtype
            if a.dtype.is_int and b.dtype.is_int:
                return DType.i64 if DType.i64 in (a.dtype, b.dtype) else a.dtype
        self.error(span, f"{what}: dtype mismatch between {a.dtype} and {b.dtype}",
                   f"cast one side explicitly, e.g. {a.dtype}(...)")
        return None

    def broadcast(self, a: Node, b: Node, span: Span, what: str):
        s = broadcast_shapes(a.shape, b.shape)
        if s is None:
            self.error(span, f"{what}: shapes {shape_str(a.shape)} and {shape_str(b.shape)} do not broadcast")
        return s

    def binary(self, op: str, a: Node, b: Node, span: Span) -> Node:
        if a.op is Op.ERROR or b.op is Op.ERROR:
            return ERR
        sym = {v: k for k, v in _BINOPS.items()}.get(op, op)
        what = f"operator '{sym}'" if op in _BINOPS.values() else f"{op}()"
        if op in ("and", "or"):
            if a.dtype is not DType.bool or b.dtype is not DType.bool:
                return self.error(span, f"'{op}' needs bool operands, got {a.dtype} and {b.dtype}")
            dt = DType.bool
        else:
            if DType.bool in (a.dtype, b.dtype) and op not in ("eq", "ne"):
                return self.error(span, f"{what} does not take bool operands")
            for v in (a, b):
                if v.dtype.is_storage:
                    return self.error(span, f"{what} on an {v.dtype} value: the quantised types are storage",
                                      "cast it to compute with it, e.g. f32(...), and multiply by its scales")
            dt = self.unify_dtypes(a, b, span, what)
            if dt is None:
                return ERR
            if op == "div" and dt.is_int:
                if a.shape == () and b.shape == ():
                    dt = DType.f32  # scalar arithmetic such as 1 / D is float, as in Python
                else:
                    return self.error(span, "'/' on integer tensors", "use '//' for integer division, or cast")
            if op == "pow" and dt.is_int and a.shape != ():
                return self.error(span, "'**' on integer tensors is not supported")
            if (op == "pow" and dt.is_int and not (a.op in (Op.CONST, Op.DIM) and b.op in (Op.CONST, Op.DIM))
                    and not (b.op is Op.CONST and 0 <= b.arg <= 64)):
                return self.error(span, "'**' on an integer needs a constant exponent from 0 to 64",
                                  "cast to f32 first for a float power")
        shape = self.broadcast(a, b, span, what)
        if shape is None:
            return ERR
        folded = self.fold_binary(op, a, b, span)
        if folded is not None:
            return folded
        out_dt = DType.bool if op in ("eq", "ne", "lt", "le", "gt", "ge") else dt
        return Node(Op.BINARY, out_dt, shape, (a, b), op, span)

    def fold_binary(self, op: str, a: Node, b: Node, span: Span) -> Node | None:
        """Constant-fold build-time scalars (CONST) and symbolic sizes (DIM)."""
        if a.op is Op.CONST and b.op is Op.CONST:
            x, y = a.arg, b.arg
            try:
                r = {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
                     "div": lambda: x / y, "floordiv": lambda: x // y, "mod": lambda: x % y,
                     "pow": lambda: x ** y, "max": lambda: max(x, y), "min": lambda: min(x, y),
                     "eq": lambda: x == y, "ne": lambda: x != y, "lt": lambda: x < y, "le": lambda: x <= y,
                     "gt": lambda: x > y, "ge": lambda: x >= y, "and": lambda: x and y,
                     "or": lambda: x or y}[op]()
            except ZeroDivisionError:
                return self.error(span, "division by zero in a constant expression")
            except (OverflowError, ValueError, TypeError):
                return self.error(span, "constant expression cannot be evaluated")
            if isinstance(r, complex):
                return self.error(span, "constant expression has no real value")
            if isinstance(r, float) and not math.isfinite(r):
                return self.error(span, "constant expression is not finite")
            if isinstance(r, float) and a.dtype.is_int and b.dtype.is_int and op != "div":
                r = int(r)
            return self.const(r, span)
        dims = (Op.DIM, Op.CONST)
        if a.op in dims and b.op in dims and a.dtype.is_int and b.dtype.is_int:
            x = a.arg if a.op is Op.DIM else sympy.Integer(a.arg)
            y = b.arg if b.op is Op.DIM else sympy.Integer(b.arg)
            if op == "div" and a.op is Op.DIM and b.op is Op.DIM:  # size / size stays a size
                r = x / y
                if r.is_Rational and not r.is_Integer:
                    return self.error(span, f"size {dim_str(x)} / {dim_str(y)} = {x}/{y} does not divide evenly")
                return self.dim_node(r, span)
            if op in ("add", "sub", "mul", "floordiv"):
                r = {"add": x + y, "sub": x - y, "mul": x * y, "floordiv": x / y}[op]
                if op == "floordiv" and r.is_Rational and not r.is_Integer:
                    r = sympy.floor(r)
                return self.dim_node(r, span)
            rel = {"eq": sympy.Eq, "ne": sympy.Ne, "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt,
                   "ge": sympy.Ge}.get(op)
            if rel is not None:
                r = rel(x, y)
                if r in (sympy.true, sympy.false):
                    return self.const(bool(r), span)
        return None

    def cast(self, x: Node, dt: DType, span: Span) -> Node:
        if x.op is Op.ERROR:
            return x
        if x.dtype == dt:
            return x
        if x.op is Op.DIM and x.arg.is_Integer:
            x = Node(Op.CONST, DType.i64, (), (), int(x.arg), x.span)
        if x.op is Op.CONST:
            v = bool(x.arg) if dt is DType.bool else int(x.arg) if dt.is_int else float(x.arg)
            return Node(Op.CONST, dt, (), (), v, span)
        return Node(Op.CAST, dt, x.shape, (x,), None, span)

    def float_operand(self, x: Node, fname: str, span: Span) -> Node:
        if x.op is Op.ERROR:
            return x
        if x.dtype.is_float:
            return x
        if x.dtype.is_int and x.shape == ():
            return self.cast(x, DType.f32, span)  # sqrt(D) and friends on build-time sizes
        return self.error(span, f"{fname}() needs a float tensor, got {type_str(x.dtype, x.shape)}",
                          "cast it first, e.g. f32(x)")

    def matmul(self, a: Node, b: Node, span: Span) -> Node:
        if a.op is Op.ERROR or b.op is Op.ERROR:
            return ERR
        if a.rank < 2 or b.rank < 2:
            return self.error(span, f"'@' needs operands of rank >= 2, got {shape_str(a.shape)} and "
                                    f"{shape_str(b.shape)}")
        if not dims_equal(a.shape[-1], b.shape[-2]):
            return self.error(span, f"'@': inner dims differ: {shape_str(a.shape)} @ {shape_str(b.shape)}",
                              "transpose one side with .T?")
        if a.dtype != b.dtype or not a.dtype.is_float:
            return self.error(span, f"'@' needs two float operands of one dtype, got {a.dtype} and {b.dtype}")
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
        if batch is None:
            return self.error(span, "'@': batch dims do not broadcast")
        return Node(Op.MATMUL, a.dtype, batch + (a.shape[-2], b.shape[-1]), (a, b), None, span)

    def transpose(self, x: Node, span: Span) -> Node:
        if x.op is Op.ERROR:
            return x
        if x.rank < 2:
            return self.error(span, f"transpose needs rank >= 2, got {shape_str(x.shape)}")
        return Node(Op.TRANSPOSE, x.dtype, x.shape[:-2] + (x.shape[-1], x.shape[-2]), (x,), None, span)

    def axis(self, x: Node, a, span: Span) -> int | None:
        if a is None:
            return None
        if not (isinstance(a, int) and not isinstance(a, bool)):
            self.error(span, "axis must be an integer constant")
            return None
        if not -x.rank <= a < x.rank:
            self.error(span, f"axis {a} is out of range for a tensor of rank {x.rank} {shape_str(x.shape)}")
            return None
        return a % x.rank

    def build_time(self, e, scope, what: str, kind=int):
        """Evaluate an argument that must be known at build time; returns python value or None."""
        if e is None or isinstance(e, (bool, int, float)):
            return e
        v = self.value(e, scope)
        if v.op is Op.ERROR:
            return None
        if v.op is Op.DIM and kind is int:
            return int(v.arg) if v.arg.is_Integer else v.arg  # symbolic only in the generic check
        if v.op is Op.DIM and kind is float and v.arg.is_Integer:
            return float(v.arg)
        if v.op is not Op.CONST:
            self.error(e.span, f"{what} must be known at build time")
            return None
        if kind is int and (isinstance(v.arg, bool) or not isinstance(v.arg, int)):
            self.error(e.span, f"{what} must be an integer")
            return None
        if kind is bool and not isinstance(v.arg, bool):
            self.error(e.span, f"{what} must be true or false")
            return None
        if kind is float and isinstance(v.arg, bool):
            self.error(e.span, f"{what} must be a number")
            return None
        return v.arg

    # ---- calls -------------------------------------------------------------------------
    def expr_Call(self, e: ast.Call, scope: _Scope):
        if not isinstance(e.func, ast.Name):
            return self.error(e.func.span, "only named functions can be called")
        name = e.func.id
        if name in scope.vars:
            return self.error(e.func.span, f"'{name}' is a value, not a function")
        if name in _CAST_NAMES:
            if len(e.args) != 1 or e.kwargs:
                return self.error(e.span, f"{name}(x) takes exactly one argument")
            dt = scope.dtype_T if _CAST_NAMES[name] is DType.T else _CAST_NAMES[name]
            return self.cast(self.value(e.args[0], scope), dt, e.span)
        if name in self.info.shadowed and e.span.file in self.info.shadowed[name][1]:
            return self.inline_call(e, self.info.shadowed[name][0], scope)
        if name in self.info.defs:
            return self.inline_call(e, self.info.defs[name], scope)
        if name not in BUILTINS:
            return self.unknown_name(e.func, scope, "function")
        if name in ATTENTION_ONLY and not scope.in_attention:
            return self.error(e.func.span, f"{name}() is only available inside attention blocks")
        args = BUILTINS[name].bind(name, e.span, e.args, e.kwargs, self.error)
        if args is None:
            return ERR
        return getattr(self, "builtin_" + name, self.builtin_unary)(name, args, e, scope)

    # ---- inlining calls to layers --------------------------------------------------------
    def inline_call(self, e: ast.Call, d, scope: _Scope):
        if isinstance(d, ast.AttentionDef):
            return self.error(e.func.span, f"'{d.name}' is an attention block; it cannot be called from a layer")
        carried = [p.name for p in d.params if p.is_state]
        if carried:
            return self.error(e.func.span, f"'{d.name}' carries state ({', '.join(carried)}): it runs as a layer of "
                                           "its own, not inlined into another",
                              "call it from Python between the layers that feed it")
        if d.name in scope.callstack:
            chain = " -> ".join(scope.callstack[scope.callstack.index(d.name):] + (d.name,))
            return self.error(e.func.span, f"recursive call: {chain}", "layers cannot call themselves")
        if len(scope.callstack) >= MAX_INLINE_DEPTH:
            return self.error(e.span, "calls nested too deeply")
        from .signatures import Signature
        sig = Signature(tuple((p.name, REQUIRED if p.default is None else p.default) for p in d.params))
        bound = sig.bind(d.name, e.span, e.args, e.kwargs, self.error)
        if bound is None:
            return ERR
        callee = _Scope({}, {}, scope.dtype_T, scope.in_attention, scope.callstack + (d.name,))
        free: dict[str, sympy.Symbol] = {}
        dtype_T: DType | None = None
        pending: list[tuple[ast.Param, Node]] = []
        for p in d.params:
            a = bound[p.name]
            if isinstance(p.type, ast.TensorTypeExpr):
                v = self.value(a, scope)
                if v.op is Op.ERROR:
                    return ERR
                pending.append((p, v))
                if p.type.dtype == "T":
                    if dtype_T is None:
                        dtype_T = v.dtype
                    elif dtype_T != v.dtype:
                        return self.error(a.span, f"argument '{p.name}' of {d.name}() is {v.dtype}, but T was "
                                                  f"already bound to {dtype_T} by an earlier argument")
                continue
            # scalar parameter
            if isinstance(a, ast.Node):
                v = self.value(a, scope)
            else:
                v = ERR if a is None else None
                v = self.const(a, p.span) if v is None else v
            if v.op is Op.ERROR:
                return ERR
            if v.shape != ():
                return self.error(a.span, f"argument '{p.name}' of {d.name}() must be a scalar, got "
                                          f"{type_str(v.dtype, v.shape)}")
            if p.is_const and v.op not in (Op.CONST, Op.DIM):
                return self.error(a.span, f"argument '{p.name}' of {d.name}() is const: it must be known at "
                                          f"build time")
            sdt = SCALAR_TYPES.get(p.type.name)
            if sdt is not None and sdt is not DType.T and v.op is Op.CONST:
                val = self.coerce_scalar(v.arg, sdt, a.span if isinstance(a, ast.Node) else e.span)
                if val is None:
                    return ERR
                v = Node(Op.CONST, sdt, (), (), val, v.span)
            callee.vars[p.name] = v
        callee.dtype_T = dtype_T or scope.dtype_T
        # unify dims: declared shapes against actual shapes (callee dims are bound per call)
        for p, v in pending:
            want_dt = self.resolve_dtype(p.type.dtype, p.type.span, callee)
            if want_dt is None:
                return ERR
            if want_dt != v.dtype:
                return self.error(bound[p.name].span, f"argument '{p.name}' of {d.name}() must be {want_dt}, "
                                                      f"got {v.dtype}")
            if len(p.type.dims) != v.rank:
                return self.error(bound[p.name].span,
                                  f"argument '{p.name}' of {d.name}() must have rank {len(p.type.dims)} "
                                  f"({_ast_shape(p.type.dims)}), got {shape_str(v.shape)}")
            for dexpr, actual in zip(p.type.dims, v.shape):
                if not self.unify_dim(dexpr, actual, callee, free, bound[p.name].span, p.name, d.name):
                    return ERR
            callee.vars[p.name] = v
        for name, sym in free.items():
            if name not in callee.dims:
                callee.dims[name] = scope.dims.get(name, sym)
        for name in self.info.all_dims:
            callee.dims.setdefault(name, scope.dims.get(name, dim_symbol(name)))
        callee.attn_heads = scope.attn_heads
        sub = ast.LayerDef(d.span, d.name, d.name_span, d.params, d.returns, d.body)
        outs = self.layer_body(sub, callee)
        if outs is None or any(o.op is Op.ERROR for o in outs):
            return ERR
        return outs[0] if len(outs) == 1 else _Tuple(outs)

    def unify_dim(self, dexpr, actual, callee: _Scope, free: dict, span: Span, pname: str, fname: str) -> bool:
        want = self.resolve_dim(dexpr, callee, free)
        if want is None:
            return False
        unknowns = [s for s in want.free_symbols if s.name.startswith("_u_")]
        if not unknowns:
            if dims_equal(want, actual):
                return True
            shown = _ast_dim(dexpr)
            if dim_str(want) != shown:  # say "H = 64", not "H = H"
                shown += f" = {dim_str(want)}"
            self.error(span, f"argument '{pname}' of {fname}(): dim {shown} does not match {dim_str(actual)}")
            return False
        if len(unknowns) > 1:
            self.error(span, f"argument '{pname}' of {fname}(): cannot infer dims of {_ast_dim(dexpr)}")
            return False
        u = unknowns[0]
        sol = sympy.solve(sympy.Eq(want, actual), u)
        if len(sol) != 1:
            self.error(span, f"argument '{pname}' of {fname}(): cannot infer {u.name[3:]} from {actual}")
            return False
        val = sympy.simplify(sol[0])
        if val.is_Rational and (not val.is_Integer or val <= 0):
            self.error(span, f"argument '{pname}' of {fname}(): {actual} does not divide as {_ast_dim(dexpr)}")
            return False
        name = u.name[3:]
        callee.dims[name] = val
        free[name] = val
        return True

    # ---- attention ---------------------------------------------------------------------
    def attention_body(self, d: ast.AttentionDef, scope: _Scope, params: list[Param]) -> list[Node] | None:
        from .attention_check import check_attention
        return check_attention(self, d, scope, params)



def _ast_dim(d) -> str:
    if isinstance(d, ast.DimName):
        return d.name
    if isinstance(d, ast.DimInt):
        return str(d.value)
    return f"{_ast_dim(d.left)}{d.op}{_ast_dim(d.right)}"


def _ast_shape(dims) -> str:
    return "[" + ", ".join(_ast_dim(x) for x in dims) + "]"


__all__ = ["Checker", "ModuleInfo", "Bindings", "ERR", "UNARY_MATH"]
