"""A mask's table reads split by the positions they read, so a kernel makes each once per key or per row.

A packed-sequence mask (`kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]`) tests, per score, a table read at
the key and one at the query. A prefill thread holds scores of a few rows (two in the tensor-core kernels) over
the same keys, so evaluated per score the key's read is repeated for every row and the row's for every key: in the
wgmma kernel 2 gathered loads, their index clamps and a branch per score on every tile the block mask calls partial.

`mask_split(expr)` finds, in the per-score test (the mask's conjuncts other than its key bounds, or the whole mask
where it has none), the largest sub-expressions that
  - read kv_pos and no other position, head or the score (b and kv_h, one value per CTA, constants, scalars, dims
    and tables are allowed): key terms, evaluated once per key of a tile;
  - read q_pos or h, but not kv_pos or the score: row terms, evaluated once per row;
and that contain a table read (the work worth moving; a bare `kv_pos % 2` costs less than a register to hold it).
The test is then emitted over the terms' values (codegen/attention.hook_context: `lf_key_term<i>`,
`lf_row_term<j>`, `lf_mask_split`), which the kernel evaluates once per (key, row) into bits while the tile's
MMAs run. Where the test reads the score, or holds no key term, there is no split (None).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dsl.ir import Node, Op, toposort
from .scalar_expr import mask_is_exact, mask_rest

_KEY_VARS = frozenset({"kv_pos", "b", "kv_h"})
_ROW_VARS = frozenset({"q_pos", "h", "b", "kv_h"})


@dataclass(frozen=True, eq=False)
class MaskSplit:
    expr: Node                   # the per-score test
    keys: tuple[Node, ...]       # its key terms (read at kv_pos)
    rows: tuple[Node, ...]       # its row terms (read at q_pos / h)


def _facts(expr: Node) -> dict[int, tuple[frozenset, bool]]:
    """Per node of expr: the attention variables it reads, and whether it holds a table read."""
    facts: dict[int, tuple[frozenset, bool]] = {}
    for n in toposort([expr]):
        names = frozenset({n.arg}) if n.op is Op.ATTN_VAR else frozenset()
        costly = n.op is Op.INDEX
        for s in n.src:
            v, c = facts[id(s)]
            names, costly = names | v, costly or c
        facts[id(n)] = (names, costly)
    return facts


def mask_split(expr: Node | None) -> MaskSplit | None:
    """The per-score test's key and row terms (the module's docstring), or None where there is no key term or the
    test reads the score."""
    if expr is None:
        return None
    facts = _facts(expr)
    if "score" in facts[id(expr)][0]:
        return None
    keys: dict[int, Node] = {}
    rows: dict[int, Node] = {}
    stack, seen = [expr], set()
    while stack:   # from the root down: a term's own sub-expressions are not terms of their own
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        names, costly = facts[id(n)]
        if costly and "kv_pos" in names and names <= _KEY_VARS:
            keys[id(n)] = n
        elif costly and names & {"q_pos", "h"} and names <= _ROW_VARS:
            rows[id(n)] = n
        else:
            stack.extend(n.src)
    if not keys:
        return None
    order = {k: i for i, k in enumerate(facts)}   # _facts' toposort order: the same source every render
    return MaskSplit(expr=expr, keys=tuple(sorted(keys.values(), key=lambda n: order[id(n)])),
                     rows=tuple(sorted(rows.values(), key=lambda n: order[id(n)])))


def attention_mask_split(mask: Node | None) -> MaskSplit | None:
    """The split of an attention block's mask: of its conjuncts other than its key bounds (mask_rest), or of the whole
    mask where it has no bounds; None where the bounds are the whole mask (mask_is_exact: no per-score test left)."""
    if mask is None or mask_is_exact(mask):
        return None
    rest = mask_rest(mask)
    return mask_split(rest if rest is not None else mask)
