"""Typing rules of the builtin functions (`exp`, `sum`, `topk`, `split`, ...), one method each.

Mixed into `Checker`: each `builtin_<name>(name, args, call, scope)` receives the call's bound
AST arguments (see signatures.py), type-checks them and returns IR nodes (or ERR after an error).
"""
from __future__ import annotations

import sympy

from . import ast
from .numerics import (ROPE_TYPES, RopeParameterError, make_rope_scaling, rope_attention_factor,
                       rope_is_static, static_inv_freq)
from .ir import Conv1dArg, Function, Node, Op, Param, ReduceArg, ScanArg
from .types import DType, broadcast_shapes, dims_equal, shape_str, type_str
from .values import _CAST_NAMES, ERR, _Tuple


class BuiltinRules:
    def builtin_unary(self, name, args, e, scope):
        x = self.float_operand(self.value(args["x"], scope), name, e.span)
        if x.op is Op.ERROR:
            return x
        if x.op is Op.CONST:
            try:
                return self.const(float(_fold_unary(name, x.arg)), e.span)
            except (ValueError, OverflowError):
                return self.error(e.span, f"{name}({x.arg}) is undefined")
        return Node(Op.UNARY, x.dtype, x.shape, (x,), name, e.span)

    def builtin_where(self, name, args, e, scope):
        c, a, b = (self.value(args[k], scope) for k in ("cond", "a", "b"))
        if ERR in (c, a, b):
            return ERR
        if c.dtype is not DType.bool:
            return self.error(args["cond"].span, f"where() condition must be bool, got {c.dtype}")
        dt = self.unify_dtypes(a, b, e.span, "where()")
        s1 = broadcast_shapes(a.shape, b.shape)
        shape = broadcast_shapes(c.shape, s1) if s1 is not None else None
        if dt is None:
            return ERR
        if shape is None:
            return self.error(e.span, f"where(): shapes {shape_str(c.shape)}, {shape_str(a.shape)}, "
                                      f"{shape_str(b.shape)} do not broadcast")
        if c.op is Op.CONST:
            return self.cast(a if c.arg else b, dt, e.span) if (a if c.arg else b).shape == shape else \
                Node(Op.WHERE, dt, shape, (c, a, b), None, e.span)
        return Node(Op.WHERE, dt, shape, (c, self.cast_weak(a, dt), self.cast_weak(b, dt)), None, e.span)

    def cast_weak(self, x: Node, dt: DType) -> Node:
        return self.cast(x, dt, x.span) if x.shape == () and x.dtype != dt else x

    def builtin_maximum(self, name, args, e, scope):
        return self.binary("max" if name == "maximum" else "min", self.value(args["a"], scope),
                           self.value(args["b"], scope), e.span)

    builtin_minimum = builtin_maximum

    def builtin_sum(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        if x.op is Op.ERROR:
            return x
        if name in ("max", "min") and args.get("y") is not None:
            return self.binary(name, x, self.value(args["y"], scope), e.span)
        if x.rank == 0:
            return self.error(e.span, f"{name}() reduces along an axis; its operand is a scalar")
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        keep = self.build_time(args["keepdim"], scope, "keepdim", bool)
        corr = self.build_time(args.get("correction", 0), scope, "correction")
        if axis is None or keep is None or corr is None:
            return ERR
        if x.dtype is DType.bool:
            return self.error(e.span, f"{name}() does not take bool tensors")
        if x.dtype.is_storage:
            return self.error(e.span, f"{name}() on an {x.dtype} tensor: the quantised types are storage",
                              "cast it to compute with it, e.g. f32(...)")
        if name in ("mean", "var") and not x.dtype.is_float:
            return self.error(e.span, f"{name}() needs a float tensor, got {x.dtype}", "cast it: f32(x)")
        shape = x.shape[:axis] + ((sympy.Integer(1),) if keep else ()) + x.shape[axis + 1:]
        return Node(Op.REDUCE, x.dtype, shape, (x,), ReduceArg(name, axis, keep, corr), e.span)

    builtin_mean = builtin_var = builtin_max = builtin_min = builtin_sum

    def builtin_softmax(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        if x.op is Op.ERROR:
            return x
        if not x.dtype.is_float:
            return self.error(e.span, f"softmax() needs a float tensor, got {x.dtype}")
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        return Node(Op.SOFTMAX, x.dtype, x.shape, (x,), axis, e.span)

    def builtin_topk(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        if x.op is Op.ERROR:
            return x
        k = self.build_time(args["k"], scope, "k")
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        if k is None or axis is None:
            return ERR
        if x.dtype is DType.bool:
            return self.error(e.span, "topk() does not take bool tensors")
        k = sympy.sympify(k)
        if k.is_Integer and k <= 0:
            return self.error(args["k"].span, "k must be positive")
        if k.is_Integer and x.shape[axis].is_Integer and k > x.shape[axis]:
            return self.error(args["k"].span, f"k = {k} is larger than the axis it selects from "
                                              f"({x.shape[axis]})")
        shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
        return _Tuple([Node(Op.TOPK, x.dtype, shape, (x,), (k, axis, 0), e.span),
                       Node(Op.TOPK, DType.i32, shape, (x,), (k, axis, 1), e.span)])

    def builtin_gather(self, name, args, e, scope):
        x, idx = self.value(args["x"], scope), self.value(args["index"], scope)
        if ERR in (x, idx):
            return ERR
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        if not idx.dtype.is_int:
            return self.error(args["index"].span, f"gather() index must be an integer tensor, got {idx.dtype}")
        if idx.rank != x.rank or not all(dims_equal(a, b) for i, (a, b) in enumerate(zip(x.shape, idx.shape))
                                         if i != axis):
            return self.error(e.span, f"gather(): index shape {shape_str(idx.shape)} must match "
                                      f"{shape_str(x.shape)} except along axis {axis}")
        return Node(Op.GATHER, x.dtype, idx.shape, (x, idx), axis, e.span)

    def builtin_split(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        if x.op is Op.ERROR:
            return x
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        n = x.shape[axis]
        sec = args["sections"]
        if isinstance(sec, ast.ListLit):
            sizes = [self.build_time(s, scope, "a section size") for s in sec.items]
            if any(s is None for s in sizes):
                return ERR
            sizes = [sympy.sympify(s) for s in sizes]
            if not dims_equal(sum(sizes), n):
                return self.error(sec.span, f"split sizes add up to {sum(sizes)}, but the axis has {n}")
        else:
            parts = self.build_time(sec, scope, "the number of parts")
            if parts is None:
                return ERR
            parts = sympy.sympify(parts)
            if parts.is_Integer and parts <= 0:
                return self.error(sec.span, "the number of parts must be positive")
            size = n / parts
            if size.is_Rational and not size.is_Integer:
                return self.error(e.span, f"split: axis of size {n} does not divide into {parts} parts")
            if not parts.is_Integer:
                return self.error(sec.span, "the number of parts must be a constant")
            sizes = [size] * int(parts)
        out, start = [], sympy.Integer(0)
        for s in sizes:
            shape = x.shape[:axis] + (s,) + x.shape[axis + 1:]
            out.append(Node(Op.SLICE, x.dtype, shape, (x,), (axis, start, start + s, 1), e.span))
            start = start + s
        return _Tuple(out)

    def builtin_slice(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        if x.op is Op.ERROR:
            return x
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        vals = [self.build_time(args[k], scope, k) for k in ("start", "stop", "step")]
        if axis is None or any(v is None for v in vals):
            return ERR
        start, stop, step = (sympy.sympify(v) for v in vals)
        n = x.shape[axis]
        if step.is_Integer and step <= 0:
            return self.error(args["step"].span if isinstance(args["step"], ast.Node) else e.span,
                              "slice step must be positive")
        length = sympy.ceiling((stop - start) / step) if (stop - start).is_Integer else (stop - start) / step
        bad = (start.is_Integer and start < 0) or ((stop - n).is_Integer and stop > n) or \
              ((stop - start).is_Integer and stop <= start)
        if bad:
            return self.error(e.span, f"slice [{start}:{stop}] is out of range for an axis of size {n}")
        shape = x.shape[:axis] + (sympy.sympify(length),) + x.shape[axis + 1:]
        return Node(Op.SLICE, x.dtype, shape, (x,), (axis, start, stop, step), e.span)

    def builtin_concat(self, name, args, e, scope):
        xs = [self.value(a, scope) for a in args["tensors"]]
        if ERR in xs:
            return ERR
        axis = self.axis(xs[0], self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        for x in xs[1:]:
            if x.dtype != xs[0].dtype:
                return self.error(e.span, f"concat(): dtypes differ ({xs[0].dtype} and {x.dtype})")
            if x.rank != xs[0].rank or not all(dims_equal(a, b) for i, (a, b) in
                                               enumerate(zip(x.shape, xs[0].shape)) if i != axis):
                return self.error(e.span, f"concat(): shapes {shape_str(xs[0].shape)} and {shape_str(x.shape)} "
                                          f"differ outside axis {axis}")
        total = sum((x.shape[axis] for x in xs), sympy.Integer(0))
        shape = xs[0].shape[:axis] + (total,) + xs[0].shape[axis + 1:]
        return Node(Op.CONCAT, xs[0].dtype, shape, tuple(xs), axis, e.span)

    def builtin_interleave(self, name, args, e, scope):
        a, b = self.value(args["a"], scope), self.value(args["b"], scope)
        if ERR in (a, b):
            return ERR
        axis = self.axis(a, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        if a.dtype != b.dtype or a.rank != b.rank or not all(dims_equal(x, y) for x, y in zip(a.shape, b.shape)):
            return self.error(e.span, f"interleave() needs two tensors of one type, got "
                                      f"{type_str(a.dtype, a.shape)} and {type_str(b.dtype, b.shape)}")
        shape = a.shape[:axis] + (2 * a.shape[axis],) + a.shape[axis + 1:]
        return Node(Op.INTERLEAVE, a.dtype, shape, (a, b), axis, e.span)

    def builtin_reshape(self, name, args, e, scope):
        items = args["dims"]
        if len(items) < 2:
            return self.error(e.span, "reshape(x, d0, d1, ...) needs a tensor and at least one dim")
        x = self.value(items[0], scope)
        dims = [self.build_time(d, scope, "a reshape dim") for d in items[1:]]
        if x.op is Op.ERROR or any(d is None for d in dims):
            return ERR
        dims = [sympy.sympify(d) for d in dims]
        if not dims_equal(sympy.Mul(*dims), sympy.Mul(*x.shape)):
            return self.error(e.span, f"reshape(): {shape_str(x.shape)} has {sympy.Mul(*x.shape)} elements, "
                                      f"{shape_str(tuple(dims))} has {sympy.Mul(*dims)}")
        return Node(Op.RESHAPE, x.dtype, tuple(dims), (x,), None, e.span)

    def builtin_unsqueeze(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        a = self.build_time(args["axis"], scope, "axis")
        if x.op is Op.ERROR or a is None:
            return ERR
        if not -x.rank - 1 <= a <= x.rank:
            return self.error(e.span, f"axis {a} is out of range for unsqueeze of rank {x.rank}")
        a = a % (x.rank + 1)
        shape = x.shape[:a] + (sympy.Integer(1),) + x.shape[a:]
        return Node(Op.RESHAPE, x.dtype, shape, (x,), None, e.span)

    def builtin_iota(self, name, args, e, scope):
        n = self.build_time(args["n"], scope, "iota's length")
        if n is None:
            return ERR
        n = sympy.sympify(n)
        if n.is_Integer and n <= 0:
            return self.error(e.span, "iota's length must be positive")
        return Node(Op.IOTA, DType.i32, (n,), (), n, e.span)

    def builtin_rope_freqs(self, name, args, e, scope):
        """The inverse frequency of each of the first rotary_dim channels (dsl/numerics, any static
        rope type): neox pairs channel c with c + rotary_dim/2, gptj 2i with 2i + 1, and a pair
        shares its frequency. Folded to a table at specialisation."""
        rd = self.build_time(args["rotary_dim"], scope, "rope_freqs' rotary_dim")
        theta = self.build_time(args["theta"], scope, "rope theta", float)
        neox = self.build_time(args["neox"], scope, "rope_freqs' neox", bool)
        scaling = rope_scaling_of(self, e.span, args, scope)
        if rd is None or theta is None or neox is None or scaling is False:
            return ERR
        rd = sympy.sympify(rd)
        if rd.is_Integer and (rd <= 0 or rd % 2):
            return self.error(args["rotary_dim"].span, f"rotary dim must be a positive even number, got {rd}")
        if float(theta) <= 0:
            return self.error(args["theta"].span, "rope theta must be positive")
        if rope_attention_factor(scaling) != 1.0:
            return self.error(e.span, f"rope type '{scaling.rope_type}' scales cos and sin by its attention "
                                      "factor, which rope_freqs does not carry; use an attention block's rope(...)")
        if not rd.is_Integer:   # the generic check: the table comes with the dims
            return Node(Op.TABLE, DType.f32, (rd,), (), None, e.span)
        inv = static_inv_freq(float(theta), int(rd), scaling)
        per_channel = inv + inv if neox else tuple(f for f in inv for _ in range(2))
        return Node(Op.TABLE, DType.f32, (rd,), (), per_channel, e.span)

    def builtin_transpose(self, name, args, e, scope):
        return self.transpose(self.value(args["x"], scope), e.span)

    def builtin_linear(self, name, args, e, scope):
        """torch.nn.functional.linear: x [..., K] @ w^T with w [O, K] (torch.nn.Linear's layout, as
        checkpoints store it), plus b [O]. Products accumulate in f32; the result is x's dtype,
        rounded once: with a bias, the sum is formed in f32 before the rounding (as F.linear does)."""
        x, w = self.value(args["x"], scope), self.value(args["w"], scope)
        b = None if args["b"] is None else self.value(args["b"], scope)
        if ERR in (x, w, b):
            return ERR
        if x.rank < 2:
            return self.error(args["x"].span, f"linear(): x must be [..., in] of rank >= 2, got "
                                              f"{type_str(x.dtype, x.shape)}")
        if w.rank != 2:
            return self.error(args["w"].span, f"linear(): the weight must be [out, in], got {type_str(w.dtype, w.shape)}",
                              "torch.nn.Linear's layout: weight [out_features, in_features]")
        if not x.dtype.is_float or w.dtype != x.dtype:
            return self.error(e.span, f"linear(): x and the weight must be float tensors of one dtype, got "
                                      f"{type_str(x.dtype, x.shape)} and {type_str(w.dtype, w.shape)}")
        if not dims_equal(x.shape[-1], w.shape[1]):
            return self.error(e.span, f"linear(): x's last dim {x.shape[-1]} differs from the weight's in-features "
                                      f"{w.shape[1]} (x {shape_str(x.shape)}, weight {shape_str(w.shape)})",
                              "the weight is [out, in], as torch.nn.Linear stores it")
        if b is not None:
            if b.rank != 1 or not dims_equal(b.shape[0], w.shape[0]):
                return self.error(args["b"].span, f"linear(): the bias must be [{w.shape[0]}] (the weight's "
                                                  f"out-features), got {type_str(b.dtype, b.shape)}")
            if b.dtype != x.dtype:
                return self.error(args["b"].span, f"linear(): the bias must be {x.dtype} like x, got {b.dtype}")
        if b is None:
            return self.matmul(x, self.transpose(w, args["w"].span), e.span)
        f32 = DType.f32
        y = self.matmul(self.cast(x, f32, e.span), self.transpose(self.cast(w, f32, e.span), args["w"].span), e.span)
        return self.cast(self.binary("add", y, self.cast(b, f32, e.span), e.span), x.dtype, e.span)

    def builtin_cast(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        d = args["dtype"]
        if not isinstance(d, ast.Name) or d.id not in _CAST_NAMES:
            return self.error(d.span, "cast(x, dtype): dtype must be a dtype name such as f32 or T")
        dt = scope.dtype_T if _CAST_NAMES[d.id] is DType.T else _CAST_NAMES[d.id]
        return self.cast(x, dt, e.span)

    # ---- scans and the causal convolution (dsl/recurrences.py defines them) -------------------
    def builtin_cumsum(self, name, args, e, scope):
        x = self.value(args["x"], scope)
        if x.op is Op.ERROR:
            return x
        if x.rank == 0:
            return self.error(e.span, f"{name}() scans along an axis; its operand is a scalar")
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        if x.dtype is DType.bool:
            return self.error(e.span, f"{name}() does not take bool tensors")
        return Node(Op.SCAN, x.dtype, x.shape, (x,), ScanArg("sum" if name == "cumsum" else "prod", axis), e.span)

    builtin_cumprod = builtin_cumsum

    def builtin_scan(self, name, args, e, scope):
        """scan(combine, x0, ..., axis=): the combine is a layer taking the k carries then the k
        elements, each of one step's shape (the operands' broadcast shape without the axis), and
        returning k values of those types; inlined once into a step function."""
        items = args["operands"]
        if len(items) < 2:
            return self.error(e.span, "scan(combine, x, ..., axis=) needs a combine layer and at least one operand")
        comb = items[0]
        d = self.info.defs.get(comb.id) if isinstance(comb, ast.Name) else None
        if isinstance(comb, ast.Name) and comb.id in self.info.shadowed and e.span.file in self.info.shadowed[comb.id][1]:
            d = self.info.shadowed[comb.id][0]
        if d is None or not isinstance(d, ast.LayerDef):
            return self.error(comb.span, "scan's first argument must name a layer: the combine",
                              "e.g. `layer lin(a1: f32[B, N], b1: f32[B, N], a2: f32[B, N], b2: f32[B, N]) -> "
                              "(f32[B, N], f32[B, N]) { return a1 * a2, a2 * b1 + b2 }`")
        xs = [self.value(a, scope) for a in items[1:]]
        if ERR in xs:
            return ERR
        k = len(xs)
        shape = ()
        for a, x in zip(items[1:], xs):
            if x.rank == 0:
                return self.error(a.span, "a scan operand must be a tensor, got a scalar")
            shape = broadcast_shapes(shape, x.shape)
            if shape is None:
                return self.error(e.span, "scan(): the operands' shapes " + ", ".join(shape_str(x.shape) for x in xs)
                                  + " do not broadcast")
        probe = Node(Op.ERROR, DType.f32, shape)
        axis = self.axis(probe, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        tensors = [p for p in d.params if isinstance(p.type, ast.TensorTypeExpr)]
        if len(tensors) != 2 * k or len(d.returns) != k:
            return self.error(comb.span, f"the combine '{d.name}' must take {2 * k} tensors (the {k} carries, then "
                                         f"the {k} elements) and return {k}, for {k} operand{'s' * (k > 1)}; it "
                                         f"takes {len(tensors)} and returns {len(d.returns)}")
        step_shape = shape[:axis] + shape[axis + 1:]
        names = [f"carry{i}" for i in range(k)] + [f"elem{i}" for i in range(k)]
        leaves = [Node(Op.INPUT, x.dtype, step_shape, (), n, a.span) for n, x, a in
                  zip(names, xs + xs, list(items[1:]) * 2)]
        call_scope = type(scope)(dict(zip(names, leaves)), scope.dims, scope.dtype_T, scope.in_attention,
                                 scope.callstack)
        call = ast.Call(e.span, comb, tuple(ast.Name(a.span, n) for n, a in zip(names, list(items[1:]) * 2)), ())
        outs = self.inline_call(call, d, call_scope)
        if outs is ERR:
            return ERR
        outs = list(outs) if isinstance(outs, _Tuple) else [outs]
        for i, (o, x) in enumerate(zip(outs, xs)):
            if o.dtype != x.dtype or len(o.shape) != len(step_shape) or \
                    not all(dims_equal(a, b) for a, b in zip(o.shape, step_shape)):
                return self.error(e.span, f"the combine '{d.name}' returns {type_str(o.dtype, o.shape)} as its value "
                                          f"{i}; the scan carries {type_str(x.dtype, step_shape)} there")
        step = Function(d.name, "layer", tuple(Param(n, "tensor", x.dtype, step_shape) for n, x in zip(names, xs + xs)),
                        tuple(outs), d.span)
        return _Tuple(Node(Op.SCAN, x.dtype, shape, tuple(xs), ScanArg("combine", axis, i, step), e.span)
                      for i, x in enumerate(xs))

    def builtin_conv1d_causal(self, name, args, e, scope):
        x, w = self.value(args["x"], scope), self.value(args["w"], scope)
        st = None if args["state"] is None else self.value(args["state"], scope)
        if ERR in (x, w, st):
            return ERR
        if x.rank == 0 or not x.dtype.is_float:
            return self.error(args["x"].span, f"conv1d_causal(): x must be a float tensor, got {type_str(x.dtype, x.shape)}")
        axis = self.axis(x, self.build_time(args["axis"], scope, "axis"), e.span)
        if axis is None:
            return ERR
        if w.rank == 0 or w.dtype != x.dtype:
            return self.error(args["w"].span, f"conv1d_causal(): the filter must be a {x.dtype} tensor like x, got "
                                              f"{type_str(w.dtype, w.shape)}", "cast it first, e.g. T(w)")
        taps = w.shape[-1]
        rest = x.shape[:axis] + x.shape[axis + 1:]
        fits = broadcast_shapes(rest, w.shape[:-1])
        if fits is None or len(fits) != len(rest) or not all(dims_equal(a, b) for a, b in zip(fits, rest)):
            return self.error(args["w"].span, f"conv1d_causal(): the filter {shape_str(w.shape)} must be x's shape "
                                              f"without the axis, {shape_str(rest)}, then the taps (it may "
                                              f"broadcast)", f"e.g. w: T[{', '.join(map(str, rest[-1:]))}, K]")
        state_shape = x.shape[:axis] + (taps - 1,) + x.shape[axis + 1:]
        if (taps - 1).is_Integer and taps - 1 < 1:
            if st is not None:
                return self.error(args["state"].span, "conv1d_causal(): a filter of one tap carries no state")
            return self.error(args["w"].span, "conv1d_causal(): the filter needs at least two taps (one is a "
                                              "pointwise product: write x * w)")
        if st is not None:
            if st.dtype != x.dtype or st.rank != x.rank or \
                    not all(dims_equal(a, b) for a, b in zip(st.shape, state_shape)):
                return self.error(args["state"].span, f"conv1d_causal(): the state must be "
                                                      f"{type_str(x.dtype, state_shape)} (x's shape with the K - 1 "
                                                      f"inputs before it along axis {axis}), got "
                                                      f"{type_str(st.dtype, st.shape)}")
        src = (x, w) if st is None else (x, w, st)
        return _Tuple([Node(Op.CONV1D, x.dtype, x.shape, src, Conv1dArg(axis, 0), e.span),
                       Node(Op.CONV1D, x.dtype, state_shape, src, Conv1dArg(axis, 1), e.span)])

    def builtin_alibi_slope(self, name, args, e, scope):
        h = self.value(args["h"], scope)
        mb = self.build_time(args["max_bias"], scope, "max_bias", float)
        heads = self.build_time(args["heads"], scope, "heads")
        if h.op is Op.ERROR or mb is None or heads is None:
            return ERR
        if not h.dtype.is_int or h.shape != ():
            return self.error(e.span, "alibi_slope(h): h must be an integer head index")
        if heads < 0:
            return self.error(e.span, f"alibi_slope: heads must be >= 0 (0: the block's heads), got {heads}")
        return Node(Op.UNARY, DType.f32, (), (h,), ("alibi_slope", heads or scope.attn_heads, float(mb)), e.span)

    def builtin_t5_bucket(self, name, args, e, scope):
        rel = self.value(args["rel"], scope)
        nb = self.build_time(args["num_buckets"], scope, "num_buckets")
        md = self.build_time(args["max_distance"], scope, "max_distance")
        bd = self.build_time(args["bidirectional"], scope, "bidirectional", bool)
        if rel.op is Op.ERROR or None in (nb, md, bd):
            return ERR
        if not rel.dtype.is_int or rel.shape != ():
            return self.error(e.span, "t5_bucket(rel): rel must be an integer position difference")
        return Node(Op.UNARY, DType.i32, (), (rel,), ("t5_bucket", nb, md, bool(bd)), e.span)



def _fold_unary(name: str, x: float) -> float:
    import math as m
    f = {"exp": m.exp, "log": m.log, "tanh": m.tanh, "sigmoid": lambda v: 1 / (1 + m.exp(-v)),
         "silu": lambda v: v / (1 + m.exp(-v)), "gelu": lambda v: 0.5 * v * (1 + m.erf(v / m.sqrt(2))),
         "gelu_tanh": lambda v: 0.5 * v * (1 + m.tanh(m.sqrt(2 / m.pi) * (v + 0.044715 * v ** 3))),
         "relu": lambda v: max(v, 0.0), "rsqrt": lambda v: 1 / m.sqrt(v), "sqrt": m.sqrt, "abs": abs,
         "cos": m.cos, "sin": m.sin, "erf": m.erf}[name]
    return f(x)


# the rope types a block can name: those with one frequency table (longrope with its regime)
_DIRECTIVE_TYPES = tuple(t for t in ROPE_TYPES if t != "dynamic")
# Llama 3's keys, when `factor` is given without a type (the directive's first form)
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 8192.0}


def rope_scaling_of(ck, span, args, scope):
    """The directive's frequency scaling (dsl/numerics): None for the default type, False
    after an error. Unknown types, missing keys and values out of range point at the source."""
    kind_arg = args["type"]
    if kind_arg is None:
        kind = "llama3" if args["factor"] is not None else "default"
    elif isinstance(kind_arg, ast.Name) and kind_arg.id in _DIRECTIVE_TYPES:
        kind = kind_arg.id
    else:
        ck.error(kind_arg.span, "unknown rope type", f"known: {', '.join(_DIRECTIVE_TYPES)} (dynamic NTK depends on "
                                                     "the sequence length: no kernel with one frequency table applies it)")
        return False
    values = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "attention_factor", "max_position"):
        if args[key] is not None:
            v = ck.build_time(args[key], scope, f"rope {key}", float)
            if v is None:
                return False
            values[key] = float(v)
    for key in ("short_factor", "long_factor"):
        e = args[key]
        if e is None:
            continue
        if not isinstance(e, ast.ListLit):
            ck.error(e.span, f"rope {key} must be a list of numbers, one per rotary pair")
            return False
        items = [ck.build_time(x, scope, f"rope {key}", float) for x in e.items]
        if None in items:
            return False
        values[key] = tuple(float(x) for x in items)
    if args["regime"] is not None:
        r = args["regime"]
        if not (isinstance(r, ast.Name) and r.id in ("short", "long")):
            ck.error(r.span, "longrope regime must be short or long")
            return False
        values["regime"] = r.id
    if kind_arg is None and kind == "llama3":
        values = {**_LLAMA3_DEFAULTS, **values}
        if values["factor"] == 1.0:   # factor 1 is the identity
            return None
    try:
        scaling = make_rope_scaling(kind, values)
        if not rope_is_static(scaling):   # the block's kernels carry one frequency table
            raise RopeParameterError("longrope rope frequencies depend on the sequence length; give "
                                     "regime = short (up to original_max_position) or long")
    except RopeParameterError as e:
        ck.error(span, str(e))
        return False
    return scaling
