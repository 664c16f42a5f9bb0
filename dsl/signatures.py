"""Call signatures of the builtins: names, defaults, and binding of call arguments."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import ast
from .ir import UNARY_MATH

REQUIRED = object()


@dataclass(frozen=True)
class Signature:
    params: tuple[tuple[str, Any], ...]   # (name, default or REQUIRED)
    varargs: bool = False                  # extra positionals collected into the first param

    def bind(self, name: str, call_span, args: tuple, kwargs: tuple[ast.KwArg, ...], error) -> dict | None:
        """Bind AST arguments; report mistakes through `error(span, msg)`; None if unbindable."""
        out: dict[str, Any] = {}
        names = [p for p, _ in self.params]
        if self.varargs:
            out[names[0]] = tuple(args)
            rest = names[1:]
            pos: list = []
        else:
            rest = names
            pos = list(args)
        if len(pos) > len(rest):
            error(pos[len(rest)].span,
                  f"{name}() takes {len(rest)} positional argument{'s' * (len(rest) != 1)} "
                  f"but {len(pos)} were given")
            return None
        for pname, a in zip(rest, pos):
            out[pname] = a
        ok = True
        for kw in kwargs:
            if kw.name not in rest:
                error(kw.span, f"{name}() got an unexpected keyword argument '{kw.name}'"
                      + (f" (it takes {', '.join(rest)})" if rest else ""))
                ok = False
            elif kw.name in out:
                error(kw.span, f"{name}() got multiple values for argument '{kw.name}'")
                ok = False
            else:
                out[kw.name] = kw.value
        for pname, default in self.params:
            if pname not in out:
                if default is REQUIRED:
                    error(call_span, f"{name}() missing required argument '{pname}'")
                    ok = False
                else:
                    out[pname] = default
        if self.varargs and not out[names[0]]:
            error(call_span, f"{name}() needs at least one operand")
            ok = False
        return out if ok else None


def sig(*params, varargs: bool = False) -> Signature:
    """sig("x", ("axis", -1)) -> Signature; a bare name is required."""
    norm = tuple((p, REQUIRED) if isinstance(p, str) else p for p in params)
    return Signature(norm, varargs)


# A RoPE frequency scaling's keys (dsl/numerics), shared by rope(...) and rope_freqs(...)
ROPE_SCALING_KEYS = tuple((k, None) for k in (
    "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor", "short_factor", "long_factor", "regime", "max_position"))


BUILTINS: dict[str, Signature] = {
    **{f: sig("x") for f in UNARY_MATH},
    "where": sig("cond", "a", "b"),
    "maximum": sig("a", "b"),
    "minimum": sig("a", "b"),
    "sum": sig("x", ("axis", -1), ("keepdim", True)),
    "mean": sig("x", ("axis", -1), ("keepdim", True)),
    "var": sig("x", ("axis", -1), ("keepdim", True), ("correction", 0)),
    # max/min: one operand = reduction, two operands = elementwise
    "max": sig("x", ("y", None), ("axis", -1), ("keepdim", True)),
    "min": sig("x", ("y", None), ("axis", -1), ("keepdim", True)),
    "softmax": sig("x", ("axis", -1)),
    "topk": sig("x", "k", ("axis", -1)),
    "gather": sig("x", "index", ("axis", -1)),
    "split": sig("x", "sections", ("axis", -1)),
    "concat": sig("tensors", ("axis", -1), varargs=True),
    "slice": sig("x", "start", "stop", ("step", 1), ("axis", -1)),
    "interleave": sig("a", "b", ("axis", -1)),
    "reshape": sig("dims", varargs=True),  # reshape(x, d0, d1, ...): first of dims is x
    "unsqueeze": sig("x", "axis"),
    "iota": sig("n"),
    # the inverse frequency of each rotary channel, f32[rotary_dim], a build-time table from dsl/numerics
    "rope_freqs": sig("rotary_dim", ("theta", 10000.0), ("neox", True), *ROPE_SCALING_KEYS),
    "transpose": sig("x"),
    # torch.nn.functional.linear: x [..., K] @ w[O, K]^T (+ b [O]), w in torch.nn.Linear's layout
    "linear": sig("x", "w", ("b", None)),
    "cast": sig("x", "dtype"),
    # scans along an axis (inclusive): cumsum, cumprod, and scan(combine, x0, x1, ..., axis=): out_0 = x_0,
    # out_t = combine(out_{t-1}, x_t), `combine` a layer of the k carries then the k elements returning k
    "cumsum": sig("x", ("axis", -1)),
    "cumprod": sig("x", ("axis", -1)),
    "scan": sig("operands", ("axis", -1), varargs=True),   # the first operand names the combine layer
    # causal depthwise 1-D convolution: (y, new state), w [..., K] (x's shape without the axis, then K taps),
    # state: the K - 1 inputs before x along the axis (zeros when not given)
    "conv1d_causal": sig("x", "w", ("axis", -1), ("state", None)),
    # attention-only helpers
    # the slope of head h among `heads` (0: the block's Hq; a tensor-parallel rank's block passes the model's)
    "alibi_slope": sig("h", ("max_bias", 8.0), ("heads", 0)),
    "t5_bucket": sig("rel", ("num_buckets", 32), ("max_distance", 128), ("bidirectional", True)),
}
ATTENTION_ONLY = ("alibi_slope", "t5_bucket")

ATTENTION_DIRECTIVES: dict[str, Signature] = {
    # type: default | linear | llama3 | yarn | longrope (dsl/numerics); `factor` alone is llama3
    "rope": sig(("theta", 10000.0), ("style", None), ("dim", None), *ROPE_SCALING_KEYS),
    # heads (0: the block's Hq) and first: the block's heads are heads first .. first + Hq - 1 of the model's
    "alibi": sig(("max_bias", 8.0), ("heads", 0), ("first", 0)),
}
