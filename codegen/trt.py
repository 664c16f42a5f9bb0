"""TensorRT plugins from the same kernels: what each plugin is, derived from a plan and its ABI.

    specs, excluded = plugin_specs(plans)     # PluginSpec per kernel TensorRT can serve; reasons for the rest

A `PluginSpec` says, as plain data, how a TensorRT plugin drives one kernel: its tensor
inputs and outputs (dtypes and shapes as expressions over named dims), the attributes
(the layer's runtime scalars), where each dim is read (input, axis), the sizes the kernel's
grid and int arguments need as expressions over those dims, and which kernel arguments
TensorRT cannot fill and get a null pointer (a workspace the launch never touches, a form's
unused input). codegen/trt_render.py turns specs into the plugin sources; nothing here
restates a signature, grid or shared-memory size: they come from the KernelABI.

What TensorRT's plugin interface allows, per family (each plugin launches the plan's main kernel
once; a refused shape is an error before the launch: static axes, axes that must agree, and the
`limits` no shape states):
  row, moe_route  every kernel: inputs, outputs and scalars are the layer's; rows = the
                  product of the lead dims, as runtime/layers.py counts them.
  paged / tc attention, per-token form (runtime/attention.py PagedAttention.__call__):
                  q [T, Hq, D], the paged cache, page table, sequence lengths, each token's
                  sequence and position are inputs; num_splits = 1 (the split-KV workspace
                  and merge kernel are not used, so the plugin allocates nothing); every
                  int argument is a dim of an input. An fp8 (e4m3) cache: FP8 cache tensors
                  and the layer's float32 k_scale / v_scale [Hkv] as inputs. The tensor-core
                  prefill kernel is left out: its grid needs the longest query chunk, a host
                  value no shape gives.
  kv_append       append-only: the caches are inputs with outputs aliased to them (written in
                  place), each token's page and position an input; the sequence-length and
                  page-table updates the runtime's PagedKVCache queues into the same launch are
                  the caller's (none in the launch). An fp8 cache as attention's.
  gemv            x [M, K] with M <= the plan's token tiles (max_m); W in the plan's layout
                  (bf16/f16; u4 int32 words; i8; f8e4m3 FP8) and its scales as inputs; the
                  norm's eps an attribute. Expert products: the permutation's offsets (src,
                  active) are inputs and the sorted rows P <= max_m (each expert's rows are at
                  most P; the kernel's bound on them is not a shape otherwise).
  gemm            the Hopper GEMM with pointers, any M. Left out: the TMA variants (tensor maps
                  the host encodes from addresses) and the persistent one (its grid needs the
                  SM count). No split-K workspace exists in this kernel.
  dequant, quant_rows   every size fixed by the plan, or M rows of x.
  scan_conv, selective_scan   prefill over [Bt, D, L]; the final state an output; L >= 1 where a
                  final state is written (L = 0 launches nothing and would leave it unwritten).
  scan_conv_update, selective_state_update, ssd_state_update   one step: the state is an input
                  with the first output aliased to it (written in place, as kv_append).
  ssd_chunk_state, ssd_state_passing, ssd_chunk_scan   Mamba2's prefill as three plugins: the
                  runtime's workspaces between them (states, s_last, start) are outputs of one
                  and inputs of the next; dense inputs (the strides from their shapes); dt_lo /
                  dt_hi attributes (runtime/ssd.py dt_limit).
  moe_align, moe_gather, moe_combine   ids [T, k] (pairs <= 2^30), x [T, H] with src [P] (T >= 1
                  where P > 0: src is clamped into [0, T)), the experts' rows with pos and w.
  lora_shrink, lora_expand   the store's tables (E1 = slots + 1 rows) and the tokens' permutation
                  are inputs; expand into a new output from dense y and the shrink's v (vslot 0).
  mla_decode      each token the last of its sequence, num_splits = 1 (no parts, no merge), the
                  scale an attribute; at least one sequence and one page. mla_append: one
                  layer's cache in place, meta [2, T].
  block_mask      left out: its grid and lists are sized by max_q_len and max_kv_len (host
                  values), and the prefill kernel reading them is not a plugin.
Kernels needing more than 48 KiB of dynamic shared memory are served by the C++ plugins only
(they set the attribute when loading the cubin); the AOT launch parameters cannot ask for it.
FP8 and INT8 tensors (fp8 caches, f8e4m3 and i8 weights) are raw bytes with their own scale
inputs: a network passes them as they are (strongly typed), not through TensorRT's quantisation.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from typing import Any, Iterable

from . import trt_exprs
from .abi import Arg, KernelABI
from .attention import attention_interface
from .plan import KernelPlan, layer_interface

__all__ = ["TensorSpec", "Attribute", "PluginSpec", "plugin_specs", "NAMESPACE", "TRT_DTYPES"]

NAMESPACE = "layerforge"

# DSL dtype -> (tensorrt Python dtype, tensorrt.plugin type string, C++ nvinfer1::DataType)
TRT_DTYPES = {"bf16": ("bfloat16", "BF16", "kBF16"), "f16": ("float16", "FP16", "kHALF"),
              "f32": ("float32", "FP32", "kFLOAT"), "i32": ("int32", "INT32", "kINT32"),
              "i64": ("int64", "INT64", "kINT64"), "bool": ("bool", "BOOL", "kBOOL"),
              "i8": ("int8", "INT8", "kINT8"),              # an i8 weight's bytes
              "fp8_e4m3": ("fp8", "FP8", "kFP8")}           # e4m3 bytes: an fp8 KV cache, an f8e4m3 weight

# C types of the int and float arguments a plugin fills (TensorRT's AOT extra arguments are
# 32-bit ints; the entry kernel widens or reinterprets them, see trt_render.py).
_VALUE_TYPES = ("int", "long long", "float")


class NotAPlugin(ValueError):
    """A kernel TensorRT's plugin interface cannot serve honestly (the message says why)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str                 # the DSL's name (inputs) or "out<i>" (outputs)
    dtype: str                # a key of TRT_DTYPES: DSL dtypes ("bf16", "i32", ...), "i8", "fp8_e4m3"
    shape: tuple[str, ...]    # per axis: an int literal or an expression over the plugin's dims


@dataclass(frozen=True)
class Attribute:
    name: str                 # the plugin field name: the layer's scalar parameter
    dtype: str                # "f32", "i32", ...
    default: Any


@dataclass(frozen=True)
class PluginSpec:
    name: str                                  # the plan's key (plugin name, version "1")
    family: str
    kernel: KernelABI                          # the main kernel, as the runtime launches it
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[Attribute, ...]
    dims: tuple[tuple[str, int, int], ...]     # (dim, input index, axis): where each dim is read
    sizes: tuple[tuple[str, str], ...]         # (name, expression over dims and earlier sizes), in order
    nulls: frozenset[str] = frozenset()        # argument refs passed as null pointers
    aliases: tuple[int, ...] = ()              # per output: the input it is written into in place (-1: none)
    form: str = ""                             # which calling form the plugin serves, for people
    qdp_reason: str | None = None              # why the Python AOT plugin leaves it out (None: it serves it)
    limits: tuple[tuple[str, int, int | None], ...] = ()   # (expression over dims and sizes, least, most or
                                               # None): bounds of the kernel no shape states (refused before launch)

    def source_of(self, arg: Arg) -> tuple[str, Any]:
        """Where the plugin takes a kernel argument from: ("input", index), ("output", index),
        ("size", name of a dim or size), ("attribute", name) or ("null", None)."""
        if arg.ref in self.nulls:
            return "null", None
        if arg.role in ("input", "table"):
            names = [t.name for t in self.inputs]
            if arg.ref not in names:
                raise NotAPlugin(f"argument {arg.name}: {arg.ref!r} is not an input of the plugin")
            return "input", names.index(arg.ref)
        if arg.role == "output":   # by index (a layer's outputs: "out<i>" where so named) or by name
            names = [t.name for t in self.outputs]
            if arg.ref.isdigit():
                return "output", names.index(f"out{arg.ref}") if f"out{arg.ref}" in names else int(arg.ref)
            if arg.ref not in names:
                raise NotAPlugin(f"argument {arg.name}: {arg.ref!r} is not an output of the plugin")
            return "output", names.index(arg.ref)
        if arg.role == "workspace":   # a buffer between two kernels of a plan: the plugin's input or output
            for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
                names = [t.name for t in tensors]
                if arg.ref in names:
                    return kind, names.index(arg.ref)
            raise NotAPlugin(f"argument {arg.name}: the workspace {arg.ref!r} is neither an input nor an output")
        if arg.role == "scalar":
            return "attribute", arg.ref
        return "size", arg.ref


def plugin_specs(plans: Iterable[KernelPlan]) -> tuple[list[PluginSpec], dict[str, str]]:
    """A PluginSpec for every plan TensorRT can serve; the others' keys with the reason."""
    specs, excluded = [], {}
    for plan in plans:
        builder = _BUILDERS.get(plan.family)
        if builder is None:
            excluded[plan.key] = f"no TensorRT plugin for the {plan.family} family yet"
            continue
        try:
            specs.append(_checked(builder(plan)))
        except NotAPlugin as e:
            excluded[plan.key] = str(e)
    return specs, excluded


# ---- rows ---------------------------------------------------------------------------------------
def _row_spec(plan) -> PluginSpec:
    info = layer_interface(plan.layer)
    inputs = tuple(TensorSpec(p["name"], p["dtype"], tuple(p["shape"])) for p in info["params"]
                   if p["kind"] == "tensor")
    attributes = tuple(Attribute(p["name"], p["dtype"], p["default"]) for p in info["params"] if p["kind"] == "scalar")
    outputs = tuple(TensorSpec(f"out{i}", o["dtype"], tuple(o["shape"])) for i, o in enumerate(info["outputs"]))
    lead = [str(d) for d in plan.lowered().lead_dims]
    rows = " * ".join(f"({d})" for d in lead) or "1"   # runtime/layers.py: rows = product of the lead dims
    return PluginSpec(name=plan.key, family=plan.family, kernel=plan.abi, inputs=inputs, outputs=outputs,
                      attributes=attributes, dims=_bind_dims(inputs, set()), sizes=(("rows", rows),),
                      form="rows")


# ---- attention, per-token form -----------------------------------------------------------------
def _attention_spec(plan) -> PluginSpec:
    if getattr(plan, "many", False):
        raise NotAPlugin("the decode kernel of grids past one wave of the default tile (PagedAttention's "
                         "decode_many): a plugin launches the block's default decode kernel whatever the grid")
    if plan.family in ("tc_attention", "wgmma_attention") and plan.mode != "decode":
        raise NotAPlugin("the tensor-core prefill kernel's grid needs the longest query chunk (max_q_len), a host "
                         "value that no input shape gives; decode-form tokens run the decode and CUDA-core kernels")
    info = attention_interface(plan.layer)
    hq, hkv, d, dtype, page = info["num_q_heads"], info["num_kv_heads"], info["head_dim"], info["dtype"], plan.page_size
    kv = getattr(plan, "kv_dtype", None)   # an fp8 cache: e4m3 pages and the layer's float32 scales [Hkv]
    inputs = (TensorSpec("q", dtype, ("T", str(hq), str(d))),
              TensorSpec("k_cache", kv or dtype, ("P", str(page), str(hkv), str(d))),
              TensorSpec("v_cache", kv or dtype, ("P", str(page), str(hkv), str(d))),
              TensorSpec("page_table", "i32", ("S", "MP")), TensorSpec("seq_lens", "i32", ("S",)),
              *_kv_scales(kv, hkv),
              TensorSpec("q_seq", "i32", ("T",)), TensorSpec("q_pos", "i32", ("T",)),
              *(TensorSpec(e["name"], e["dtype"], tuple(e["shape"])) for e in info["extra"]))
    outputs = (TensorSpec("out", dtype, ("T", str(hq), str(d))),)
    attributes = tuple(Attribute(s["name"], s["dtype"], s["default"]) for s in info["scalars"])
    # The values runtime/attention.py gives the same arguments, with num_splits fixed at 1
    # (one CTA column per token; no workspace, no merge kernel) and the per-token form's
    # chunks (a token each) of one query row.
    sizes = (("B", "S"), ("tokens", "T"), ("chunks", "T"), ("max_q_len", "1"), ("num_splits", "1"),
             ("max_pages", "MP"), ("num_pages", "P"), ("num_seqs", "S"), ("num_tokens", "T"))
    return _spec(plan, inputs, outputs, sizes, attributes=attributes, nulls={"cu_q", "part_o", "part_lse"},
                 form="per-token (decode), num_splits = 1" + (f", {kv} cache" if kv else ""))


def _kv_scales(kv_dtype: str | None, hkv: int) -> tuple[TensorSpec, ...]:
    """An fp8 cache's per-KV-head float32 scales (runtime/kv_cache.py PagedKVCache.scales)."""
    return (TensorSpec("k_scale", "f32", (str(hkv),)), TensorSpec("v_scale", "f32", (str(hkv),))) if kv_dtype else ()


# ---- the KV-cache append, append-only form -----------------------------------------------------
def _kv_append_spec(plan) -> PluginSpec:
    """k, v [T, Hkv, D] written (K rotated) into the paged cache in place: each cache is an input
    and the output aliased to it. `slots` [2, T] holds each token's page and position (the first
    T and next T ints of the kernel's `meta`). The runtime's PagedKVCache also queues sequence-
    length and page-table updates into the same launch; here there are none (U = W = 0: those
    pointers are null and never read): the caller owns its page table and lengths, which the
    attention plugins take as inputs. An fp8 cache: e4m3 pages, quantised by the layer's float32
    k_scale / v_scale [Hkv] (inputs)."""
    hkv, d, page, kv = plan.num_kv_heads, plan.head_dim, plan.page_size, plan.kv_dtype
    cache = ("P", str(page), str(hkv), str(d))
    inputs = (TensorSpec("k_cache", kv or plan.dtype, cache), TensorSpec("v_cache", kv or plan.dtype, cache),
              TensorSpec("k", plan.dtype, ("T", str(hkv), str(d))), TensorSpec("v", plan.dtype, ("T", str(hkv), str(d))),
              TensorSpec("meta", "i32", ("2", "T")), *_kv_scales(kv, hkv))
    outputs = (TensorSpec("k_cache", kv or plan.dtype, cache), TensorSpec("v_cache", kv or plan.dtype, cache))
    # runtime/kv_cache.py launches (tokens = T, updates = U + W) with k_stride = k.stride(0): dense rows here
    sizes = (("tokens", "T"), ("updates", "0"), ("num_tokens", "T"), ("num_len_updates", "0"),
             ("num_page_updates", "0"), ("k_stride", str(hkv * d)), ("v_stride", str(hkv * d)))
    return _spec(plan, inputs, outputs, sizes, nulls={"seq_lens", "page_table"}, aliases=(0, 1),
                 form="append-only (cache in place; no length or page-table updates)" + (f", {kv} cache" if kv else ""))


# ---- small-token products (gemv), the Hopper GEMM, dequantisation, fp8 row quantiser -------------
def _weight_inputs(plan, lead: tuple[str, ...] = ()) -> tuple[TensorSpec, ...]:
    """W and a quantised W's scales as codegen/gemv.py lays them out (runtime/quant.py packs them):
    u4 int32 words of 8 k; i8 bytes; f8e4m3 e4m3 bytes; scales: per row, (scale, zero) words per
    group padded to 4 words, or f32 128 x 128 block scales. `lead`: an expert stack's axis."""
    t, n, k, wtype, group = plan.dtype, plan.n, plan.k, plan.wtype, plan.group
    w = {None: (t, (n, k)), "u4": ("i32", (n, k // 8)), "i8": ("i8", (n, k)), "f8e4m3": ("fp8_e4m3", (n, k))}[wtype]
    out = [TensorSpec("w", w[0], (*lead, *map(str, w[1])))]
    if wtype == "f8e4m3":
        shape = (n,) if not group else (-(-n // 128), -(-k // 128))
        out.append(TensorSpec("wscale", "f32", (*lead, *map(str, shape))))
    elif group:
        out.append(TensorSpec("wgroup", "i32", (*lead, str(n), str((k // group + 3) // 4 * 4))))
    elif wtype:
        out.append(TensorSpec("wscale", t, (*lead, str(n))))
    return tuple(out)


def _gemv_spec(plan) -> PluginSpec:
    """x [M, K] (M <= max_m: the kernel's token tiles) -> out [M, N_out], as runtime/linear.py
    launch_gemv passes them (M = the rows, eps the norm's). Expert products (runtime/moe.py
    expert_product): rows sorted by expert, x [P, K] (gather: x [T, K] read through src [P]),
    W [E, N, K] (and a shared expert's slices w_fixed [S, N, K]), offsets [E + S + 1] (active too); P <= max_m bounds every expert's rows, which
    the kernel needs and no shape gives otherwise."""
    t, k, no = plan.dtype, plan.k, plan.n_out
    if not plan.experts:
        inputs = [TensorSpec("x", t, ("M", str(k))), *_weight_inputs(plan)]
        inputs += [TensorSpec(name, t, shape) for on, name, shape in
                   ((plan.bias, "bias", (str(no),)), (plan.residual, "residual", ("M", str(no))),
                    (plan.norm, "gamma", (str(k),))) if on]
        attributes = (Attribute("eps", "f32", None),) if plan.norm else ()
        return _spec(plan, inputs, (TensorSpec("out", t, ("M", str(no))),), (), attributes=attributes,
                     limits=(("M", 0, plan.max_m),), form=f"x [M, K], M <= {plan.max_m}")
    routed = str(plan.experts - plan.fixed)   # fixed: a shared expert's slices, a second stack w_fixed [S, N, K]
    inputs = [TensorSpec("x", t, ("X" if plan.gather else "M", str(k))), *_weight_inputs(plan, (routed,))]
    inputs += [TensorSpec("w_fixed", t, (str(plan.fixed), str(plan.n), str(k)))] if plan.fixed else []
    inputs += [TensorSpec("offsets", "i32", (str(plan.experts + 1),))]
    inputs += [TensorSpec("src", "i32", ("M",))] if plan.gather else []
    inputs += [TensorSpec("active", "i32", (str(plan.experts + 1),))] if plan.compact else []
    return _spec(plan, inputs, (TensorSpec("out", t, ("M", str(no))),), (("rows", "M"),),
                 limits=(("M", 0, plan.max_m),),
                 form=f"expert product over P = M sorted rows, P <= {plan.max_m}" + (", gathered" if plan.gather else ""))


def _gemm_spec(plan) -> PluginSpec:
    """The Hopper GEMM as runtime/linear.py launches it (M = the rows; grid (N tiles, M tiles))."""
    why = ["x and W reach the kernel as TMA tensor maps, which runtime/tma.py encodes on the host from their "
           "addresses (cuTensorMapEncodeTiled); the plugins pass pointers"] if plan.tma else []
    why += ["the persistent grid is min(SMS, tiles): the device's SM count, a host value no input shape "
            "gives"] if plan.persistent else []
    if why:
        raise NotAPlugin("; ".join(why))
    t, k, no = plan.dtype, plan.k, plan.n_out
    inputs = [TensorSpec("x", t, ("M", str(k))), TensorSpec("w", t, (str(plan.n), str(k)))]
    inputs += [TensorSpec(name, t, shape) for on, name, shape in
               ((plan.bias, "bias", (str(no),)), (plan.residual, "residual", ("M", str(no)))) if on]
    return _spec(plan, inputs, (TensorSpec("out", t, ("M", str(no))),), form="x [M, K], any M")


def _gemm_stream_spec(plan) -> PluginSpec:
    raise NotAPlugin("x (and W, unless packed) reach the kernel as TMA tensor maps encoded on the host from their "
                     "addresses; its grid is min(ctas x SMS, units), the device's SM count a host value no input "
                     "shape gives; and its per-tile counters are a workspace that must stay zero between launches")


def _dequant_spec(plan) -> PluginSpec:
    """A quantised W [N, K] (codegen/gemv.py's layouts) -> W in T [N, K] (runtime/quant.py
    dequantize_cuda: one launch, every size fixed by the plan)."""
    return _spec(plan, _weight_inputs(plan), (TensorSpec("out", plan.dtype, (str(plan.n), str(plan.k))),),
                 form="W [N, K], all sizes fixed")


def _quant_rows_spec(plan) -> PluginSpec:
    """x [M, K] -> e4m3 bytes [M, K] and float32 scales [M, ceil(K / 128)] (group 0: [M, 1], one a
    token) (runtime/quant.py quantize_fp8_rows)."""
    k = plan.k
    kb = -(-k // 128) if getattr(plan, "group", 128) else 1
    return _spec(plan, (TensorSpec("x", plan.dtype, ("M", str(k))),),
                 (TensorSpec("q", "fp8_e4m3", ("M", str(k))), TensorSpec("scale", "f32", ("M", str(kb)))),
                 form="x [M, K], any M")


# ---- scans (Mamba): causal conv, its decode update, selective scan, state update ---------------
def _conv_spec(plan) -> PluginSpec:
    """x [Bt, D, L] -> y [Bt, D, L] (and the last K - 1 inputs [Bt, D, K - 1] when final), as
    runtime/scan.py causal_conv1d launches it: rows = Bt D, the length L."""
    d, k, t = str(plan.channels), plan.width, plan.dtype
    inputs = [TensorSpec("x", t, ("Bt", d, "L")), TensorSpec("weight", plan.weight_dtype, (d, str(k)))]
    inputs += [TensorSpec("bias", plan.bias, (d,))] if plan.bias else []
    inputs += [TensorSpec("initial_state", t, ("Bt", d, str(k - 1)))] if plan.initial else []
    outputs = [TensorSpec("out0", t, ("Bt", d, "L"))]
    outputs += [TensorSpec("out1", t, ("Bt", d, str(k - 1)))] if plan.final else []
    # L = 0 launches nothing, so the final state would be left unwritten (the runtime copies it)
    return _spec(plan, inputs, outputs, (("rows", f"Bt * {d}"), ("length", "L"), ("batch", "Bt")),
                 limits=(("L", 1, None),) if plan.final else (), form="x [Bt, D, L]" + (", L >= 1" if plan.final else ""))


def _conv_update_spec(plan) -> PluginSpec:
    """x [Bt, D] joins conv_state [Bt, D, K] (written in place: an input with the first output
    aliased to it) -> y [Bt, D] (runtime/scan.py causal_conv1d_update)."""
    d, k, t = str(plan.channels), str(plan.width), plan.dtype
    state = TensorSpec("conv_state", plan.state_dtype, ("Bt", d, k))
    inputs = [TensorSpec("x", t, ("Bt", d)), state, TensorSpec("weight", plan.weight_dtype, (d, k))]
    inputs += [TensorSpec("bias", plan.bias, (d,))] if plan.bias else []
    return _spec(plan, inputs, (state, TensorSpec("out0", t, ("Bt", d))),
                 (("rows", f"Bt * {d}"), ("batch", "Bt"), ("x_sb", d)),   # dense x: rows D apart
                 aliases=(1, -1), form="one step, conv_state in place")


def _scan_inputs(plan, step: tuple[str, ...], names: tuple[str, str, str]) -> list[TensorSpec]:
    """u/x, delta/dt, A, B, C, D, z, delta_bias/dt_bias as runtime/scan.py checks them: B and C
    [Bt, N(, L)], A [D, N], D and the bias [D]."""
    d, n, t = str(plan.channels), str(plan.state), plan.dtype
    x, dt, bias = names
    inputs = [TensorSpec(x, t, ("Bt", d, *step)), TensorSpec(dt, t, ("Bt", d, *step)),
              TensorSpec("A", plan.a_dtype, (d, n)), TensorSpec("B", t, ("Bt", n, *step)),
              TensorSpec("C", t, ("Bt", n, *step))]
    inputs += [TensorSpec("D", plan.d_dtype, (d,))] if plan.d_dtype else []
    inputs += [TensorSpec("z", t, ("Bt", d, *step))] if plan.gate else []
    inputs += [TensorSpec(bias, plan.bias_dtype, (d,))] if plan.bias_dtype else []
    return inputs


def _selective_scan_spec(plan) -> PluginSpec:
    """u [Bt, D, L] -> y [Bt, D, L] (and the f32 final state [Bt, D, N]) from an f32 initial
    state when given (runtime/scan.py selective_scan: rows = Bt D)."""
    d, n, t = str(plan.channels), str(plan.state), plan.dtype
    inputs = _scan_inputs(plan, ("L",), ("u", "delta", "delta_bias"))
    inputs += [TensorSpec("initial_state", "f32", ("Bt", d, n))] if plan.initial else []
    outputs = [TensorSpec("out0", t, ("Bt", d, "L"))] + ([TensorSpec("out1", "f32", ("Bt", d, n))] if plan.final else [])
    return _spec(plan, inputs, outputs, (("rows", f"Bt * {d}"), ("batch", "Bt"), ("length", "L")),
                 form="u [Bt, D, L]")


def _state_update_spec(plan) -> PluginSpec:
    """One step: the f32 state [Bt, D, N] updated in place (an input with the first output aliased
    to it), x [Bt, D] -> y [Bt, D] (runtime/scan.py selective_state_update)."""
    d, n = str(plan.channels), str(plan.state)
    state = TensorSpec("state", "f32", ("Bt", d, n))
    inputs = [state, *_scan_inputs(plan, (), ("x", "dt", "dt_bias"))]
    return _spec(plan, inputs, (state, TensorSpec("out0", plan.dtype, ("Bt", d))), (("rows", f"Bt * {d}"), ("batch", "Bt")),
                 aliases=(0, -1), form="one step, state in place" + (", A given as A_log" if plan.a_log else ""))


# ---- SSD (Mamba2): the chunked scan's three kernels, and the decode update -----------------------
_DT_LIMITS = (Attribute("dt_lo", "f32", 0.0), Attribute("dt_hi", "f32", float("inf")))   # runtime/ssd.py dt_limit


def _ssd_inputs(plan, step: bool, with_c: bool) -> tuple[list[TensorSpec], list[tuple[str, str]]]:
    """x, dt, B (C, z) dense, as runtime/ssd.py checks them ([Bt, L, ...] prefill, [Bt, ...] a step),
    then A, dt_bias [H] f32; the strides the kernel takes (elements) of those dense rows."""
    h, p, g, n, t = str(plan.heads), str(plan.head_dim), str(plan.groups), str(plan.state), plan.dtype
    lead = ("Bt",) if step else ("Bt", "L")
    parts = [("x", (h, p)), ("dt", (h,)), ("B", (g, n))]
    if with_c:
        parts += [("C", (g, n))] + ([("z", (h, p))] if plan.gate else [])
    inputs = [TensorSpec(name, t, (*lead, *rest)) for name, rest in parts]
    size = {"bf16": 2, "f16": 2, "f32": 4}[t]
    for name, rest in parts:   # the rows the kernel copies as 16-byte vectors (runtime/ssd.py _strides)
        row = size * math.prod(int(r) for r in rest)
        if name in (("B", "C") if step else ("x", "B", "C", "z")) and (not step or t == "f32") and row % 16:
            raise NotAPlugin(f"{name}'s dense rows are {row} bytes, and the kernel reads them as 16-byte vectors")
    vec = getattr(plan, "params", "f32")   # the update's per-head vectors may be in the model dtype
    inputs += [TensorSpec("A", vec, (h,))] + ([TensorSpec("dt_bias", vec, (h,))] if plan.dt_bias else [])
    strides = []
    for name, rest in parts:
        row = " * ".join(rest)
        strides += [(f"{name}_sb", row if step else f"L * {row}")] + ([] if step else [(f"{name}_sl", row)])
    return inputs, strides


def _ssd_chunk_state_spec(plan) -> PluginSpec:
    """Each chunk's state: x [Bt, L, H, P] ... -> states f32 [Bt, nc, H, P, N] and the chunks' dt
    sums s_last f32 [Bt, H, nc] (runtime/ssd.py's workspaces, outputs here; nc = cdiv(L, chunk))."""
    h, p, n = str(plan.heads), str(plan.head_dim), str(plan.state)
    inputs, strides = _ssd_inputs(plan, step=False, with_c=False)
    nc = f"cdiv(L, {plan.chunk})"
    outputs = (TensorSpec("states", "f32", ("Bt", "nc", h, p, n)), TensorSpec("s_last", "f32", ("Bt", h, "nc")))
    return _spec(plan, inputs, outputs, (("nc", nc), ("batch", "Bt"), ("seqlen", "L"), *strides),
                 attributes=_DT_LIMITS, form="prefill stage 1 of 3: chunk states")


def _ssd_state_passing_spec(plan) -> PluginSpec:
    """The states entering each chunk: states, s_last (stage 1's) [, initial f32 [Bt, H, P, N]] ->
    start [Bt, nc, H, P, N] in the model's dtype and the final state f32 [Bt, H, P, N]."""
    h, p, n = str(plan.heads), str(plan.head_dim), str(plan.state)
    inputs = [TensorSpec("states", "f32", ("Bt", "NC", h, p, n)), TensorSpec("s_last", "f32", ("Bt", h, "NC"))]
    inputs += [TensorSpec("initial", "f32", ("Bt", h, p, n))] if plan.initial else []
    outputs = (TensorSpec("start", plan.dtype, ("Bt", "NC", h, p, n)), TensorSpec("out1", "f32", ("Bt", h, p, n)))
    return _spec(plan, inputs, outputs, (("batch", "Bt"), ("nc", "NC")), form="prefill stage 2 of 3: state passing")


def _ssd_chunk_scan_spec(plan) -> PluginSpec:
    """y [Bt, L, H, P] from x, dt, B, C (z), A, dt_bias (D) and stage 2's start states."""
    if getattr(plan, "cb_table", False):
        raise NotAPlugin("the score-table form (LAYERFORGE_SSD_CB) reads a table another launch writes; no plugin "
                         "pair for it yet (the plugins keep the form that computes the scores)")
    h, p, n = str(plan.heads), str(plan.head_dim), str(plan.state)
    inputs, strides = _ssd_inputs(plan, step=False, with_c=True)
    inputs += [TensorSpec("D", "f32", (h,))] if plan.skip else []
    inputs += [TensorSpec("start", plan.dtype, ("Bt", f"cdiv(L, {plan.chunk})", h, p, n))]
    return _spec(plan, inputs, (TensorSpec("out0", plan.dtype, ("Bt", "L", h, p)),),
                 (("nc", f"cdiv(L, {plan.chunk})"), ("batch", "Bt"), ("seqlen", "L"), *strides),
                 attributes=_DT_LIMITS, form="prefill stage 3 of 3: chunk scan")


def _ssd_state_update_spec(plan) -> PluginSpec:
    """One token a sequence: the f32 state [Bt, H, P, N] updated in place (an input with the
    first output aliased to it), x [Bt, H, P] -> y [Bt, H, P] (runtime/ssd.py ssd_state_update)."""
    h, p, n = str(plan.heads), str(plan.head_dim), str(plan.state)
    state = TensorSpec("state", "f32", ("Bt", h, p, n))
    inputs, strides = _ssd_inputs(plan, step=True, with_c=True)
    inputs = [state, *inputs] + ([TensorSpec("D", plan.params, (h,))] if plan.skip else [])
    return _spec(plan, inputs, (state, TensorSpec("out0", plan.dtype, ("Bt", h, p))), (("batch", "Bt"), *strides),
                 attributes=_DT_LIMITS, aliases=(0, -1),
                 form="one step, state in place" + (", A given as A_log" if plan.a_log else ""))


# ---- MoE: the permutation, gather, combine -------------------------------------------------------
def _moe_align_spec(plan) -> PluginSpec:
    """ids [T, k] -> offsets [E + fixed + 1], pos and src [T (k + fixed)] (active [E + fixed + 1])
    (runtime/moe_kernels.py moe_align: n_pairs = T (k + fixed))."""
    groups, pairs = str(plan.experts + plan.fixed + 1), f"T * {plan.k + plan.fixed}"
    outputs = [TensorSpec("out0", "i32", (groups,)), TensorSpec("out1", "i32", (pairs,)),
               TensorSpec("out2", "i32", (pairs,))] + ([TensorSpec("out3", "i32", (groups,))] if plan.active else [])
    return _spec(plan, (TensorSpec("ids", "i32", ("T", str(plan.k))),), outputs, (("pairs", pairs),),
                 limits=(("pairs", 0, 1 << 30),), form="ids [T, k]")   # runtime MAX_PAIRS: pair indices are ints


def _moe_gather_spec(plan) -> PluginSpec:
    """xs [P, H] = x[src] for x [T, H], src [P] (runtime/moe_kernels.py moe_gather; src is
    clamped into [0, T): T >= 1 where there are slots)."""
    h = str(plan.hidden)
    return _spec(plan, (TensorSpec("x", plan.dtype, ("T", h)), TensorSpec("src", "i32", ("P",))),
                 (TensorSpec("out0", plan.dtype, ("P", h)),), (("slots", "P"), ("tokens", "T")),
                 limits=(("T - min(P, 1)", 0, None),), form="x [T, H], src [P]")


def _moe_combine_spec(plan) -> PluginSpec:
    """out [T, H] from the experts' rows y [T (k + fixed), H], pos [T (k + fixed)], w f32 [T, k]
    (shared [T, H], gate_logit [T], residual [T, H]) (runtime/moe_kernels.py moe_combine)."""
    h, t, rows = str(plan.hidden), plan.dtype, f"T * {plan.k + plan.fixed}"
    inputs = [TensorSpec("y", t, (rows, h)), TensorSpec("pos", "i32", (rows,)), TensorSpec("w", "f32", ("T", str(plan.k)))]
    inputs += [TensorSpec(name, t, shape) for on, name, shape in
               ((plan.shared, "shared", ("T", h)), (plan.shared_gate, "gate_logit", ("T",)),
                (plan.residual, "residual", ("T", h))) if on]
    return _spec(plan, inputs, (TensorSpec("out0", t, ("T", h)),), (("tokens", "T"),), form="w [T, k]")


# ---- LoRA: shrink and expand of the adapters' tokens --------------------------------------------
def _lora_shrink_spec(plan) -> PluginSpec:
    """v [T, S R] from x [T, K] and A [E1, S R, K] (runtime/lora.py MultiLoRA.shrink: the
    grid's slots are the adapters, E1 - 1)."""
    sr, t = str(plan.slices * plan.rank), plan.dtype
    inputs = [TensorSpec("x", t, ("T", str(plan.k))), TensorSpec("a", t, ("E1", sr, str(plan.k))),
              TensorSpec("ranks", "i32", ("E1", str(plan.slices))), TensorSpec("offsets", "i32", ("E1 + 1",)),
              TensorSpec("src", "i32", ("T",))]
    return _spec(plan, inputs, (TensorSpec("out0", t, ("T", sr)),), (("slots", "E1 - 1"), ("tokens", "T")),
                 form="x [T, K], the tokens sorted by slot")


def _lora_expand_spec(plan) -> PluginSpec:
    """out [T, O] = y (+ bias) + each token's adapter's expand of v [T, S R] (runtime/lora.py
    MultiLoRA.expand into a new out: groups = slots + 1, the no-adapter group copying y; y and v
    dense: ldy = O, ldv = S R, vslot = 0)."""
    o, s, r, t = sum(plan.slices), len(plan.slices), plan.rank, plan.dtype
    inputs = [TensorSpec("y", t, ("T", str(o))), TensorSpec("v", t, ("T", str(s * r))),
              TensorSpec("b", t, ("E1", str(r), str(o))), TensorSpec("ranks", "i32", ("E1", str(s))),
              TensorSpec("scales", "f32", ("E1", str(s))), TensorSpec("offsets", "i32", ("E1 + 1",)),
              TensorSpec("src", "i32", ("T",))]
    inputs += [TensorSpec("bias", t, (str(o),))] if plan.bias else []
    sizes = (("groups", "E1"), ("slots", "E1 - 1"), ("tokens", "T"), ("ldy", str(o)), ("ldv", str(s * r)), ("vslot", "0"))
    return _spec(plan, inputs, (TensorSpec("out0", t, ("T", str(o))),), sizes,
                 form="v [T, S R] (the shrink's), out a new tensor")


# ---- MLA: decode over the latent cache, and its append ------------------------------------------
def _mla_decode_spec(plan) -> PluginSpec:
    """q [T, H, L + R] over the paged latent cache [P, page, L + R] -> out [T, H, L], each token
    the last of its sequence (runtime/mla_decode.py) with num_splits = 1: the split parts and the
    merge kernel are not used (null), the scale an attribute. The wgmma kernel reads full key tiles
    through a TMA tensor map of the cache (encoded on the host): no plugin; the mma.sync plan is."""
    if plan.tma:
        raise NotAPlugin("the wgmma MLA decode reads the cache through a TMA tensor map, which runtime/tma.py "
                         "encodes on the host from its address; the plugins pass pointers (plan kernel='mma')")
    row, h, t = str(plan.latent_dim + plan.rope_dim), str(plan.num_heads), plan.dtype
    inputs = (TensorSpec("q", t, ("T", h, row)), TensorSpec("cache", t, ("P", str(plan.page_size), row)),
              TensorSpec("page_table", "i32", ("S", "MP")), TensorSpec("seq_lens", "i32", ("S",)),
              TensorSpec("q_seq", "i32", ("T",)))
    sizes = (("tokens", "T"), ("num_splits", "1"), ("max_pages", "MP"), ("num_pages", "P"), ("num_seqs", "S"))
    return _spec(plan, inputs, (TensorSpec("out", t, ("T", h, str(plan.latent_dim))),), sizes,
                 attributes=(Attribute("scale", "f32", None),), nulls={"part_o", "part_lse"},
                 limits=(("S", 1, None), ("P", 1, None)),   # the runtime's checks: a sequence and a page at least
                 form="decode, num_splits = 1")


def _mla_append_spec(plan) -> PluginSpec:
    """latent [T, L] and k_pe [T, R] (rotated) into one layer's cache [P, page, L + R] in place (an
    input with the output aliased to it); meta [2, T] each token's page, then its position
    (runtime/mla_cache.py _write_cuda; dense rows: the strides are L and R)."""
    cache = TensorSpec("cache", plan.dtype, ("P", str(plan.page_size), str(plan.latent_dim + plan.rope_dim)))
    inputs = (cache, TensorSpec("latent", plan.dtype, ("T", str(plan.latent_dim))),
              TensorSpec("k_pe", plan.dtype, ("T", str(plan.rope_dim))), TensorSpec("meta", "i32", ("2", "T")))
    sizes = (("tokens", "T"), ("num_tokens", "T"), ("latent_stride", str(plan.latent_dim)),
             ("k_pe_stride", str(plan.rope_dim)))
    return _spec(plan, inputs, (cache,), sizes, aliases=(0,), form="append (cache in place)")


def _block_mask_spec(plan) -> PluginSpec:
    raise NotAPlugin("its grid and its lists are sized by the longest query chunk and key length (max_q_len, "
                     "max_kv_len), host values no input shape gives; the tensor-core prefill that reads them is "
                     "not a plugin for the same reason")


_BUILDERS = {"row": _row_spec, "paged_attention": _attention_spec, "tc_attention": _attention_spec,
             "wgmma_attention": _attention_spec, "kv_append": _kv_append_spec,
             "gemv": _gemv_spec, "gemm": _gemm_spec, "gemm_stream": _gemm_stream_spec, "dequant": _dequant_spec, "quant_rows": _quant_rows_spec,
             "scan_conv": _conv_spec, "scan_conv_update": _conv_update_spec, "selective_scan": _selective_scan_spec,
             "selective_state_update": _state_update_spec, "ssd_chunk_state": _ssd_chunk_state_spec,
             "ssd_state_passing": _ssd_state_passing_spec, "ssd_chunk_scan": _ssd_chunk_scan_spec,
             "ssd_state_update": _ssd_state_update_spec, "moe_align": _moe_align_spec, "moe_gather": _moe_gather_spec,
             "moe_combine": _moe_combine_spec, "moe_route": _row_spec, "lora_shrink": _lora_shrink_spec,
             "lora_expand": _lora_expand_spec, "mla_decode": _mla_decode_spec, "mla_append": _mla_append_spec,
             "block_mask": _block_mask_spec}


# ---- checks ------------------------------------------------------------------------------------

def _bind_dims(inputs: tuple[TensorSpec, ...], defined: set[str]) -> tuple[tuple[str, int, int], ...]:
    """Each dim that is a whole axis of an input, at its first such axis (later ones must agree:
    the C++ plugin checks them when shapes are known)."""
    seen: dict[str, tuple[int, int]] = {}
    for i, t in enumerate(inputs):
        for axis, e in enumerate(t.shape):
            if e.isidentifier() and e not in defined and e not in seen:
                seen[e] = (i, axis)
    return tuple((d, i, axis) for d, (i, axis) in seen.items())


def _spec(plan, inputs, outputs, sizes=(), *, attributes=(), nulls=(), aliases=(), form: str,
          limits=(), qdp_reason: str | None = None) -> PluginSpec:
    """The spec of `plan`'s main kernel; dims are read from the first input axis that is one."""
    return PluginSpec(name=plan.key, family=plan.family, kernel=plan.abi, inputs=tuple(inputs), outputs=tuple(outputs),
                      attributes=tuple(attributes), dims=_bind_dims(tuple(inputs), {s for s, _ in sizes}),
                      sizes=tuple(sizes), nulls=frozenset(nulls), aliases=tuple(aliases), form=form,
                      limits=tuple(limits), qdp_reason=qdp_reason or _shared_memory_reason(plan.abi))


def _shared_memory_reason(abi: KernelABI) -> str | None:
    if abi.shared_bytes <= 48 * 1024:
        return None
    return (f"needs {abi.shared_bytes} bytes of dynamic shared memory, past the 48 KiB a launch gets "
            f"without cuFuncSetAttribute; the AOT launch parameters have no way to ask for it that could be "
            f"checked here (the C++ plugin sets it when it loads the cubin)")


def _checked(spec: PluginSpec) -> PluginSpec:
    """Refuse what the generated code could not express: a size no input determines, a dtype or
    argument type TensorRT has no slot for, an attribute that is not a Python identifier."""
    known = {d for d, _, _ in spec.dims}
    for name, expr in spec.sizes:
        _require_names(spec, expr, known, f"size {name}")
        known.add(name)
    aliased = [i for i in spec.aliases if i >= 0]
    if list(spec.aliases[:len(aliased)]) != aliased or len(spec.aliases) > len(spec.outputs):
        raise NotAPlugin("outputs written in place must come first (the Python module aliases the first ones)")
    for i, a in enumerate(aliased):
        if not 0 <= a < len(spec.inputs) or (spec.inputs[a].dtype, spec.inputs[a].shape) != \
                (spec.outputs[i].dtype, spec.outputs[i].shape):
            raise NotAPlugin(f"output {i} is written into input {a}, which is not a tensor of its shape and dtype")
    for expr, _, _ in spec.limits:
        _require_names(spec, expr, known, "a limit")
    tensor_names = {t.name for t in spec.inputs} | {"outputs", "tactic"}
    for t in spec.inputs:
        if keyword.iskeyword(t.name) or t.name in ("outputs", "tactic"):
            raise NotAPlugin(f"input {t.name!r} cannot be a parameter of the plugin's functions")
    for t in (*spec.inputs, *spec.outputs):
        if t.dtype not in TRT_DTYPES:
            raise NotAPlugin(f"{t.name}: TensorRT has no {t.dtype} tensors")
        for e in t.shape:
            _require_names(spec, e, known, f"{t.name}'s shape")
    for a in spec.attributes:
        if keyword.iskeyword(a.name) or not a.name.isidentifier() or a.name in tensor_names:
            raise NotAPlugin(f"attribute {a.name!r} is not a plugin field name")
        if a.dtype not in ("f32", "i32"):
            raise NotAPlugin(f"attribute {a.name}: no {a.dtype} scalar argument")
    for g in spec.kernel.grid:
        _require_names(spec, g, known, "the grid")
    for arg in spec.kernel.args:
        if arg.role == "tmap":   # (e.g. the e4m3 decode by TMA, LAYERFORGE_DECODE_TMA)
            raise NotAPlugin(f"argument {arg.name} is a TMA tensor map, which runtime/tma.py encodes on the host from "
                             f"the tensor's address; the plugins pass pointers")
        kind, ref = spec.source_of(arg)
        if kind == "size" and ref not in known:
            raise NotAPlugin(f"argument {arg.name}: no input shape gives {ref!r}")
        if kind in ("size", "attribute") and arg.ctype.replace("const ", "").strip() not in _VALUE_TYPES:
            raise NotAPlugin(f"argument {arg.name}: no TensorRT argument of C type {arg.ctype!r}")
        if kind == "output" and ref >= len(spec.outputs):
            raise NotAPlugin(f"argument {arg.name}: the plugin has no output {ref}")
        if kind == "input" and not arg.is_pointer:
            raise NotAPlugin(f"argument {arg.name} is not a pointer")
    return spec


def _require_names(spec: PluginSpec, expr: str, known: set[str], where: str) -> None:
    try:
        missing = trt_exprs.names(expr) - known
    except trt_exprs.ExprError as e:
        raise NotAPlugin(f"{where}: {e}") from None
    if missing:
        raise NotAPlugin(f"{where} uses {sorted(missing)}, which no input shape determines")
