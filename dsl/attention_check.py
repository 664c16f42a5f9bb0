"""Checking attention blocks.

    attention name(q: T[B, Sq, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, Dv], extra...)
        -> T[B, Sq, Hq, Dv] {
        rope(theta = 10000.0, style = neox, dim = D)   # optional: rotate q and k by position
        rope(theta = 1e6, type = yarn, factor = 4.0, original_max_position = 32768)  # scaled (dsl/numerics)
        alibi(max_bias = 8.0)                          # optional: score += slope(h) * (kv_pos - q_pos)
                                                       # (heads, first: the block's heads among a model's)
        scale = 1.0 / sqrt(D)                          # optional, this is the default
        score = 50.0 * tanh(score / 50.0)              # optional: any scalar f32 expression
        mask  = q_pos >= kv_pos                        # optional: any scalar bool expression
        sink  = sinks[h]                               # optional: a logit in every row's softmax
    }                                                  #   denominator that weighs no value (gpt-oss)

Inside the block the scalars `score` (f32, the scaled q.k), `b` (batch), `h` (query head),
`kv_h` (its KV head), `q_pos` and `kv_pos` (i32 positions) are defined; extra tensor
parameters may be indexed by them (`kv_len[b]`, `bias[h, t5_bucket(kv_pos - q_pos)]`).
Without a batch dim, q is [Sq, Hq, D]. Query positions are aligned to the end of the keys
(q_pos = Skv - Sq + i) unless the caller passes positions.
"""
from __future__ import annotations

import dataclasses
import difflib
import math

import sympy

from . import ast
from .builtins import rope_scaling_of
from .numerics import rope_is_static
from .ir import AttentionSpec, Node, Op, Param, RopeSpec, toposort
from .signatures import ATTENTION_DIRECTIVES
from .types import DType, dims_equal, shape_str

_RESERVED = ("b", "h", "kv_h", "q_pos", "kv_pos")
_HOOKS = ("score", "mask", "scale", "sink")   # what a block's statements may set for the kernels


def check_attention(ck, d: ast.AttentionDef, scope, params: list[Param]):
    from .checker import ERR

    names = [p.name for p in d.params]
    if names[:3] != ["q", "k", "v"]:
        ck.error(d.name_span, f"attention '{d.name}' must take q, k, v as its first three parameters",
                 "e.g. (q: T[B, Sq, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D])")
        return None
    q, k, v = (scope.vars.get(n, ERR) for n in ("q", "k", "v"))
    if ERR in (q, k, v):
        return None
    if any(x.op is not Op.INPUT for x in (q, k, v)):
        ck.error(d.name_span, "q, k and v must be tensors")
        return None
    span = {p.name: p.span for p in d.params}
    if q.rank not in (3, 4):
        ck.error(span["q"], f"q must be [B, S, H, D] or [S, H, D], got {shape_str(q.shape)}")
        return None
    for x, n in ((k, "k"), (v, "v")):
        if x.rank != q.rank:
            ck.error(span[n], f"{n} has rank {x.rank} but q has rank {q.rank}")
            return None
        if x.dtype != q.dtype:
            ck.error(span[n], f"{n} is {x.dtype} but q is {q.dtype}")
            return None
    if not q.dtype.is_float:
        ck.error(span["q"], f"attention needs float q, k, v, got {q.dtype}")
        return None
    batched = q.rank == 4
    if batched and not (dims_equal(q.shape[0], k.shape[0]) and dims_equal(k.shape[0], v.shape[0])):
        ck.error(d.name_span, "q, k and v must have the same batch dim")
        return None
    if not (dims_equal(k.shape[-3], v.shape[-3]) and dims_equal(k.shape[-2], v.shape[-2])):
        ck.error(span["v"], f"k {shape_str(k.shape)} and v {shape_str(v.shape)} must agree in length and heads")
        return None
    if not dims_equal(q.shape[-1], k.shape[-1]):
        ck.error(span["k"], f"q and k head dims differ: {q.shape[-1]} and {k.shape[-1]}")
        return None
    hq, hkv, hd, hdv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    group = hq / hkv
    if group.is_Rational and not group.is_Integer:
        ck.error(span["k"], f"{hq} query heads cannot be grouped over {hkv} KV heads: {hkv} does not divide {hq}",
                 "GQA needs Hq to be a multiple of Hkv")
        return None
    want = q.shape[:-1] + (hdv,)
    ret = ck.return_types((d.returns,), scope)
    if ret is None:
        return None
    rdt, rshape = ret[0]
    if rdt != q.dtype or len(rshape) != len(want) or not all(dims_equal(a, b) for a, b in zip(rshape, want)):
        ck.error(d.returns.span, f"attention output is {q.dtype}{shape_str(want)}, but the signature declares "
                                 f"{rdt}{shape_str(rshape)}")
        return None

    scope.in_attention = True
    scope.attn_heads = hq
    scope.attn_main = ("q", "k", "v")
    score0 = Node(Op.ATTN_VAR, DType.f32, (), (), "score", d.span)
    scope.vars["score"] = score0
    for n in _RESERVED:
        scope.vars[n] = Node(Op.ATTN_VAR, DType.i32, (), (), n, d.span)
    extra = tuple(p.name for p in params[3:] if p.kind == "tensor")
    tables = {p.name: Node(Op.INPUT, p.dtype, p.shape, (), p.name, span[p.name]) for p in params[3:]
              if p.kind == "tensor"}
    scope.vars.update(tables)

    scale = None
    mask = None
    sink = None
    rope = None
    for st in d.body:
        if isinstance(st, ast.AttnCall):
            if st.name not in ATTENTION_DIRECTIVES:
                ck.error(st.span, f"unknown attention directive '{st.name}(...)'", "known: rope(...), alibi(...)")
                continue
            args = ATTENTION_DIRECTIVES[st.name].bind(st.name, st.span, st.args, st.kwargs, ck.error)
            if args is None:
                continue
            if st.name == "rope":
                if rope is not None:
                    ck.error(st.span, "rope(...) is given twice")
                    continue
                rope = _rope(ck, st, args, scope, hd)
            else:
                mb = ck.build_time(args["max_bias"], scope, "max_bias", float)
                heads = ck.build_time(args["heads"], scope, "heads")
                first = ck.build_time(args["first"], scope, "first")
                if mb is None or heads is None or first is None:
                    continue
                nq = int(hq) if getattr(hq, "is_number", False) or isinstance(hq, int) else None
                if heads < 0 or first < 0 or (nq is not None and first + nq > (heads or nq)):
                    ck.error(st.span, f"alibi(heads = {heads}, first = {first}): the block's {hq} heads must lie "
                                      f"within the model's heads (0: the block's own)")
                    continue
                h = scope.vars["h"]
                if first:   # a tensor-parallel rank's heads: their slopes are those of the model's heads first ..
                    h = ck.binary("add", h, ck.const(int(first), st.span), st.span)
                slope = Node(Op.UNARY, DType.f32, (), (h,), ("alibi_slope", heads or hq, float(mb)), st.span)
                rel = ck.binary("sub", scope.vars["kv_pos"], scope.vars["q_pos"], st.span)
                bias = ck.binary("mul", slope, ck.cast(rel, DType.f32, st.span), st.span)
                scope.vars["score"] = ck.binary("add", scope.vars["score"], bias, st.span)
            continue
        if isinstance(st, ast.Return):
            ck.error(st.span, "attention blocks do not return: the output is softmax(score) @ v",
                     "set `score = ...` and `mask = ...` instead")
            continue
        if any(t.id in _RESERVED for t in st.targets):
            bad = next(t for t in st.targets if t.id in _RESERVED)
            ck.error(bad.span, f"'{bad.id}' is defined by the attention block and cannot be assigned")
            continue
        ck.assign(st, scope)
        for t in st.targets:
            val = scope.vars.get(t.id)
            if val is None or val.op is Op.ERROR:
                continue
            if val.shape != ():
                ck.error(st.value.span, f"attention expressions are per score element: '{t.id}' must be a scalar, "
                                        f"got {val.dtype}{shape_str(val.shape)}", "index tensors, e.g. bias[h, kv_pos]")
                scope.vars[t.id] = ERR
            elif t.id == "score" and not val.dtype.is_float:
                ck.error(st.value.span, f"score must be a float expression, got {val.dtype}")
                scope.vars[t.id] = ERR
            elif t.id == "score" and val.dtype is not DType.f32:
                scope.vars[t.id] = ck.cast(val, DType.f32, st.value.span)
            elif t.id == "mask":
                if val.dtype is not DType.bool:
                    ck.error(st.value.span, f"mask must be a bool expression, got {val.dtype}",
                             "e.g. mask = q_pos >= kv_pos")
                    scope.vars[t.id] = ERR
                else:
                    mask = val
            elif t.id == "sink":
                if not (val.dtype.is_float or val.dtype.is_int) or _reads(val, ("kv_pos", "score")):
                    ck.error(st.value.span, "sink must be a number per row: it may read b, h, kv_h, q_pos and "
                                            "tables, not kv_pos or the score", "e.g. sink = sinks[h]")
                    scope.vars[t.id] = ERR
                else:
                    sink = ck.cast(val, DType.f32, st.value.span) if val.dtype is not DType.f32 else val
            elif t.id == "scale":
                if not (val.dtype.is_float or val.dtype.is_int) or _uses_position(val):
                    ck.error(st.value.span, "scale must be a number that does not depend on the score element")
                    scope.vars[t.id] = ERR
                else:
                    scale = ck.cast(val, DType.f32, st.value.span)
    for t in _unused_locals(d.body):
        if scope.vars.get(t.id) is not ERR:
            close = difflib.get_close_matches(t.id, _HOOKS, n=1)
            ck.error(t.span, f"'{t.id}' is assigned but never used: an attention block's results are only "
                             f"`score`, `mask`, `scale` and `sink`",
                     f"did you mean '{close[0]}'?" if close else "use it in score, mask, scale or sink, or remove it")
    score = scope.vars.get("score")
    if score is None or score.op is Op.ERROR or (mask is not None and mask.op is Op.ERROR):
        return None
    if sink is not None and sink.op is Op.ERROR:
        return None
    if scale is None:
        if hd.is_Integer:
            scale = ck.const(1.0 / math.sqrt(int(hd)), d.span)
        else:
            dn = Node(Op.CAST, DType.f32, (), (Node(Op.DIM, DType.i64, (), (), hd, d.span),), None, d.span)
            scale = Node(Op.UNARY, DType.f32, (), (dn,), "rsqrt", d.span)
    spec = AttentionSpec(num_q_heads=hq, num_kv_heads=hkv, head_dim=hd, v_head_dim=hdv, batched=batched,
                         scale=scale, score=None if score is score0 else score, mask=mask, rope=rope, extra=extra,
                         sink=sink)
    extra_nodes = tuple(tables[n] for n in extra)   # the inputs, even where a local took a table's name
    out = Node(Op.ATTENTION, q.dtype, want, (q, k, v) + extra_nodes, spec, d.span)
    return [out]


def _unused_locals(body) -> list[ast.Name]:
    """The names a block assigns that are not hooks and that no later statement reads (a
    misspelt `scroe = ...` would otherwise be dropped without a word)."""
    unused = []
    for i, st in enumerate(body):
        if not isinstance(st, ast.Assign):
            continue
        later = set().union(*(_names_read(s) for s in body[i + 1:]))
        unused += [t for t in st.targets if t.id not in _HOOKS + _RESERVED and t.id not in later]
    return unused


def _names_read(node) -> set[str]:
    """Every name an AST node reads (an assignment's targets are written, not read)."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Assign):
        return _names_read(node.value)
    if isinstance(node, tuple):
        return set().union(*(_names_read(x) for x in node))
    if dataclasses.is_dataclass(node):
        return set().union(*(_names_read(getattr(node, f.name)) for f in dataclasses.fields(node)))
    return set()


def _reads(n: Node, names) -> bool:
    return any(m.op is Op.ATTN_VAR and m.arg in names for m in toposort([n]))


def _uses_position(n: Node) -> bool:
    return any(m.op in (Op.ATTN_VAR, Op.INDEX) for m in toposort([n]))


def _rope(ck, st: ast.AttnCall, args, scope, head_dim) -> RopeSpec | None:
    theta = ck.build_time(args["theta"], scope, "theta", float)
    style = args["style"]
    if style is None:
        style_name = "neox"
    elif isinstance(style, ast.Name) and style.id in ("neox", "gptj"):
        style_name = style.id
    else:
        ck.error(style.span, "rope style must be neox (rotate halves) or gptj (rotate interleaved pairs)")
        return None
    dim = head_dim if args["dim"] is None else ck.build_time(args["dim"], scope, "rotary dim")
    if theta is None or dim is None:
        return None
    if float(theta) <= 0:
        ck.error(args["theta"].span, "rope theta must be positive")
        return None
    dim = sympy.sympify(dim)
    span = args["dim"].span if args["dim"] is not None else st.span
    if dim.is_Integer and (dim <= 0 or dim % 2):
        ck.error(span, f"rotary dim must be a positive even number, got {dim}")
        return None
    if (head_dim - dim).is_Integer and dim > head_dim:
        ck.error(span, f"rotary dim {dim} is larger than the head dim {head_dim}")
        return None
    scaling = rope_scaling_of(ck, st.span, args, scope)
    if scaling is False:
        return None
    model = ck.bindings.rope_scaling
    if model is not None:
        if scaling is not None and scaling != model:   # the same scaling (llama3 consts from the config) agrees
            ck.error(st.span, f"rope(...) sets its own frequency scaling ({scaling.rope_type}) and the model's "
                              f"config gives rope type '{model.rope_type}'")
            return None
        if not rope_is_static(model):
            ck.error(st.span, f"the model's rope type '{model.rope_type}' depends on the sequence length; the "
                              "block's kernels carry one frequency table",
                     "longrope: pass rope_regime='short' or 'long' when specialising")
            return None
        scaling = model
    return RopeSpec(float(theta), style_name, dim, scaling)
