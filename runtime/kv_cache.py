"""A paged KV cache, managed from Python, and its append (RoPE fused into one generated kernel).

    cache = PagedKVCache(num_pages=4096, page_size=16, num_kv_heads=8, head_dim=128,
                         dtype=torch.bfloat16, device="cuda", max_seqs=256, max_pages_per_seq=512)
    cache.allocate(3, 100)                       # sequence 3 can now hold 100 tokens
    pos = cache.append([3, 3, 3], k, v, rope)    # k, v: [3, Hkv, D]; K rotated at positions `pos`
    k3, v3 = cache.gather(3)                     # [len, Hkv, D] copies, for tests and debugging

Layout (the attention kernels read it exactly): `k_cache`, `v_cache` [num_pages, page_size,
Hkv, D]; `page_table` int32 [max_seqs, max_pages_per_seq], -1 where unused; `seq_lens` int32
[max_seqs]. Token position t of sequence s lives in page page_table[s, t // page_size], slot
t % page_size. K is stored already rotated by RoPE at t (when the attention has rope), V as given.

The bookkeeping lives on the host: numpy mirrors of page_table and seq_lens and a free list of
pages. So an append is checked completely (dtypes, devices, shapes, capacity, page table)
without reading the GPU, and then costs one pinned host-to-device copy of its metadata plus
one kernel launch on torch's current stream: it never synchronises. The device `page_table`
and `seq_lens` follow the mirrors in stream order: allocate()/free() queue their changes, and
the next append's kernel writes them (or `flush()`; the two properties flush first).

An append cannot be captured in a CUDA graph: its metadata comes from the host at each call.

FP8 (`kv_dtype="fp8_e4m3"`): the pages hold e4m3 values (torch.float8_e4m3fn) and each layer
owns float32 scales for K and V, [num_layers, Hkv]: a stored value is x / scale[head], rounded
once to e4m3 (nearest even, saturating to +-448), after K's RoPE; the attention kernels read
x ~= stored * scale. `scales="per_tensor"` keeps one scale per layer (every head's entry equal),
`"per_head"` one per KV head. Scales start at 1.0; calibrate them with set_scales() before the
first append (values already stored keep the scales they were written with: changing a scale
rescales what the attention reads, so a cache refilled after set_scales is the supported use).

On a CPU device the same bookkeeping runs and torch ops do the kernel's work (the same f32
math), so the cache's behaviour can be used and tested without a GPU.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..codegen.kv_append import FP8_MAX, KV_DTYPES, KVAppendPlan, rope_fields
from ..dsl.attention_ref import rotate
from ..dsl.numerics import rope_cos_sin
from ..dsl.evaluator import LayerInputError
from . import ops
from .pages import KVCacheError, OutOfPagesError, PagedSequences, columns

__all__ = ["PagedKVCache", "KVCacheError", "OutOfPagesError", "quantise", "dequantise"]

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_DTYPE_NAMES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_SCALES = ("per_tensor", "per_head")


@dataclass
class _Append:
    """One checked append (or a model's step, begin_step()): everything the writes need."""
    k: torch.Tensor | None
    v: torch.Tensor | None
    rope: tuple | None       # (style, theta, rotary_dim, scaling), see rope_fields
    pages: np.ndarray        # int32 [T]: the page of each token
    positions: np.ndarray    # int32 [T]
    len_seqs: np.ndarray     # int32 [U]: seq_lens updates (queued ones and this append's)
    len_values: np.ndarray
    pt_index: np.ndarray     # int32 [W]: queued page_table updates, flat index
    pt_values: np.ndarray
    new_seqs: np.ndarray     # int64: the sequences whose length this append changes
    new_ends: np.ndarray     # int64: their new lengths
    seq_ids: np.ndarray      # int32 [T]: each token's sequence (uploaded with the rest, see last_tokens)
    meta_dev: torch.Tensor | None = None   # begin_step(): the uploaded meta
    pending: bool = False    # begin_step(): length / page-table updates not yet written on the device

    @property
    def meta(self) -> np.ndarray:
        """The kernel's metadata, in the order it reads it (templates/cuda/kv_append.cu.jinja)."""
        return np.concatenate([self.pages, self.positions, self.len_seqs, self.len_values,
                               self.pt_index, self.pt_values, self.seq_ids]).astype(np.int32, copy=False)


# (plan key, device index) -> (Launcher, its argument getter), shared by caches
_LOADED: dict[tuple[str, int], tuple[Any, Any]] = {}
# plan key -> (cubin, KernelABI): append kernels a pack provides (runtime/pack.py), used instead of compiling
_IMAGES: dict[str, tuple[bytes, Any]] = {}


def register_append_kernel(key: str, cubin: bytes, abi) -> None:
    """Make a compiled append kernel (a pack's) available to every cache that needs its plan."""
    _IMAGES[key] = (cubin, abi)


class PagedKVCache(PagedSequences):
    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | str, device: torch.device | str | int, max_seqs: int,
                 max_pages_per_seq: int, *, num_layers: int = 1, arch: str | None = None, kernel_cache=None,
                 kv_dtype: str | None = None, scales: str = "per_tensor"):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_seqs", max_seqs),
                            ("max_pages_per_seq", max_pages_per_seq), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {value!r}")
        dtype = _DTYPE_NAMES.get(dtype, dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"PagedKVCache: dtype must be torch.bfloat16, torch.float16 or torch.float32 "
                             f"('bf16', 'f16', 'f32'), got {dtype!r}")
        if kv_dtype is not None:
            if kv_dtype not in KV_DTYPES:
                raise ValueError(f"PagedKVCache: kv_dtype must be one of {KV_DTYPES} or None (the dtype), "
                                 f"got {kv_dtype!r}")
            if dtype == torch.float32 or head_dim % 16:
                raise ValueError(f"PagedKVCache: an fp8 cache takes bf16 or f16 K/V and a head dim that is a "
                                 f"multiple of 16, got {dtype} and {head_dim}")
        if scales not in _SCALES:
            raise ValueError(f"PagedKVCache: scales must be one of {_SCALES}, got {scales!r}")
        device = self._init_pages("PagedKVCache", num_pages, page_size, max_seqs, max_pages_per_seq, device)
        self.num_kv_heads, self.head_dim = int(num_kv_heads), int(head_dim)
        self.num_layers = int(num_layers)
        self.dtype, self.device = dtype, device
        self.kv_dtype, self.scales = kv_dtype, scales
        # what the pages hold: the dtype, or e4m3 values
        self.storage_dtype = torch.float8_e4m3fn if kv_dtype else dtype
        self.arch = arch
        self._kernel_cache = kernel_cache

        shape = (self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        self._k = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self._v = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        # fp8: float32 scales [num_layers, Hkv] (per_tensor: a layer's entries are equal); None otherwise
        self._k_scale = self._v_scale = None
        if kv_dtype:
            self._k_scale = torch.ones((self.num_layers, self.num_kv_heads), dtype=torch.float32, device=device)
            self._v_scale = torch.ones_like(self._k_scale)
        self._last_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ropes: dict[Any, tuple | None] = {}
        self._kernels: dict[tuple, Any] = {}

    # ---- tensors (the layout the attention kernels read) -----------------------------------
    @property
    def k_cache(self) -> torch.Tensor:
        """Layer 0's keys [num_pages, page_size, Hkv, D] (see layer() for the others)."""
        return self._k[0]

    @property
    def v_cache(self) -> torch.Tensor:
        return self._v[0]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (k_cache, v_cache), each [num_pages, page_size, Hkv, D]: every layer
        has its own pages' storage; the page table and lengths are shared."""
        if not 0 <= index < self.num_layers:
            raise KVCacheError(f"layer {index} is out of range [0, num_layers={self.num_layers})")
        return self._k[index], self._v[index]

    def layer_scales(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp8 caches: layer `index`'s (k_scale, v_scale), float32 [Hkv] views on the cache's
        device (what the attention kernels take)."""
        if self._k_scale is None:
            raise KVCacheError(f"layer_scales: the cache stores {self.dtype}, not fp8; it has no scales")
        self.layer(index)   # range check
        return self._k_scale[index], self._v_scale[index]

    def set_scales(self, index: int, k_scale, v_scale) -> None:
        """Set layer `index`'s scales (calibration): a stored value is x / scale. per_tensor: a
        number (or a 1-element tensor); per_head: that or Hkv values, one per KV head. Every
        scale must be finite and positive. Written with a torch copy on the current stream
        (values from a device tensor are read to check them, which synchronises)."""
        if self._k_scale is None:
            raise KVCacheError(f"set_scales: the cache stores {self.dtype}, not fp8; it has no scales")
        self.layer(index)
        for name, value, dst in (("k_scale", k_scale, self._k_scale), ("v_scale", v_scale, self._v_scale)):
            dst[index] = torch.from_numpy(self._scale_values(name, value)).to(self.device)

    def _scale_values(self, name: str, value) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(value, dtype=np.float64).reshape(-1)
        H = self.num_kv_heads
        if x.size == 1:
            x = np.repeat(x, H)
        elif self.scales == "per_tensor":
            raise LayerInputError(f"set_scales: '{name}' must be one number (scales='per_tensor'), got {x.size} values")
        elif x.size != H:
            raise LayerInputError(f"set_scales: '{name}' must be one number or {H} (one per KV head), got {x.size}")
        x32 = x.astype(np.float32)
        if not (np.isfinite(x32).all() and (x32 > 0).all()):
            raise LayerInputError(f"set_scales: '{name}' must be finite and positive (as float32), got {x.tolist()}")
        return x32

    def dequantised(self, seq_id: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """gather() as float32 values: fp8 entries times their head's scale (exact in float64,
        then rounded to float32 once); a cache of another dtype: its values as float32."""
        k, v = self.gather(seq_id, layer)
        if self._k_scale is None:
            return k.float(), v.float()
        return (dequantise(k, self._k_scale[layer]), dequantise(v, self._v_scale[layer]))

    # ---- sequences and pages (allocate, reserve, free, ...: runtime/pages.py) -------------
    @property
    def last_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_ids, positions) of the tokens of the last append(), int32 [T] on the cache's
        device: what a decode step passes to the attention kernel, already uploaded with the
        append's metadata (no second copy). Valid until the next append()."""
        if self._last_tokens is None:
            raise KVCacheError("last_tokens: nothing has been appended yet")
        return self._last_tokens

    # ---- append -------------------------------------------------------------------------
    def append(self, seq_ids, k: torch.Tensor, v: torch.Tensor, rope=None, *, positions=None,
               layer: int = 0) -> torch.Tensor:
        """Write tokens into their sequences' pages and advance seq_lens; returns the positions
        used (a CPU int32 tensor [T]).

        seq_ids: int [T] on the host (list, numpy array or CPU tensor): token t belongs to
        sequence seq_ids[t]. k, v: [T, Hkv, D] of the cache's dtype on its device, each token's
        [Hkv, D] dense (tokens may be strided, e.g. views of a fused QKV output). rope: the
        attention's `RopeSpec` (numeric rotary_dim) or None. positions: int [T] on the host;
        by default a sequence's new tokens take the positions after its length, in their order
        in seq_ids. A sequence's length becomes max(length, its largest position + 1). layer: the
        layer whose pages are written (a model's cache: see begin_step(), which plans a step once
        for every layer).

        Everything is checked before anything is written: a bad call raises ValueError
        (LayerInputError for tensors, KVCacheError for positions and pages) and changes nothing.

        Traced (torch.compile, torch.export): one `layerforge::kv_append` op whose real
        implementation is this method, so the bookkeeping runs on the host at each call of the
        compiled program (runtime/ops.py).
        """
        if torch.compiler.is_compiling():
            return ops.kv_append(self, seq_ids, k, v, rope, positions)[0]
        if not 0 <= layer < self.num_layers:
            raise KVCacheError(f"append: layer {layer} is out of range [0, num_layers={self.num_layers})")
        prep = self._prepare(seq_ids, k, v, rope, positions)
        if prep.pages.size:
            if self.device.type == "cuda":
                self._write_cuda(prep, layer)
            else:
                self._write_torch(prep, layer)
            self._queued_pt.clear()
            self._queued_lens.clear()
            self._lens[prep.new_seqs] = prep.new_ends
        return torch.from_numpy(prep.positions)

    def begin_step(self, seq_ids, *, positions=None) -> _Append:
        """Plan one step of a model's tokens once, for every layer: positions, pages and length
        updates (host bookkeeping, checked as append() checks it), uploaded in one copy. Then
        write(step, layer, k, v, rope) once per layer writes that layer's K/V (the first write
        also applies the step's length and page-table updates on the device). The lengths are
        advanced here: a step begun must be written before the attention of each layer reads."""
        T = len(seq_ids)
        step = self._plan(seq_ids, T, positions)
        if self.device.type == "cuda":
            step.meta_dev = torch.from_numpy(step.meta).pin_memory().to(self.device, non_blocking=True)
            self._last_tokens = (step.meta_dev[step.meta_dev.numel() - T:], step.meta_dev[T: 2 * T])
            step.pending = bool(step.len_seqs.size or step.pt_index.size)
        else:
            self._last_tokens = (torch.from_numpy(step.seq_ids), torch.from_numpy(step.positions))
            self._apply_torch(step.len_seqs, step.len_values, step.pt_index, step.pt_values)
            step.pending = False
        self._queued_pt.clear()
        self._queued_lens.clear()
        self._lens[step.new_seqs] = step.new_ends
        return step

    def write(self, step: _Append, layer: int, k: torch.Tensor, v: torch.Tensor, rope=None) -> None:
        """Write one layer's K/V of a step planned by begin_step() (K rotated by `rope`)."""
        if not 0 <= layer < self.num_layers:
            raise KVCacheError(f"write: layer {layer} is out of range [0, num_layers={self.num_layers})")
        self._check_tensor("k", k)
        self._check_tensor("v", v)
        T = step.pages.size
        if k.shape[0] != T or v.shape[0] != T:
            raise LayerInputError(f"write: the step has {T} tokens, 'k' {k.shape[0]}, 'v' {v.shape[0]}")
        if not T:
            return
        step.k, step.v, step.rope = k, v, self._rope(rope)
        if self.device.type == "cuda":
            self._launch(step.rope, k, v, step.meta_dev, T, layer,
                         (step.len_seqs.size, step.pt_index.size) if step.pending else (0, 0))
            step.pending = False
        else:
            self._write_torch(step, layer, apply=False)

    def write_device(self, layer: int, k: torch.Tensor, v: torch.Tensor, rope, meta: torch.Tensor) -> None:
        """One layer's K/V at pages and positions already on the device: `meta` is int32 [2T]
        (T pages, then T positions), computed on the device (a CUDA-graph decode step, whose
        bookkeeping is on the device). Capturable: no host work beyond the launch."""
        T = k.shape[0]
        self._launch(self._rope(rope), k, v, meta, T, layer, (0, 0))

    def advance_host(self, seq_ids) -> None:
        """Record on the host that a step whose bookkeeping ran on the device (a captured decode
        step: it reads seq_lens, writes each token at its sequence's length and increments it)
        appended one token to each of these distinct sequences. Checked like an append: each
        must have a page for its new position (allocate() first); nothing changes on an error."""
        ids = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.max_seqs):
            bad = int(ids[(ids < 0) | (ids >= self.max_seqs)][0])
            raise KVCacheError(f"seq_id {bad} is out of range [0, max_seqs={self.max_seqs})")
        if len(set(ids.tolist())) != ids.size:
            raise KVCacheError("advance_host: a sequence appears twice in one step")
        short = np.flatnonzero(self._lens[ids] >= self._npages[ids] * self.page_size)
        if short.size:
            s = int(ids[short[0]])
            raise KVCacheError(f"advance_host: sequence {s} has no page for position {self._lens[s]}; "
                               f"call allocate({s}, {self._lens[s] + 1}) first")
        self._lens[ids] += 1

    def gather(self, seq_id: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence `seq_id`'s keys (as stored: rotated) and values, contiguous [len, Hkv, D]
        copies. For tests and debugging (plain torch indexing; may synchronise)."""
        s = self._seq(seq_id)
        n = int(self._lens[s])
        pages = torch.from_numpy(self._pt[s, : -(-n // self.page_size)].astype(np.int64)).to(self.device)
        shape = (-1, self.num_kv_heads, self.head_dim)
        return self._k[layer][pages].reshape(shape)[:n], self._v[layer][pages].reshape(shape)[:n]

    def __repr__(self) -> str:
        return (f"PagedKVCache(pages={self.num_pages}x{self.page_size}, Hkv={self.num_kv_heads}, "
                f"D={self.head_dim}, {_DTYPES[self.dtype]}{f', {self.kv_dtype} {self.scales}' if self.kv_dtype else ''}, {self.device}, free={len(self._free)}, "
                f"max_seqs={self.max_seqs}, max_pages_per_seq={self.max_pages_per_seq})")

    # ---- checks -------------------------------------------------------------------------
    def _check_tensor(self, name: str, x) -> None:
        H, D = self.num_kv_heads, self.head_dim
        self._check_dtype_device(name, x)
        if x.dim() != 3 or x.shape[1] != H or x.shape[2] != D:
            raise LayerInputError(f"append: '{name}' must have shape [T, {H}, {D}], got {tuple(x.shape)}")
        if (D > 1 and x.stride(2) != 1) or (H > 1 and x.stride(1) != D):
            raise LayerInputError(f"append: each token of '{name}' must be a dense [{H}, {D}] block "
                                  f"(strides {x.stride()}); call .contiguous() first")

    def _rope(self, rope) -> tuple | None:
        try:
            return self._ropes[rope]
        except KeyError:
            fields = self._ropes[rope] = rope_fields(rope, self.head_dim)
            return fields
        except TypeError:  # unhashable: not a RopeSpec
            return rope_fields(rope, self.head_dim)

    def _prepare(self, seq_ids, k, v, rope, positions) -> _Append:
        self._check_tensor("k", k)
        self._check_tensor("v", v)
        T = k.shape[0]
        if v.shape[0] != T:
            raise LayerInputError(f"append: 'k' has {T} tokens, 'v' {v.shape[0]}")
        return self._plan(seq_ids, T, positions, k, v, self._rope(rope))

    def _plan(self, seq_ids, T: int, positions, k=None, v=None, fields=None) -> _Append:
        ids, pages, pos, new_seqs, new_ends = self._place(seq_ids, T, positions)
        if self._queued_lens:   # queued allocate()/free() length changes go in the same launch
            merged = {**self._queued_lens, **dict(zip(new_seqs.tolist(), new_ends.tolist()))}
            len_seqs, len_values = columns(merged)
        else:
            len_seqs, len_values = new_seqs.astype(np.int32), new_ends.astype(np.int32)
        pt_index, pt_values = columns(self._queued_pt)
        return _Append(k, v, fields, pages, pos.astype(np.int32), len_seqs, len_values,
                       pt_index, pt_values, new_seqs, new_ends, ids.astype(np.int32))

    # ---- writes -------------------------------------------------------------------------
    def _write_cuda(self, a: _Append, layer: int = 0) -> None:
        meta = torch.from_numpy(a.meta).pin_memory().to(self.device, non_blocking=True)
        T = a.pages.size
        self._last_tokens = (meta[meta.numel() - T:], meta[T: 2 * T])   # (seq ids, positions), on the device
        self._launch(a.rope, a.k, a.v, meta, T, layer, (a.len_seqs.size, a.pt_index.size))

    def _launch(self, rope, k, v, meta, T: int, layer: int, updates: tuple[int, int]) -> None:
        kernel, args = self._kernel(rope, _vec_bytes(k, v))
        U, W = updates
        kernel((T, U + W), args(dict(
            k_cache=self._k[layer], v_cache=self._v[layer], k=k, v=v, k_stride=k.stride(0), v_stride=v.stride(0),
            meta=meta, num_tokens=T, num_len_updates=U, num_page_updates=W, seq_lens=self._seq_lens,
            page_table=self._page_table, **self._scale_args(layer))))

    def _scale_args(self, layer: int) -> dict:
        if self._k_scale is None:
            return {}
        return {"k_scale": self._k_scale[layer], "v_scale": self._v_scale[layer]}

    def _kernel(self, rope: tuple | None, vec_bytes: int):
        hit = self._kernels.get((rope, vec_bytes))
        if hit is not None:
            return hit
        from .launch import compile_plan, device_arch, load_kernels

        arch = self.arch or device_arch(self.device)
        style, theta, rd, scaling = rope or (None, None, None, None)
        plan = KVAppendPlan(dtype=_DTYPES[self.dtype], num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            page_size=self.page_size, rope_style=style, rope_theta=theta, rotary_dim=rd,
                            rope_scaling=scaling, arch=arch, vec_bytes=vec_bytes, kv_dtype=self.kv_dtype)
        hit = _LOADED.get((plan.key, self.device.index))
        if hit is None:
            image = _IMAGES.get(plan.key)
            if image is None:
                image = (compile_plan(plan, self._kernel_cache).cubin, plan.abi)
            kernel = load_kernels(image[0], image[1:], self.device)[plan.kernel_name]
            hit = _LOADED[(plan.key, self.device.index)] = (kernel, operator.itemgetter(*(a.ref for a in kernel.abi.args)))
        self._kernels[(rope, vec_bytes)] = hit
        return hit

    @torch.no_grad()
    def _write_torch(self, a: _Append, layer: int = 0, apply: bool = True) -> None:
        """The kernel's work with torch ops (CPU caches): same f32 angles and rotation, one rounding."""
        if apply:
            self._last_tokens = (torch.from_numpy(a.seq_ids), torch.from_numpy(a.positions))
        pages = torch.from_numpy(a.pages.astype(np.int64)).to(self.device)
        slots = torch.from_numpy((a.positions % self.page_size).astype(np.int64)).to(self.device)
        if self._k_scale is not None:   # fp8: K rotated in f32, then each value quantised once
            k = _rope_f32(a.k, a.positions, a.rope, round_to=None) if a.rope else a.k.float()
            self._k[layer][pages, slots] = quantise(k, self._k_scale[layer])
            self._v[layer][pages, slots] = quantise(a.v.float(), self._v_scale[layer])
        else:
            self._k[layer][pages, slots] = _rope_f32(a.k, a.positions, a.rope) if a.rope else a.k
            self._v[layer][pages, slots] = a.v
        if apply:
            self._apply_torch(a.len_seqs, a.len_values, a.pt_index, a.pt_values)


def _vec_bytes(*tensors: torch.Tensor) -> int:
    """The widest access (bytes) that every token row of these 2-byte tensors is aligned to."""
    align = 16
    for x in tensors:
        for b in (x.data_ptr(), 2 * x.stride(0) if x.shape[0] > 1 else 0):
            while align > 2 and b % align:
                align //= 2
    return align


def _rope_f32(x: torch.Tensor, positions: np.ndarray, rope: tuple, round_to="input") -> torch.Tensor:
    """The kernel's rotation with torch ops: cos/sin of the float64 angles (dsl/numerics), the
    rotation in f32, one rounding (to x's dtype; round_to=None: the f32 result, for fp8)."""
    style, theta, rd, scaling = rope
    pos = torch.from_numpy(positions.astype(np.int64)).to(x.device)
    cos, sin = rope_cos_sin(pos, rd, theta, scaling, torch.float32)
    out = rotate(x.float(), cos[:, None, :], sin[:, None, :], style, rd)
    return out if round_to is None else out.to(x.dtype)


def quantise(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x [..., Hkv, D] as the fp8 cache stores it: x / scale[head] in float32, rounded to
    e4m3 (nearest even) and saturated to +-448, as the append kernel does (NaN stays NaN)."""
    q = x.float() / scale.float()[:, None]
    return q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantise(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 values [..., Hkv, D] times their head's scale: the values the attention kernels use
    (the product is exact in float64; the result is that, rounded to `dtype`)."""
    return (x.double() * scale.double()[:, None]).to(dtype)
