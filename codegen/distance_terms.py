"""Score terms that depend on the positions only through their distance, tabulated per tile.

T5's relative bias (`rel_bias[t5_bucket(kv_pos - q_pos), h]`) and clamped relative biases
(`bias[min(max(kv_pos - q_pos, -K), K) + K, h]`) cost a bucket computation and a gathered
load per score. Over a prefill tile of T query tokens and BN keys they take only T + BN - 1
distances (per head), so the kernel computes the term once per (distance, head) into shared
memory and each score reads it there.

`distance_term(score)` finds the largest sub-expression of the score hook that
  - reads q_pos and kv_pos only through one kind of difference (kv_pos - q_pos, or
    q_pos - kv_pos), and does not read the score,
  - reads otherwise only b, kv_h (one value per CTA), h (a table column per head), constants,
    scalars, dims and tables,
  - contains a gathered load or a T5 bucket (the work worth moving), and is f32 or i32;
the C function of it is emitted with the difference as its argument `rel`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dsl.ir import Node, Op, toposort, unary_name
from ..dsl.types import DType

_POSITIONS = ("q_pos", "kv_pos")


@dataclass(frozen=True, eq=False)
class DistanceTerm:
    node: Node                       # the sub-expression the kernel tabulates
    distances: tuple[Node, ...]      # its difference nodes (the function's `rel`)
    sign: int                        # +1: rel = kv_pos - q_pos; -1: rel = q_pos - kv_pos
    heads: bool                      # it reads h: one table column per query head of the CTA

    @property
    def ctype(self) -> str:
        return "float" if self.node.dtype is DType.f32 else "int"


def _distance_sign(n: Node) -> int | None:
    if n.op is Op.BINARY and n.arg == "sub" and all(s.op is Op.ATTN_VAR for s in n.src):
        args = tuple(s.arg for s in n.src)
        return {("kv_pos", "q_pos"): 1, ("q_pos", "kv_pos"): -1}.get(args)
    return None


def _candidate(n: Node) -> DistanceTerm | None:
    if n.dtype not in (DType.f32, DType.i32):
        return None
    distances, seen, stack = [], set(), [n]
    costly = heads = False
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if _distance_sign(m) is not None:
            distances.append(m)
            continue
        if m.op is Op.ATTN_VAR:
            if m.arg in (*_POSITIONS, "score"):
                return None
            heads |= m.arg == "h"
        costly |= m.op is Op.INDEX or (m.op is Op.UNARY and unary_name(m) == "t5_bucket")
        stack.extend(m.src)
    signs = {_distance_sign(d) for d in distances}
    if not costly or len(signs) != 1:
        return None
    return DistanceTerm(node=n, distances=tuple(distances), sign=signs.pop(), heads=heads)


def distance_term(score: Node | None) -> DistanceTerm | None:
    """The score's largest tabulable distance term (nodes are visited users first), or None."""
    if score is None:
        return None
    for n in reversed(toposort([score])):
        term = _candidate(n)
        if term is not None:
            return term
    return None
