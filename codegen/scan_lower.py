"""Lowering a layer with a scan, a causal convolution or state to the scan family (codegen/scan.py).

    pattern = match_scan(layer)              # ScanPattern, or LoweringError saying what differs
    pattern.kind -> 'selective_scan'; pattern.plans("sm_90") -> the kernels a module launches
    scan_plans(layer, "sm_90")               # the same, from the layer

A specialised layer lowers when its IR is, up to float casts, unit-axis reshapes (unsqueeze,
reshape(y, B, F)), the order of the operands of + and *, names, dims and dtypes, one of Mamba's
four computations, as dsl/stdlib/ssm.lf writes them (F channels, K taps, N states; B and S at
run time; [...] optional):

  conv            y, s' = conv1d_causal(x [B, F, S], w [F, K], axis=-1[, state=s [B, F, K-1]])
                  out = [silu](y [+ b [F] along F])                         s <- s' (when s is a state)
  conv_step       the same with x [B, F] as one step (unsqueeze(x, -1)), y read back as [B, F]
  selective_scan  dt = [softplus](delta [+ dt_bias [F]]),  dA = exp(dt A [F, N]),  dBu = dt u Bm^T
                  (c, hs) = scan(combine, dA, dBu, axis=S) with combine (a1 a2, a2 b1 + b2)
                  hs [+ c h], y = sum(hs Cm^T, N) [+ u Dskip [F]] [* silu(z)]   h <- the last step of hs
  state_update    h' = exp(dt A) h + dt x Bm,  y = sum(h' Cm, N) [+ x Dskip] [* silu(z)],  h <- h'

softplus is where(v > 20, v, log(1 + exp(v))): torch's threshold, the one the kernels hard-code
(another threshold is a LoweringError). What the kernels compute differs from the DSL's
reference only in rounding: every intermediate stays f32 and rounds once at the output, where
the reference rounds T-typed intermediates (a conv's y before its bias and SiLU); the SSM state
is f32 in both. A cast that narrows an operand (T(w) of an f32 filter, which the DSL's
conv1d_causal asks for) is looked through too: the kernel reads the operand as stored, unrounded,
and the plan records its dtype (weight_dtype="f32"). The decode conv keeps its state K - 1
wide as the layer declares it: the module runs the kernel (whose state is K wide, the oldest
column shifted out) on a copy one column wider and writes the last K - 1 columns back
(runtime/layers.py). The selective scan's plans are one per chunk tiling (runtime/scan.py
picks the tiling by the sequence's length; a pack holds them all).

Anything else (another gate, an extra term, A computed in the layer, a scan whose combine is not
the linear recurrence, a second output) is a LoweringError naming the expression and its source
position (dsl.program.located), as codegen/linear_lower.py reports products.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from ..dsl.ir import Function, Node, Op, unary_name
from ..dsl.program import Layer, located
from .plan import KernelPlan
from .row import LoweringError
from .scan import (DTYPES, SCAN_ITEMS, SCAN_THREADS, WIDTHS, plan_conv, plan_conv_update, plan_selective_scan,
                   plan_state_update, scan_tiles, scan_tilings)

__all__ = ["ScanPattern", "KINDS", "has_scan", "match_scan", "scan_plans", "SOFTPLUS_THRESHOLD"]

KINDS = ("conv", "conv_step", "selective_scan", "state_update")
SOFTPLUS_THRESHOLD = 20.0   # the kernels' (codegen/scan.py renders softplus_threshold=20.0)


@dataclass(frozen=True, kw_only=True)
class ScanPattern:
    """What a layer maps to: its kind, the DSL names of the kernel's operands by role (x, weight,
    bias, state for the convs; u, delta, A, B, C, D, z, delta_bias, state for the scans), and the
    plan's sizes and switches read from the layer."""
    kind: str                              # one of KINDS
    operands: tuple[tuple[str, str], ...]  # (role, DSL name), present roles only
    channels: int                          # F
    dtype: str                             # the inputs' and the output's
    width: int | None = None               # K (convs)
    state: int | None = None               # N (scans)
    weight_dtype: str | None = None        # convs: w's dtype
    bias: str | None = None                # convs: b's dtype (None: no bias)
    silu: bool = False                     # convs: SiLU after
    state_dtype: str | None = None         # conv_step: its state's dtype
    a_dtype: str | None = None             # scans
    d_dtype: str | None = None             # scans: Dskip's dtype (None: no skip)
    bias_dtype: str | None = None          # scans: the Δ bias's dtype (None: no bias)
    gate: bool = False                     # scans: * silu(z)
    softplus: bool = False                 # scans: Δ through softplus
    initial: bool = False                  # conv / selective_scan: read the carried state
    final: bool = False                    # conv / selective_scan: write it back

    def name(self, role: str) -> str | None:
        return dict(self.operands).get(role)

    def plan(self, arch: str, length: int | None = None) -> KernelPlan:
        """The plan runtime/scan.py launches for this layer; `length` (the sequence's, for the
        selective scan) picks its chunk tiling as the runtime does (scan_tiles)."""
        try:
            if self.kind == "conv":
                return plan_conv(channels=self.channels, width=self.width, dtype=self.dtype,
                                 weight_dtype=self.weight_dtype, bias=self.bias, silu=self.silu,
                                 initial=self.initial, final=self.final, arch=arch)
            if self.kind == "conv_step":
                return plan_conv_update(channels=self.channels, width=self.width, dtype=self.dtype,
                                        state_dtype=self.state_dtype, weight_dtype=self.weight_dtype, bias=self.bias,
                                        silu=self.silu, arch=arch)
            opts = dict(channels=self.channels, state=self.state, dtype=self.dtype, a_dtype=self.a_dtype,
                        d_dtype=self.d_dtype, bias_dtype=self.bias_dtype, gate=self.gate, softplus=self.softplus,
                        arch=arch)
            if self.kind == "state_update":
                return plan_state_update(**opts)
            threads, items = scan_tiles(length) if length is not None else (SCAN_THREADS, SCAN_ITEMS)
            return plan_selective_scan(**opts, initial=self.initial, final=self.final, threads=threads, items=items)
        except ValueError as e:
            raise LoweringError(str(e)) from None

    def plans(self, arch: str) -> list[KernelPlan]:
        """Every kernel a module of the layer may launch: one, or for the selective scan one per
        chunk tiling runtime/scan.py picks by the sequence's length (1 .. SCAN_ITEMS items a thread)."""
        if self.kind != "selective_scan":
            return [self.plan(arch)]
        return [self.plan(arch, length=threads * items) for threads, items in scan_tilings()]


def has_scan(fn: Function) -> bool:
    """Whether a function has a scan, a causal convolution or a state parameter: the layers only
    this family can serve (a row kernel would never write a state back)."""
    return any(p.kind == "state" for p in fn.params) or any(n.op in (Op.SCAN, Op.CONV1D) for n in fn.nodes())


@functools.lru_cache(maxsize=256)
def _match_cached(layer: Layer) -> ScanPattern:
    return _Matcher(layer.function).match()


def match_scan(layer: Layer) -> ScanPattern:
    """The scan-family computation the layer is; LoweringError naming what differs (and where)."""
    return _match_cached(layer)


def scan_plans(layer: Layer, arch: str) -> list[KernelPlan]:
    return match_scan(layer).plans(arch)


# ---- helpers over the IR ------------------------------------------------------------------------

def _is_one(d) -> bool:
    return sympy.sympify(d) == 1


def _eq(a, b) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _nonunit(shape) -> tuple:
    return tuple(d for d in shape if not _is_one(d))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _static(d) -> int | None:
    d = sympy.sympify(d)
    return int(d) if d.is_Integer else None


def _peel(n: Node) -> Node:
    """Look through float-to-float casts and reshapes that only add or drop unit axes (the order
    of the elements stays: unsqueeze, reshape(y, B, F))."""
    while True:
        if n.op is Op.CAST and n.dtype.is_float and n.src[0].dtype.is_float:
            n = n.src[0]
        elif n.op is Op.RESHAPE and _same(_nonunit(n.shape), _nonunit(n.src[0].shape)):
            n = n.src[0]
        else:
            return n


def _cast(n: Node) -> Node:
    while n.op is Op.CAST and n.dtype.is_float and n.src[0].dtype.is_float:
        n = n.src[0]
    return n


def _terms(n: Node, op: str) -> list[Node]:
    """The operands of a chain of one binary operator at one shape, casts peeled (a * b * c ->
    [a, b, c]); a reshape ends the chain (its operand broadcasts differently)."""
    p = _cast(n)
    if p.op is Op.BINARY and p.arg == op:
        return _terms(p.src[0], op) + _terms(p.src[1], op)
    return [n]


def _equal(a: Node, b: Node) -> bool:
    """The same expression: one node, or the same op over equal operands (a sub-expression
    written twice is two nodes; casts and unit reshapes count)."""
    if a is b:
        return True
    if a.op is not b.op or a.dtype != b.dtype or not _same(a.shape, b.shape) or len(a.src) != len(b.src):
        return False
    if a.op in (Op.SCAN, Op.CONV1D, Op.ERROR) or a.arg != b.arg:
        return False
    return all(_equal(x, y) for x, y in zip(a.src, b.src))


def _aligned(n: Node, rank: int) -> tuple:
    """n's shape as it broadcasts at `rank` (numpy's right alignment): None where it is 1."""
    shape = (1,) * (rank - len(n.shape)) + tuple(n.shape)
    return tuple(None if _is_one(d) else d for d in shape)


def _describe(n: Node) -> str:
    n = _peel(n)
    if n.op is Op.UNARY:
        return f"{unary_name(n)}(...)"
    if n.op is Op.BINARY:
        return {"add": "a sum", "sub": "a difference", "mul": "a product", "div": "a quotient"}.get(
            n.arg, f"'{n.arg}'")
    return {Op.INPUT: f"input '{n.arg}'", Op.SCALAR: f"scalar '{n.arg}'", Op.CONST: f"the constant {n.arg}",
            Op.SCAN: "a scan", Op.CONV1D: "a causal convolution"}.get(n.op, f"a {n.op.value}")


# the shapes operands broadcast to, by letter: B batch, F channels, S steps, N states, _ a unit axis
_PREFILL = {"seq": "BFS", "chan": "_F_", "dt": "BFS_", "A": "_F_N", "BC": "B_SN", "h": "BF_N"}
_STEP = {"seq": "BF", "chan": "_F", "dt": "BF_", "A": "_FN", "BC": "B_N", "h": "BFN"}


class _Matcher:
    def __init__(self, fn: Function):
        self.fn = fn
        self.params = {p.name: p for p in fn.params}
        self.dims: dict[str, object] = {}

    # ---- reporting ----
    def fail(self, n: Node | None, what: str):
        span = n.span if n is not None and n.span.line > 0 else self.fn.span
        raise LoweringError(f"{self.fn.name}: {located(span, what)}")

    def _need(self, ok: bool, n: Node | None, what: str) -> None:
        if not ok:
            self.fail(n, what)

    # ---- operands ----
    def _expect(self, pattern: str) -> tuple:
        return tuple(None if c == "_" else self.dims[c] for c in pattern)

    def operand(self, n: Node, pattern: str, what: str, *, transposed: bool = False, kind: str = "tensor") -> Node:
        """The input `n` reads (through casts and unit reshapes; through one transpose of the last
        two axes when `transposed`), checked to broadcast as `pattern` at the pattern's rank."""
        expect = self._expect(pattern)
        base = _peel(n)
        if transposed:
            self._need(base.op is Op.TRANSPOSE, n, f"{what} must be an input [B, N, S] read transposed "
                                                   f"(transpose(...) of it, unsqueezed to [B, 1, S, N])")
            base = _peel(base.src[0])
        want = "a state parameter" if kind == "state" else "a tensor input"
        if base.op is not Op.INPUT or self.params[base.arg].kind != kind:
            self.fail(n, f"{what} must be {want}, not {_describe(base)}")
        dims = tuple(d for d in expect if d is not None)
        if transposed:
            dims = dims[:-2] + dims[-1:] + dims[-2:-1]
        ok = all((a is None) == (b is None) and (a is None or _eq(a, b)) for a, b in zip(_aligned(n, len(expect)), expect))
        if not ok or not _same(_nonunit(base.shape), dims):
            shown = "[" + ", ".join("1" if c == "_" else c for c in pattern) + "]"
            self.fail(n, f"{what} ('{base.arg}' {list(base.shape)}) must broadcast as {shown} here")
        return base

    def dtype_of(self, node: Node, allowed: tuple[str, ...], what: str) -> str:
        t = str(node.dtype)
        if t not in allowed:
            self.fail(node, f"{what} '{node.arg}' is {t}; the kernel takes {' or '.join(allowed)}")
        return t

    # ---- the match ----
    def match(self) -> ScanPattern:
        fn = self.fn
        if fn.kind != "layer":
            self.fail(None, "attention blocks are not scans")
        if len(fn.outputs) != 1:
            self.fail(fn.outputs[1] if len(fn.outputs) > 1 else None,
                      f"{len(fn.outputs)} outputs; the scan kernels write one (and the state)")
        (out,) = fn.outputs
        self.dtype = str(out.dtype)
        if self.dtype not in DTYPES:
            self.fail(out, f"the output is {self.dtype}; the scan kernels write {', '.join(DTYPES)}")
        convs = [n for n in fn.nodes() if n.op is Op.CONV1D]
        scans = [n for n in fn.nodes() if n.op is Op.SCAN]
        if convs and scans:
            self.fail(scans[0], "a scan and a convolution in one layer: the kernels do one or the other "
                                "(write each as a layer of its own)")
        if convs:
            return self.conv(out, convs)
        seq = bool(scans) or any(n.op is Op.REDUCE and len(n.src[0].shape) == 4 for n in fn.nodes())
        return self.selective(out, seq)

    # ---- the convolutions ----
    def conv(self, out: Node, convs: list[Node]) -> ScanPattern:
        r = _peel(out)
        silu = r.op is Op.UNARY and unary_name(r) == "silu"
        if silu:
            r = _peel(r.src[0])
        terms = _terms(r, "add")
        ys = [t for t in terms if _peel(t).op is Op.CONV1D]
        if len(ys) != 1:
            self.fail(r, f"{_describe(r)}: the conv kernels compute [silu](conv1d_causal(x, w) [+ b]); "
                         "the output must be the convolution, + a bias, under an optional silu")
        y = _peel(ys[0])
        self._need(y.arg.which == 0, y, "the output must be the convolution's result, not its state")
        self._need(y.arg.axis == len(y.shape) - 1, y, "the kernels convolve along the last axis")
        x_in = _peel(y.src[0])
        self._need(x_in.op is Op.INPUT and self.params[x_in.arg].kind == "tensor", y.src[0],
                   f"the convolution's input must be a tensor input, not {_describe(x_in)}")
        if len(x_in.shape) == 3 and _same(x_in.shape, y.shape) and y.src[0].shape == y.shape:
            kind = "conv"
            self.dims = {"B": y.shape[0], "F": y.shape[1], "S": y.shape[2]}
        elif len(x_in.shape) == 2 and len(y.shape) == 3 and _is_one(y.shape[2]) and _same(x_in.shape, y.shape[:2]):
            kind = "conv_step"
            self.dims = {"B": y.shape[0], "F": y.shape[1]}
        else:
            self.fail(y, f"the convolution's input must be x [B, F, S] (prefill) or x [B, F] unsqueezed to one "
                         f"step (decode), not {list(x_in.shape)} read as {list(y.src[0].shape)}")
        channels = _static(self.dims["F"])
        self._need(channels is not None, y, "the channels F must be a static size")
        w = _peel(y.src[1])
        width = _static(w.shape[-1]) if w.op is Op.INPUT else None
        if w.op is not Op.INPUT or len(w.shape) != 2 or not _eq(w.shape[0], channels) or width not in WIDTHS:
            self.fail(y, f"the convolution's weight must be an input w [F, K] with F = {channels} and K in "
                         f"{WIDTHS} (one filter a channel), not {_describe(w)} {list(w.shape)}")
        x_dt = self.dtype_of(x_in, DTYPES, "input")
        if x_dt != self.dtype:
            self.fail(out, f"the output is {self.dtype}, the input '{x_in.arg}' {x_dt}: the kernel writes x's dtype")
        w_dt = self.dtype_of(w, ("f32", x_dt), "weight")
        if not _same(out.shape, x_in.shape):
            self.fail(out, f"the output is {list(out.shape)}; the kernel writes x's shape {list(x_in.shape)}")
        bias = None
        if len(terms) > 2:
            self.fail(r, f"{len(terms) - 1} terms beside the convolution: the conv kernels add one bias [F]")
        for t in terms:
            if t is ys[0]:
                continue
            b = self.operand(t, _chan(r.shape), "the bias")
            bias = self.dtype_of(b, ("f32", x_dt), "bias")
            bias_name = b.arg
        state = _peel(y.src[2]) if len(y.src) == 3 else None
        state_name = None
        if state is not None:
            self._need(state.op is Op.INPUT, y.src[2], f"the convolution's state must be an input, "
                                                      f"not {_describe(state)}")
            state_name = state.arg
            if not _same(state.shape, (self.dims["B"], channels, width - 1)) or len(y.src[2].shape) != 3:
                self.fail(y.src[2], f"the convolution's state '{state.arg}' must be [B, F, K - 1] = "
                                    f"[{self.dims['B']}, {channels}, {width - 1}], not {list(state.shape)}")
        updates = dict(self.fn.state_updates)
        final = False
        for name, v in updates.items():
            pv = _peel(v)
            if name != state_name or pv.op is not Op.CONV1D or pv.arg.which != 1 or pv.src != y.src:
                self.fail(v, f"state '{name}' must be rewritten with the convolution's new state (the second "
                             "result of the conv1d_causal that reads it)")
            final = True
        if kind == "conv_step" and (state is None or not final):
            self.fail(y, "the decode conv reads its state and writes it back (state=s, a state parameter)")
        if state is not None:
            s_dt = self.dtype_of(state, (x_dt,) if kind == "conv" else ("f32", x_dt), "state")
        operands = [("x", x_in.arg), ("weight", w.arg)] + ([("bias", bias_name)] if bias else []) \
            + ([("state", state_name)] if state is not None else [])
        if kind == "conv":
            return ScanPattern(kind=kind, operands=tuple(operands), channels=channels, dtype=x_dt, width=width,
                               weight_dtype=w_dt, bias=bias, silu=silu, initial=state is not None, final=final)
        return ScanPattern(kind=kind, operands=tuple(operands), channels=channels, dtype=x_dt, width=width,
                           weight_dtype=w_dt, bias=bias, silu=silu, state_dtype=s_dt)

    # ---- the selective scan and its decode step ----
    def selective(self, out: Node, seq: bool) -> ScanPattern:
        P = _PREFILL if seq else _STEP
        r = _peel(out)
        factors = _terms(r, "mul")
        gates = [f for f in factors if _peel(f).op is Op.UNARY and unary_name(_peel(f)) == "silu"]
        z = None
        if len(factors) == 2 and len(gates) == 1:
            z_at = _peel(gates[0]).src[0]
            core = next(f for f in factors if f is not gates[0])
        elif len(factors) == 1:
            z_at, core = None, r
        else:
            self.fail(r, "the scan kernels' output is (sum_n h C + u D) * silu(z): a product other than the "
                         "z gate differs")
        terms = _terms(core, "add")
        sums = [t for t in terms if _peel(t).op is Op.REDUCE]
        if len(sums) != 1:
            self.fail(_peel(core), f"{_describe(core)}: the scan kernels' output is sum(h * C, axis=-1) "
                                   "[+ u * Dskip] [* silu(z)]")
        if len(terms) > 2:
            self.fail(_peel(core), f"{len(terms) - 1} terms beside the states' sum: the scan kernels add one skip "
                                   "term, u * Dskip [F]")
        red = _peel(sums[0])
        self._need(red.arg.fn == "sum" and red.arg.axis == len(red.src[0].shape) - 1 and not red.arg.keepdim, red,
                   "the output reads the state through sum(h * C, axis=-1, keepdim=false)")
        hc = _terms(red.src[0], "mul")
        if len(hc) != 2:
            self.fail(red, "the sum over the states must be of h * C")
        full = red.src[0].shape
        self.dims = dict(zip("BFSN", full)) if seq else dict(zip("BFN", full))
        if len(full) != (4 if seq else 3):
            self.fail(red, f"the states' sum must run over [B, F{', S' if seq else ''}, N], not {list(full)}")
        channels, n_state = _static(self.dims["F"]), _static(self.dims["N"])
        self._need(channels is not None and n_state is not None, red, "F and N must be static sizes")
        c_at = next((f for f in hc if _peel(f).op is Op.TRANSPOSE
                     or (_peel(f).op is Op.INPUT and self.params[_peel(f).arg].kind == "tensor")), None)
        self._need(c_at is not None, red, "one factor of the states' sum must be C (an input)")
        hs = next(f for f in hc if f is not c_at)
        C = self.operand(c_at, P["BC"], "C", transposed=seq)
        updates = dict(self.fn.state_updates)
        states = [p.name for p in self.fn.params if p.kind == "state"]
        if len(states) != 1:
            self.fail(None, f"{len(states)} state parameters; the scan kernels carry one, h f32 [B, F, N]")
        state_name = states[0]
        new_h = updates[state_name]
        if seq:
            dt, A, B, u, h = self.prefill_state(hs, new_h, state_name, P)
        else:
            self._need(_peel(new_h) is _peel(hs), new_h, "the decode step writes back the state its output reads "
                                                          "(y = sum(h' * C) with h' the new state)")
            dt, A, B, u, h = self.recurrence_step(_peel(hs), P)
        delta, bias, softplus = self.delta(dt, P)
        skip = None
        for t in terms:
            if t is sums[0]:
                continue
            fs = _terms(t, "mul")
            if len(fs) != 2:
                self.fail(t, f"+ {_describe(t)}: the scan kernels add one skip term, u * Dskip [F]")
            ins = [f for f in fs if _peel(f).op is Op.INPUT and _peel(f) is u]
            self._need(len(ins) == 1, t, f"the skip term must be u * Dskip with u the scan's input '{u.arg}'")
            self.operand(ins[0], P["seq"], "the skip term's u")
            skip = self.operand(next(f for f in fs if f is not ins[0]), P["chan"], "Dskip")
        if z_at is not None:
            z = self.operand(z_at, P["seq"], "the gate z")
        T = self.dtype_of(u, DTYPES, "input")
        for node, what in ((delta, "delta"), (B, "B"), (C, "C"), (z, "z")):
            if node is not None and str(node.dtype) != T:
                self.fail(node, f"{what} '{node.arg}' is {node.dtype}; the kernel takes it in u's dtype, {T}")
        if self.dtype != T:
            self.fail(out, f"the output is {self.dtype}; the kernel writes u's dtype, {T}")
        if not _same(out.shape, u.shape):
            self.fail(out, f"the output is {list(out.shape)}; the kernel writes u's shape {list(u.shape)}")
        state_param = self.params[state_name]
        if str(state_param.dtype) != "f32" or not _same(state_param.shape, (self.dims["B"], channels, n_state)):
            self.fail(new_h, f"the state '{state_name}' must be f32 [B, F, N] (the kernels keep it in f32), "
                             f"not {state_param.dtype} {list(state_param.shape)}")
        a_dt = self.dtype_of(A, ("f32", T), "A")
        d_dt = None if skip is None else self.dtype_of(skip, ("f32", T), "Dskip")
        b_dt = None if bias is None else self.dtype_of(bias, ("f32", T), "the Δ bias")
        roles = [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", skip), ("z", z),
                 ("delta_bias", bias), ("state", h)]
        operands = tuple((role, n.arg) for role, n in roles if n is not None)
        if h is None:   # the prefill does not read the carried state, only writes it
            operands += (("state", state_name),)
        return ScanPattern(kind="selective_scan" if seq else "state_update", operands=operands, channels=channels,
                           dtype=T, state=n_state, a_dtype=a_dt, d_dtype=d_dt, bias_dtype=b_dt, gate=z is not None,
                           softplus=softplus, initial=seq and h is not None, final=seq)

    def prefill_state(self, hs_at: Node, new_h: Node, state_name: str, P: dict):
        """hs = scan(combine, dA, dBu)[1] [+ scan(...)[0] * h]; h <- hs's last step."""
        hs = _peel(hs_at)
        terms = _terms(hs, "add")
        ys = [t for t in terms if _peel(t).op is Op.SCAN and _peel(t).arg.which == 1]
        if len(ys) != 1 or len(terms) > 2:
            self.fail(hs, f"{_describe(hs)}: the states are the scan's second result [+ its first * h], "
                          "(decay, hs) = scan(combine, dA, dBu, axis=2)")
        scan1 = _peel(ys[0])
        h = None
        for t in terms:
            if t is ys[0]:
                continue
            fs = _terms(t, "mul")
            scan0 = [f for f in fs if _peel(f).op is Op.SCAN and _peel(f).arg.which == 0]
            if len(fs) != 2 or len(scan0) != 1 or _peel(scan0[0]).src != scan1.src:
                self.fail(t, "the carried state enters as decay * h, decay the scan's first result")
            h = self.operand(next(f for f in fs if f is not scan0[0]), P["h"], "the carried state", kind="state")
            if h.arg != state_name:
                self.fail(t, f"the carried state must be the state '{state_name}' the layer writes back")
        self.check_combine(scan1)
        last = _peel(new_h)
        S = self.dims["S"]
        if last.op is not Op.SLICE or _peel(last.src[0]) is not hs or last.arg[0] != 2 \
                or not _eq(last.arg[1], S - 1) or not _eq(last.arg[2], S) or last.arg[3] != 1:
            self.fail(new_h, f"the state '{state_name}' must be rewritten with the last step of the states, "
                             "slice(hs, S - 1, S, axis=2)")
        dt, A = self.decay(scan1.src[0], P)
        u, B = self.drive(scan1.src[1], dt, P, transposed=True)
        return dt, A, B, u, h

    def recurrence_step(self, new_h: Node, P: dict):
        """h' = exp(dt A) * h + (dt x) * Bm."""
        terms = _terms(new_h, "add")
        if len(terms) != 2:
            self.fail(new_h, "the decode step's new state is exp(dt A) * h + dt x Bm")
        for decay_term, drive_term in ((terms[0], terms[1]), (terms[1], terms[0])):
            fs = _terms(decay_term, "mul")
            exps = [f for f in fs if _peel(f).op is Op.UNARY and unary_name(_peel(f)) == "exp"]
            if len(fs) == 2 and len(exps) == 1:
                break
        else:
            self.fail(new_h, "the decode step's new state is exp(dt A) * h + dt x Bm: no decay exp(dt A) * h")
        h = self.operand(next(f for f in fs if f is not exps[0]), P["h"], "the decayed state", kind="state")
        dt, A = self.decay(exps[0], P)
        x, B = self.drive(drive_term, dt, P, transposed=False)
        return dt, A, B, x, h

    def check_combine(self, scan: Node) -> None:
        arg = scan.arg
        if arg.fn != "combine" or len(scan.src) != 2 or arg.axis != 2:
            self.fail(scan, "the scan must be scan(combine, dA, dBu, axis=2) over the steps")
        comb = arg.combine
        c0, c1, e0, e1 = (p.name for p in comb.params)
        o0, o1 = comb.outputs

        def is_input(n, name):
            n = _peel(n)
            return n.op is Op.INPUT and n.arg == name

        def is_product(n, a, b):
            fs = _terms(n, "mul")
            return len(fs) == 2 and {_peel(f).arg for f in fs if _peel(f).op is Op.INPUT} == {a, b} \
                and all(_peel(f).op is Op.INPUT for f in fs)
        t1 = _terms(o1, "add")
        ok = is_product(o0, c0, e0) and len(t1) == 2 and any(
            is_product(t1[i], e0, c1) and is_input(t1[1 - i], e1) for i in (0, 1))
        if not ok:
            self.fail(scan, f"the scan's combine '{comb.name}' must be the linear recurrence's, "
                            "(a1, b1), (a2, b2) -> (a1 * a2, a2 * b1 + b2)")

    def decay(self, n: Node, P: dict):
        """exp(dt * A) -> (dt's node, A)."""
        e = _peel(n)
        if e.op is not Op.UNARY or unary_name(e) != "exp":
            self.fail(e, f"the decay must be exp(dt * A), not {_describe(e)}")
        fs = _terms(e.src[0], "mul")
        As = [f for f in fs if _peel(f).op is Op.INPUT and len(_peel(f).shape) == 2
              and all(_static(d) is not None for d in _peel(f).shape)]   # [F, N]: no run-time dim
        if len(fs) != 2 or len(As) != 1:
            self.fail(e, "the decay must be exp(dt * A) with A an input [F, N] (A = -exp(A_log) outside the layer)")
        A = self.operand(As[0], P["A"], "A")
        dt_at = next(f for f in fs if f is not As[0])
        self._aligned_as(dt_at, P["dt"], "dt")
        return _peel(dt_at), A

    def drive(self, n: Node, dt: Node, P: dict, *, transposed: bool):
        """(dt * u) * B with dt the decay's -> (u, B)."""
        fs = _terms(n, "mul")
        Bs = [f for f in fs if _peel(f).op in (Op.TRANSPOSE, Op.INPUT)]
        if len(fs) != 2 or len(Bs) != 1:
            self.fail(n, "the scan's input term must be (dt * u) * B")
        B = self.operand(Bs[0], P["BC"], "B", transposed=transposed)
        du_at = next(f for f in fs if f is not Bs[0])
        self._aligned_as(du_at, P["dt"], "dt * u")
        du = _terms(_peel(du_at), "mul")
        dts = [f for f in du if _equal(_peel(f), dt)]
        if len(du) != 2 or not dts:
            self.fail(du_at, "the scan's input term must be (dt * u) * B, with the dt of the decay exp(dt * A)")
        u_at = next(f for f in du if f is not dts[0])
        self._aligned_as(dts[0], P["seq"], "dt")
        return self.operand(u_at, P["seq"], "u"), B

    def delta(self, dt: Node, P: dict):
        """dt = [softplus](delta [+ bias]) -> (delta, bias, softplus)."""
        softplus = dt.op is Op.WHERE
        pre = self.softplus_input(dt) if softplus else dt
        terms = _terms(pre, "add")
        ins = [t for t in terms if _peel(t).op is Op.INPUT and len(_peel(t).shape) == len(P["seq"])]
        if len(ins) != 1 or len(terms) > 2:
            self.fail(pre, f"{_describe(pre)}: dt must be [softplus](delta [+ dt_bias]) with delta an input")
        delta = self.operand(ins[0], P["seq"], "delta")
        bias = None
        for t in terms:
            if t is not ins[0]:
                bias = self.operand(t, P["chan"], "the Δ bias")
        return delta, bias, softplus

    def softplus_input(self, w: Node) -> Node:
        """where(v > 20, v, log(1 + exp(v))) -> v."""
        cond, big, small = w.src
        v = _peel(big)
        ok = cond.op is Op.BINARY and cond.arg in ("gt", "lt")
        if ok:
            a, b = (cond.src[0], cond.src[1]) if cond.arg == "gt" else (cond.src[1], cond.src[0])
            ok = _equal(_peel(a), v) and _peel(b).op is Op.CONST
            if ok and float(_peel(b).arg) != SOFTPLUS_THRESHOLD:
                self.fail(cond, f"softplus's threshold is {_peel(b).arg}; the kernels' is {SOFTPLUS_THRESHOLD:g} "
                                "(torch's): where(v > 20, v, log(1 + exp(v)))")
        lg = _peel(small)
        ok = ok and lg.op is Op.UNARY and unary_name(lg) == "log"
        if ok:
            t = _terms(lg.src[0], "add")
            ones = [x for x in t if _peel(x).op is Op.CONST and float(_peel(x).arg) == 1.0]
            exps = [x for x in t if _peel(x).op is Op.UNARY and unary_name(_peel(x)) == "exp"]
            ok = len(t) == 2 and len(ones) == 1 and len(exps) == 1 and _equal(_peel(_peel(exps[0]).src[0]), v)
        if not ok:
            self.fail(w, "dt's where(...) must be softplus, where(v > 20, v, log(1 + exp(v)))")
        return v

    def _aligned_as(self, n: Node, pattern: str, what: str) -> None:
        expect = self._expect(pattern)
        got = _aligned(n, len(expect))
        if len(n.shape) > len(expect) or not all((a is None) == (b is None) and (a is None or _eq(a, b))
                                                 for a, b in zip(got, expect)):
            shown = "[" + ", ".join("1" if c == "_" else c for c in pattern) + "]"
            self.fail(n, f"{what} {list(n.shape)} must broadcast as {shown} here")


def _chan(shape) -> str:
    """A per-channel operand's pattern at a [B, F(, S)] shape."""
    return "_F" + "_" * (len(shape) - 2)
