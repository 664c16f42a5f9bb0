"""A run-time block mask for masks that read tables at the query or key position.

A document mask (`doc[b, q_pos] == doc[b, kv_pos]`, packed sequences) cannot be bounded per
tile when the kernel is generated: its tiles are decided by the table's values. Before the
prefill kernel, a small generated pre-pass classifies every (sequence, KV head if the mask
reads heads, row block, key tile) of the prefill kernel's tiling, with the interval classifier
of codegen/mask_tiles.py in its `ranges` form: a lookup over a tile's positions is bounded by
the table's least and greatest element over them. It writes, as FlexAttention's block mask:

    cls [B, HB, Y, J]  uint8   0 empty, 1 partial, 2 full, per key tile j (keys j*BN ..)
    num [B, HB, Y]     int32   the row block's non-empty key tiles
    idx [B, HB, Y, J]  int32   their list, in order: (j << 1) | full; entries past num unused

with Y = cdiv(max_q_len * group, BM) row blocks of BM rows (token x head, as the kernel packs
them) and J = cdiv(max_kv_len, BN). The prefill kernel walks only idx[.., :num] (split-KV
parts take equal shares of it) and skips the per-element mask on full tiles. A mask that
reads no head (HB = 1) is classified over all of a KV head's query heads.

`block_mask_model` is the same computation on the CPU, from the classifier's Python twin
(tests compare it with the reference evaluator's mask element by element).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..dsl.ir import Op, toposort
from ..dsl.program import Layer
from ..dsl.types import DType
from .abi import Arg, KernelABI
from .attention import extra_args, extra_inputs, hook_context, table_dims
from .mask_terms import MaskSplit, attention_mask_split
from .mask_tiles import EMPTY, FULL, TileClassifier, python_classifier, range_axis
from .plan import KernelPlan, layer_key
from .render import read_template, render
from .scalar_expr import TableInfo

THREADS = 128


@functools.lru_cache(maxsize=256)   # asked at every prefill call: a walk of the mask's graph
def needs_block_mask(layer: Layer) -> bool:
    """True when the block's mask reads an i32 table at a query or key position (one index
    along the positions), which only a run-time pass can bound per tile."""
    mask = layer.function.outputs[0].arg.mask
    if mask is None:
        return False
    tensors = {p.name for p in extra_inputs(layer)[0]}
    return any(n.op is Op.INDEX and n.dtype is DType.i32 and n.src[0].op is Op.INPUT and n.src[0].arg in tensors
               and range_axis(n) is not None for n in toposort([mask]))


@functools.lru_cache(maxsize=256)   # asked by every plan's key and render: a walk of the mask's graph
def block_mask_split(layer: Layer) -> MaskSplit | None:
    """The split of a block-mask kernel's mask into its key / row table reads (codegen/mask_terms.py), which the
    tensor-core prefills test once a tile as bits; None for blocks that need no block mask (their kernels keep their
    per-score test and their sources) or whose mask has no key term."""
    return attention_mask_split(layer.function.outputs[0].arg.mask) if needs_block_mask(layer) else None


def mask_heads(layer: Layer) -> int:
    """Head slices of the block mask: the KV heads where the mask reads `h` or `kv_h`, else 1."""
    spec = layer.function.outputs[0].arg
    reads = any(n.op is Op.ATTN_VAR and n.arg in ("h", "kv_h") for n in toposort([spec.mask]))
    return int(spec.num_kv_heads) if reads else 1


def _tables(layer: Layer) -> dict[str, TableInfo]:
    dims = {d: f"d_{d}" for d in table_dims(layer)}
    return {p.name: TableInfo(p.name, p.dtype, p.shape, dims) for p in extra_inputs(layer)[0]}


@dataclass(frozen=True, kw_only=True)
class BlockMaskPlan(KernelPlan):
    """The pre-pass of one prefill tiling: `rows` (BM) query rows and `keys` (BN) per tile."""
    family: ClassVar[str] = "block_mask"
    layer: Layer
    arch: str
    rows: int
    keys: int

    @property
    def key(self) -> str:
        return layer_key(self.layer, f"bm{self.rows}x{self.keys}", self.arch.replace("_", ""))

    @property
    def group(self) -> int:
        spec = self.layer.function.outputs[0].arg
        return int(spec.num_q_heads) // int(spec.num_kv_heads)

    @property
    def heads(self) -> int:
        return mask_heads(self.layer)

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer.name, "dims": dict(self.layer.dims), "consts": dict(self.layer.consts),
                "rows": self.rows, "keys": self.keys, "heads": self.heads}

    def source(self) -> str:
        return _render(self)


@functools.lru_cache(maxsize=64)
def _abi(plan: BlockMaskPlan) -> KernelABI:
    args = (Arg("seq_lens", "const int* __restrict__", "input"), Arg("cu_q", "const int* __restrict__", "input"),
            Arg("bm_cls", "unsigned char* __restrict__", "output"), Arg("bm_num", "int* __restrict__", "output"),
            Arg("bm_idx", "int* __restrict__", "output"), Arg("num_tokens", "int", "dim"),
            Arg("bm_rows", "int", "dim"), Arg("bm_cols", "int", "dim"), *extra_args(plan.layer))
    return KernelABI(name=plan.kernel_name, args=args, grid=("chunks", "bm_rows", str(plan.heads)), block=(THREADS,),
                     problem=("chunks", "bm_rows"))


@functools.lru_cache(maxsize=64)
def _render(plan: BlockMaskPlan) -> str:
    tc = TileClassifier({d: f"d_{d}" for d in table_dims(plan.layer)}, _tables(plan.layer), ranges=True)
    may_true, may_false = tc.classify(plan.layer.function.outputs[0].arg.mask)
    ctx = hook_context(plan.layer)
    return render("cuda/block_mask.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key,
                  signature=plan.abi.signature, common=read_template("cuda/common.cuh"), BM=plan.rows, BN=plan.keys,
                  GROUP=plan.group, HEADS=plan.heads, NT=THREADS, tile_lines=tc.c, tile_true=may_true,
                  tile_false=may_false, extra_params=ctx["extra_params"], extra_args=ctx["extra_args"])


def plan_block_mask(layer: Layer, arch: str, *, rows: int, keys: int) -> BlockMaskPlan:
    plan = BlockMaskPlan(layer=layer, arch=arch, rows=rows, keys=keys)
    plan.source()
    return plan


def python_tile_classifier(layer: Layer):
    """The pre-pass's tile classifier as a Python function (mask_tiles.python_classifier)."""
    return python_classifier(layer.function.outputs[0].arg.mask, {d: f"d_{d}" for d in table_dims(layer)},
                             _tables(layer), ranges=True)


def block_mask_model(layer: Layer, *, rows: int, keys: int, seq_lens, cu_seqlens, max_q_len: int,
                     max_kv_len: int, env: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pre-pass on the CPU, tile by tile as the kernel does it: (cls, num, idx) as above
    (idx entries past num are -1). env: the classifier's tables (p_name), scalars (s_name)
    and dims (d_name)."""
    classify = python_tile_classifier(layer)
    spec = layer.function.outputs[0].arg
    group = int(spec.num_q_heads) // int(spec.num_kv_heads)
    heads = mask_heads(layer)
    lens = [int(x) for x in seq_lens]
    cu = [int(x) for x in cu_seqlens]
    B, T = len(lens), cu[-1]
    Y, J = -(-max_q_len * group // rows), -(-max_kv_len // keys)
    cls = np.zeros((B, heads, Y, J), np.uint8)
    num = np.zeros((B, heads, Y), np.int32)
    idx = np.full((B, heads, Y, J), -1, np.int32)
    for b in range(B):
        tok0 = min(max(cu[b], 0), T)
        n = max(min(cu[b + 1], T) - tok0, 0)
        length = min(lens[b], J * keys)
        qp0 = length - n
        for hb in range(heads):
            for y in range(Y):
                r0 = y * rows
                if r0 >= n * group:
                    continue
                nrows = min(rows, n * group - r0)
                q_lo, q_hi = qp0 + r0 // group, qp0 + (r0 + nrows - 1) // group
                for j in range(J):
                    k0 = j * keys
                    if k0 >= length:
                        break
                    c = classify(q_lo, q_hi, k0, min(k0 + keys, length) - 1, hb * group, hb * group + group - 1, hb, b,
                                 **env)
                    cls[b, hb, y, j] = c
                    if c != EMPTY:
                        idx[b, hb, y, num[b, hb, y]] = (j << 1) | (c == FULL)
                        num[b, hb, y] += 1
    return cls, num, idx


def tiles_visited(num: np.ndarray) -> int:
    """Key tiles the prefill kernel walks with the block mask (benchmark predictions)."""
    return int(np.asarray(num).sum())

