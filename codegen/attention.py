"""Attention blocks -> a paged-KV attention kernel (decode and chunked prefill, split-KV).

    plan = plan_paged_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"),
                                arch="sm_90", page_size=16)
    plan.key -> 'llama_attn_d128_hkv8_hq32_bf16_p16_sm90'

The block's `score` and `mask` expressions become two inline device functions; the mask's
causal / window / length conjuncts also bound each query's key range, so keys the mask
rules out are never read. RoPE rotates q in the kernel (K is rotated when appended).

kv_dtype="fp8_e4m3" (both attention kernels): the cache holds e4m3 values and the kernel takes
float32 k_scale / v_scale [Hkv] (runtime/kv_cache.py). A CTA serves one KV head, so K's scale
folds into the score scale and V's into the output normalisation; values are widened exactly
(templates/cuda/fp8.cuh).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import sympy

from ..dsl.ir import AttentionSpec, Op
from ..dsl.numerics import rope_scaling_to_json
from ..dsl.program import Layer
from ..dsl.types import DType
from . import ops
from .abi import Arg, KernelABI
from .kv_append import KV_DTYPES
from .plan import KernelPlan, layer_key
from .render import read_template, render
from .row import LoweringError
from .rope import rope_context
from .distance_terms import distance_term
from .mask_tiles import tile_context
from .scalar_expr import ScalarEmitter, TableInfo, alibi_table, mask_bounds, mask_is_exact, mask_rest, t5_tables

VARS = {"score": "score", "b": "b", "h": "h", "kv_h": "kv_h", "q_pos": "q_pos", "kv_pos": "kv_pos"}


class AttentionPlan(KernelPlan):
    """What every attention plan derives from its layer and key (needs .layer, .key): the main
    kernel and the split-KV merge kernel, the extra inputs' arguments, the manifest fields."""

    @property
    def spec(self) -> AttentionSpec:
        return self.layer.function.outputs[0].arg

    @property
    def merge_name(self) -> str:
        return "lf_" + self.key + "_merge"

    @property
    def group(self) -> int:
        return int(self.spec.num_q_heads) // int(self.spec.num_kv_heads)

    @property
    def kv_suffix(self) -> tuple[str, ...]:
        """The key's part for the cache's storage: ('kvfp8e4m3',) for an fp8 cache, else ()."""
        kv = getattr(self, "kv_dtype", None)
        return ("kv" + kv.replace("_", ""),) if kv else ()

    def main_abi(self) -> KernelABI:
        raise NotImplementedError

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return _attention_kernels(self)

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer.name, "dims": dict(self.layer.dims), "consts": dict(self.layer.consts),
                "page_size": self.page_size, "interface": attention_interface(self.layer)}


def attention_interface(layer: Layer) -> dict[str, Any]:
    """What a runtime module needs to check and launch a block's kernels, as JSON: heads, head
    dim (and v_head_dim where the value dim differs), dtype, RoPE (for the cache's append kernel), extra inputs, scalars, and the dims of
    the extra inputs that the kernels take as ints (in order)."""
    spec = layer.function.outputs[0].arg
    tensors, scalars = extra_inputs(layer)
    hd, hdv = int(spec.head_dim), int(spec.v_head_dim)
    return {"num_q_heads": int(spec.num_q_heads), "num_kv_heads": int(spec.num_kv_heads),
            "head_dim": hd, **({"v_head_dim": hdv} if hdv != hd else {}), "dtype": str(layer.dtype),
            "rope": rope_description(layer),
            "extra": [{"name": p.name, "dtype": str(p.dtype), "shape": [str(d) for d in p.shape]} for p in tensors],
            "scalars": [{"name": p.name, "dtype": str(p.dtype), "default": p.default} for p in scalars],
            "table_dims": table_dims(layer)}


@functools.lru_cache(maxsize=256)
def _attention_kernels(plan: AttentionPlan) -> tuple[KernelABI, ...]:
    return plan.main_abi(), merge_abi(plan.merge_name, plan.layer.dtype, int(plan.spec.num_q_heads),
                                      int(plan.spec.v_head_dim))


def merge_abi(name: str, dtype: DType, num_q_heads: int, head_dim: int) -> KernelABI:
    """The split-KV merge (attention_merge.cuh.jinja): one block per (token, query head), a
    thread per channel of the output (head_dim: the value head dim)."""
    return KernelABI(name=name, args=(
        Arg("part_o", "const float* __restrict__", "workspace"),
        Arg("part_lse", "const float* __restrict__", "workspace"),
        Arg("out", f"{ops.STORAGE_TYPE[dtype]}* __restrict__", "output"),
        Arg("num_splits", "int", "dim")), grid=(f"tokens * {num_q_heads}",), block=(head_dim,), problem=("tokens",))


def cache_args(dtype: DType, kv_dtype: str | None = None) -> tuple[Arg, ...]:
    """q and the paged cache, as every attention kernel takes them first (an fp8 cache: e4m3
    bytes, then its float32 scales [Hkv])."""
    t = ops.STORAGE_TYPE[dtype]
    kt = "unsigned char" if kv_dtype else t
    args = (Arg("q", f"const {t}* __restrict__", "input"), Arg("k_cache", f"const {kt}* __restrict__", "input"),
            Arg("v_cache", f"const {kt}* __restrict__", "input"),
            Arg("page_table", "const int* __restrict__", "input"), Arg("seq_lens", "const int* __restrict__", "input"))
    if kv_dtype:
        args += (Arg("k_scale", "const float* __restrict__", "input"),
                 Arg("v_scale", "const float* __restrict__", "input"))
    return args


def check_kv_dtype(layer: Layer, kv_dtype: str | None) -> None:
    """An fp8 cache serves bf16/f16 blocks (kv_dtype: None or one of codegen.kv_append.KV_DTYPES)."""
    if kv_dtype is None:
        return
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES} or None, got {kv_dtype!r}")
    if layer.dtype not in (DType.bf16, DType.f16):
        raise LoweringError(f"{layer.name}: an {kv_dtype} cache serves bf16 or f16 blocks, not {layer.dtype}")


def output_args(dtype: DType) -> tuple[Arg, ...]:
    """The output and the split-KV workspace (partial outputs and log-sum-exps)."""
    return (Arg("out", f"{ops.STORAGE_TYPE[dtype]}* __restrict__", "output"),
            Arg("part_o", "float* __restrict__", "workspace"), Arg("part_lse", "float* __restrict__", "workspace"))


def extra_args(layer: Layer) -> tuple[Arg, ...]:
    """The block's extra tensor inputs, scalars and the dims of the extra inputs, in the order
    every attention kernel (and its hooks) takes them last."""
    tensors, scalars = extra_inputs(layer)
    args = [Arg(f"p_{p.name}", f"const {ops.STORAGE_TYPE[p.dtype]}* __restrict__", "table", p.name) for p in tensors]
    args += [Arg(f"s_{p.name}", ops.C_TYPE[p.dtype], "scalar", p.name) for p in scalars]
    args += [Arg(f"d_{d}", "long long", "dim", d) for d in table_dims(layer)]
    return tuple(args)


def rope_description(layer: Layer) -> dict[str, Any] | None:
    """The block's RoPE (what the KV-cache append kernel needs), as JSON; None without one."""
    rope = layer.function.outputs[0].arg.rope
    if rope is None:
        return None
    return {"style": rope.style, "theta": float(rope.theta), "rotary_dim": int(rope.rotary_dim),
            "scaling": rope_scaling_to_json(rope.scaling)}


def extra_inputs(layer: Layer):
    """The block's extra tensor inputs (after q, k, v) and its scalar parameters."""
    fn = layer.function
    return [p for p in fn.params[3:] if p.kind == "tensor"], [p for p in fn.params if p.kind == "scalar"]


def table_dims(layer: Layer) -> list[str]:
    """Dims of the extra inputs that are passed to the kernel as ints (in this order)."""
    tensors, _ = extra_inputs(layer)
    return sorted({s.name for p in tensors for d in p.shape for s in sympy.sympify(d).free_symbols})


def tile_page_entries(keys: int, page: int) -> int:
    """Pages a key tile of `keys` keys spans at most (tiles start at multiples of their width)."""
    return 1 if page % keys == 0 else (keys // page if keys % page == 0 else (keys - 1) // page + 2)


def check_attention_layer(layer: Layer, page_size: int) -> None:
    if layer.function.kind != "attention":
        raise LoweringError(f"{layer.name} is not an attention block")
    if layer.function.outputs[0].op is not Op.ATTENTION:
        raise LoweringError(f"{layer.name}: unexpected attention IR")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two, got {page_size}")


TC_HEAD_DIMS = tuple(range(32, 257, 16))   # the tensor-core kernel's q/k and value head dims
SWIZZLED_HEAD_DIMS = (64, 128, 256)          # rows of whole 128-byte lines: the wgmma kernel's, the fp8 caches'


def check_specialisable(layer: Layer, what: str, f32: bool = False, any_head_dim: bool = False,
                        head_dims: tuple[int, ...] = SWIZZLED_HEAD_DIMS, value_dim: bool = False) -> int:
    """bf16/f16 storage (f32 too where f32 is set) and a head dim with a specialisation: one of
    `head_dims` (with any_head_dim, the CUDA-core kernel's: multiples of 16 up to 256), equal
    to the value dim, or (value_dim) with a value dim of `head_dims` too; returns the head dim."""
    spec = layer.function.outputs[0].arg
    if layer.dtype not in (DType.bf16, DType.f16) + ((DType.f32,) if f32 else ()):
        raise LoweringError(f"{layer.name}: {what} takes bf16{', f16 or f32' if f32 else ' or f16'}, not {layer.dtype}")
    hd, hdv = int(spec.head_dim), int(spec.v_head_dim)
    dims = tuple(range(16, 257, 16)) if any_head_dim else head_dims
    ok = hd in dims and (hdv in dims if value_dim else hd == hdv)
    if not ok:
        raise LoweringError(f"{layer.name}: no {what} specialisation for head dim {hd} (value dim {hdv}); "
                            f"supported: {_dims_text(dims)}, {'for either' if value_dim else 'equal to the value dim'}")
    return hd


def _dims_text(dims: tuple[int, ...]) -> str:
    """'64, 128, 256', or a range of multiples of 16 in words."""
    if len(dims) > 3 and dims == tuple(range(dims[0], dims[-1] + 1, 16)):
        return f"multiples of 16 {'up to' if dims[0] == 16 else f'from {dims[0]} to'} {dims[-1]}"
    return ", ".join(map(str, dims))


def lane_shape(hd: int, itemsize: int) -> dict[str, int] | None:
    """The CUDA-core kernel's lanes for a head dim whose 16-byte vectors do not tile a warp
    (80, 96, ...): LPK lanes a key (a power of two), EPL channels a lane loaded as EPL / VW
    vectors of VW; None where the kernel's own 16-byte shape applies (64, 128, 256)."""
    per16 = 16 // itemsize
    epl = hd // 32 if hd // per16 > 32 else per16     # the kernel's own shape (templates/cuda/attention_paged)
    if hd % epl == 0 and 32 % (hd // epl) == 0 and epl & (epl - 1) == 0:
        return None
    lpk = next(p for p in (32, 16, 8, 4, 2, 1) if hd % p == 0 and hd // p >= per16 or p == 1)
    epl = hd // lpk
    vw = next(v for v in (per16, per16 // 2, per16 // 4, per16 // 8, 1) if v and epl % v == 0)
    return {"EPL": epl, "LPK": lpk, "VW": vw}


@dataclass(frozen=True, kw_only=True)
class PagedAttentionPlan(AttentionPlan):
    """The CUDA-core kernel: a CTA per (token, KV head, chunk of its query heads), warps along keys."""

    family: ClassVar[str] = "paged_attention"
    layer: Layer
    arch: str
    page_size: int = 16
    warps: int = 4
    kv_dtype: str | None = None   # "fp8_e4m3": e4m3 cache with per-head scales

    @property
    def key(self) -> str:
        return layer_key(self.layer, f"p{self.page_size}", *self.kv_suffix, self.arch.replace("_", ""))

    @property
    def heads_per_cta(self) -> int:
        g = int(self.spec.num_q_heads) // int(self.spec.num_kv_heads)
        cap = 4 if self.kv_dtype else 8   # fp8: 16 channels a lane, so half the heads' registers
        gc = 1
        while gc * 2 <= min(g, cap) and g % (gc * 2) == 0:
            gc *= 2
        return gc

    def source(self) -> str:
        return _render(self)

    def main_abi(self) -> KernelABI:
        dims = tuple(Arg(n, "int", "dim") for n in ("max_pages", "num_pages", "num_seqs", "num_splits"))
        args = (*cache_args(self.layer.dtype, self.kv_dtype), Arg("q_seq", "const int* __restrict__", "input"),
                Arg("q_pos_arr", "const int* __restrict__", "input", "q_pos"), *output_args(self.layer.dtype), *dims,
                *extra_args(self.layer))
        nchunk = self.group // self.heads_per_cta
        return KernelABI(name=self.kernel_name, args=args, grid=(f"tokens * {int(self.spec.num_kv_heads) * nchunk}",
                         "num_splits"), block=(self.warps * 32,), problem=("tokens", "num_splits"))

    def describe(self) -> dict[str, Any]:
        kv = {"kv_dtype": self.kv_dtype} if self.kv_dtype else {}
        return {**super().describe(), **kv, "heads_per_cta": self.heads_per_cta}


@functools.lru_cache(maxsize=128)
def _render(plan: PagedAttentionPlan) -> str:
    spec = plan.spec
    dtype = plan.layer.dtype
    hd = check_specialisable(plan.layer, "paged attention", f32=True, any_head_dim=True)
    hq, hkv = int(spec.num_q_heads), int(spec.num_kv_heads)
    group = hq // hkv
    gc = plan.heads_per_cta
    ctx = hook_context(plan.layer)
    t = ops.STORAGE_TYPE[dtype]
    fp8 = plan.kv_dtype is not None
    kt = "unsigned char" if fp8 else t   # the cache's element: e4m3 bytes, or the block's dtype
    lanes = lane_shape(hd, 1 if fp8 else dtype.itemsize)
    if fp8 and lanes:   # head dims off the 16-byte shape: the 2-byte lanes' channels (their registers fit)
        lanes = lane_shape(hd, 2)
    return render(
        "cuda/attention_paged.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name,
        signature=plan.abi.signature, merge_signature=plan.kernels[1].signature, plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, HD=hd, HQ=hq,
        HKV=hkv, GROUP=group, GC=gc, NCHUNK=group // gc, PAGE=plan.page_size, NW=plan.warps,
        lanes=lanes, kv_type=f"{'lf_arr' if lanes else 'lf_vec'}<{kt}, EPL>",
        kv_load=(f"lf_load_kv_arr<{kt}, EPL, VW, " if lanes else f"lf_load_kv<{kt}, EPL, ") + "PAGE, HKV * HD>",
        fp8=fp8, KT=kt, fp8_helpers=read_template("cuda/fp8.cuh") if fp8 else "",
        to_float="lf_e4m3_to_float" if fp8 else "lf_to_float", **ctx)


def folds(ctx: dict) -> bool:
    """Whether a kernel may fold the scale into the exponent's FFMA (WGTileConfig.fold, TCAttentionPlan.fold):
    no score hook and a positive constant scale (the raw scores' max is then the scaled ones'). ctx: hook_context's."""
    return not ctx["has_score"] and ctx["scale_const"] is not None and ctx["scale_const"] > 0


def hook_context(layer: Layer, distance_table: bool = False, key_tile: int | None = None,
                 unsigned_abs: bool = True) -> dict:
    """Template variables of an attention block's hooks, shared by the attention templates:
    extra inputs and scalars, the score / mask / scale expressions, the mask's key bounds,
    RoPE and ALiBi. distance_table: the score's distance term (codegen/distance_terms.py)
    becomes `lf_rel_term(rel, ...)`, and lf_score takes its value (`rel_v`) from the kernel.
    key_tile (a kernel's keys a tile, a power of two): where the mask reads kv_pos // 2^j or kv_pos % 2^j with
    2^j dividing it, also `lf_mask_kt(..., kv_tile, kv_off)` (mask_kt), the mask at key kv_tile + kv_off for a
    tile start kv_tile and 0 <= kv_off < key_tile, those terms split over the two (ScalarEmitter.key_split):
    a kernel passing a constant kv_off per unrolled key has them folded, not computed per score. unsigned_abs: |x|
    against a constant as one unsigned compare (ScalarEmitter.unsigned_abs; False: abs and a signed compare)."""
    spec = layer.function.outputs[0].arg
    tensors, scalars = extra_inputs(layer)
    dims = {d: f"d_{d}" for d in table_dims(layer)}
    tables = {p.name: TableInfo(p.name, p.dtype, p.shape, dims) for p in tensors}
    extra = extra_args(layer)   # the hooks take the kernel's extra arguments as they are
    extra_params = [f"{a.ctype} {a.name}" for a in extra]

    def emitter(names: dict[str, str], **kw) -> ScalarEmitter:
        return ScalarEmitter(names, tables, dims, unsigned_abs=unsigned_abs, **kw)

    score_em = emitter(VARS)
    term = distance_term(spec.score) if distance_table else None
    rel_em = emitter({"b": "b", "h": "h", "kv_h": "kv_h"})
    rel_term = None
    if term is not None:
        score_em.cache[id(term.node)] = "rel_v"
        rel_em.cache.update({id(d): "rel" for d in term.distances})
        rel_value = rel_em.emit(term.node)
        rel_term = {"ctype": term.ctype, "lines": rel_em.lines, "value": rel_value, "sign": term.sign,
                    "heads": term.heads}
    score_value = score_em.emit(spec.score) if spec.score is not None else "score"
    mask_em = emitter(VARS)
    mask_value = mask_em.emit(spec.mask) if spec.mask is not None else None
    mask_kt = None
    if key_tile is not None and spec.mask is not None:
        kt_em = emitter({**VARS, "kv_pos": "(kv_tile + kv_off)"}, key_split=("kv_tile", "kv_off", key_tile))
        kt_value = kt_em.emit(spec.mask)
        mask_kt = {"lines": kt_em.lines, "value": kt_value} if kt_em.split_used else None
    rest = mask_rest(spec.mask)
    rest_em = emitter(VARS)
    rest_value = rest_em.emit(rest) if rest is not None else None
    from .block_mask import block_mask_split   # (codegen/block_mask.py imports this module)
    split = block_mask_split(layer)
    split_ctx = None
    if split is not None:   # the per-score test over its key / row terms' values (codegen/mask_terms.py)
        def term(node, names):
            em = emitter(names)
            value = em.emit(node)
            return {"ctype": ops.C_TYPE[node.dtype], "lines": em.lines, "value": value}
        test_em = emitter(VARS)
        test_em.cache.update({id(n): f"kt{i}" for i, n in enumerate(split.keys)})
        test_em.cache.update({id(n): f"rt{i}" for i, n in enumerate(split.rows)})
        test_value = test_em.emit(split.expr)
        split_ctx = {"keys": [term(n, {"b": "b", "kv_h": "kv_h", "kv_pos": "kv_pos"}) for n in split.keys],
                     "rows": [term(n, {"b": "b", "h": "h", "kv_h": "kv_h", "q_pos": "q_pos"}) for n in split.rows],
                     "lines": test_em.lines, "value": test_value, "bounds": rest is not None}
    bound_em = emitter({"b": "b", "q_pos": "qp", "kv_h": "kvh"})
    lows, highs = mask_bounds(spec.mask, bound_em)
    sink_em = emitter(VARS)
    sink_value = sink_em.emit(spec.sink) if spec.sink is not None else None
    scale_em = emitter({})
    scale_value = scale_em.emit(spec.scale)
    if scale_em.lines:
        scale_value = "[&]() { " + " ".join(scale_em.lines) + f" return (float)({scale_value}); }}()"
    alibi = score_em.alibi or mask_em.alibi or sink_em.alibi or rel_em.alibi
    scale_const = float(spec.scale.arg) if spec.scale.op is Op.CONST else None
    tiles = tile_context(spec.mask, dims, exact=mask_is_exact(spec.mask), tables=tables)
    return dict(tile_lines=tiles.get("tile_lines"), tile_true=tiles.get("tile_true"), tile_false=tiles.get("tile_false"),
                rope=rope_context(spec.rope, memory="global"), t5=t5_tables(score_em.t5 | mask_em.t5 | sink_em.t5 | rel_em.t5), scale=scale_value, scale_const=scale_const, extra_params=extra_params,
                extra_args=[a.name for a in extra],
                score_lines=score_em.lines, score_value=score_value, has_score=spec.score is not None,
                mask_lines=mask_em.lines, mask_value=mask_value, exact_mask=mask_is_exact(spec.mask), mask_kt=mask_kt,
                rest_lines=rest_em.lines, rest_value=rest_value,
                sink_lines=sink_em.lines, sink_value=sink_value, rel_term=rel_term,
                mask_split=split_ctx,
                bound_lines=bound_em.lines, lows=lows, highs=highs, alibi=alibi_table(*alibi) if alibi else None)


def plan_paged_attention(layer: Layer, arch: str, *, page_size: int = 16, warps: int = 4,
                         kv_dtype: str | None = None) -> PagedAttentionPlan:
    check_attention_layer(layer, page_size)
    check_kv_dtype(layer, kv_dtype)
    plan = PagedAttentionPlan(layer=layer, arch=arch, page_size=page_size, warps=warps, kv_dtype=kv_dtype)
    plan.source()
    return plan
