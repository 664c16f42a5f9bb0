"""TensorRT plugins from the same kernels: what each plugin is, derived from a plan and its ABI.

    specs, excluded = plugin_specs(plans)     # PluginSpec per kernel TensorRT can serve; reasons for the rest

A `PluginSpec` says, as plain data, how a TensorRT plugin drives one kernel: its tensor
inputs and outputs (dtypes and shapes as expressions over named dims), the attributes
(the layer's runtime scalars), where each dim is read (input, axis), the sizes the kernel's
grid and int arguments need as expressions over those dims, and which kernel arguments
TensorRT cannot fill and get a null pointer (a workspace the launch never touches, a form's
unused input). codegen/trt_render.py turns specs into the plugin sources; nothing here
restates a signature, grid or shared-memory size: they come from the KernelABI.

What TensorRT's plugin interface allows, per family:
  row             every kernel: inputs, outputs and scalars are the layer's; rows = the
                  product of the lead dims, as runtime/layers.py counts them.
  paged / tc attention, per-token form (runtime/attention.py PagedAttention.__call__):
                  q [T, Hq, D], the paged cache, page table, sequence lengths, each token's
                  sequence and position are inputs; num_splits = 1 (the split-KV workspace
                  and merge kernel are not used, so the plugin allocates nothing); every
                  int argument is a dim of an input. The tensor-core prefill kernel is left
                  out: its grid needs the longest query chunk, a host value no shape gives.
  kv_append       append-only: the caches are inputs with outputs aliased to them (written in
                  place), each token's page and position an input; the sequence-length and
                  page-table updates the runtime's PagedKVCache queues into the same launch are
                  the caller's (none in the launch).
"""
from __future__ import annotations

import keyword
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
              "i64": ("int64", "INT64", "kINT64"), "bool": ("bool", "BOOL", "kBOOL")}

# C types of the int and float arguments a plugin fills (TensorRT's AOT extra arguments are
# 32-bit ints; the entry kernel widens or reinterprets them, see trt_render.py).
_VALUE_TYPES = ("int", "long long", "float")


class NotAPlugin(ValueError):
    """A kernel TensorRT's plugin interface cannot serve honestly (the message says why)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str                 # the DSL's name (inputs) or "out<i>" (outputs)
    dtype: str                # DSL dtype: "bf16", "i32", ...
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
        if arg.role == "output":   # by index (a layer's outputs) or by name
            if arg.ref.isdigit():
                return "output", int(arg.ref)
            names = [t.name for t in self.outputs]
            if arg.ref not in names:
                raise NotAPlugin(f"argument {arg.name}: {arg.ref!r} is not an output of the plugin")
            return "output", names.index(arg.ref)
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
    if plan.family in ("tc_attention", "wgmma_attention") and plan.mode != "decode":
        raise NotAPlugin("the tensor-core prefill kernel's grid needs the longest query chunk (max_q_len), a host "
                         "value that no input shape gives; decode-form tokens run the decode and CUDA-core kernels")
    if getattr(plan, "kv_dtype", None):
        raise NotAPlugin(f"no TensorRT plugin reads an {plan.kv_dtype} KV cache yet")
    info = attention_interface(plan.layer)
    hq, hkv, d, dtype, page = info["num_q_heads"], info["num_kv_heads"], info["head_dim"], info["dtype"], plan.page_size
    inputs = (TensorSpec("q", dtype, ("T", str(hq), str(d))),
              TensorSpec("k_cache", dtype, ("P", str(page), str(hkv), str(d))),
              TensorSpec("v_cache", dtype, ("P", str(page), str(hkv), str(d))),
              TensorSpec("page_table", "i32", ("S", "MP")), TensorSpec("seq_lens", "i32", ("S",)),
              TensorSpec("q_seq", "i32", ("T",)), TensorSpec("q_pos", "i32", ("T",)),
              *(TensorSpec(e["name"], e["dtype"], tuple(e["shape"])) for e in info["extra"]))
    outputs = (TensorSpec("out", dtype, ("T", str(hq), str(d))),)
    attributes = tuple(Attribute(s["name"], s["dtype"], s["default"]) for s in info["scalars"])
    # The values runtime/attention.py gives the same arguments, with num_splits fixed at 1
    # (one CTA column per token; no workspace, no merge kernel) and the per-token form's
    # chunks (a token each) of one query row.
    sizes = (("B", "S"), ("tokens", "T"), ("chunks", "T"), ("max_q_len", "1"), ("num_splits", "1"),
             ("max_pages", "MP"), ("num_pages", "P"), ("num_seqs", "S"), ("num_tokens", "T"))
    reason = None
    if plan.abi.shared_bytes > 48 * 1024:
        reason = (f"needs {plan.abi.shared_bytes} bytes of dynamic shared memory, past the 48 KiB a launch gets "
                  f"without cuFuncSetAttribute; the AOT launch parameters have no way to ask for it that could be "
                  f"checked here (the C++ plugin sets it when it loads the cubin)")
    return PluginSpec(name=plan.key, family=plan.family, kernel=plan.abi, inputs=inputs, outputs=outputs,
                      attributes=attributes, dims=_bind_dims(inputs, {s for s, _ in sizes}), sizes=sizes,
                      nulls=frozenset({"cu_q", "part_o", "part_lse"}), form="per-token (decode), num_splits = 1",
                      qdp_reason=reason)


# ---- the KV-cache append, append-only form -----------------------------------------------------
def _kv_append_spec(plan) -> PluginSpec:
    """k, v [T, Hkv, D] written (K rotated) into the paged cache in place: each cache is an input
    and the output aliased to it. `slots` [2, T] holds each token's page and position (the first
    T and next T ints of the kernel's `meta`). The runtime's PagedKVCache also queues sequence-
    length and page-table updates into the same launch; here there are none (U = W = 0: those
    pointers are null and never read): the caller owns its page table and lengths, which the
    attention plugins take as inputs."""
    if getattr(plan, "kv_dtype", None):
        raise NotAPlugin(f"no TensorRT plugin writes an {plan.kv_dtype} KV cache yet")
    hkv, d, page = plan.num_kv_heads, plan.head_dim, plan.page_size
    cache = ("P", str(page), str(hkv), str(d))
    inputs = (TensorSpec("k_cache", plan.dtype, cache), TensorSpec("v_cache", plan.dtype, cache),
              TensorSpec("k", plan.dtype, ("T", str(hkv), str(d))), TensorSpec("v", plan.dtype, ("T", str(hkv), str(d))),
              TensorSpec("meta", "i32", ("2", "T")))
    outputs = (TensorSpec("k_cache", plan.dtype, cache), TensorSpec("v_cache", plan.dtype, cache))
    # runtime/kv_cache.py launches (tokens = T, updates = U + W) with k_stride = k.stride(0): dense rows here
    sizes = (("tokens", "T"), ("updates", "0"), ("num_tokens", "T"), ("num_len_updates", "0"),
             ("num_page_updates", "0"), ("k_stride", str(hkv * d)), ("v_stride", str(hkv * d)))
    return PluginSpec(name=plan.key, family=plan.family, kernel=plan.abi, inputs=inputs, outputs=outputs,
                      attributes=(), dims=_bind_dims(inputs, {s for s, _ in sizes}), sizes=sizes,
                      nulls=frozenset({"seq_lens", "page_table"}), aliases=(0, 1),
                      form="append-only (cache in place; no length or page-table updates)")


_BUILDERS = {"row": _row_spec, "paged_attention": _attention_spec, "tc_attention": _attention_spec,
             "wgmma_attention": _attention_spec, "kv_append": _kv_append_spec}


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


def _checked(spec: PluginSpec) -> PluginSpec:
    """Refuse what the generated code could not express: a size no input determines, a dtype or
    argument type TensorRT has no slot for, an attribute that is not a Python identifier."""
    known = {d for d, _, _ in spec.dims}
    for name, expr in spec.sizes:
        _require_names(spec, expr, known, f"size {name}")
        known.add(name)
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
        kind, ref = spec.source_of(arg)
        if kind == "size" and ref not in known:
            raise NotAPlugin(f"argument {arg.name}: no input shape gives {ref!r}")
        if kind in ("size", "attribute") and arg.ctype.replace("const ", "").strip() not in _VALUE_TYPES:
            raise NotAPlugin(f"argument {arg.name}: no TensorRT argument of C type {arg.ctype!r}")
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
