"""layerforge's launchers as PyTorch custom ops: what torch.compile, torch.export and CUDA graphs see.

    y = torch.compile(model, fullgraph=True)(x)     # every layerforge layer is one op in the graph
    ep = torch.export.export(model, (x,))           # ... and in the exported program

A launch is Python that torch's tracers cannot follow (a driver call with raw pointers), so
each entry point (LayerModule.forward, PagedAttention.__call__ / prefill, PagedKVCache.append)
checks `torch.compiler.is_compiling()`: eager calls launch directly, as before (no dispatcher
cost on the host-bound decode path); traced calls go through one op of the `layerforge`
namespace. The op's real implementation is that same direct path; its fake implementation
gives the output shapes and dtypes from the layer's interface, so tracing never touches data.

Ops are registered once per kind of launch, not per module: the module travels as a handle
(a string; `handle(obj)`), resolved at run time through a registry of live objects, as
vLLM's attention ops carry a layer name. The handle is made when the object is first traced
and is meaningful only in the process that holds the object: an exported program runs where
its modules live (`register(obj, handle)` binds a handle to an object again). Being a
constant of the graph, the handle makes the compiler guard on the object's identity: compile
the model that holds the layers (each layer appears once in its graph), not one layer class's
forward reused over many instances (a graph per instance, up to the recompile limit).
Weights, runtime scalars and every tensor a kernel reads or writes are op arguments, so the
graph holds the real data flow.

Ops:
  row_layer(h, tensors, scalars) -> outputs            a row layer (inputs then weights)
  row_layer_out(h, tensors, scalars, out!)             ... writing `out=`
  paged_attention[_out](h, q, k_cache, ..., q_seq?, q_pos?, max_kv_len, ...)   per-token form (q_seq and
      q_pos None: token t is sequence t at its last position, as PagedAttention.__call__ takes them)
  paged_prefill[_out](h, q, k_cache, ..., cu_seqlens, max_q_len, max_kv_len, ...)   ragged form
  kv_append(h, k, v, seq_ids, positions, rope, k_cache!, v_cache!, page_table!, seq_lens!)
      -> (positions, q_seq, q_pos)

The KV append under tracing: the cache's bookkeeping (free pages, lengths, the page table's
host mirror) is host state that a graph cannot hold. It stays outside the graph, inside the
op: each call of a compiled graph runs the op's real implementation, which checks and
updates the bookkeeping and launches the append kernel, exactly as an eager append does.
The op declares the device tensors it writes (k_cache, v_cache, page_table, seq_lens), so the
compiler orders later reads after it. Host ids (`seq_ids`) are a CPU tensor argument; the
positions the bookkeeping chose come back as a CPU tensor, and the tokens' sequences and
positions on the device (what a decode step's attention reads) as two more outputs. Like an
eager append, the op cannot be captured in a CUDA graph (its metadata comes from the host).
"""
from __future__ import annotations

import ctypes
import itertools
import weakref
from typing import Any, Optional

import sympy
import torch
from torch import Tensor

__all__ = ["handle", "register", "row_layer", "paged_attention", "paged_prefill", "kv_append", "cache_tables"]

_LIVE: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()   # handle -> module / cache
_ROPES: dict[str, Any] = {}    # repr -> RopeSpec (small frozen values, kept)
_NUMBERS = itertools.count()


# ---- registration ----------------------------------------------------------------------
_LIB = torch.library.Library("layerforge", "FRAGMENT")


def _op(mutates_args: tuple[str, ...] = (), tags: tuple = ()):
    """Define layerforge::<the function's name, less its underscore>, its schema inferred from
    the annotations and the function its implementation on every backend. Registered on the
    Library directly, not through torch.library.custom_op, whose Python layers (autograd,
    alias checks on every call) cost ~11 us more per call (benchmarks/NOTES.md): a compiled
    graph pays that at every launch."""
    def define(fn):
        name = fn.__name__.lstrip("_")
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args), tags=tags)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return define


def _fake(name: str):
    def register(fn):
        torch.library.register_fake(f"layerforge::{name}", fn, lib=_LIB)
        return fn
    return register


# ---- handles ---------------------------------------------------------------------------
def register(obj: Any, name: str) -> str:
    """Bind handle `name` to `obj` (a LayerModule, PagedAttention or PagedKVCache)."""
    _LIVE[name] = obj
    obj.__dict__["_op_handle"] = name
    return name


def handle(obj: Any) -> str:
    """The op handle of `obj`, made on first use: its name and a number ('rms_norm#3').
    A constant to the tracer, so the graph holds a string, not the object."""
    return _handle_at(id(obj))


@torch.compiler.assume_constant_result
def _handle_at(address: int) -> str:
    # The tracer runs this for real and keeps the result as a constant, but passes it only
    # constants: so the object travels as its id, and is alive (the traced code holds it).
    obj = ctypes.cast(address, ctypes.py_object).value
    name = obj.__dict__.get("_op_handle")
    if name is None or _LIVE.get(name) is not obj:   # new, or a copy that carries its original's handle
        name = register(obj, f"{getattr(obj, 'name', None) or type(obj).__name__}#{next(_NUMBERS)}")
    return name


def _owner(name: str) -> Any:
    obj = _LIVE.get(name)
    if obj is None:
        raise LookupError(f"layerforge op handle {name!r} names no live module in this process (the module was "
                          f"freed, or the program was traced elsewhere: bind it with layerforge.runtime.ops.register)")
    return obj


def _rope_handle(rope: Any) -> Optional[str]:
    return None if rope is None else _rope_handle_at(id(rope))


@torch.compiler.assume_constant_result
def _rope_handle_at(address: int) -> str:
    rope = ctypes.cast(address, ctypes.py_object).value    # as in _handle_at
    key = repr(rope)
    _ROPES.setdefault(key, rope)
    return key


# ---- row layers ------------------------------------------------------------------------
# These read the LayerModule's parsed interface (_inputs, _weights, _scalars, _params,
# _out_specs, _out_dtypes): the op is the module's traced face, not a second interface.
def row_layer(module, args: tuple, scalars: dict[str, Any], out) -> Tensor | tuple[Tensor, ...]:
    """A LayerModule call as one op: `args` are forward()'s tensors, `scalars` its keyword scalars."""
    tensors = [*args, *(getattr(module, attr) for attr in module._weights.values())]
    values = []
    for name, default in module._scalars.items():
        value = scalars.get(name, default)
        if value is None:
            raise ValueError(f"{module.name}: scalar '{name}' has no value")
        values.append(float(value))
    h = handle(module)
    if out is not None:
        torch.ops.layerforge.row_layer_out(h, tensors, values, list(out))
        outs = tuple(out)
    else:
        outs = tuple(torch.ops.layerforge.row_layer(h, tensors, values))
    return outs[0] if len(outs) == 1 else outs


def _row_direct(h: str, tensors: list[Tensor], scalars: list[float], out) -> tuple[Tensor, ...]:
    module = _owner(h)
    names = [*module._inputs, *module._weights]
    values = {name: int(v) if type(default) is int else v
              for (name, default), v in zip(module._scalars.items(), scalars)}
    outs = module._forward_bound(dict(zip(names, tensors)), values, out)
    return outs if isinstance(outs, tuple) else (outs,)


@_op()
def _row_layer(h: str, tensors: list[Tensor], scalars: list[float]) -> list[Tensor]:
    return list(_row_direct(h, tensors, scalars, None))


@_op(mutates_args=("out",))
def _row_layer_out(h: str, tensors: list[Tensor], scalars: list[float], out: list[Tensor]) -> None:
    _row_direct(h, tensors, scalars, tuple(out))


@_fake("row_layer")
def _row_layer_fake(h: str, tensors: list[Tensor], scalars: list[float]) -> list[Tensor]:
    module = _owner(h)
    device = tensors[0].device
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _row_outputs(module, tensors)]


@_fake("row_layer_out")
def _row_layer_out_fake(h: str, tensors: list[Tensor], scalars: list[float], out: list[Tensor]) -> None:
    return None


def _row_outputs(module, tensors: list[Tensor]) -> list[tuple[list, torch.dtype]]:
    """Output shapes and dtypes from the layer's interface: the dynamic dims are bound from the
    inputs' shapes (symbolic under dynamic shapes), then the output shape expressions evaluated."""
    dims: dict[str, Any] = {}
    by_name = dict(zip([*module._inputs, *module._weights], tensors))
    for pname, _, dtype, spec in module._params:
        t = by_name[pname]
        if t.dtype != dtype or t.dim() != len(spec):
            raise ValueError(f"{module.name}: '{pname}' must be {dtype} with {len(spec)} dims, "
                             f"got {t.dtype} {tuple(t.shape)}")
        for s, n in zip(spec, t.shape):
            if isinstance(s, str):
                dims.setdefault(s, n)
    return [([_eval_dim(s, dims) for s in spec], dtype) for spec, dtype in zip(module._out_specs, module._out_dtypes)]


def _eval_dim(spec, dims: dict[str, Any]):
    """An int, a dim name or a sympy expression over dim names, with torch SymInts allowed as values."""
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str):
        return dims[spec]
    if spec.is_Integer:
        return int(spec)
    if spec.is_Symbol:
        return dims[spec.name]
    parts = [_eval_dim(a, dims) for a in spec.args]
    if spec.is_Add:
        return sum(parts[1:], parts[0])
    if spec.is_Mul:
        result = parts[0]
        for p in parts[1:]:
            result = result * p
        return result
    if isinstance(spec, sympy.floor) and spec.args[0].is_Mul:   # floor(x / k)
        num, den = sympy.fraction(spec.args[0])
        return _eval_dim(num, dims) // _eval_dim(den, dims)
    raise NotImplementedError(f"output dim {spec} cannot be evaluated symbolically")


# ---- attention -------------------------------------------------------------------------
def _attention_args(attn, extra, scalars, scales=(None, None)) -> tuple[list[Tensor], list[float]]:
    extra = extra or {}
    tensors = []
    for name, _, _ in attn.extra:
        if name not in extra:
            raise ValueError(f"{attn.name}: missing extra input '{name}'")
        tensors.append(extra[name])
    if getattr(attn, "kv_dtype", None):   # an fp8 cache's k_scale, v_scale travel after the extra inputs
        if scales[0] is None or scales[1] is None:
            raise ValueError(f"{attn.name}: an {attn.kv_dtype} cache needs 'k_scale' and 'v_scale'")
        tensors += list(scales)
    values = []
    for name in attn.scalar_names:
        value = scalars.get(name, attn.scalars.get(name))
        if value is None:
            raise ValueError(f"{attn.name}: scalar '{name}' has no value")
        values.append(float(value))
    return tensors, values


def _attention_kwargs(attn, extra: list[Tensor], scalars: list[float]) -> dict[str, Any]:
    n = len(attn.extra)
    kwargs = {"extra": dict(zip((name for name, _, _ in attn.extra), extra[:n])),
              **dict(zip(attn.scalar_names, scalars))}
    if getattr(attn, "kv_dtype", None):
        kwargs.update(k_scale=extra[n], v_scale=extra[n + 1])
    return kwargs


def paged_attention(attn, q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, *, max_kv_len, extra,
                    num_splits, out, scalars, scales=(None, None)) -> Tensor:
    """PagedAttention.__call__ (the per-token form) as one op (an fp8 cache's scales ride in `extra`)."""
    tensors, values = _attention_args(attn, extra, scalars, scales)
    args = (handle(attn), q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len, num_splits,
            tensors, values)
    if out is None:
        return torch.ops.layerforge.paged_attention(*args)
    torch.ops.layerforge.paged_attention_out(*args, out)
    return out


@_op()
def _paged_attention(h: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor,
                     q_seq: Optional[Tensor], q_pos: Optional[Tensor], max_kv_len: int, num_splits: Optional[int],
                     extra: list[Tensor], scalars: list[float]) -> Tensor:
    attn = _owner(h)
    return attn(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=max_kv_len,
                num_splits=num_splits, **_attention_kwargs(attn, extra, scalars))


@_op(mutates_args=("out",))
def _paged_attention_out(h: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor,
                         seq_lens: Tensor, q_seq: Optional[Tensor], q_pos: Optional[Tensor], max_kv_len: int,
                         num_splits: Optional[int], extra: list[Tensor], scalars: list[float], out: Tensor) -> None:
    attn = _owner(h)
    attn(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=max_kv_len, num_splits=num_splits,
         out=out, **_attention_kwargs(attn, extra, scalars))


def paged_prefill(attn, q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, *, max_q_len, max_kv_len, extra,
                  num_splits, out, scalars, scales=(None, None)) -> Tensor:
    """PagedAttention.prefill (the ragged form) as one op (an fp8 cache's scales ride in `extra`)."""
    tensors, values = _attention_args(attn, extra, scalars, scales)
    args = (handle(attn), q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len, max_kv_len, num_splits,
            tensors, values)
    if out is None:
        return torch.ops.layerforge.paged_prefill(*args)
    torch.ops.layerforge.paged_prefill_out(*args, out)
    return out


@_op()
def _paged_prefill(h: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor,
                   cu_seqlens: Tensor, max_q_len: int, max_kv_len: int, num_splits: Optional[int],
                   extra: list[Tensor], scalars: list[float]) -> Tensor:
    attn = _owner(h)
    return attn.prefill(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len=max_q_len,
                        max_kv_len=max_kv_len, num_splits=num_splits, **_attention_kwargs(attn, extra, scalars))


@_op(mutates_args=("out",))
def _paged_prefill_out(h: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor,
                       cu_seqlens: Tensor, max_q_len: int, max_kv_len: int, num_splits: Optional[int],
                       extra: list[Tensor], scalars: list[float], out: Tensor) -> None:
    attn = _owner(h)
    attn.prefill(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len=max_q_len, max_kv_len=max_kv_len,
                 num_splits=num_splits, out=out, **_attention_kwargs(attn, extra, scalars))


def _attention_fake(h: str, q: Tensor, *args) -> Tensor:
    attn = _owner(h)
    if q.dim() != 3 or q.shape[1] != attn.hq or q.shape[2] != attn.d or q.dtype != attn.dtype:
        raise ValueError(f"{attn.name}: q must be {attn.dtype} [T, {attn.hq}, {attn.d}], got {q.dtype} "
                         f"{tuple(q.shape)}")
    return q.new_empty((q.shape[0], attn.hq, attn.dv))


for _name in ("paged_attention", "paged_prefill"):
    _fake(_name)(_attention_fake)
    _fake(f"{_name}_out")(lambda *args: None)


# ---- KV cache append -------------------------------------------------------------------
def kv_append(cache, seq_ids, k: Tensor, v: Tensor, rope=None, positions=None) -> tuple[Tensor, Tensor, Tensor]:
    """PagedKVCache.append as one op: (positions [T] int32 on the host, the tokens' sequences
    and positions [T] int32 on the cache's device). `seq_ids` / `positions` are host ints: a
    list (a constant of the graph) or a CPU tensor (an input)."""
    ids = seq_ids if isinstance(seq_ids, Tensor) else torch.tensor(list(seq_ids), dtype=torch.int64)
    if positions is not None and not isinstance(positions, Tensor):
        positions = torch.tensor(list(positions), dtype=torch.int64)
    page_table, seq_lens = cache_tables(cache)
    return torch.ops.layerforge.kv_append(handle(cache), k, v, ids, positions, _rope_handle(rope),
                                          cache.k_cache, cache.v_cache, page_table, seq_lens)


def cache_tables(cache) -> tuple[Tensor, Tensor]:
    """The cache's device page_table and seq_lens without flushing queued host changes (a
    traced program cannot run the flush; the next kv_append op writes them)."""
    return cache._page_table, cache._seq_lens


# cudagraph_unsafe: a graph replay would write the metadata of the call that was captured
@_op(mutates_args=("k_cache", "v_cache", "page_table", "seq_lens"), tags=(torch.Tag.cudagraph_unsafe,))
def _kv_append(h: str, k: Tensor, v: Tensor, seq_ids: Tensor, positions: Optional[Tensor], rope: Optional[str],
               k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    cache = _owner(h)
    if k_cache.shape != cache.k_cache.shape or page_table.shape != cache.page_table_host.shape:
        raise ValueError(f"kv_append: the tensors passed are not shaped like cache {h!r}'s")
    # The op writes the tensors it is given: a functionalised graph may pass copies and
    # write them back afterwards (the compiler turns that back into in-place writes).
    own = cache._k, cache._v, cache._page_table, cache._seq_lens
    # (the cache keeps [layers, ...]; the op serves a one-layer cache's layer 0)
    cache._k, cache._v, cache._page_table, cache._seq_lens = k_cache[None], v_cache[None], page_table, seq_lens
    try:
        pos = cache.append(seq_ids, k, v, _ROPES[rope] if rope is not None else None, positions=positions)
    finally:
        cache._k, cache._v, cache._page_table, cache._seq_lens = own
    if k.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int32, device=k.device)
        return pos.clone(), empty, empty.clone()
    q_seq, q_pos = cache.last_tokens
    # An op's outputs may not share memory: on CUDA both are views of the uploaded metadata,
    # on the CPU q_pos is the positions' array; one small copy each way.
    return pos.clone(), q_seq, q_pos.clone()


@_fake("kv_append")
def _kv_append_fake(h, k, v, seq_ids, positions, rope, k_cache, v_cache, page_table, seq_lens):
    T = k.shape[0]
    return (torch.empty(T, dtype=torch.int32, device="cpu"), torch.empty(T, dtype=torch.int32, device=k.device),
            torch.empty(T, dtype=torch.int32, device=k.device))
