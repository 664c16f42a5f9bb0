"""Which kernel families serve a specialised definition: the one place that knows.

    plans_for_layer(layer, "sm_90", page_size=16, compile_fn=...)  -> [KernelPlan, ...]

A layer gives its row kernel, or, with a matrix product, the small-token product kernels for up
to 8 and up to 16 rows (codegen/linear_lower.py), or, with a scan, a causal convolution or state,
the scan family's kernel(s) it matches (codegen/scan_lower.py: the selective scan one per chunk tiling); an attention block gives the tensor-core prefill and decode
kernels (sm_80+; on sm_90 the prefill is the wgmma kernel where it serves the block), the CUDA-core paged kernel, and the KV-cache append kernel its cache
needs (RoPE fused when the block rotates). Everything downstream (build, manifest, packs,
TensorRT plugins) handles the plans through the KernelPlan interface alone.
"""
from __future__ import annotations

from ..dsl.program import Layer
from .attention import plan_paged_attention
from .attention_tc import (MODES, block_many_tile, fp8_cvt_default, heads_first_default, plan_tc_attention,
                           fold_default as tc_fold_default)
from .attention_wgmma import default_options as wgmma_options, plan_wgmma_attention, supports as wgmma_supports
from .kv_append import plan_kv_append
from .linear_lower import has_matmul, linear_plans
from .plan import CompileFn, KernelPlan, LoweringError, plan_layer, spill_free
from .scan import not_lowered_reason, scan_parts
from .scan_lower import scan_plans

__all__ = ["plans_for_layer"]


def plans_for_layer(layer: Layer, arch: str, *, page_size: int = 16, compile_fn: CompileFn | None = None,
                    kv_cache: str | None = None) -> list[KernelPlan]:
    """The plans of every kernel `layer` needs; LoweringError when no family lowers it.
    kv_cache: the KV cache's storage when it is not the block's dtype ("fp8_e4m3")."""
    if layer.function.kind != "attention":
        if scan_parts(layer.function):   # scans, causal convolutions, state: the scan family's (codegen/scan_lower.py)
            reason = not_lowered_reason(layer)
            if reason:
                raise LoweringError(reason)
            return scan_plans(layer, arch)
        if has_matmul(layer.function):
            return list(linear_plans(layer, arch))
        return [plan_layer(layer, arch)]
    plans: list[KernelPlan] = []
    if int(arch.removeprefix("sm_").rstrip("af")) >= 80:
        # on Hopper the ragged prefill is the wgmma kernel where it serves the block (sm_90a), with
        # its default distance tables, as PagedAttention plans it (so a pack holds what runs)
        hopper = arch.rstrip("af") == "sm_90" and not kv_cache and wgmma_supports(layer, page_size)
        plans += [plan_wgmma_attention(layer, page_size=page_size, compile_fn=compile_fn, **wgmma_options(layer))
                  if m == "prefill" and hopper else
                  plan_tc_attention(layer, arch, page_size=page_size, mode=m, compile_fn=compile_fn, kv_dtype=kv_cache,
                                    fp8_cvt=fp8_cvt_default(), fold=tc_fold_default(),
                                    heads_first=heads_first_default())
                  for m in MODES]
        if getattr(plans[0], "block_mask", False):   # the prefill kernel's block-mask pre-pass (codegen/block_mask.py)
            plans.append(plans[0].block_mask_plan())
        if block_many_tile(layer, kv_cache) is not None:
            # decode's kernel for grids past one wave of its default tile, as PagedAttention takes it (runtime/
            # attention.DECODE_MANY): in the pack where it compiles without spills
            many = plan_tc_attention(layer, arch, page_size=page_size, mode="decode", many=True, compile_fn=compile_fn,
                                     kv_dtype=kv_cache, fp8_cvt=fp8_cvt_default(), fold=tc_fold_default(),
                                     heads_first=heads_first_default())
            if spill_free(many, compile_fn):
                plans.append(many)
    paged = plan_paged_attention(layer, arch, page_size=page_size, kv_dtype=kv_cache)
    spec = paged.spec
    append = plan_kv_append(str(layer.dtype), int(spec.num_kv_heads), int(spec.head_dim), page_size, spec.rope, arch,
                            kv_dtype=kv_cache)
    return plans + [paged, append]
