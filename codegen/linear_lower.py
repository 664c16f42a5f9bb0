"""Lowering a layer with a matrix product to the small-token product family (codegen/gemv.py).

    pattern = match_linear(layer)              # LinearPattern, or LoweringError saying what does not fuse
    plan = plan_linear(layer, "sm_90", max_m=16)
    plan.key -> 'gemv_n6144_k4096_m16_bf16_rms_r1w4s4_sm90'

A layer lowers when its one output is, up to float casts,

    [r +]  act(y[..., :n/2]) * y[..., n/2:]   or   [r +] y,      y = norm(x) @ w.T [+ b]

with x [..., K], w [n, K] (torch.nn.Linear's layout; or an i8 weight dequantised by its row scales,
T(f32(q) * f32(unsqueeze(s, 1))) with q i8 [n, K] and s [n]: the quantised kernel's i8 layout), b [n]
and r (the output's shape) tensor inputs; norm(x) is x, or an RMSNorm of it, x * rsqrt(mean(x * x) + eps) times gamma [K] (or
1 + gamma, Gemma's), with eps a runtime scalar or a constant; act is silu, gelu or gelu_tanh
(swiglu / geglu / geglu_tanh over the product). The stdlib's `linear(x, w[, b])`, `rms_norm`,
`gemma_rms_norm`, `swiglu`, `geglu`, `geglu_tanh` and `res + ...` inline to exactly these shapes.

FP8 W8A8 with one scale a token (dsl/stdlib/quant.lf fp8_linear_per_token) is matched as written,
nothing fused around it and no cast looked through (each rounding of the activations' quantisation is
its meaning):

    T((f32(q) * (amax * (1.0 / 448.0))) @ (f32(wq) * unsqueeze(ws, 1)).T),
    q = f8e4m3(xf * where(amax > 0.0, 448.0 / amax, 0.0)),  amax = max(abs(xf), axis=-1),  xf = f32(x)

with wq f8e4m3 [n, K] and ws f32 [n] (LinearPattern xquant "token", wtype "f8e4m3"). It has no
small-token plan: codegen/gemv.py's e4m3 kernels quantise x by 1 x 128 blocks, another meaning, so
`plan` / `linear_plans` are LoweringErrors for it (a pack cannot hold it; its module runs runtime/quant.py's
fp8_linear_per_token: the Hopper FP8 GEMM with per-token scales, compiled at run time, or torch). A
layer that quantises its activations some other way, or an e4m3 weight without the activations
quantised (fp8_block_linear), is a LoweringError saying what lowers; such layers run the evaluator.

Float casts are looked through: the kernel keeps every intermediate in f32 and rounds once, at
the output, where the reference rounds after some steps too (the normed x, the product); the
difference is that rounding, within the tolerance the kernels are tested to. Anything else with
a product (a second product, an activation that is not gated, a scale, a product with the weight
not transposed) is a LoweringError naming the expression and its source position.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from dataclasses import dataclass

import sympy

from ..dsl.ir import Function, Node, Op, toposort, unary_name
from ..dsl.program import Layer, located
from ..dsl.types import DType, shape_str
from .gemv import GATED, GemvPlan, plan_gemv
from .row import LoweringError

__all__ = ["LinearPattern", "has_matmul", "match_linear", "plan_linear", "linear_plans"]

_DTYPES = (DType.bf16, DType.f16)


@dataclass(frozen=True, kw_only=True)
class LinearPattern:
    """What a layer's product and the math around it map to: the names of its tensor inputs
    (None: absent) and the kernel's switches."""
    x: str                       # [..., K]
    weight: str                  # [n, K]
    n: int                       # weight rows (gated: 2 x the output columns)
    k: int
    dtype: str                   # "bf16" | "f16"
    bias: str | None = None      # [n]
    residual: str | None = None  # the output's shape
    gated: str | None = None     # None | "silu" | "gelu" | "gelu_tanh"
    norm_weight: str | None = None   # gamma [K] of the RMSNorm of x in the prologue
    norm_offset: float = 0.0         # 1.0: x * (1 + gamma)
    eps: str | float | None = None   # the norm's eps: a runtime scalar's name or a constant
    wtype: str | None = None         # "i8": weight is i8 [n, K] with one scale a row, wscale [n] in dtype
    wscale: str | None = None        #   (W = T(f32(weight) * f32(unsqueeze(wscale, 1))): the kernel's layout), or
                                     #   [n, K / group];
                                     # "u4" / "i4": weight u4 / i4 [n, K] (packed two a byte), wscale [n, K / group]
    group: int = 0                   #   in dtype, wzero u4 [n, K / group] (u4 only): W = T((q - z) s) by group of
    wzero: str | None = None         #   K (i4: z = 0); the kernels' layouts are made from them at run time;
                                     # "f8e4m3" (only with xquant): weight e4m3 [n, K], wscale f32 [n] ("token"),
                                     #   or [n / 128, K / 128] with group 128 ("k128")
    xquant: str | None = None        # "token": x quantised to e4m3 in the layer, one scale a token (amax / 448);
                                     # "k128": one scale a token and 128 k (runtime/quant.py gemv_quant's W8A8)

    @property
    def kernel_wtype(self) -> str | None:
        """The quantised product's weight type: i4 runs as u4 (q + 8, zero point 8)."""
        return "u4" if self.wtype == "i4" else self.wtype

    def to_json(self) -> dict:
        """The pattern as a pack's manifest records it (LinearPattern(**d) reads it back); xquant only
        when set (a pack holds no W8A8 per-token product: its manifests are as before)."""
        d = dataclasses.asdict(self)
        if self.xquant is None:
            del d["xquant"]
        return d

    def plan(self, arch: str, max_m: int = 16) -> GemvPlan:
        if self.xquant == "k128":
            raise LoweringError(NO_BLOCK_PLAN)
        if self.xquant is not None:
            raise LoweringError(NO_TOKEN_PLAN)
        try:
            return plan_gemv(self.dtype, n=self.n, k=self.k, max_m=max_m, gated=self.gated, bias=self.bias is not None,
                             residual=self.residual is not None, norm="rms" if self.norm_weight else None,
                             norm_offset=self.norm_offset, arch=arch, wtype=self.kernel_wtype, group=self.group)
        except ValueError as e:
            raise LoweringError(str(e)) from None


def has_matmul(fn: Function) -> bool:
    return any(n.op is Op.MATMUL for n in fn.nodes())


@functools.lru_cache(maxsize=256)
def _match_cached(layer: Layer) -> LinearPattern:
    return _Matcher(layer.function).match()


def match_linear(layer: Layer) -> LinearPattern:
    """The layer's product and its fused prologue / epilogue; LoweringError when it has none or
    some part does not fit (the message names the expression and where it is)."""
    return _match_cached(layer)


def plan_linear(layer: Layer, arch: str, max_m: int = 16) -> GemvPlan:
    return match_linear(layer).plan(arch, max_m)


def linear_plans(layer: Layer, arch: str) -> list[GemvPlan]:
    """The kernels a module of the layer launches: one for up to 8 rows, one for 9 to 16
    (runtime/linear.py's KERNEL_MAX_ROWS). The W8A8 per-token product has none (NO_TOKEN_PLAN): a
    LoweringError, which a build records as the layer skipped."""
    pattern = match_linear(layer)
    return [pattern.plan(arch, 8), pattern.plan(arch, 16)]


NO_BLOCK_PLAN = ("the W8A8 product with 128 x 128 weight blocks has no small-token kernel a pack holds (a pack's module "
                 "takes torch's product of the dequantised W past 16 rows, which quantises no activations): a module of "
                 "the layer runs runtime/quant.py's gemv_quant (the small-token e4m3 kernel, the Hopper FP8 GEMM's "
                 "k128-blocks scaling; compiled at run time)")
NO_TOKEN_PLAN = ("the W8A8 product with one activation scale a token has no small-token kernel (codegen/gemv.py's "
                 "e4m3 kernels quantise x by 1 x 128 blocks, another meaning), so no plan a pack holds: a module of "
                 "the layer runs runtime/quant.py's fp8_linear_per_token (the Hopper FP8 GEMM with per-token "
                 "scales, compiled at run time, on sm_90; torch elsewhere)")


# ---- the matcher ------------------------------------------------------------------------------

def _peel(n: Node) -> Node:
    """Look through float-to-float casts (the kernel keeps f32 and rounds once)."""
    while n.op is Op.CAST and n.dtype.is_float and n.src[0].dtype.is_float:
        n = n.src[0]
    return n


def _terms(n: Node, op: str) -> list[Node]:
    """The operands of a chain of one binary operator (a + b + c -> [a, b, c]), casts peeled."""
    n = _peel(n)
    if n.op is Op.BINARY and n.arg == op:
        return _terms(n.src[0], op) + _terms(n.src[1], op)
    return [n]


def _describe(n: Node) -> str:
    if n.op is Op.UNARY:
        return f"{unary_name(n)}(...)"
    if n.op is Op.BINARY:
        return {"add": "a sum", "sub": "a difference", "mul": "a product", "div": "a quotient"}.get(
            n.arg, f"'{n.arg}'")
    return {Op.MATMUL: "a matrix product", Op.INPUT: f"input '{n.arg}'", Op.SCALAR: f"scalar '{n.arg}'",
            Op.CONST: f"the constant {n.arg}"}.get(n.op, f"a {n.op.value}")


def _at(term: Node, total: Node) -> Node:
    """Where to report a term of a sum: a leaf's own span is its declaration, so the sum's."""
    return _peel(total) if term.op in (Op.INPUT, Op.SCALAR, Op.CONST) else term


def _static(d) -> int | None:
    d = sympy.sympify(d)
    return int(d) if d.is_Integer else None


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(sympy.simplify(sympy.sympify(x) - sympy.sympify(y)) == 0 for x, y in zip(a, b))


class _Matcher:
    EPILOGUE = ("the small-token product fuses an RMSNorm of its input, + a bias [n], a gated activation "
                "(swiglu / geglu / geglu_tanh over the product) and + a residual of the output's shape")

    def __init__(self, fn: Function):
        self.fn = fn

    def fail(self, n: Node | None, what: str):
        span = n.span if n is not None and n.span.line > 0 else self.fn.span
        raise LoweringError(f"{self.fn.name}: {_format(span, what)}")

    def match(self) -> LinearPattern:
        fn = self.fn
        products = [n for n in fn.nodes() if n.op is Op.MATMUL]
        if not products:
            self.fail(None, "no matrix product (a row kernel's layer)")
        if len(products) > 1:
            self.fail(products[1], f"{len(products)} matrix products; the small-token product kernel fuses one "
                                   "(write each product as a layer of its own)")
        if len(fn.outputs) != 1:
            self.fail(fn.outputs[1], "a product layer has one output")
        (out,) = fn.outputs
        if out.dtype not in _DTYPES:
            self.fail(None, f"the small-token product kernel takes bf16 or f16, not {out.dtype}")
        product = products[0]
        core, extras = self._split_sum(out)
        outer_sum = _peel(out)
        residual = bias = None
        gate = self._gate(core)
        if gate is not None:
            act, y = gate
            core, inner = self._split_sum(y)
            for t in inner:
                bias = self._bias(t, product, bias, y)
        else:
            act = None
        if _peel(core) is not product:
            self.fail(_peel(core), f"{_describe(_peel(core))} around the product cannot be fused: "
                                   + self.EPILOGUE)
        n_rows = _static(product.shape[-1])
        for t in extras:
            if t.op is Op.INPUT and _same_shape(t.shape, out.shape) and residual is None:
                residual = t
            elif gate is None and t.op is Op.INPUT and len(t.shape) == 1 and bias is None:
                bias = self._bias(t, product, bias, outer_sum)
            else:
                self.fail(_at(t, outer_sum), f"+ {_describe(t)} cannot be fused: " + self.EPILOGUE)
        lhs = _peel(product.src[0])
        if any(m.op is Op.CAST and m.dtype.is_storage for m in toposort([lhs])):   # x quantised in the layer
            fused = [what for what, t in (("a gated activation", act), ("a bias", bias), ("a residual", residual))
                     if t is not None]
            if fused or _peel(out) is not product or out.op is not Op.CAST or out.src[0] is not product:
                self.fail(_peel(out), f"the W8A8 product with one scale a token lowers alone, T(its product) with "
                                      f"nothing fused around it ({', '.join(fused) or 'a cast'} here): " + self.TOKEN)
            if lhs.op is Op.RESHAPE:   # x quantised by blocks of 128 along K (DeepSeek-V3's W8A8)
                return self._blocks(lhs, product, out)
            return self._token(lhs, product, out)
        x, gamma, offset, eps = self._prologue(lhs)
        w, ws, wz, group = self._weight(_peel(product.src[1]), product)
        k, n = _static(w.shape[1]), _static(w.shape[0])
        if k is None or n is None or n != n_rows:
            self.fail(w, f"the weight '{w.arg}' must have a static shape [out, in]")
        for t in (x, w if ws is None else ws, bias, residual, gamma):
            if t is not None and t.dtype != out.dtype:
                self.fail(t, f"input '{t.arg}' is {t.dtype}; the kernel takes every tensor in the output's "
                             f"dtype, {out.dtype}" + (" (a quantised weight's scales too)" if t is ws else ""))
        return LinearPattern(x=x.arg, weight=w.arg, n=n, k=k, dtype=str(out.dtype),
                             bias=None if bias is None else bias.arg, residual=None if residual is None else residual.arg,
                             gated=act, norm_weight=None if gamma is None else gamma.arg, norm_offset=offset, eps=eps,
                             wtype=None if ws is None else str(w.dtype), wscale=None if ws is None else ws.arg,
                             group=group, wzero=None if wz is None else wz.arg)

    def _split_sum(self, n: Node) -> tuple[Node, list[Node]]:
        """A sum's term that holds the product, and the other terms."""
        terms = _terms(n, "add")
        holding = [t for t in terms if any(m.op is Op.MATMUL for m in toposort([t]))]
        if len(holding) != 1:   # one product (checked): only a sub-expression of a term can hold it
            self.fail(n, "the product must be one term of the output's sum")
        return holding[0], [t for t in terms if t is not holding[0]]

    def _bias(self, t: Node, product: Node, bias: Node | None, total: Node) -> Node:
        if bias is not None or t.op is not Op.INPUT or len(t.shape) != 1 \
                or not _same_shape(t.shape, product.shape[-1:]):
            self.fail(_at(t, total), f"+ {_describe(t)} before the activation cannot be fused: the product's bias is one "
                         f"input of shape [{product.shape[-1]}]")
        return t

    def _gate(self, n: Node) -> tuple[str, Node] | None:
        """act(y[..., :h]) * y[..., h:] -> (act, y); None when `n` is no product of two factors."""
        n = _peel(n)
        factors = _terms(n, "mul")
        if n.op is not Op.BINARY or n.arg != "mul":
            return None
        acts = [f for f in factors if f.op is Op.UNARY and unary_name(f) in GATED]
        if len(factors) != 2 or len(acts) != 1:
            self.fail(n, "a multiplication after the matrix product fuses only as a gated activation, "
                         "act(gate) * up over the product's two halves (swiglu, geglu, geglu_tanh)")
        act = acts[0]
        gate, up = _peel(act.src[0]), next(f for f in factors if f is not act)
        if gate.op is not Op.SLICE or up.op is not Op.SLICE or _peel(gate.src[0]) is not _peel(up.src[0]):
            self.fail(n, f"{unary_name(act)}(gate) * up fuses when gate and up are the two halves of the product "
                         "(gate, up = split(y, 2))")
        y = _peel(gate.src[0])
        width = y.shape[-1]
        last = len(y.shape) - 1
        if gate.arg != (last, 0, width / 2, 1) or up.arg != (last, width / 2, width, 1):
            self.fail(n, "the gate must be the first half of the product's last axis and up the second")
        return unary_name(act), y

    def _weight(self, b: Node, product: Node) -> tuple[Node, Node | None, Node | None, int]:
        """(weight, scales, zero points, group): w; or the dequantisation T(f32(q) * f32(unsqueeze(s, 1)))
        of an i8 q [out, in] by s [out] (the kernel's i8 layout); or a grouped one of a 4-bit q (_group).
        An fp8 weight here (x not quantised) is an error: only the W8A8 form lowers it."""
        fp8 = [m for m in toposort([b]) if m.op is Op.INPUT and m.dtype in (DType.f8e4m3, DType.f8e5m2)]
        if fp8:
            self.fail(fp8[0], self.FP8_WEIGHT_ONLY.format(q=fp8[0].arg, t=fp8[0].dtype))
        w = _peel(b.src[0]) if b.op is Op.TRANSPOSE else None
        if w is not None and w.op is Op.BINARY and w.arg == "mul":
            return (*self._dequant(w), None, 0)
        if w is not None and w.op is Op.RESHAPE and _peel(w.src[0]).op is Op.BINARY:
            return self._group(w)
        if w is None or w.op is not Op.INPUT or len(w.shape) != 2:
            self.fail(product, "the product's right operand must be a weight's transpose, w.T with w [out, in] as "
                         "torch.nn.Linear stores it (linear(x, w) writes it)")
        return w, None, None, 0

    GROUPED = ("a weight with scales by group of K lowers as reshape((f32(reshape(q, O, I / G, G)) - "
               "f32(unsqueeze(z, 2))) * f32(unsqueeze(s, 2)), O, I) (u4 q, zero points z [O, I / G], scales s "
               "[O, I / G]) or without the zero points (i4 or i8 q): dsl/stdlib/quant.lf u4_linear / i4_linear / "
               "int8_group_linear")

    def _group(self, r: Node) -> tuple[Node, Node, Node | None, int]:
        """reshape(W3, O, I) of W3 [O, I / G, G] = (f32(reshape(q)) [- f32(unsqueeze(z, 2))]) * f32(unsqueeze(s, 2)):
        (q, s, z or None, G) for a u4 q with zero points, or an i4 q without."""
        m = _peel(r.src[0])
        factors = _terms(m, "mul")
        if len(m.shape) != 3 or len(r.shape) != 2 or len(factors) != 2:
            self.fail(r, self.GROUPED)
        o, i = r.shape
        group = _static(m.shape[2])

        def unsq(f, want):   # f32(unsqueeze(t, 2)) of an input t [O, I / G] of dtype `want` (None: a float)
            f = f.src[0] if f.op is Op.CAST else f
            t = f.src[0] if f.op is Op.RESHAPE else None
            if t is None or t.op is not Op.INPUT or not _same_shape(t.shape, m.shape[:2]) \
                    or not _same_shape(f.shape, (*m.shape[:2], 1)) or (want is not None and t.dtype is not want) \
                    or (want is None and not t.dtype.is_float):
                return None
            return t

        def values(f):   # f32(reshape(q, O, I / G, G)) of a 4-bit or i8 input q [O, I]
            f = f.src[0] if f.op is Op.CAST else None
            q = f.src[0] if f is not None and f.op is Op.RESHAPE else None
            if q is None or q.op is not Op.INPUT or q.dtype not in (DType.u4, DType.i4, DType.i8) \
                    or not _same_shape(q.shape, (o, i)):
                return None
            return q

        scales = [(f, unsq(f, None)) for f in factors]
        found = [(f, t) for f, t in scales if t is not None]
        if len(found) != 1 or group is None:
            self.fail(m, self.GROUPED)
        s = found[0][1]
        other = _peel(next(f for f in factors if f is not found[0][0]))
        if other.op is Op.BINARY and other.arg == "sub":
            q, z = values(other.src[0]), unsq(other.src[1], DType.u4)
            if q is None or z is None or q.dtype is not DType.u4:
                self.fail(other, self.GROUPED)
        else:
            q, z = values(other), None
            if q is None or q.dtype not in (DType.i4, DType.i8):
                self.fail(other, self.GROUPED)
        return q, s, z, group

    def _dequant(self, m: Node) -> tuple[Node, Node]:
        factors = _terms(m, "mul")
        qs = [f for f in factors if f.op is Op.CAST and f.src[0].op is Op.INPUT and f.src[0].dtype.is_storage]
        rest = [_peel(f) for f in factors if not any(f is g for g in qs)]
        if len(factors) != 2 or len(qs) != 1 or len(rest) != 1:
            self.fail(m, "a quantised weight lowers as f32(q) * f32(unsqueeze(s, 1)): an 8-bit weight q [out, in] "
                         "times one scale s [out] per row")
        q, sc = qs[0].src[0], rest[0]
        s = _row_scales(sc, q)
        if s is None:
            self.fail(sc, f"the scales of '{q.arg}' lower as one per row: unsqueeze(s, 1) of an input s "
                          f"[{q.shape[0]}] (groups along K and 128 x 128 blocks run the reference evaluator)")
        if q.dtype is not DType.i8:
            self.fail(q, f"an {q.dtype} weight lowers only in the W8A8 products (the activations quantised too), "
                         "which the DSL's lowering does not match yet: this layer runs the reference evaluator")
        return q, s

    FP8_WEIGHT_ONLY = ("input '{q}' is {t}: an fp8 weight lowers only in the W8A8 products, with the "
                       "activations quantised to e4m3 in the layer, one scale a token, as dsl/stdlib/quant.lf "
                       "fp8_linear_per_token writes it; a weight-only fp8 layer (fp8_block_linear's 128 x 128 blocks) "
                       "runs the reference evaluator")
    TOKEN = ("W8A8 with one scale a token lowers as T((f32(q) * (amax * (1.0 / 448.0))) @ (f32(wq) * "
             "unsqueeze(ws, 1)).T) with q = f8e4m3(xf * where(amax > 0.0, 448.0 / amax, 0.0)), amax = "
             "max(abs(xf), axis=-1), xf = f32(x), x a tensor input [..., I], wq f8e4m3 [O, I] and ws f32 [O] "
             "(dsl/stdlib/quant.lf fp8_linear_per_token); other scalings run the reference evaluator")

    BLOCKS = ("W8A8 with 128 x 128 weight blocks lowers as T(xd @ reshape(w, O, I).T) with xd = reshape(f32(q) * "
              "(amax * (1.0 / 448.0)), N, I), q = f8e4m3(xg * where(amax > 0.0, 448.0 / amax, 0.0)), amax = "
              "max(abs(xg), axis=-1), xg = reshape(f32(x), N, I / G, G) and w = reshape(f32(wq), O / G, G, I / G, G) * "
              "reshape(ws, O / G, 1, I / G, 1), G = 128, x a tensor input [N, I], wq f8e4m3 [O, I], ws f32 "
              "[O / G, I / G] (dsl/stdlib/quant.lf fp8_block_w8a8_linear); other scalings run the reference evaluator")

    def _blocks(self, r: Node, product: Node, out: Node) -> LinearPattern:
        """The W8A8 product with x quantised by 1 x 128 blocks and W by 128 x 128 blocks (the BLOCKS form,
        exactly) -> its LinearPattern (runtime/quant.py gemv_quant's meaning of a block-scaled e4m3 W)."""
        a = r.src[0]
        if len(a.shape) != 3 or _static(a.shape[-1]) != 128 or len(r.shape) != 2:
            self.fail(r, "x's dequantised blocks [N, I / 128, 128] reshape back to [N, I]; blocks of 128 (the kernels' "
                         "k groups): " + self.BLOCKS)
        x = self._dequantised_x(a, self.BLOCKS, grouped=True)
        if not _same_shape(r.shape, x.shape):
            self.fail(r, f"the dequantised x must have x's shape {shape_str(x.shape)}: " + self.BLOCKS)
        q_w, ws = self._fp8_block_weight(_peel(product.src[1]), product)
        k, n = _static(q_w.shape[1]), _static(q_w.shape[0])
        if k is None or n is None or n != _static(product.shape[-1]) or k % 128:
            self.fail(q_w, f"the weight '{q_w.arg}' must have a static shape [out, in], in a multiple of 128")
        if x.dtype != out.dtype:
            self.fail(x, f"input '{x.arg}' is {x.dtype}; the W8A8 product takes x in the output's dtype, {out.dtype}")
        return LinearPattern(x=x.arg, weight=q_w.arg, n=n, k=k, dtype=str(out.dtype), wtype="f8e4m3", wscale=ws.arg,
                             group=128, xquant="k128")

    def _fp8_block_weight(self, b: Node, product: Node) -> tuple[Node, Node]:
        """(wq, ws) of reshape(reshape(f32(wq), O / G, G, I / G, G) * reshape(ws, O / G, 1, I / G, 1), O, I).T."""
        t = b.src[0] if b.op is Op.TRANSPOSE else None
        d = t.src[0] if t is not None and t.op is Op.RESHAPE else None
        if d is None or d.op is not Op.BINARY or d.arg != "mul" or d.dtype is not DType.f32 or len(d.shape) != 4:
            self.fail(product if d is None else d, "W8A8's block-scaled weight: " + self.BLOCKS)
        wr = next((f for f in d.src if f.op is Op.RESHAPE and f.src[0].op is Op.CAST), None)
        sr = next((f for f in d.src if f.op is Op.RESHAPE and f.src[0].op is Op.INPUT), None)
        q = None if wr is None else wr.src[0].src[0]
        if wr is None or sr is None or q.op is not Op.INPUT or q.dtype is not DType.f8e4m3 \
                or wr.src[0].dtype is not DType.f32 or len(q.shape) != 2:
            self.fail(d, "W8A8's block-scaled weight: " + self.BLOCKS)
        o, i = q.shape
        if not (_same_shape(wr.shape, (o / 128, 128, i / 128, 128)) and _same_shape(sr.shape, (o / 128, 1, i / 128, 1))
                and _same_shape(t.shape, (o, i))):
            self.fail(d, "the weight's blocks must be 128 x 128 (the FP8 kernels' blocks): " + self.BLOCKS)
        ws = sr.src[0]
        if ws.dtype is not DType.f32 or not _same_shape(ws.shape, (o / 128, i / 128)):
            self.fail(ws, f"input '{ws.arg}' must be f32 [{o / 128}, {i / 128}], one scale a 128 x 128 block: "
                          + self.BLOCKS)
        return q, ws

    def _token(self, a: Node, product: Node, out: Node) -> LinearPattern:
        """The W8A8 product with x quantised per token (the TOKEN form, exactly: each cast and constant is
        part of its rounding) -> its LinearPattern; a positioned error naming the part that differs."""
        x = self._dequantised_x(a, self.TOKEN, grouped=False)
        if product.dtype is not DType.f32:
            self.fail(a, "the product is in f32: " + self.TOKEN)
        q_w, ws = self._fp8_weight(_peel(product.src[1]), product)
        k, n = _static(q_w.shape[1]), _static(q_w.shape[0])
        if k is None or n is None or n != _static(product.shape[-1]):
            self.fail(q_w, f"the weight '{q_w.arg}' must have a static shape [out, in]")
        if x.dtype != out.dtype:
            self.fail(x, f"input '{x.arg}' is {x.dtype}; the W8A8 product takes x in the output's dtype, "
                         f"{out.dtype}")
        return LinearPattern(x=x.arg, weight=q_w.arg, n=n, k=k, dtype=str(out.dtype), wtype="f8e4m3", wscale=ws.arg,
                             xquant="token")

    def _dequantised_x(self, a: Node, form: str, grouped: bool) -> Node:
        """x of the dequantised activations f32(q) * (amax * (1.0 / 448.0)), q = f8e4m3(xq * where(amax > 0.0,
        448.0 / amax, 0.0)), amax = max(abs(xq), axis=-1), with xq = f32(x) (grouped: reshape(f32(x), N, I / 128,
        128)); a positioned error naming the part that differs from `form`."""
        TOKEN = form

        def const(n: Node, value: float, what: str) -> None:
            if n.op is not Op.CONST or _f32(n.arg) != _f32(value):
                self.fail(n, f"{what} must be the constant {value!r}: " + TOKEN)

        def other(n: Node, first: Node) -> Node:
            return n.src[1] if n.src[0] is first else n.src[0]

        if a.op is not Op.BINARY or a.arg != "mul" or a.dtype is not DType.f32:
            self.fail(a, "the product's left operand must be the f32 dequantised x, f32(q) * (amax * (1.0 / 448.0)): "
                         + TOKEN)
        fq = next((f for f in a.src if f.op is Op.CAST and f.src[0].op is Op.CAST and f.src[0].dtype.is_storage),
                  None)
        if fq is None or fq.dtype is not DType.f32:
            self.fail(a, "the dequantised x is f32(q) times its token's scale: " + TOKEN)
        q = fq.src[0]
        if q.dtype is not DType.f8e4m3:
            self.fail(q, f"x quantises to f8e4m3 (the FP8 GEMM's e4m3), not {q.dtype}: " + TOKEN)
        m = q.src[0]
        if m.op is not Op.BINARY or m.arg != "mul" or m.dtype is not DType.f32:
            self.fail(m, "x quantises as f8e4m3(xf * where(amax > 0.0, 448.0 / amax, 0.0)): " + TOKEN)
        wh = next((f for f in m.src if f.op is Op.WHERE), None)
        xq = None if wh is None else other(m, wh)   # f32(x), or (grouped) reshape(f32(x), N, I / 128, 128)
        xf = xq.src[0] if grouped and xq is not None and xq.op is Op.RESHAPE else None if grouped else xq
        if wh is None or xf is None or xf.op is not Op.CAST or xf.dtype is not DType.f32 or xf.src[0].op is not Op.INPUT:
            self.fail(m, "x quantises as f8e4m3(xf * where(amax > 0.0, 448.0 / amax, 0.0)) with xf = "
                         + ("reshape(f32(x), N, I / 128, 128)" if grouped else "f32(x)") + ", x a tensor input: " + TOKEN)
        x = xf.src[0]
        if grouped and not _same_shape(xq.shape, (*x.shape[:-1], x.shape[-1] / 128, 128)):
            self.fail(xq, f"x's blocks are reshape(f32(x), N, I / 128, 128), not {shape_str(xq.shape)}: " + TOKEN)
        cond, inv, zero = wh.src
        if cond.op is not Op.BINARY or cond.arg != "gt" or inv.op is not Op.BINARY or inv.arg != "div" \
                or inv.dtype is not DType.f32:
            self.fail(wh, "a token's inverse scale is where(amax > 0.0, 448.0 / amax, 0.0) (zeros quantise to "
                          "zeros): " + TOKEN)
        self._amax(cond.src[0], x, xq)
        const(cond.src[1], 0.0, "amax's threshold")
        const(inv.src[0], 448.0, "the e4m3 range a token's largest |x| maps to")
        self._amax(inv.src[1], x, xq)
        const(zero, 0.0, "a token of zeros' inverse scale")
        scale = other(a, fq)
        amax = next((f for f in scale.src if f.op is Op.REDUCE), None) if scale.op is Op.BINARY else None
        if amax is None or scale.arg != "mul" or scale.dtype is not DType.f32:
            self.fail(scale, "a token's scale is amax * (1.0 / 448.0): " + TOKEN)
        self._amax(amax, x, xq)
        const(other(scale, amax), 1.0 / 448.0, "the scale's factor")
        return x

    def _amax(self, r: Node, x: Node, xq: Node) -> None:
        """r is max(abs(xq), axis=-1): a token's (or its block's) largest |x| (keepdim, as max keeps it by
        default), xq the f32 x quantised (f32(x), or its blocks)."""
        form = self.TOKEN if xq.op is Op.CAST else self.BLOCKS
        if r.op is not Op.REDUCE or r.arg.fn != "max" or r.dtype is not DType.f32:
            self.fail(r, "amax is max(abs(xf), axis=-1): " + form)
        if r.arg.axis != xq.rank - 1 or not r.arg.keepdim:
            self.fail(r, "amax is over the last axis, max(abs(xf), axis=-1) (one scale a token or block; other axes "
                         "are other scalings): " + form)
        a = r.src[0]
        if not (a.op is Op.UNARY and unary_name(a) == "abs" and a.src[0] is xq):
            self.fail(r, f"amax is max(abs(xf), axis=-1) of xf = f32({x.arg}), the x quantised: " + form)

    def _fp8_weight(self, b: Node, product: Node) -> tuple[Node, Node]:
        """(wq, ws) of the W8A8 weight (f32(wq) * unsqueeze(ws, 1)).T, wq f8e4m3 [O, I], ws f32 [O]."""
        form = ("W8A8's weight lowers as (f32(wq) * unsqueeze(ws, 1)).T: an f8e4m3 wq [O, I] times one f32 scale "
                "ws [O] a row (an fp8 checkpoint's per-channel weight_scale; 128 x 128 blocks and other scales run "
                "the reference evaluator)")
        d = b.src[0] if b.op is Op.TRANSPOSE else None
        if d is None or d.op is not Op.BINARY or d.arg != "mul" or d.dtype is not DType.f32:
            self.fail(product if d is None else d, form)
        fq = next((f for f in d.src if f.op is Op.CAST and f.src[0].op is Op.INPUT), None)
        q = None if fq is None else fq.src[0]
        if q is None or q.dtype is not DType.f8e4m3 or fq.dtype is not DType.f32 or len(q.shape) != 2:
            self.fail(d, form)
        sc = _peel(d.src[1] if d.src[0] is fq else d.src[0])
        s = _row_scales(sc, q, casts=False)
        if s is None:
            self.fail(sc, f"the scales of '{q.arg}' lower as one a row, unsqueeze(ws, 1) of an f32 input ws "
                          f"[{q.shape[0]}]: " + form)
        if s.dtype is not DType.f32:
            self.fail(s, f"input '{s.arg}' is {s.dtype}; W8A8's weight scales are f32 [{q.shape[0]}]: " + form)
        return q, s

    def _prologue(self, a: Node):
        """x, or an RMSNorm of x -> (x, gamma, offset, eps)."""
        if a.op is Op.INPUT:
            return a, None, 0.0, None
        factors = _terms(a, "mul")
        xs = [f for f in factors if f.op is Op.INPUT and _same_shape(f.shape, a.shape)]
        rstd = [f for f in factors if f.op is Op.UNARY and unary_name(f) == "rsqrt"]
        rest = [f for f in factors if not any(f is g for g in xs + rstd)]
        if len(xs) != 1 or len(rstd) != 1 or len(rest) != 1:
            self.fail(a, f"{_describe(a)} before the product cannot be fused: the product's input is a tensor "
                         "input x or its RMSNorm, x * rsqrt(mean(x * x) + eps) * gamma (or * (1 + gamma))")
        x = xs[0]
        eps = self._rstd_eps(rstd[0], x)
        gamma, offset = self._gamma(rest[0], x)
        return x, gamma, offset, eps

    def _rstd_eps(self, r: Node, x: Node):
        s = _peel(r.src[0])
        terms = _terms(s, "add")
        means = [t for t in terms if t.op is Op.REDUCE and t.arg.fn == "mean" and t.arg.axis == x.rank - 1]
        eps = [t for t in terms if t.op in (Op.SCALAR, Op.CONST) and t.shape == ()]
        if len(terms) != 2 or len(means) != 1 or len(eps) != 1:
            self.fail(r, "an RMSNorm's scale is rsqrt(mean(x * x, axis=-1) + eps)")
        sq = _terms(means[0].src[0], "mul")
        if len(sq) != 2 or not all(t is x for t in sq):
            self.fail(means[0], f"an RMSNorm's statistic is the mean of x * x, with x the input '{x.arg}'")
        e = eps[0]
        return e.arg if e.op is Op.SCALAR else float(e.arg)

    def _gamma(self, g: Node, x: Node) -> tuple[Node, float]:
        k = x.shape[-1:]
        if g.op is Op.INPUT and _same_shape(g.shape, k):
            return g, 0.0
        terms = _terms(g, "add")
        ones = [t for t in terms if t.op is Op.CONST and float(t.arg) == 1.0]
        ws = [t for t in terms if t.op is Op.INPUT and _same_shape(t.shape, k)]
        if len(terms) == 2 and len(ones) == 1 and len(ws) == 1:
            return ws[0], 1.0
        self.fail(g, f"an RMSNorm's weight is an input gamma [{x.shape[-1]}] or 1 + gamma")


def _row_scales(sc: Node, q: Node, casts: bool = True) -> Node | None:
    """s where sc is unsqueeze(s, 1) of an input s [out] of q [out, in]'s rows (a scale a row), else None;
    casts: float casts of s looked through (the W8A8 form takes none: each rounding is its meaning)."""
    s = (_peel(sc.src[0]) if casts else sc.src[0]) if sc.op is Op.RESHAPE else None
    if s is None or s.op is not Op.INPUT or len(s.shape) != 1 or len(q.shape) != 2 \
            or not _same_shape(s.shape, q.shape[:1]) or not _same_shape(sc.shape, (q.shape[0], 1)):
        return None
    return s


def _f32(v) -> float:
    """v rounded to f32, as the layer's f32 constants are."""
    return struct.unpack("f", struct.pack("f", float(v)))[0]


_format = located   # dsl/program.py: the source line and a caret
