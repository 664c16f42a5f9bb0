"""The typed IR: a small op set, a node type, functions, and a verifier.

A node is `(op, dtype, shape, src, arg)`. Layer bodies are DAGs of nodes (calls to other
layers are inlined by the checker); an attention function holds one ATTENTION node whose
`arg` describes the score/mask sub-graphs, which are built from ATTN_VAR leaves.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .source import Span, UNKNOWN_SPAN
from .types import DType, Shape, broadcast_shapes, dims_equal, type_str


class Op(enum.Enum):
    INPUT = "input"            # tensor parameter; arg: name
    SCALAR = "scalar"          # runtime scalar parameter; arg: name
    CONST = "const"            # build-time value; arg: python bool/int/float
    DIM = "dim"                # a size as an integer value; arg: sympy expression
    UNARY = "unary"            # arg: function name (see UNARY_FUNCS)
    BINARY = "binary"          # arg: operator name (see BINARY_OPS)
    WHERE = "where"            # src: cond, a, b
    CAST = "cast"              # to node.dtype
    REDUCE = "reduce"          # arg: ReduceArg
    SOFTMAX = "softmax"        # arg: axis
    TOPK = "topk"              # arg: (k, axis, which) with which 0 = values, 1 = indices
    GATHER = "gather"          # src: x, index; arg: axis (torch.gather semantics)
    SLICE = "slice"            # arg: (axis, start, stop, step)
    CONCAT = "concat"          # arg: axis
    INTERLEAVE = "interleave"  # src: a, b; arg: axis; out[..., 2i] = a[..., i], out[..., 2i+1] = b[..., i]
    RESHAPE = "reshape"        # to node.shape
    IOTA = "iota"              # 0..n-1 as i32; shape (n,)
    TABLE = "table"            # a build-time f32 vector; arg: tuple of floats (None in the generic check)
    MATMUL = "matmul"          # batched over leading dims
    TRANSPOSE = "transpose"    # swap the last two axes
    ATTENTION = "attention"    # src: q, k, v, *extra inputs; arg: AttentionSpec
    ATTN_VAR = "attn_var"      # arg: one of ATTN_VARS; only inside attention sub-graphs
    INDEX = "index"            # src: table, *scalar indices; element lookup inside attention sub-graphs
    SCAN = "scan"              # src: the operands; arg: ScanArg (cumsum, cumprod, or a combine's fold)
    CONV1D = "conv1d"          # src: x, w (, state); arg: Conv1dArg (causal depthwise, dsl/recurrences)
    ERROR = "error"            # placeholder after a reported error; never in a checked function


# the elementwise math the language offers by name (dsl/signatures.py makes them builtins)
UNARY_MATH = ("exp", "log", "tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "relu", "rsqrt", "sqrt",
              "abs", "cos", "sin", "erf")
UNARY_FUNCS = ("neg", *UNARY_MATH, "not", "alibi_slope", "t5_bucket")
BINARY_OPS = ("add", "sub", "mul", "div", "floordiv", "mod", "pow", "max", "min",
              "eq", "ne", "lt", "le", "gt", "ge", "and", "or")
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
ATTN_VARS = ("score", "b", "h", "kv_h", "q_pos", "kv_pos")


@dataclass(frozen=True, eq=False)
class Node:
    op: Op
    dtype: DType
    shape: Shape
    src: tuple["Node", ...] = ()
    arg: Any = None
    span: Span = field(default=UNKNOWN_SPAN, compare=False)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Node({self.op.value}, {type_str(self.dtype, self.shape)}, arg={self.arg!r})"


@dataclass(frozen=True)
class ReduceArg:
    fn: str  # sum mean max min var
    axis: int
    keepdim: bool
    correction: int = 0


@dataclass(frozen=True)
class ScanArg:
    """An inclusive scan along `axis`. fn "sum" / "prod": cumsum / cumprod of the one operand.
    fn "combine": out_0 = x_0, out_t = combine(out_{t-1}, x_t) over k operands at once (each
    step's slices), `combine` a layer function of 2k tensors (the carries, then the
    elements) returning k; the node is output `which` of the k."""

    fn: str
    axis: int
    which: int = 0
    combine: "Function | None" = None


@dataclass(frozen=True)
class Conv1dArg:
    """A causal depthwise 1-D convolution along `axis` (dsl/recurrences.causal_conv1d): which 0
    is y, 1 the new state (the last K - 1 inputs, the given state before x included)."""

    axis: int
    which: int


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    style: str  # "neox" (rotate halves) or "gptj" (rotate interleaved pairs)
    rotary_dim: Any  # dim expression; <= head dim
    # a dsl/numerics RopeScaling (linear, llama3, yarn, longrope with its regime, dynamic) or
    # None: plain theta^(-2i/d). Llama 3's four numbers (the first form) are read as llama3.
    scaling: Any = None


@dataclass(frozen=True)
class AttentionSpec:
    num_q_heads: Any
    num_kv_heads: Any
    head_dim: Any
    v_head_dim: Any
    batched: bool              # q is [B, S, H, D] (True) or [S, H, D] (False)
    scale: Node                # scalar expression (no ATTN_VAR)
    score: Node | None         # f32 sub-graph over ATTN_VAR leaves; None = plain scaled dot product
    mask: Node | None          # bool sub-graph; None = every position visible
    rope: RopeSpec | None
    extra: tuple[str, ...]     # names of the extra inputs, in src order after q, k, v
    sink: Node | None = None   # f32 per-row logit in the softmax's denominator (attention sinks); None = none


@dataclass(frozen=True)
class Param:
    name: str
    kind: str            # "tensor" | "scalar" (runtime) | "const" (build time) | "state" (a tensor the
                         # layer reads and rewrites: Function.state_updates holds its new value)
    dtype: DType
    shape: Shape
    default: Any = None  # python value for scalars/consts


@dataclass(frozen=True)
class Function:
    name: str
    kind: str                      # "layer" | "attention"
    params: tuple[Param, ...]
    outputs: tuple[Node, ...]
    span: Span = UNKNOWN_SPAN
    bindings: tuple = ()           # ((name, value), ...) applied at specialisation
    state_updates: tuple = ()      # ((state parameter name, its new value Node), ...), in parameter order

    def nodes(self) -> list[Node]:
        return toposort(self.outputs + tuple(n for _, n in self.state_updates))


def toposort(outputs) -> list[Node]:
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(n, False) for n in reversed(outputs)]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        # An attention node's score/mask/scale sub-graphs are not children: they are
        # evaluated per score element (see AttentionSpec), and verified separately.
        for s in reversed(n.src):
            if id(s) not in seen:
                stack.append((s, False))
    return order


def unary_name(n: Node) -> str:
    """UNARY's arg is a function name, or (name, *build-time parameters) for alibi_slope/t5_bucket."""
    return n.arg if isinstance(n.arg, str) else n.arg[0]


class IRVerificationError(AssertionError):
    """The IR is malformed: a bug in layerforge, not a user error."""


_ARITY = {Op.INPUT: 0, Op.SCALAR: 0, Op.CONST: 0, Op.DIM: 0, Op.UNARY: 1, Op.BINARY: 2, Op.WHERE: 3,
          Op.CAST: 1, Op.REDUCE: 1, Op.SOFTMAX: 1, Op.TOPK: 1, Op.GATHER: 2, Op.SLICE: 1,
          Op.INTERLEAVE: 2, Op.RESHAPE: 1, Op.IOTA: 0, Op.TABLE: 0, Op.MATMUL: 2, Op.TRANSPOSE: 1, Op.ATTN_VAR: 0}


def verify(fn: Function) -> None:
    """Reject malformed IR early: arity, dtypes, broadcast shapes, misplaced leaves."""
    params = {p.name: p for p in fn.params}

    def fail(n: Node, why: str):
        raise IRVerificationError(f"{fn.name}: {n!r}: {why}")

    def check(n: Node, in_attention: bool):
        if n.op is Op.ERROR:
            fail(n, "error placeholder left in IR")
        if n.op in _ARITY and len(n.src) != _ARITY[n.op]:
            fail(n, f"expects {_ARITY[n.op]} operands, has {len(n.src)}")
        if n.op is Op.INPUT and (n.arg not in params or params[n.arg].kind not in ("tensor", "state")):
            fail(n, "input is not a tensor parameter")
        # (a const parameter is a SCALAR too until specialisation binds it)
        if n.op is Op.SCALAR and (n.arg not in params or params[n.arg].kind not in ("scalar", "const")):
            fail(n, "scalar is not a scalar parameter")
        if n.op is Op.ATTN_VAR and (not in_attention or n.arg not in ATTN_VARS):
            fail(n, "attention variable outside an attention block")
        if n.op is Op.UNARY and unary_name(n) not in UNARY_FUNCS:
            fail(n, "unknown unary function")
        if n.op is Op.BINARY:
            if n.arg not in BINARY_OPS:
                fail(n, "unknown binary operator")
            if broadcast_shapes(n.src[0].shape, n.src[1].shape) is None:
                fail(n, "operand shapes do not broadcast")
            if n.arg in COMPARISONS and n.dtype is not DType.bool:
                fail(n, "comparison must produce bool")
        if n.op is Op.WHERE and n.src[0].dtype is not DType.bool:
            fail(n, "where condition must be bool")
        if n.op is Op.MATMUL and not dims_equal(n.src[0].shape[-1], n.src[1].shape[-2]):
            fail(n, "matmul inner dims differ")
        if n.op is Op.TABLE and n.arg is not None and (len(n.shape) != 1 or n.shape[0] != len(n.arg)):
            fail(n, "table length differs from its shape")
        if n.op is Op.CONCAT and any(s.dtype != n.dtype for s in n.src):
            fail(n, "concat operands differ in dtype")
        if n.op is Op.SCAN and (n.arg.fn == "combine") != (n.arg.combine is not None):
            fail(n, "a combine scan needs its combine function (and only it)")
        if n.op is Op.CONV1D and len(n.src) not in (2, 3):
            fail(n, "conv1d takes x, w and an optional state")

    states = {name for name, _ in fn.state_updates}
    if states != {p.name for p in fn.params if p.kind == "state"}:
        fail(fn.outputs[0] if fn.outputs else Node(Op.ERROR, DType.f32, ()), "state parameters and updates differ")
    for n in fn.nodes():
        check(n, in_attention=False)
        if n.op is Op.SCAN and n.arg.combine is not None:
            verify(n.arg.combine)
        if n.op is Op.ATTENTION:
            spec: AttentionSpec = n.arg
            if len(n.src) != 3 + len(spec.extra):
                fail(n, "attention operands do not match its extra inputs")
            for g in (spec.scale, spec.score, spec.mask):
                if g is not None:
                    for m in toposort([g]):
                        check(m, in_attention=True)
            if spec.mask is not None and spec.mask.dtype is not DType.bool:
                fail(n, "mask must be bool")
