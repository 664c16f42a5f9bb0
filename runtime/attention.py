"""Attention over a paged KV cache: kernels generated from each attention block.

    attn = PagedAttention(stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), page_size=16)
    out = attn(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=4096)      # per token
    out = attn(q, k_cache, v_cache, page_table, seq_lens, max_kv_len=4096)    # decode, token t = sequence t
    out = attn.prefill(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len=512,
                       max_kv_len=4096)                                                        # ragged

q is [T, Hq, D]: the new query tokens of every sequence, concatenated. In the per-token form
q_seq[t] is token t's sequence (a row of page_table) and q_pos[t] its position (decode: one
token per sequence); without both (None), token t is sequence t at its last position
(seq_lens[t] - 1), a decode step of every sequence in order, and the kernels read neither
array (one dependent global read less ahead of each CTA's first page-table and K/V loads).
In the ragged form, sequence s owns q rows cu_seqlens[s] ..
cu_seqlens[s+1]-1, which are its last tokens (prefill, chunked prefill over a cached prefix).
The cache holds K already rotated (see runtime/kv_cache.py); seq_lens counts the tokens each
sequence has in the cache, the new ones included.

An fp8 cache (PagedKVCache(kv_dtype="fp8_e4m3")) is read by a module built with the same
kv_dtype, and every call passes the layer's scales (cache.layer_scales(i)):

    attn = PagedAttention(layer, page_size=16, kv_dtype="fp8_e4m3")
    k_scale, v_scale = cache.layer_scales(0)
    out = attn(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=4096,
               k_scale=k_scale, v_scale=v_scale)

kernel="tc" runs the tensor-core kernels (codegen/attention_tc.py; the default from sm_80 on),
kernel="simt" the CUDA-core one (codegen/attention.py; the default before sm_80), which
serves only the per-token form. Under kernel="tc", prefill="wgmma" runs the ragged prefill
tiles on the Hopper kernel (codegen/attention_wgmma.py, compiled for sm_90a; the default on
sm_90 where it serves the block), prefill="tc" on the mma.sync one. A block whose mask reads
tables at positions (document ids) runs on the wgmma kernel too, over the same block-mask
pre-pass, where its key-side reads are staged in shared memory (1.20x mma.sync on an H100;
LAYERFORGE_WGMMA_KEY_STAGE=0 keeps such blocks on mma.sync). The wgmma kernel tabulates
the score's distance term per tile (T5 buckets, relative-bias tables) by default: 1.67-1.74x
the per-score kernel on an H200 (codegen/attention_wgmma.py, benchmarks/NOTES.md);
distance_table=False computes the term per score instead. The wgmma prefill takes its overlap
schedule (WGTileConfig.overlap: the softmax under the consumer's own P V) wherever it compiles
without spills: measured 3-7 % faster on the H200 at every benchmarked shape (benchmarks/NOTES.md);
LAYERFORGE_WGMMA_OVERLAP=0 turns it off.
Everything is checked before the launch; the split-KV workspace is allocated here, through
torch's allocator, so calls are capturable in CUDA graphs. CPU tensors run the DSL's
reference evaluator instead (slow, exact; bad page tables are errors there).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from operator import itemgetter
from typing import Any

import torch

from ..codegen.attention import PagedAttentionPlan, attention_interface, plan_paged_attention
from ..codegen.attention_tc import (TCAttentionPlan, block_many_tile, fp8_cvt_default, heads_first_default,
                                    pick_mode, plan_tc_attention, fold_default as tc_fold_default, supports as tc_supports)
from ..codegen.attention_wgmma import (WGMMAAttentionPlan, WGTileConfig, default_options as wgmma_options,
                                       plan_wgmma_attention, supports as wgmma_supports)
from ..codegen.block_mask import needs_block_mask
from ..codegen.kv_append import KV_DTYPES
from ..dsl.evaluator import LayerInputError
from ..dsl.program import Layer
from ..dsl.types import DType
from . import block_mask as bmc, ops
from .block_mask import BlockMask
from .kv_cache import dequantise
from .linear import device_properties


# the decode plan for grids the default decode tile cannot hold in one wave (codegen/attention_tc.many_ctas_tile)
DECODE_MANY = "decode_many"


# the tensors the kernels read or write in 16-byte pieces (cp.async / TMA / vector stores): checked before a launch
_ALIGNED = frozenset({"q", "k_cache", "v_cache", "out"})


class PagedAttention:
    def __init__(self, layer: Layer | None, *, page_size: int = 16, arch: str | None = None, cache=None,
                 kernel: str | None = None, prefill: str | None = None, tiles: dict | None = None,
                 interface: dict | None = None, name: str | None = None, kv_dtype: str | None = None,
                 distance_table: bool = True, **scalars: Any):
        if layer is not None and layer.function.kind != "attention":
            raise TypeError(f"{layer.name} is not an attention block")
        if kv_dtype not in (None, *KV_DTYPES):
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES} or None (the block's dtype), got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        if kernel not in (None, "tc", "simt"):
            raise ValueError(f"kernel must be 'tc' or 'simt' (None: 'tc' from sm_80 on), got {kernel!r}")
        if prefill not in (None, "tc", "wgmma"):
            raise ValueError(f"prefill must be 'tc' or 'wgmma' (None: 'wgmma' on sm_90 where it serves the block), "
                             f"got {prefill!r}")
        self._kernel = kernel
        self._prefill = prefill
        self.distance_table = distance_table   # the wgmma prefill's per-tile distance tables (False: per score)
        # mode -> codegen.attention_tc.TileConfig (or, for prefill, attention_wgmma.WGTileConfig),
        # to override the default tiles
        self.tiles = dict(tiles or {})
        self.layer = layer
        self.name = layer.name if layer is not None else name
        info = interface or attention_interface(layer)
        self.page_size = page_size
        self.arch = arch
        self._cache = cache
        self.hq, self.hkv, self.d = info["num_q_heads"], info["num_kv_heads"], info["head_dim"]
        self.dv = info.get("v_head_dim", self.d)   # the value head dim: v_cache's and the output's
        self.dtype = DType[info["dtype"]].torch
        if kv_dtype and self.dtype == torch.float32:
            raise ValueError(f"{self.name}: an {kv_dtype} cache serves bf16 or f16 blocks, not float32")
        # what k_cache / v_cache hold
        self.cache_dtype = torch.float8_e4m3fn if kv_dtype else self.dtype
        self.extra = [(e["name"], DType[e["dtype"]].torch, e["shape"]) for e in info["extra"]]
        self.scalar_names = [p["name"] for p in info["scalars"]]
        self.table_dims = info["table_dims"]   # dims of the extra inputs passed as ints
        self.scalars = {p["name"]: scalars.pop(p["name"], p["default"]) for p in info["scalars"]}
        if scalars:
            raise TypeError(f"{self.name}: unknown scalar arguments {sorted(scalars)}")
        self._plan: PagedAttentionPlan | None = None
        self._tc_plans: dict[str, TCAttentionPlan | WGMMAAttentionPlan] = {}
        self._kernels: dict[tuple, tuple] = {}   # (device, mode) -> (main, merge, arguments getter)
        self._maps: dict[tuple, tuple] = {}      # the wgmma prefill's K / V tensor maps by the caches they map
        self._queues: dict[int, torch.Tensor] = {}   # the persistent prefill's work counter, by device
        self._images: dict[str | None, tuple] = {}   # mode -> (cubin, ABIs): a pack's kernels
        self._many: bool | None = None   # whether decode has a DECODE_MANY plan (decided at its first need)

    @classmethod
    def from_images(cls, name: str, interface: dict, images: dict, *, page_size: int, arch: str,
                    kv_dtype: str | None = None, **scalars: Any) -> PagedAttention:
        """A module over compiled kernels (a pack's): `images` maps a mode ('prefill', 'decode',
        or None for the CUDA-core kernel) to (cubin, (main ABI, merge ABI), keys per tile, None for the CUDA-core kernel). No NVRTC, no DSL;
        CPU tensors are not served (the reference needs the DSL)."""
        self = cls(None, page_size=page_size, arch=arch, interface=interface, name=name,
                   kernel="tc" if "decode" in images else "simt", kv_dtype=kv_dtype, **scalars)
        self._images = dict(images)
        return self

    @property
    def target(self) -> str:
        from .launch import device_arch
        return self.arch or device_arch()

    @property
    def kernel(self) -> str:
        """'tc' (tensor cores, sm_80 and newer, bf16/f16, head dims and value dims that are
        multiples of 16 from 32 to 256; over an fp8 cache 64/128/256 equal to the value dim) or
        'simt' (CUDA cores, any GPU, f32 too, head dims that are multiples of 16 up to 256, equal
        to the value dim)."""
        if self._kernel is None:   # f32, or head dims the tensor-core kernel lacks: the CUDA-core kernel
            tc = (int(self.target.removeprefix("sm_").rstrip("af")) >= 80 and self.dtype != torch.float32
                  and tc_supports(self.d, self.dv, self.kv_dtype))
            self._kernel = "tc" if tc else "simt"
        return self._kernel

    @property
    def prefill_kernel(self) -> str:
        """The kernel of the ragged prefill tiles: 'wgmma' (Hopper, sm_90; bf16/f16; by default at
        head dims 64/128/256 equal to the value dim, asked for (prefill="wgmma") at any multiple of
        16 from 32 to 256 and value dims of their own; pages of 4+ keys) or 'tc' (mma.sync, sm_80
        and newer)."""
        if self._prefill is None:
            # the wgmma kernel reads bf16/f16 caches only: an fp8 cache stays on mma.sync
            hopper = (self.target in ("sm_90", "sm_90a") and self.layer is not None and self.kernel == "tc"
                      and not self.kv_dtype)
            forced = self.tiles.get("prefill")   # a TileConfig (mma.sync) or a WGTileConfig (wgmma)
            if forced is not None:
                self._prefill = "wgmma" if isinstance(forced, WGTileConfig) else "tc"
            else:
                self._prefill = "wgmma" if hopper and wgmma_supports(self.layer, self.page_size) else "tc"
        elif self._prefill == "wgmma":
            if self.layer is None or not self.target.startswith("sm_90"):
                raise LayerInputError(f"{self.name}: the wgmma prefill kernel needs an sm_90 GPU and the DSL block "
                                      f"(target {self.target})")
        return self._prefill

    @property
    def plan(self) -> PagedAttentionPlan:
        if self._plan is None:
            self._plan = plan_paged_attention(self.layer, self.target, page_size=self.page_size, kv_dtype=self.kv_dtype)
        return self._plan

    def tc_plan(self, mode: str) -> TCAttentionPlan | WGMMAAttentionPlan:
        plan = self._tc_plans.get(mode)
        if plan is None:
            from .launch import compile_fn
            if mode == "prefill" and self.prefill_kernel == "wgmma":
                plan = plan_wgmma_attention(self.layer, page_size=self.page_size, tiles=self.tiles.get("prefill"),
                                            compile_fn=compile_fn(self._cache), distance_table=self.distance_table,
                                            **wgmma_options(self.layer))
            else:
                many = mode == DECODE_MANY   # (the decode's options on many_ctas_tile)
                plan = plan_tc_attention(self.layer, self.target, page_size=self.page_size,
                                         mode="decode" if many else mode, many=many,
                                         tiles=None if many else self.tiles.get(mode), compile_fn=compile_fn(self._cache),
                                         kv_dtype=self.kv_dtype, fp8_cvt=fp8_cvt_default(),
                                         fold=tc_fold_default(), heads_first=heads_first_default())
            self._tc_plans[mode] = plan
        return plan

    def _decode_many(self) -> bool:
        """Whether decode grids past one wave of the default tile take the DECODE_MANY plan: a block with such a
        tile (codegen/attention_tc.many_ctas_tile; none where the decode tile is forced) that compiles without
        register spills, or a pack that holds its kernel."""
        if self._many is None:
            if self.layer is None:
                self._many = DECODE_MANY in self._images
            elif self.tiles.get("decode") is not None or block_many_tile(self.layer, self.kv_dtype) is None:
                self._many = False
            else:
                from ..codegen.plan import spill_free
                from .launch import compile_fn
                self._many = spill_free(self.tc_plan(DECODE_MANY), compile_fn(self._cache))
        return self._many

    def _decode_slots(self, dev) -> int:
        """CTAs the default decode tile holds in one wave: SMs x its CTAs an SM (a pack's: its plan's default, 2)."""
        blocks = self.tc_plan("decode").config.min_blocks if self.layer is not None else 2
        return blocks * device_properties(dev).multi_processor_count

    def _load(self, device: torch.device, mode: str | None = None):
        """(main, merge, main's and merge's argument getters, key tile) of the CUDA-core kernel
        (mode None) or a tensor-core one. A getter picks a kernel's arguments, in its ABI's
        order, from a dict of values by ref; the key tile sizes the split-KV heuristic."""
        hit = self._kernels.get((device.index, mode))
        if hit is not None:
            return hit
        from .launch import compile_plan, load_kernels
        if mode in self._images:
            cubin, abis, keys = self._images[mode]
        elif self.layer is None:
            raise LayerInputError(f"{self.name}: the pack has no {mode or 'simt'} attention kernel")
        else:
            plan = self.plan if mode is None else self.tc_plan(mode)
            cubin, abis = compile_plan(plan, self._cache).cubin, plan.kernels
            keys = plan.config.keys if mode is not None else None   # the CUDA-core kernel has no key tile
        kernels = load_kernels(cubin, abis, device)
        main, merge = kernels[abis[0].name], kernels[abis[1].name]
        hit = (main, merge, itemgetter(*(a.ref for a in abis[0].args)), itemgetter(*(a.ref for a in abis[1].args)),
               keys)
        self._kernels[(device.index, mode)] = hit
        return hit

    def _check(self, name, t, dtype, shape=None, ndim=None, device=None):
        if not isinstance(t, torch.Tensor):
            raise LayerInputError(f"{self.name}: '{name}' must be a torch.Tensor")
        if t.dtype != dtype:
            raise LayerInputError(f"{self.name}: '{name}' must be {dtype}, got {t.dtype}")
        if device is not None and t.device != device:
            raise LayerInputError(f"{self.name}: '{name}' is on {t.device}, expected {device}")
        if ndim is not None and t.dim() != ndim:
            raise LayerInputError(f"{self.name}: '{name}' must have {ndim} dims, got shape {tuple(t.shape)}")
        if shape is not None:
            for i, (want, got) in enumerate(zip(shape, t.shape)):
                if want is not None and want != got:
                    raise LayerInputError(f"{self.name}: '{name}' dim {i} must be {want}, got {got} "
                                          f"(shape {tuple(t.shape)})")
        if not t.is_contiguous():
            raise LayerInputError(f"{self.name}: '{name}' must be contiguous")
        if name in _ALIGNED and t.is_cuda and t.data_ptr() % 16:
            raise LayerInputError(f"{self.name}: '{name}' must start at a 16-byte aligned address (the kernels move "
                                  f"it in 16-byte pieces); this view starts {t.data_ptr() % 16} bytes past one")

    def _common_checks(self, q, k_cache, v_cache, page_table, seq_lens, max_kv_len, extra, out, scalars,
                       k_scale=None, v_scale=None):
        dev = q.device if isinstance(q, torch.Tensor) else None
        if dev is None or dev.type not in ("cuda", "cpu"):
            raise LayerInputError(f"{self.name}: q must be a CUDA tensor (the kernels) or a CPU tensor "
                                  f"(the reference evaluator)")
        if isinstance(q, torch.Tensor) and q.dim() == 3 and (q.shape[1] != self.hq or q.shape[2] != self.d):
            raise LayerInputError(f"{self.name}: q must be [T, {self.hq}, {self.d}] (Hq heads of dim D), "
                                  f"got {tuple(q.shape)}")
        self._check("q", q, self.dtype, (None, self.hq, self.d), 3, dev)
        if isinstance(k_cache, torch.Tensor) and k_cache.dtype != self.cache_dtype and (
                k_cache.dtype == torch.float8_e4m3fn or self.kv_dtype):
            raise LayerInputError(f"{self.name}: 'k_cache' is {k_cache.dtype}; this module reads "
                                  f"{self.cache_dtype} caches (build it with kv_dtype="
                                  f"{'None' if self.kv_dtype else repr(KV_DTYPES[0])} to read the other)")
        self._check("k_cache", k_cache, self.cache_dtype, (None, self.page_size, self.hkv, self.d), 4, dev)
        if k_cache.shape[2] != self.hkv:
            raise LayerInputError(f"{self.name}: the cache has {k_cache.shape[2]} KV heads, the block {self.hkv}")
        self._check("v_cache", v_cache, self.cache_dtype, (*k_cache.shape[:3], self.dv), 4, dev)
        scales = {}
        if self.kv_dtype:
            for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
                if t is None:
                    raise LayerInputError(f"{self.name}: an {self.kv_dtype} cache needs '{name}' (float32 [{self.hkv}], "
                                          f"PagedKVCache.layer_scales)")
                self._check(name, t, torch.float32, (self.hkv,), 1, dev)
                scales[name] = t
        elif k_scale is not None or v_scale is not None:
            raise LayerInputError(f"{self.name}: k_scale / v_scale are for fp8 caches; this module reads {self.dtype}")
        self._check("page_table", page_table, torch.int32, None, 2, dev)
        S, max_pages = page_table.shape
        self._check("seq_lens", seq_lens, torch.int32, (S,), 1, dev)
        if max_kv_len > max_pages * self.page_size:
            raise LayerInputError(f"{self.name}: max_kv_len {max_kv_len} is past the page table's capacity "
                                  f"({max_pages} pages of {self.page_size})")
        values = self._extra_values(extra, scalars, dev, S)
        values.update(scales)
        if out is None:
            out = q.new_empty((q.shape[0], self.hq, self.dv))
        else:
            self._check("out", out, self.dtype, (q.shape[0], self.hq, self.dv), 3, dev)
        return dev, S, max_pages, out, values

    def _extra_values(self, extra, scalars, dev, S: int) -> dict:
        """The extra inputs, scalars and extra-input dims, checked, by their kernel arguments' refs."""
        extra = extra or {}
        unknown = set(extra) - {name for name, _, _ in self.extra}
        if unknown:
            raise LayerInputError(f"{self.name}: unknown extra inputs {sorted(unknown)}")
        values = {}   # the extra inputs, scalars and extra-input dims, by their kernel arguments' refs
        dims = {"B": S}   # B is the page table's rows; other dynamic dims are bound by the first table that has them
        for name, dtype, shape in self.extra:
            if name not in extra:
                raise LayerInputError(f"{self.name}: missing extra input '{name}'")
            t = extra[name]
            self._check(name, t, dtype, None, len(shape), dev)
            for d, n in zip(shape, t.shape):
                if d.isidentifier():
                    dims.setdefault(d, int(n))
            self._check(name, t, dtype, tuple(int(d) if d.isdigit() else dims.get(d) for d in shape), len(shape), dev)
            values[name] = t
        unbound = [d for d in self.table_dims if d not in dims]
        if unbound:
            raise LayerInputError(f"{self.name}: dims {unbound} of the extra inputs cannot be bound from their shapes "
                                  f"(only a dim that is a whole axis of some extra input can)")
        sc = {**self.scalars, **scalars}
        for name in self.scalar_names:
            if sc.get(name) is None:
                raise LayerInputError(f"{self.name}: scalar '{name}' has no value")
            values[name] = sc[name]
        for d in self.table_dims:
            values[d] = dims[d]
        return values

    def _check_identity(self, q, page_table, q_seq, q_pos):
        """The per-token form without q_seq / q_pos: both or neither, and T <= the page table's rows."""
        if (q_seq is None) != (q_pos is None):
            given, missing = ("q_seq", "q_pos") if q_pos is None else ("q_pos", "q_seq")
            raise LayerInputError(f"{self.name}: '{given}' is given but '{missing}' is None; pass both (each token's "
                                  f"sequence and position) or neither (token t is sequence t, at its last position)")
        # (traced, the op's real implementation checks the sizes: no guard on the token count here)
        if q_seq is None and not torch.compiler.is_compiling() and isinstance(q, torch.Tensor) \
                and isinstance(page_table, torch.Tensor) and q.dim() >= 1 and page_table.dim() >= 1 \
                and q.shape[0] > page_table.shape[0]:
            raise LayerInputError(f"{self.name}: without q_seq / q_pos token t is sequence t, but q has "
                                  f"{q.shape[0]} tokens and the page table {page_table.shape[0]} rows (pass q_seq "
                                  f"and q_pos, or at most one token per row)")

    def _splits(self, dev, ctas: int, max_kv_len: int, num_splits: int | None, tile: int = 256,
                one_wave: bool = False) -> int:
        """Split-KV parts: enough CTAs for about two per SM, no more parts than key tiles.
        one_wave (the tensor-core kernels): the CTAs of all parts fit one wave of two per SM and
        a grid that already holds ~one CTA per SM is not split (a split costs a merge launch).
        H200, Llama GQA 32/8 decode (benchmarks/bench_splits.py sweeps): 8 x 4096 took 58.7 us
        with 5 parts (320 CTAs: a second, partial wave) and 50.7 with 4; 8 x 2048 38.4 / 33.4;
        16 x 1024 37.7 with 2 parts, 30.5 unsplit; the other cases swept gain nothing from it."""
        if num_splits is not None:
            if num_splits < 1:
                raise ValueError(f"num_splits must be >= 1, got {num_splits}")
            return num_splits
        sms = device_properties(dev).multi_processor_count
        if one_wave:
            if 10 * ctas >= 9 * sms:
                return 1
            return max(1, min(2 * sms // ctas, math.ceil(max_kv_len / tile), 64))
        if ctas >= sms:
            return 1
        return max(1, min(math.ceil(2 * sms / ctas), math.ceil(max_kv_len / tile), 64))

    def _work_counter(self, dev) -> torch.Tensor:
        """The persistent prefill's work counter on `dev`: one int, zero before and after each launch (the kernel
        sets it back). One a module and device, so calls through a module must be ordered (one stream), as for
        its split-KV workspace."""
        hit = self._queues.get(dev.index)
        if hit is None:
            hit = self._queues[dev.index] = torch.zeros(1, dtype=torch.int32, device=dev)
        return hit

    def _workspace(self, dev, T: int, num_splits: int):
        if num_splits == 1:
            return None, None
        return (torch.empty((T * self.hq * num_splits * self.dv,), dtype=torch.float32, device=dev),
                torch.empty((T * self.hq * num_splits,), dtype=torch.float32, device=dev))

    def __call__(self, q, k_cache, v_cache, page_table, seq_lens, q_seq=None, q_pos=None, *, max_kv_len: int,
                 extra: dict[str, torch.Tensor] | None = None, num_splits: int | None = None,
                 out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, **scalars) -> torch.Tensor:
        """Per-token form: q_seq[t], q_pos[t] give token t's sequence and position. Both None:
        token t is sequence t (T <= the page table's rows) at its last position, seq_lens[t] - 1
        (a decode step of every sequence in order; the kernels then read neither array). k_scale,
        v_scale: an fp8 cache's float32 [Hkv] scales (required then, refused otherwise)."""
        self._check_identity(q, page_table, q_seq, q_pos)
        if torch.compiler.is_compiling():   # traced: one custom op (runtime/ops.py); eager: the direct launch
            return ops.paged_attention(self, q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos,
                                       max_kv_len=max_kv_len, extra=extra, num_splits=num_splits, out=out,
                                       scalars=scalars, scales=(k_scale, v_scale))
        dev, S, max_pages, out, values = self._common_checks(q, k_cache, v_cache, page_table, seq_lens, max_kv_len,
                                                           extra, out, scalars, k_scale, v_scale)
        T = q.shape[0]
        identity = q_seq is None   # (and q_pos: _check_identity): token t is sequence t, at its last position
        if not identity:
            self._check("q_seq", q_seq, torch.int32, (T,), 1, dev)
            self._check("q_pos", q_pos, torch.int32, (T,), 1, dev)
        if T == 0:
            return out
        if dev.type == "cpu":
            if identity:
                ids, pos = torch.arange(T), seq_lens[:T].long() - 1
            else:
                ids, pos = q_seq.long(), q_pos.long()
            groups = [(int(b), (ids == b).nonzero()[:, 0]) for b in ids.unique()]
            return self._reference(q, k_cache, v_cache, page_table, seq_lens, [(b, r, pos[r]) for b, r in groups],
                                   extra, scalars, out, values)
        if identity and self.layer is None:
            # a pack's kernels may predate the null-pointer branches (its version check cannot tell): spelled out
            q_seq, q_pos = torch.arange(T, dtype=torch.int32, device=dev), seq_lens[:T] - 1
        if self.kernel == "tc":
            return self._launch_tc(dev, "decode", q, k_cache, v_cache, page_table, seq_lens, None, q_seq, q_pos, out,
                                   S, max_pages, T, 1, max_kv_len, num_splits, values)
        main, merge, main_args, merge_args, _ = self._load(dev)
        ctas = main.grid(T, 1)[0]
        num_splits = self._splits(dev, ctas, max_kv_len, num_splits)
        part_o, part_lse = self._workspace(dev, T, num_splits)
        values.update(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens, q_seq=q_seq,
                      q_pos=q_pos, out=out, part_o=part_o, part_lse=part_lse, max_pages=max_pages,
                      num_pages=k_cache.shape[0], num_seqs=S, num_splits=num_splits)
        main((T, num_splits), main_args(values))
        if num_splits > 1:
            merge((T,), merge_args(values))
        return out

    def prefill(self, q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, *, max_q_len: int, max_kv_len: int,
                extra: dict[str, torch.Tensor] | None = None, num_splits: int | None = None,
                out: torch.Tensor | None = None, block_mask: BlockMask | None = None,
                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, **scalars) -> torch.Tensor:
        """Ragged form: sequence s owns q rows cu_seqlens[s] .. cu_seqlens[s+1]-1, its last tokens.
        max_q_len bounds every sequence's new tokens (a host int, like max_kv_len).
        block_mask: for a mask that reads tables at positions (document ids), the batch's
        `self.block_mask(...)`, shared by the layers; without it one is looked up in a cache or
        computed (runtime/block_mask.py). Short chunks (the decode tiling) need none. k_scale,
        v_scale: as in the per-token form."""
        if torch.compiler.is_compiling():   # traced: one custom op (runtime/ops.py); eager: the direct launch
            return ops.paged_prefill(self, q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len=max_q_len,
                                     max_kv_len=max_kv_len, extra=extra, num_splits=num_splits, out=out,
                                     scalars=scalars, scales=(k_scale, v_scale))
        if isinstance(q, torch.Tensor) and q.device.type == "cuda" and self.kernel != "tc":
            raise LayerInputError(f"{self.name}: the ragged prefill form needs the tensor-core kernels "
                                  f"(kernel='tc', sm_80 or newer)")
        dev, S, max_pages, out, values = self._common_checks(q, k_cache, v_cache, page_table, seq_lens, max_kv_len,
                                                           extra, out, scalars, k_scale, v_scale)
        T = q.shape[0]
        self._check("cu_seqlens", cu_seqlens, torch.int32, (S + 1,), 1, dev)
        if max_q_len > max_kv_len:
            raise LayerInputError(f"{self.name}: max_q_len {max_q_len} is more than max_kv_len {max_kv_len} "
                                  f"(the new tokens are part of the cache)")
        if T == 0 or max_q_len <= 0:
            return out
        if dev.type == "cpu":
            cu = cu_seqlens.long().tolist()
            if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
                raise LayerInputError(f"{self.name}: cu_seqlens must rise from 0 to q's {T} rows, got {cu}")
            groups = []
            for b in range(S):
                n, length = cu[b + 1] - cu[b], int(seq_lens[b])
                if n:
                    groups.append((b, torch.arange(cu[b], cu[b + 1]), torch.arange(length - n, length)))
            return self._reference(q, k_cache, v_cache, page_table, seq_lens, groups, extra, scalars, out, values)
        mode = pick_mode(max_q_len, self.hq // self.hkv)
        if mode == "prefill" and self.needs_block_mask:
            bm = self._prefill_block_mask(block_mask, dev, seq_lens, cu_seqlens, T, max_q_len, max_kv_len, values)
            values.update(bm_num=bm.num, bm_idx=bm.idx, bm_rows=bm.row_blocks, bm_cols=bm.key_tiles)
        return self._launch_tc(dev, mode, q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, None, None, out,
                               S, max_pages, S, max_q_len, max_kv_len, num_splits, values)

    def step(self, q, k_cache, v_cache, page_table, seq_lens, seq_ids: list[int], q_seq, q_pos, *,
             max_kv_len: int) -> torch.Tensor:
        """A model step's tokens, whichever form serves them: when some sequence brings several
        tokens and the tokens come grouped by sequence in sequence order (prefill, chunked prefill),
        the ragged prefill tiles over each sequence's chunk; otherwise (decode, or tokens in any
        order) one chunk per token. seq_ids: each token's sequence (host ints); q_seq / q_pos: the
        same on the device, as the per-token form takes them."""
        T = len(seq_ids)
        if len(set(seq_ids)) < T and seq_ids == sorted(seq_ids):
            counts = [0] * page_table.shape[0]
            for i in seq_ids:
                counts[i] += 1
            cu_t = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=q.device)
            return self.prefill(q, k_cache, v_cache, page_table, seq_lens, cu_t, max_q_len=max(counts),
                                max_kv_len=max_kv_len)
        return self(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=max_kv_len)

    def block_mask(self, seq_lens, cu_seqlens, *, max_q_len: int, max_kv_len: int,
                   extra: dict[str, torch.Tensor] | None = None, **scalars) -> BlockMask:
        """The block mask of a ragged prefill batch, for blocks whose mask reads tables at
        positions: computed once on the device (the generated pre-pass) and passed to each
        layer's `prefill(..., block_mask=)` of that batch. Arguments as `prefill` takes them."""
        dev = seq_lens.device if isinstance(seq_lens, torch.Tensor) else None
        if dev is None or dev.type != "cuda":
            raise LayerInputError(f"{self.name}: block masks are computed on a CUDA device; seq_lens is not a CUDA tensor")
        if not self.needs_block_mask:
            raise LayerInputError(f"{self.name}: its mask reads no table at a query or key position, so the prefill "
                                  f"kernel needs no block mask")
        self._check("seq_lens", seq_lens, torch.int32, None, 1, dev)
        S = seq_lens.shape[0]
        self._check("cu_seqlens", cu_seqlens, torch.int32, (S + 1,), 1, dev)
        if not 0 < max_q_len <= max_kv_len:
            raise LayerInputError(f"{self.name}: need 0 < max_q_len <= max_kv_len, got {max_q_len}, {max_kv_len}")
        values = self._extra_values(extra, scalars, dev, S)
        return self._run_block_mask(dev, seq_lens, cu_seqlens, 2 ** 31 - 1, max_q_len, max_kv_len, values)

    @property
    def needs_block_mask(self) -> bool:
        """The prefill kernel walks a block mask's tile lists (the mask reads tables at positions)."""
        return needs_block_mask(self.layer) if self.layer is not None else "block_mask" in self._images

    def _block_mask_kernel(self, dev):
        """(launcher, argument getter, rows, keys, head slices, key) of the block-mask pre-pass."""
        hit = self._kernels.get((dev.index, "block_mask"))
        if hit is not None:
            return hit
        from .launch import compile_plan, load_kernels
        if "block_mask" in self._images:
            cubin, abis, (rows, keys, heads, key) = self._images["block_mask"]
        elif self.layer is None:
            raise LayerInputError(f"{self.name}: the pack has no block-mask pre-pass for this prefill kernel")
        else:
            plan = self.tc_plan("prefill").block_mask_plan()
            cubin, abis = compile_plan(plan, self._cache).cubin, plan.kernels
            rows, keys, heads, key = plan.rows, plan.keys, plan.heads, plan.key
        hit = (load_kernels(cubin, abis, dev)[abis[0].name], itemgetter(*(a.ref for a in abis[0].args)), rows, keys,
               heads, key)
        self._kernels[(dev.index, "block_mask")] = hit
        return hit

    def _run_block_mask(self, dev, seq_lens, cu_seqlens, num_tokens, max_q_len, max_kv_len, values) -> BlockMask:
        launch, args, rows, keys, heads, key = self._block_mask_kernel(dev)
        S, group = seq_lens.shape[0], self.hq // self.hkv
        Y, J = -(-max_q_len * group // rows), -(-max_kv_len // keys)
        cls = torch.empty((S, heads, Y, J), dtype=torch.uint8, device=dev)
        num = torch.empty((S, heads, Y), dtype=torch.int32, device=dev)
        idx = torch.empty((S, heads, Y, J), dtype=torch.int32, device=dev)
        if S:
            launch((S, Y), args({**values, "seq_lens": seq_lens, "cu_q": cu_seqlens, "bm_cls": cls, "bm_num": num,
                                 "bm_idx": idx, "num_tokens": num_tokens, "bm_rows": Y, "bm_cols": J}))
        return BlockMask(cls=cls, num=num, idx=idx, rows=rows, keys=keys, kernel=key)

    def _prefill_block_mask(self, given, dev, seq_lens, cu_seqlens, T, max_q_len, max_kv_len, values) -> BlockMask:
        """The caller's block mask, checked against this kernel and call, or a cached or new one."""
        _, _, rows, keys, _, kernel = self._block_mask_kernel(dev)
        S = seq_lens.shape[0]
        Y, J = -(-max_q_len * (self.hq // self.hkv) // rows), -(-max_kv_len // keys)
        if given is not None:
            if not isinstance(given, BlockMask):
                raise LayerInputError(f"{self.name}: block_mask must be a BlockMask (from .block_mask()), got "
                                      f"{type(given).__name__}")
            if given.kernel != kernel:
                raise LayerInputError(f"{self.name}: the block mask was made for {given.kernel}, not {kernel}")
            if given.cls.device != dev or (given.num_seqs, given.row_blocks, given.key_tiles) != (S, Y, J):
                raise LayerInputError(f"{self.name}: the block mask covers {given.num_seqs} sequences x "
                                      f"{given.row_blocks} row blocks x {given.key_tiles} key tiles on "
                                      f"{given.cls.device}; this call needs {S} x {Y} x {J} on {dev} (make it with "
                                      f"the call's seq_lens, cu_seqlens, max_q_len and max_kv_len)")
            return given
        tensors = (seq_lens, cu_seqlens, *(values[name] for name, _, _ in self.extra))
        key = bmc.cache_key(kernel, dev, tensors, {n: values[n] for n in self.scalar_names},
                            (max_q_len, max_kv_len, T))
        capturing = bmc.capturing()
        mask = None if capturing else bmc.cached(key)
        if mask is None:
            mask = self._run_block_mask(dev, seq_lens, cu_seqlens, T, max_q_len, max_kv_len, values)
            if not capturing:
                bmc.remember(key, mask, tensors)
        return mask

    def _reference(self, q, k_cache, v_cache, page_table, seq_lens, groups, extra, scalars, out, values):
        """CPU tensors: the DSL's reference evaluator, one sequence at a time, over K/V gathered
        from the pages (K is stored rotated, so only q is rotated). Bad tables are errors here.
        An fp8 cache: over its dequantised values (float32 K/V, runtime/kv_cache.dequantise)."""
        from ..dsl.evaluator import evaluate
        if self.layer is None:
            raise LayerInputError(f"{self.name}: a module loaded from a pack runs CUDA tensors only (the reference "
                                  f"evaluator on CPU tensors needs the DSL definition)")
        num_pages, max_pages = k_cache.shape[0], page_table.shape[1]
        sc = {**self.scalars, **scalars}
        for b, rows, pos in groups:
            if not 0 <= b < page_table.shape[0]:
                raise LayerInputError(f"{self.name}: sequence {b} is not a row of the page table")
            length = int(seq_lens[b])
            if not 0 < length <= max_pages * self.page_size:
                raise LayerInputError(f"{self.name}: sequence {b} has length {length}, outside "
                                      f"[1, {max_pages * self.page_size}] (the page table's capacity)")
            pages = page_table[b, : -(-length // self.page_size)].long()
            if ((pages < 0) | (pages >= num_pages)).any():
                raise LayerInputError(f"{self.name}: sequence {b}'s page table points outside the cache's "
                                      f"{num_pages} pages: {pages.tolist()}")
            k = k_cache[pages].reshape(-1, self.hkv, self.d)[:length]
            v = v_cache[pages].reshape(-1, self.hkv, self.dv)[:length]
            fn = self.layer.function
            if self.kv_dtype:
                k, v = dequantise(k, values["k_scale"]), dequantise(v, values["v_scale"])
                fn = float32_kv(fn)
            inputs = {"q": q[rows][None], "k": k[None], "v": v[None]}
            seq_dims = _dims_of(fn.params[:3], (inputs["q"], k[None], v[None]))
            for name, _, shape in self.extra:
                t = (extra or {})[name]
                inputs[name] = _fit_table(t[b:b + 1] if shape[0] == "B" else t, shape, seq_dims)
            inputs.update({name: sc[name] for name in self.scalar_names})
            (o,) = evaluate(fn, inputs, q_positions=pos[None], kv_positions=torch.arange(length)[None],
                            k_rotated=True, batch_offset=b)
            out[rows] = o[0].to(out.dtype)
        return out

    def _tma_box(self, mode: str, keys: int) -> tuple[int, int]:
        """The K / V map box (keys, columns) of a kernel that reads the caches by TMA: its plan's; a pack's kernel
        (no plan) was built with the default tiles, so the native swizzle of the head dims (the wgmma prefill) or
        one head's row of e4m3 bytes (the decode over an e4m3 cache: TCAttentionPlan.tma_box)."""
        if self.layer is not None:
            return self.tc_plan(mode).tma_box
        if mode in ("decode", DECODE_MANY):
            return min(self.page_size, keys), self.d
        from ..codegen.attention_wgmma import native_swizzle
        return min(self.page_size, keys), native_swizzle(self.d, self.dv) // 2

    def _tensor_maps(self, main, mode: str, keys: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict:
        """The TMA maps of the caches ({} for a kernel that takes none), kept per module by the
        caches' addresses and shapes (contiguous: checked before), as runtime/tma caches them by their
        parameters: the lookup is one tuple's hash, a few microseconds under the parameters' a call."""
        key = (mode, keys, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype, *k_cache.shape, v_cache.shape[3])
        hit = self._maps.get(key)
        if hit is None:
            if not any(a.ref == "k_map" for a in main.abi.args):
                hit = {}
            else:   # the wgmma prefill's TMA tiles, or the e4m3 decode's: maps of the caches
                from .tma import tensor_map
                box = self._tma_box(mode, keys)
                swizzle = box[1] * k_cache.element_size()   # a box row is one swizzle row
                hit = dict(k_map=tensor_map(k_cache.view(-1, k_cache.shape[2] * k_cache.shape[3]), box, swizzle),
                           v_map=tensor_map(v_cache.view(-1, v_cache.shape[2] * v_cache.shape[3]), box, swizzle))
            if len(self._maps) >= 64:   # caches come and go (a model's pools are few): start over past 64
                self._maps.clear()
            self._maps[key] = hit
        return hit

    def _launch_tc(self, dev, mode, q, k_cache, v_cache, page_table, seq_lens, cu_q, q_seq, q_pos, out, S,
                   max_pages, chunks, max_q_len, max_kv_len, num_splits, values):
        main, merge, main_args, merge_args, keys = self._load(dev, mode)
        if "bm_num" not in values and any(a.ref == "bm_num" for a in main.abi.args):   # a pack without its pre-pass
            raise LayerInputError(f"{self.name}: this prefill kernel reads a block mask and there is no pre-pass "
                                  f"kernel to make one")
        T = q.shape[0]
        queue = main.abi.problem[-1:] == ("sms",)   # the persistent kernel: its CTAs take the grid's places
        if queue:   # its places: the grid before the min with the SMs
            ctas = main.grid(chunks, max_q_len, 1, 1 << 30)[0]
        else:
            _, row_blocks, _ = main.grid(chunks, max_q_len, 1)
            ctas = chunks * row_blocks * self.hkv
            if mode == "decode" and ctas > self._decode_slots(dev) and self._decode_many():
                # past one wave of the default tile: the tile of more, smaller CTAs (many_ctas_tile)
                mode = DECODE_MANY
                main, merge, main_args, merge_args, keys = self._load(dev, mode)
                _, row_blocks, _ = main.grid(chunks, max_q_len, 1)
                ctas = chunks * row_blocks * self.hkv
        # (decode: a part at least 256 keys whatever the tile; e4m3's 128-key tiles at 1 x 4096 took 18.5 us with 8
        # parts against 16.9 with 16, bench_decode_tiles --kv fp8)
        num_splits = self._splits(dev, ctas, max_kv_len, num_splits, tile=256 if mode in ("decode", DECODE_MANY) else 4 * keys,
                                  one_wave=True)
        part_o, part_lse = self._workspace(dev, T, num_splits)
        values.update(self._tensor_maps(main, mode, keys, k_cache, v_cache))
        values.update(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens, cu_q=cu_q,
                      q_seq=q_seq, q_pos=q_pos, out=out, part_o=part_o, part_lse=part_lse, max_pages=max_pages,
                      num_pages=k_cache.shape[0], num_seqs=S, num_splits=num_splits, num_tokens=T)
        if queue:
            values.update(chunks=chunks, max_q_len=max_q_len, work=self._work_counter(dev))
            main((chunks, max_q_len, num_splits, device_properties(dev).multi_processor_count), main_args(values))
        else:
            main((chunks, max_q_len, num_splits), main_args(values))
        if num_splits > 1:
            merge((T,), merge_args(values))
        return out


@functools.lru_cache(maxsize=64)
def float32_kv(fn):
    """An attention block's function with k and v taken as float32: the reference over an fp8
    cache's dequantised values (which bf16/f16 cannot hold exactly)."""
    q, k, v, *rest = fn.params
    return dataclasses.replace(fn, params=(q, dataclasses.replace(k, dtype=DType.f32),
                                           dataclasses.replace(v, dtype=DType.f32), *rest))


def _dims_of(params, tensors) -> dict[str, int]:
    """The dynamic dims (plain names) that q, k, v bind for the reference evaluator."""
    return {str(d): int(n) for p, t in zip(params, tensors) for d, n in zip(p.shape, t.shape)
            if getattr(d, "is_Symbol", False) and str(d) != "B"}


def _fit_table(t: torch.Tensor, shape, seq_dims: dict[str, int]) -> torch.Tensor:
    """An extra input resized, along the axes sized by a dim that q, k, v also bind (a table
    `doc: i32[B, Skv]` passed as wide as the page table), to one sequence's size, as the
    evaluator binds it: its first columns, or its last column repeated, which is what the
    kernels' clamped reads of the whole table give for every index inside the sequence."""
    for axis, d in enumerate(shape):
        if d in seq_dims and t.shape[axis] != seq_dims[d] and t.shape[axis] > 0:
            t = t.index_select(axis, torch.arange(seq_dims[d], device=t.device).clamp(max=t.shape[axis] - 1))
    return t
