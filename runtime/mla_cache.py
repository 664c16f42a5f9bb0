"""A paged latent cache for DeepSeek MLA, managed from Python, and its append kernel.

    cache = PagedLatentCache(num_pages=4096, page_size=64, latent_dim=512, rope_dim=64,
                             dtype=torch.bfloat16, device="cuda", max_seqs=256, max_pages_per_seq=512)
    cache.allocate(3, 100)                          # sequence 3 can now hold 100 tokens
    pos = cache.append([3, 3], latent, k_pe, rope)  # latent [2, 512] (normed), k_pe [2, 64] (not rotated)
    rows = cache.gather(3)                          # [len, 576] copy, for tests and debugging

Layout (the decode kernel reads it exactly, codegen/mla.py): `cache` [num_pages, page_size,
L + R], a token's row its latent then its RoPE key rotated at its position (interleaved pairs);
`page_table` int32 [max_seqs, max_pages_per_seq], -1 where unused; `seq_lens` int32 [max_seqs].
Position t of sequence s lives in page page_table[s, t // page_size], slot t % page_size: the
conventions of runtime/kv_cache.py with one latent row a token instead of K and V heads.

The bookkeeping lives on the host (numpy mirrors of page_table and seq_lens, a free list), so
an append is checked completely without reading the GPU; then one pinned copy of its pages and
positions and one kernel launch write the rows, and the device page_table / seq_lens follow the
mirrors in stream order (torch ops, no synchronisation). Not capturable in a CUDA graph (the
metadata comes from the host at each call). On a CPU device torch ops do the kernel's work
(the same f32 rotation), so the cache can be used and tested without a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from ..codegen.mla import MLAAppendPlan, plan_mla_append
from ..codegen.rope import static_table
from ..dsl.ir import RopeSpec
from ..dsl.attention_ref import rotate
from ..dsl.evaluator import LayerInputError
from ..dsl.numerics import rope_cos_sin
from .pages import KVCacheError, OutOfPagesError, PagedSequences

__all__ = ["PagedLatentCache", "KVCacheError", "OutOfPagesError"]

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}


class PagedLatentCache(PagedSequences):
    def __init__(self, num_pages: int, page_size: int, latent_dim: int, rope_dim: int, dtype: torch.dtype,
                 device, max_seqs: int, max_pages_per_seq: int, *, num_layers: int = 1, arch: str | None = None,
                 kernel_cache=None):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("latent_dim", latent_dim),
                            ("rope_dim", rope_dim), ("max_seqs", max_seqs), ("max_pages_per_seq", max_pages_per_seq),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"PagedLatentCache: {name} must be a positive int, got {value!r}")
        if page_size & (page_size - 1):
            raise ValueError(f"PagedLatentCache: page_size must be a power of two, got {page_size}")
        if dtype not in _DTYPES and not (dtype == torch.float32 and torch.device(device).type == "cpu"):
            raise ValueError(f"PagedLatentCache: dtype must be torch.bfloat16 or torch.float16 (torch.float32 on the "
                             f"CPU, where torch ops write it), got {dtype!r}")
        if latent_dim % 8 or rope_dim % 2:
            raise ValueError(f"PagedLatentCache: latent_dim must be a multiple of 8 and rope_dim even, "
                             f"got {latent_dim}, {rope_dim}")
        device = self._init_pages("PagedLatentCache", num_pages, page_size, max_seqs, max_pages_per_seq, device)
        self.latent_dim, self.rope_dim = int(latent_dim), int(rope_dim)
        self.row_dim = self.latent_dim + self.rope_dim
        self.num_layers = int(num_layers)
        self.dtype, self.device, self.arch = dtype, device, arch
        self._kernel_cache = kernel_cache
        self._rows = torch.zeros((self.num_layers, self.num_pages, self.page_size, self.row_dim), dtype=dtype,
                                 device=device)
        self._kernels: dict = {}

    # ---- tensors ------------------------------------------------------------------------
    @property
    def cache(self) -> torch.Tensor:
        """Layer 0's rows [num_pages, page_size, L + R] (see layer() for the others)."""
        return self._rows[0]

    def layer(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_layers:
            raise KVCacheError(f"layer {index} is out of range [0, num_layers={self.num_layers})")
        return self._rows[index]

    # ---- sequences and pages: allocate, reserve, free, page_table, seq_lens, ... (runtime/pages.py)

    # ---- append -------------------------------------------------------------------------
    def append(self, seq_ids, latent: torch.Tensor, k_pe: torch.Tensor, rope, *, positions=None,
               layer: int = 0) -> torch.Tensor:
        """Write tokens' rows into their sequences' pages and advance seq_lens; returns the
        positions used (a CPU int32 tensor [T]).

        seq_ids: int [T] on the host: token t belongs to sequence seq_ids[t]. latent [T, L] (the
        normed compressed KV) and k_pe [T, R] (the RoPE key, not rotated) of the cache's dtype on
        its device, each token's row dense (rows may be strided). rope: the block's RopeSpec
        (gptj, rotary_dim R). positions: int [T] on the host; by default a sequence's new tokens
        take the positions after its length, in order. A sequence's length becomes max(length,
        its largest position + 1). Everything is checked before anything is written."""
        if not 0 <= layer < self.num_layers:
            raise KVCacheError(f"append: layer {layer} is out of range [0, num_layers={self.num_layers})")
        T = latent.shape[0] if isinstance(latent, torch.Tensor) and latent.dim() >= 1 else -1
        self._check_tensor("latent", latent, self.latent_dim, T)
        self._check_tensor("k_pe", k_pe, self.rope_dim, T)
        rope = self._check_rope(rope)   # before anything is written
        _, pages, pos, new_seqs, new_ends = self._place(seq_ids, T, positions)
        if T:
            if self.device.type == "cuda":
                self._write_cuda(self._plan(rope), layer, latent, k_pe, pages, pos)
            else:
                self._write_torch(rope, layer, latent, k_pe, pages, pos)
            self._lens[new_seqs] = new_ends
            for s, n in zip(new_seqs.tolist(), new_ends.tolist()):
                self._queued_lens[s] = n
            self.flush()
        return torch.from_numpy(pos.astype(np.int32))

    def gather(self, seq_id: int, layer: int = 0) -> torch.Tensor:
        """Sequence `seq_id`'s rows as stored (k_pe rotated), a contiguous [len, L + R] copy."""
        s = self._seq(seq_id)
        n = int(self._lens[s])
        pages = torch.from_numpy(self._pt[s, : -(-n // self.page_size)].astype(np.int64)).to(self.device)
        return self._rows[layer][pages].reshape(-1, self.row_dim)[:n]

    def __repr__(self) -> str:
        return (f"PagedLatentCache(pages={self.num_pages}x{self.page_size}, L={self.latent_dim}, R={self.rope_dim}, "
                f"{self.dtype}, {self.device}, free={len(self._free)}, max_seqs={self.max_seqs})")

    # ---- checks and placement -----------------------------------------------------------
    def _check_tensor(self, name: str, x, width: int, T: int) -> None:
        self._check_dtype_device(name, x)
        if x.dim() != 2 or x.shape[0] != T or x.shape[1] != width:
            raise LayerInputError(f"append: '{name}' must have shape [{T}, {width}], got {tuple(x.shape)}")
        if x.stride(1) != 1:
            raise LayerInputError(f"append: each row of '{name}' must be dense (strides {x.stride()})")
        # the kernel reads latent rows as 16-byte vectors and k_pe pairs as 4-byte words
        align = 16 if name == "latent" else 4
        if x.shape[0] and (x.data_ptr() % align or (x.shape[0] > 1 and (x.stride(0) * x.element_size()) % align)):
            raise LayerInputError(f"append: rows of '{name}' must start at {align}-byte boundaries "
                                  f"(strides {x.stride()}); call .contiguous() first")

    def _check_rope(self, rope) -> RopeSpec:
        """The block's RopeSpec, checked: interleaved pairs over the R channels, a constant table."""
        if not isinstance(rope, RopeSpec):
            raise LayerInputError(f"append: 'rope' must be the block's RopeSpec, got {type(rope).__name__}")
        if rope.style != "gptj" or int(rope.rotary_dim) != self.rope_dim:
            raise LayerInputError(f"append: the latent cache rotates its {self.rope_dim} RoPE channels in interleaved "
                                  f"pairs (gptj); got style {rope.style!r} over {rope.rotary_dim} channels")
        static_table(float(rope.theta), self.rope_dim, rope.scaling)   # a length-dependent type: an error
        return rope

    # ---- writes -------------------------------------------------------------------------
    def _plan(self, rope) -> MLAAppendPlan:
        hit = self._kernels.get(("plan", rope))
        if hit is None:
            from .launch import device_arch
            arch = self.arch or (device_arch(self.device) if self.device.type == "cuda" else "sm_90")
            hit = self._kernels[("plan", rope)] = plan_mla_append(
                latent_dim=self.latent_dim, rope_dim=self.rope_dim, page_size=self.page_size,
                dtype=_DTYPES[self.dtype], rope=rope, arch=arch)
        return hit

    def _write_cuda(self, plan: MLAAppendPlan, layer, latent, k_pe, pages, pos) -> None:
        from .launch import compile_plan, load_kernels
        kernel = self._kernels.get(plan.key)
        if kernel is None:
            kernel = load_kernels(compile_plan(plan, self._kernel_cache).cubin, plan.kernels,
                                  self.device)[plan.kernel_name]
            self._kernels[plan.key] = kernel
        T = pages.size
        meta = torch.from_numpy(np.concatenate([pages, pos.astype(np.int32)])).pin_memory()
        meta = meta.to(self.device, non_blocking=True)
        kernel((T,), (self._rows[layer], latent, k_pe, latent.stride(0), k_pe.stride(0), meta, T))

    @torch.no_grad()
    def _write_torch(self, rope: RopeSpec, layer, latent, k_pe, pages, pos) -> None:
        """The kernel's work with torch ops: f32 angles and rotation, one rounding."""
        p = torch.from_numpy(pages.astype(np.int64))
        slots = torch.from_numpy(pos % self.page_size)
        cos, sin = rope_cos_sin(torch.from_numpy(pos), self.rope_dim, float(rope.theta), rope.scaling, torch.float32)
        rows = self._rows[layer]
        rows[p, slots, : self.latent_dim] = latent
        rows[p, slots, self.latent_dim:] = rotate(k_pe.float(), cos, sin, "gptj", self.rope_dim).to(self.dtype)
