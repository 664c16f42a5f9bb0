"""Attention blocks -> a paged-KV attention kernel (decode and chunked prefill, split-KV).

    plan = plan_paged_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"),
                                arch="sm_90", page_size=16)
    plan.key -> 'llama_attn_d128_hkv8_hq32_bf16_p16_sm90'

The block's `score` and `mask` expressions become two inline device functions; the mask's
causal / window / length conjuncts also bound each query's key range, so keys the mask
rules out are never read. RoPE rotates q in the kernel (K is rotated when appended).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from ..dsl.attention_ref import rope_inv_freq
from ..dsl.ir import AttentionSpec, Op
from ..dsl.program import Layer
from ..dsl.types import DType
from . import ops
from .plan import layer_key
from .render import read_template, render
from .row import LoweringError
from .scalar_expr import ScalarEmitter, TableInfo, alibi_table, mask_bounds, mask_is_exact

VARS = {"score": "score", "b": "b", "h": "h", "kv_h": "kv_h", "q_pos": "q_pos", "kv_pos": "kv_pos"}


class AttentionPlanNames:
    """What every attention plan derives from its layer and key (a mixin: needs .layer, .key)."""

    @property
    def spec(self) -> AttentionSpec:
        return self.layer.function.outputs[0].arg

    @property
    def kernel_name(self) -> str:
        return "lf_" + self.key

    @property
    def merge_name(self) -> str:
        return "lf_" + self.key + "_merge"


def extra_inputs(layer: Layer):
    """The block's extra tensor inputs (after q, k, v) and its scalar parameters."""
    fn = layer.function
    return [p for p in fn.params[3:] if p.kind == "tensor"], [p for p in fn.params if p.kind == "scalar"]


def table_dims(layer: Layer) -> list[str]:
    """Dims of the extra inputs that are passed to the kernel as ints (in this order)."""
    tensors, _ = extra_inputs(layer)
    return sorted({s.name for p in tensors for d in p.shape for s in sympy.sympify(d).free_symbols})


def check_attention_layer(layer: Layer, page_size: int) -> None:
    if layer.function.kind != "attention":
        raise LoweringError(f"{layer.name} is not an attention block")
    if layer.function.outputs[0].op is not Op.ATTENTION:
        raise LoweringError(f"{layer.name}: unexpected attention IR")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two, got {page_size}")


def check_specialisable(layer: Layer, what: str) -> int:
    """bf16/f16 storage and a head dim with a specialisation; returns the head dim."""
    spec = layer.function.outputs[0].arg
    if layer.dtype not in (DType.bf16, DType.f16):
        raise LoweringError(f"{layer.name}: {what} takes bf16 or f16, not {layer.dtype}")
    hd, hdv = int(spec.head_dim), int(spec.v_head_dim)
    if hd != hdv or hd not in (64, 128, 256):
        raise LoweringError(f"{layer.name}: no {what} specialisation for head dim {hd} "
                            f"(value dim {hdv}); supported: 64, 128, 256")
    return hd


@dataclass(frozen=True)
class PagedAttentionPlan(AttentionPlanNames):
    layer: Layer
    arch: str
    page_size: int = 16
    warps: int = 4

    @property
    def key(self) -> str:
        return layer_key(self.layer, f"p{self.page_size}", self.arch.replace("_", ""))

    @property
    def heads_per_cta(self) -> int:
        g = int(self.spec.num_q_heads) // int(self.spec.num_kv_heads)
        gc = 1
        while gc * 2 <= min(g, 8) and g % (gc * 2) == 0:
            gc *= 2
        return gc

    def source(self) -> str:
        return _render(self)


@functools.lru_cache(maxsize=128)
def _render(plan: PagedAttentionPlan) -> str:
    spec = plan.spec
    dtype = plan.layer.dtype
    hd = check_specialisable(plan.layer, "paged attention")
    hq, hkv = int(spec.num_q_heads), int(spec.num_kv_heads)
    group = hq // hkv
    gc = plan.heads_per_cta
    ctx = hook_context(plan.layer)
    return render(
        "cuda/attention_paged.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name,
        plan_key=plan.key, common=read_template("cuda/common.cuh"), T=ops.STORAGE_TYPE[dtype], HD=hd, HQ=hq,
        HKV=hkv, GROUP=group, GC=gc, NCHUNK=group // gc, PAGE=plan.page_size, NW=plan.warps, **ctx)


def hook_context(layer: Layer) -> dict:
    """Template variables of an attention block's hooks, shared by the attention templates:
    extra inputs and scalars, the score / mask / scale expressions, the mask's key bounds,
    RoPE and ALiBi."""
    spec = layer.function.outputs[0].arg
    tensors, scalars = extra_inputs(layer)
    dims = {d: f"d_{d}" for d in table_dims(layer)}
    tables = {p.name: TableInfo(p.name, p.dtype, p.shape, dims) for p in tensors}
    extra_params = [f"const {ops.STORAGE_TYPE[p.dtype]}* __restrict__ p_{p.name}" for p in tensors]
    extra_params += [f"{ops.C_TYPE[p.dtype]} s_{p.name}" for p in scalars]
    extra_params += [f"long long {c}" for c in dims.values()]
    extra_args = [f"p_{p.name}" for p in tensors] + [f"s_{p.name}" for p in scalars] + list(dims.values())

    score_em = ScalarEmitter(VARS, tables, dims)
    score_value = score_em.emit(spec.score) if spec.score is not None else "score"
    mask_em = ScalarEmitter(VARS, tables, dims)
    mask_value = mask_em.emit(spec.mask) if spec.mask is not None else None
    bound_em = ScalarEmitter({"b": "b", "q_pos": "qp", "kv_h": "kvh"}, tables, dims)
    lows, highs = mask_bounds(spec.mask, bound_em)
    scale_em = ScalarEmitter({}, tables, dims)
    scale_value = scale_em.emit(spec.scale)
    if scale_em.lines:
        scale_value = "[&]() { " + " ".join(scale_em.lines) + f" return (float)({scale_value}); }}()"
    alibi = score_em.alibi or mask_em.alibi
    rope = None
    if spec.rope is not None:
        r = int(spec.rope.rotary_dim)
        inv = rope_inv_freq(float(spec.rope.theta), r, spec.rope.scaling)   # float64, Llama 3 scaling applied
        rope = {"style": spec.rope.style, "rdim": r, "inv_freq": ", ".join(repr(float(x)) for x in inv)}
    scale_const = float(spec.scale.arg) if spec.scale.op is Op.CONST else None
    return dict(rope=rope, scale=scale_value, scale_const=scale_const, extra_params=extra_params, extra_args=extra_args,
                score_lines=score_em.lines, score_value=score_value, has_score=spec.score is not None,
                mask_lines=mask_em.lines, mask_value=mask_value, exact_mask=mask_is_exact(spec.mask),
                bound_lines=bound_em.lines, lows=lows, highs=highs, alibi=alibi_table(*alibi) if alibi else None)


def plan_paged_attention(layer: Layer, arch: str, *, page_size: int = 16, warps: int = 4) -> PagedAttentionPlan:
    check_attention_layer(layer, page_size)
    plan = PagedAttentionPlan(layer, arch, page_size, warps)
    plan.source()
    return plan
