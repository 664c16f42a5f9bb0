"""The reference evaluator: what every layerforge program means.

`evaluate(fn, inputs)` runs a specialised IR function on torch tensors (CPU or GPU).

Precision modes:
  * "program" (default): every op's result is rounded to its static dtype, as the program is
    written; half-precision operands are computed in f32 and reductions accumulate in f32.
  * "float64": every float value is held in float64 and casts between float dtypes do not
    round; this is the exact math that generated kernels are tested against.
Dynamic dims (token counts, batch) are bound from the inputs' shapes; any mismatch is a
`LayerInputError` naming the parameter, before anything runs.

State parameters (`state s: T[...]`) are inputs the layer also rewrites: `evaluate` writes
their new values into the given tensors after computing the outputs (prefill leaves a state,
decode steps update it); `evaluate_states` returns them instead, in the evaluation's precision.
Scans and the causal convolution are dsl/recurrences.py's definitions; a scan over a combine
layer folds its step function along the axis, one step at a time.
"""
from __future__ import annotations

from typing import Any, Mapping

import sympy
import torch
import torch.nn.functional as F

from .ir import Function, Node, ReduceArg, toposort, unary_name
from .numerics import alibi_slopes, t5_relative_bucket
from .recurrences import causal_conv1d
from .types import DType, dim_str, pack_4bit, shape_str, unpack_4bit


class LayerInputError(ValueError):
    """An input does not fit the layer: wrong shape, dtype, device, or a missing argument."""


PRECISIONS = ("program", "float64")


def bind_inputs(fn: Function, inputs: Mapping[str, Any], *, check_device: bool = True) -> dict[str, int]:
    """Check inputs against the function's parameters; return the dynamic dims they bind."""
    dims: dict[str, int] = {}
    known = {p.name for p in fn.params}
    for k in inputs:
        if k not in known:
            raise LayerInputError(f"{fn.name}: unexpected input '{k}' (parameters: {', '.join(sorted(known))})")
    device = None
    for p in fn.params:
        if p.kind == "const":
            continue
        if p.name not in inputs:
            if p.kind == "scalar" and p.default is not None:
                continue
            raise LayerInputError(f"{fn.name}: missing input '{p.name}'")
        x = inputs[p.name]
        if p.kind == "scalar":
            if isinstance(x, torch.Tensor) and x.numel() != 1:
                raise LayerInputError(f"{fn.name}: '{p.name}' is a scalar, got a tensor of shape {tuple(x.shape)}")
            continue
        if not isinstance(x, torch.Tensor):
            raise LayerInputError(f"{fn.name}: '{p.name}' must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != p.dtype.torch:
            held = ", packed two a byte" if p.dtype.is_packed else ""
            raise LayerInputError(f"{fn.name}: '{p.name}' must be {p.dtype} ({p.dtype.torch}{held}), got {x.dtype}")
        if check_device:
            if device is None:
                device = x.device
            elif x.device != device:
                raise LayerInputError(f"{fn.name}: '{p.name}' is on {x.device} but other inputs are on {device}")
        if x.dim() != len(p.shape):
            raise LayerInputError(f"{fn.name}: '{p.name}' must have shape {shape_str(p.shape)} "
                                  f"(rank {len(p.shape)}), got {tuple(x.shape)}")
        for axis, (d, n) in enumerate(zip(p.shape, x.shape)):
            # a 4-bit tensor's last axis holds two values a byte: its logical size is twice the bytes
            _bind_dim(fn, p.name, axis, d, int(n) * (2 if p.dtype.is_packed and axis == len(p.shape) - 1 else 1), dims)
    return dims


def _bind_dim(fn, pname, axis, d: sympy.Expr, n: int, dims: dict[str, int]) -> None:
    d = d.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()})
    if d.is_Integer:
        if int(d) != n:
            raise LayerInputError(f"{fn.name}: '{pname}' dim {axis} must be {int(d)}, got {n}")
        return
    syms = list(d.free_symbols)
    if len(syms) == 1:
        sol = sympy.solve(sympy.Eq(d, n), syms[0])
        if len(sol) == 1 and sol[0].is_Integer and sol[0] > 0:
            dims[syms[0].name] = int(sol[0])
            return
        raise LayerInputError(f"{fn.name}: '{pname}' dim {axis} is {n}, which does not fit {dim_str(d)}")
    raise LayerInputError(f"{fn.name}: cannot bind {dim_str(d)} from '{pname}'")


def evaluate(fn: Function, inputs: Mapping[str, Any], *, precision: str = "program",
             q_positions: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
             k_rotated: bool = False, batch_offset: int = 0) -> tuple[torch.Tensor, ...]:
    """Run `fn` on `inputs` (a mapping from parameter name to tensor or scalar).

    Attention blocks: q_positions / kv_positions ([B, Sq] / [B, Skv]) place the queries and
    keys; k_rotated says that k already carries its RoPE rotation (as a paged cache stores it),
    so only q is rotated; batch_offset is the batch index of the inputs' first entry, which hooks
    reading `b` see (one sequence of a larger batch evaluated alone)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dims = bind_inputs(fn, inputs)
    ev = _Evaluator(fn, inputs, dims, precision == "float64", q_positions, kv_positions)
    ev.k_rotated = k_rotated
    ev.batch_offset = int(batch_offset)
    outputs = tuple(_stored(ev.value(o), o.dtype) for o in fn.outputs)
    updates = [(name, _stored(ev.value(n), n.dtype)) for name, n in fn.state_updates]
    held = {inputs[name].untyped_storage().data_ptr() for name, _ in updates}
    outputs = tuple(o.clone() if o.untyped_storage().data_ptr() in held else o for o in outputs)   # not a view of a state
    with torch.no_grad():
        for name, v in updates:   # after every output: a state is read with its old value throughout
            inputs[name].copy_(v)
    return outputs


def evaluate_states(fn: Function, inputs: Mapping[str, Any], *, precision: str = "program"
                    ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(outputs, {state name: new value}) of a layer with state parameters, the given state
    tensors left as they are; the new values in the evaluation's precision (float64 when asked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ev = _Evaluator(fn, inputs, bind_inputs(fn, inputs), precision == "float64", None, None)
    return (tuple(_stored(ev.value(o), o.dtype) for o in fn.outputs),
            {name: _stored(ev.value(n), n.dtype) for name, n in fn.state_updates})


def _stored(v: torch.Tensor, dt: DType) -> torch.Tensor:
    """A value as a tensor of its type holds it: 4-bit values packed two a byte."""
    if dt.is_packed:
        if v.shape[-1] % 2:
            raise LayerInputError(f"a {dt} tensor packs two values a byte along its last axis, which is {v.shape[-1]}")
        return pack_4bit(v)
    return v


class _Evaluator:
    def __init__(self, fn: Function, inputs, dims, f64: bool, q_positions, kv_positions):
        self.fn, self.inputs, self.f64 = fn, inputs, f64
        self.subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}
        self.params = {p.name: p for p in fn.params}
        self.device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self.memo: dict[int, torch.Tensor] = {}
        self.q_positions, self.kv_positions = q_positions, kv_positions
        self.attn_env: dict[str, torch.Tensor] = {}
        self.k_rotated = False
        self.batch_offset = 0
        self.dims = dims
        self.folds: dict[tuple, list[torch.Tensor]] = {}   # a combine scan's k outputs, computed once

    # ---- helpers
    def int_of(self, d) -> int:
        v = sympy.sympify(d).subs(self.subs)
        if not v.is_Integer:
            raise LayerInputError(f"{self.fn.name}: size {dim_str(d)} is not bound")
        return int(v)

    def storage(self, dt: DType) -> torch.dtype:
        if self.f64 and dt.is_float:
            return torch.float64
        if dt.is_packed:   # values held unpacked, one an element
            return torch.uint8 if dt is DType.u4 else torch.int8
        return dt.torch

    def compute(self, dt: DType) -> torch.dtype:
        """The dtype arithmetic runs in: f32 for half types (f64 in float64 mode)."""
        if self.f64 and dt.is_float:
            return torch.float64
        if dt in (DType.f16, DType.bf16):
            return torch.float32
        return dt.torch

    def up(self, x: torch.Tensor, dt: DType) -> torch.Tensor:
        return x.to(self.compute(dt))

    def out(self, x: torch.Tensor, n: Node) -> torch.Tensor:
        return x.to(self.storage(n.dtype))

    def value(self, n: Node) -> torch.Tensor:
        for m in toposort([n]):
            if id(m) not in self.memo:
                self.memo[id(m)] = self.eval_node(m)
        return self.memo[id(n)]

    def arg(self, n: Node, i: int = 0) -> torch.Tensor:
        return self.memo[id(n.src[i])] if id(n.src[i]) in self.memo else self.value(n.src[i])

    # ---- ops
    def eval_node(self, n: Node) -> torch.Tensor:
        return getattr(self, "op_" + n.op.value)(n)

    def op_input(self, n):
        x = self.inputs[n.arg]
        if n.dtype.is_packed:
            return unpack_4bit(x, n.dtype)
        return x.to(self.storage(n.dtype))

    def op_scalar(self, n):
        p = self.params[n.arg]
        v = self.inputs.get(n.arg, p.default)
        if isinstance(v, torch.Tensor):
            v = v.item()
        return torch.tensor(v, dtype=self.storage(n.dtype), device=self.device)

    def op_const(self, n):
        return torch.tensor(n.arg, dtype=self.storage(n.dtype), device=self.device)

    def op_dim(self, n):
        return torch.tensor(self.int_of(n.arg), dtype=torch.int64, device=self.device)

    def op_attn_var(self, n):
        return self.attn_env[n.arg]

    def op_unary(self, n):
        name = unary_name(n)
        x = self.arg(n)
        if name == "not":
            return ~x
        if name == "alibi_slope":
            _, heads, max_bias = n.arg
            slopes = alibi_slopes(self.int_of(heads), max_bias, x.device, torch.float64 if self.f64 else torch.float32)
            return slopes[x.long()]
        if name == "t5_bucket":
            _, nb, md, bd = n.arg
            return t5_relative_bucket(x.long(), self.int_of(nb), self.int_of(md), bd).to(torch.int32)
        x = self.up(x, n.dtype)
        f = {
            "neg": torch.neg, "exp": torch.exp, "log": torch.log, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "silu": F.silu, "gelu": lambda v: F.gelu(v), "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
            "relu": torch.relu, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "abs": torch.abs, "cos": torch.cos,
            "sin": torch.sin, "erf": torch.erf,
        }[name]
        return self.out(f(x), n)

    def op_binary(self, n):
        a, b = self.arg(n, 0), self.arg(n, 1)
        op = n.arg
        if op in ("and", "or"):
            return (a & b) if op == "and" else (a | b)
        cdt = self.compute(n.src[0].dtype if n.dtype is DType.bool else n.dtype)
        if n.dtype is DType.bool and n.src[0].dtype != n.src[1].dtype:
            cdt = torch.promote_types(self.compute(n.src[0].dtype), self.compute(n.src[1].dtype))
        a, b = a.to(cdt), b.to(cdt)
        f = {
            "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
            "floordiv": lambda x, y: torch.div(x, y, rounding_mode="floor"), "mod": torch.remainder,
            "pow": torch.pow, "max": torch.maximum, "min": torch.minimum, "eq": torch.eq, "ne": torch.ne,
            "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
        }[op]
        return self.out(f(a, b), n)

    def op_where(self, n):
        c, a, b = (self.arg(n, i) for i in range(3))
        cdt = self.compute(n.dtype)
        return self.out(torch.where(c, a.to(cdt), b.to(cdt)), n)

    def op_cast(self, n):
        x = self.arg(n)
        if n.dtype.int_range is not None:   # quantise: nearest even, saturating
            lo, hi = n.dtype.int_range
            return (torch.round(x) if x.is_floating_point() else x.to(torch.int64)).clamp(lo, hi).to(self.storage(n.dtype))
        if n.dtype.is_storage and x.is_floating_point():
            big = torch.finfo(n.dtype.torch).max
            return x.clamp(-big, big).to(n.dtype.torch)
        if n.dtype.is_int and x.is_floating_point():
            x = torch.trunc(x)
        return x.to(self.storage(n.dtype))

    def op_reduce(self, n):
        r: ReduceArg = n.arg
        x = self.arg(n)
        acc = self.compute(n.dtype) if n.dtype.is_float else n.dtype.torch
        if n.dtype.is_float:
            acc = torch.float64 if self.f64 else torch.float32
        x = x.to(acc)
        if r.fn == "sum":
            y = x.sum(dim=r.axis, keepdim=r.keepdim)
        elif r.fn == "mean":
            y = x.mean(dim=r.axis, keepdim=r.keepdim)
        elif r.fn == "max":
            y = x.amax(dim=r.axis, keepdim=r.keepdim)
        elif r.fn == "min":
            y = x.amin(dim=r.axis, keepdim=r.keepdim)
        else:
            y = x.var(dim=r.axis, keepdim=r.keepdim, correction=r.correction)
        return self.out(y, n)

    def op_softmax(self, n):
        x = self.up(self.arg(n), n.dtype)
        return self.out(torch.softmax(x, dim=n.arg), n)

    def op_topk(self, n):
        k, axis, which = n.arg
        x = self.arg(n)
        # A stable descending sort, not torch.topk: ties go to the lowest index, on every device
        # (torch.topk leaves their order open), as the kernels' (value desc, index asc) keys rank
        # them; NaN ranks above +inf, as in torch.topk.
        vals, idx = torch.sort(x, dim=axis, descending=True, stable=True)
        k = self.int_of(k)
        return vals.narrow(axis, 0, k) if which == 0 else idx.narrow(axis, 0, k).to(torch.int32)

    def op_gather(self, n):
        x, idx = self.arg(n, 0), self.arg(n, 1)
        size = x.shape[n.arg]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise LayerInputError(f"{self.fn.name}: gather index out of range [0, {size})")
        return torch.gather(x, n.arg, idx.long())

    def op_slice(self, n):
        axis, start, stop, step = n.arg
        x = self.arg(n)
        sl = [slice(None)] * x.dim()
        sl[axis] = slice(self.int_of(start), self.int_of(stop), self.int_of(step))
        return x[tuple(sl)]

    def op_concat(self, n):
        xs = [self.arg(n, i) for i in range(len(n.src))]
        return torch.cat(xs, dim=n.arg)

    def op_interleave(self, n):
        a, b = self.arg(n, 0), self.arg(n, 1)
        axis = n.arg
        st = torch.stack([a, b], dim=axis + 1)
        return st.flatten(axis, axis + 1)

    def op_reshape(self, n):
        return self.arg(n).reshape([self.int_of(d) for d in n.shape])

    def op_iota(self, n):
        return torch.arange(self.int_of(n.arg), dtype=torch.int32, device=self.device)

    def op_table(self, n):  # float64 values, rounded to the storage dtype
        return torch.tensor(n.arg, dtype=torch.float64, device=self.device).to(self.storage(n.dtype))

    def op_matmul(self, n):
        a, b = self.arg(n, 0), self.arg(n, 1)
        cdt = self.compute(n.dtype)
        return self.out(torch.matmul(a.to(cdt), b.to(cdt)), n)

    def op_transpose(self, n):
        return self.arg(n).transpose(-1, -2)

    def op_index(self, n):
        """A hook's table read. Each index is clamped into its dim, [0, size - 1], for every score
        element (masked ones too): the kernels cannot raise, so this is what such a read means."""
        table = self.arg(n, 0)
        idx = [self.arg(n, i).long() for i in range(1, len(n.src))]
        for axis, i in enumerate(idx):
            if i.numel() and table.shape[axis] == 0:
                raise LayerInputError(f"{self.fn.name}: '{n.src[0].arg}' is indexed but its dim {axis} is empty")
        return table[tuple(i.clamp(0, table.shape[axis] - 1) for axis, i in enumerate(idx))]

    def op_scan(self, n):
        arg = n.arg
        if arg.fn == "combine":
            return self.fold(n)[arg.which]
        x = self.arg(n)
        if n.dtype.is_float:
            y = (torch.cumsum if arg.fn == "sum" else torch.cumprod)(self.up(x, n.dtype), dim=arg.axis)
        else:
            y = (torch.cumsum if arg.fn == "sum" else torch.cumprod)(x.to(torch.int64), dim=arg.axis)
        return self.out(y, n)

    def fold(self, n) -> list[torch.Tensor]:
        """out_0 = x_0, out_t = combine(out_{t-1}, x_t) along the axis, the step function run by
        an evaluator of its own on each step's slices."""
        arg = n.arg
        key = (id(arg.combine), arg.axis, tuple(id(s) for s in n.src))
        if key in self.folds:
            return self.folds[key]
        shape = [self.int_of(d) for d in n.shape]
        xs = [torch.broadcast_to(self.arg(n, i), shape).movedim(arg.axis, 0) for i in range(len(n.src))]
        k, length = len(xs), shape[arg.axis]
        outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs]
        carry = [x[0] for x in xs]
        for t in range(length):
            if t:
                step = _Evaluator(arg.combine, {**{f"carry{i}": carry[i] for i in range(k)},
                                                **{f"elem{i}": xs[i][t] for i in range(k)}},
                                  self.dims, self.f64, None, None)
                carry = [step.value(o) for o in arg.combine.outputs]
            for o, c in zip(outs, carry):
                o[t] = c
        self.folds[key] = [o.movedim(0, arg.axis) for o in outs]
        return self.folds[key]

    def op_conv1d(self, n):
        x, w = self.arg(n, 0), self.arg(n, 1)
        state = self.arg(n, 2) if len(n.src) == 3 else None
        cdt = self.compute(n.dtype)
        y, new_state = causal_conv1d(x.to(cdt), w.to(cdt), n.arg.axis, None if state is None else state.to(cdt))
        return self.out(y if n.arg.which == 0 else new_state, n)

    def op_attention(self, n):
        from .attention_ref import attention_reference
        return attention_reference(self, n)
