"""MLA decode over a paged latent cache (absorbed form), and its float64 reference.

    decode = MLADecode(num_heads=128, latent_dim=512, rope_dim=64, page_size=64, dtype=torch.bfloat16)
    out = decode(q, cache.cache, cache.page_table, cache.seq_lens, q_seq, scale=s, max_kv_len=4096)

q [T, H, L + R]: token t's query heads, each [W_uk^T q_nope (L) | rotated q_rope (R)]; the cache
[num_pages, page_size, L + R] (runtime/mla_cache.py); q_seq[t] the page-table row whose first
seq_lens[q_seq[t]] rows token t attends to (all of them: a decode token is its sequence's last).
Returns out [T, H, L], softmax(scale * q . rows) @ rows[:, :L]; the caller applies W_uv and
o_proj. CUDA tensors run the tensor-core kernel (codegen/mla.py: on sm_90 the wgmma kernel, full key
tiles by TMA; mma.sync on sm_80 and newer or with kernel="mma"; split-KV with the merge kernel);
CPU tensors run `mla_decode_reference` in float64. Everything is checked
before the launch; the split-KV workspace comes from torch's allocator.
"""
from __future__ import annotations

import math
from operator import itemgetter

import torch

from ..codegen.mla import HEADS_PER_CTA, MLADecodePlan, plan_mla_decode
from ..dsl.evaluator import LayerInputError
from .linear import device_properties

__all__ = ["MLADecode", "mla_decode_reference"]

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}


def mla_decode_reference(q, cache, page_table, seq_lens, q_seq, *, scale: float, latent_dim: int,
                         dtype=torch.float64) -> torch.Tensor:
    """The absorbed decode in `dtype` with torch ops, one token at a time; bad tables are errors.
    A sequence of length 0 gives zeros."""
    T, H, DK = q.shape
    page = cache.shape[1]
    out = torch.zeros(T, H, latent_dim, dtype=dtype, device=q.device)
    for t in range(T):
        b = int(q_seq[t])
        if not 0 <= b < page_table.shape[0]:
            raise LayerInputError(f"mla decode: q_seq[{t}] = {b} is not a row of the page table")
        n = int(seq_lens[b])
        if not 0 <= n <= page_table.shape[1] * page:
            raise LayerInputError(f"mla decode: sequence {b} has length {n}, past its page table's capacity")
        if n == 0:
            continue
        pages = page_table[b, : -(-n // page)].long()
        if ((pages < 0) | (pages >= cache.shape[0])).any():
            raise LayerInputError(f"mla decode: sequence {b}'s page table points outside the cache: {pages.tolist()}")
        rows = cache[pages].reshape(-1, DK)[:n].to(dtype)
        p = torch.softmax((q[t].to(dtype) @ rows.T) * scale, dim=-1)
        out[t] = p @ rows[:, :latent_dim]
    return out


class MLADecode:
    """The decode layer (module docstring). Where its plan pairs a token's two head blocks (codegen/mla.py,
    pair_default) and `pair` was left None, a call whose splits hold fewer than PAIR_MIN_KEYS keys each runs the
    unpaired kernel: a pair's cluster syncs and coupled stages are paid per split, and on an H100 one sequence of 4096
    keys in 32 splits took 22.9 us paired against 20.9 unpaired, 64 x 1024 (one split) 47.3 against 51.1
    (benchmarks/NOTES.md, "The CTA pairs without their GPU-scope fence")."""

    PAIR_MIN_KEYS = 1024

    def __init__(self, *, num_heads: int, latent_dim: int = 512, rope_dim: int = 64, page_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, arch: str | None = None, keys: int | None = None,
                 kernel: str | None = None, overlap: bool = False, seesaw: bool | None = None,
                 sync_handoff: bool | None = None, fine: bool | None = None, pair: bool | None = None,
                 staged_out: bool | None = None, evict: bool | None = None, kernel_cache=None):
        self.num_heads, self.latent_dim, self.rope_dim = int(num_heads), int(latent_dim), int(rope_dim)
        self.row_dim = self.latent_dim + self.rope_dim
        self.page_size, self.dtype, self.arch, self.keys, self.kernel = int(page_size), dtype, arch, keys, kernel
        self.overlap, self.seesaw, self.sync_handoff, self.fine, self.pair = overlap, seesaw, sync_handoff, fine, pair
        self.staged_out, self.evict = staged_out, evict
        self._kernel_cache = kernel_cache
        self._plan: MLADecodePlan | None = None
        self._unpaired: MLADecodePlan | None = None
        self._kernels: dict[tuple[int, str], tuple] = {}

    def _planned(self, pair: bool | None) -> MLADecodePlan:
        """The plan of this layer's options, with `pair` for its pair option."""
        if self.dtype not in _DTYPES:
            raise LayerInputError(f"mla decode: the kernel takes bf16 or f16, not {self.dtype}")
        from .launch import device_arch
        return plan_mla_decode(num_heads=self.num_heads, latent_dim=self.latent_dim, rope_dim=self.rope_dim,
                               page_size=self.page_size, dtype=_DTYPES[self.dtype], arch=self.arch or device_arch(),
                               keys=self.keys, kernel=self.kernel, overlap=self.overlap, seesaw=self.seesaw,
                               sync_handoff=self.sync_handoff, fine=self.fine, pair=pair, staged_out=self.staged_out,
                               evict=self.evict)

    @property
    def plan(self) -> MLADecodePlan:
        if self._plan is None:
            self._plan = self._planned(self.pair)
        return self._plan

    def plan_for(self, max_kv_len: int, num_splits: int) -> MLADecodePlan:
        """The plan a call runs: `plan`, or where it pairs head blocks by default and the call's splits hold fewer
        than PAIR_MIN_KEYS keys each, the same options unpaired."""
        plan = self.plan
        if not plan.pair or self.pair is not None or -(-max_kv_len // num_splits) >= self.PAIR_MIN_KEYS:
            return plan
        if self._unpaired is None:
            self._unpaired = self._planned(False)
        return self._unpaired

    def _load(self, dev: torch.device, plan: MLADecodePlan):
        hit = self._kernels.get((dev.index, plan.key))
        if hit is None:
            from .launch import compile_plan, load_kernels
            kernels = load_kernels(compile_plan(plan, self._kernel_cache).cubin, plan.kernels, dev)
            main, merge = kernels[plan.kernels[0].name], kernels[plan.kernels[1].name]
            hit = (main, merge, itemgetter(*(a.ref for a in plan.kernels[0].args)),
                   itemgetter(*(a.ref for a in plan.kernels[1].args)))
            self._kernels[dev.index, plan.key] = hit
        return hit

    def _check(self, name, t, dtype, shape, dev):
        if not isinstance(t, torch.Tensor):
            raise LayerInputError(f"mla decode: '{name}' must be a torch.Tensor")
        if t.dtype != dtype:
            raise LayerInputError(f"mla decode: '{name}' must be {dtype}, got {t.dtype}")
        if t.device != dev:
            raise LayerInputError(f"mla decode: '{name}' is on {t.device}, expected {dev}")
        if t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape)):
            want = ", ".join("*" if w is None else str(w) for w in shape)
            raise LayerInputError(f"mla decode: '{name}' must have shape [{want}], got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise LayerInputError(f"mla decode: '{name}' must be contiguous")
        if t.is_cuda and name in ("q", "cache", "out") and t.data_ptr() % 16:
            raise LayerInputError(f"mla decode: '{name}' must start at a 16-byte aligned address (the kernels move "
                                  f"its rows in 16-byte pieces); it is a view {t.storage_offset()} elements into its "
                                  f"storage")

    def splits(self, dev: torch.device, tokens: int, max_kv_len: int) -> int:
        """Split-KV parts: a CTA per SM fits (152 KB of shared memory each), so the parts fill
        one wave, each with at least two key tiles; a grid that already fills the SMs is not split."""
        ctas = tokens * -(-self.num_heads // HEADS_PER_CTA)
        sms = device_properties(dev).multi_processor_count
        if 10 * ctas >= 9 * sms:
            return 1
        return max(1, min(sms // ctas, math.ceil(max_kv_len / (2 * self.plan.keys)), 64))

    def __call__(self, q, cache, page_table, seq_lens, q_seq, *, scale: float, max_kv_len: int,
                 num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        dev = q.device if isinstance(q, torch.Tensor) else None
        if dev is None or dev.type not in ("cuda", "cpu"):
            raise LayerInputError("mla decode: q must be a CUDA tensor (the kernel) or a CPU tensor (the reference)")
        T = q.shape[0] if q.dim() == 3 else -1
        if dev.type == "cpu":   # the reference: f32 / f64 caches too
            self._check("q", q, q.dtype, (None, self.num_heads, self.row_dim), dev)
            self._check("cache", cache, q.dtype, (None, self.page_size, self.row_dim), dev)
        else:
            self._check("q", q, self.dtype, (None, self.num_heads, self.row_dim), dev)
            self._check("cache", cache, self.dtype, (None, self.page_size, self.row_dim), dev)
        if page_table.dim() != 2:
            raise LayerInputError(f"mla decode: 'page_table' must be [num_seqs, max_pages], got {tuple(page_table.shape)}")
        S, max_pages = page_table.shape
        self._check("page_table", page_table, torch.int32, (S, max_pages), dev)
        self._check("seq_lens", seq_lens, torch.int32, (S,), dev)
        self._check("q_seq", q_seq, torch.int32, (T,), dev)
        if S < 1 or cache.shape[0] < 1:
            raise LayerInputError(f"mla decode: the page table has {S} rows and the cache {cache.shape[0]} pages; "
                                  f"both need at least one")
        if not 0 <= max_kv_len <= max_pages * self.page_size:
            raise LayerInputError(f"mla decode: max_kv_len {max_kv_len} is outside [0, {max_pages * self.page_size}] "
                                  f"(the page table's capacity)")
        if out is None:
            out = torch.empty((T, self.num_heads, self.latent_dim), dtype=q.dtype, device=dev)
        else:
            self._check("out", out, q.dtype, (T, self.num_heads, self.latent_dim), dev)
        if T == 0:
            return out
        if dev.type == "cpu":
            out.copy_(mla_decode_reference(q, cache, page_table, seq_lens, q_seq, scale=scale,
                                           latent_dim=self.latent_dim))
            return out
        if num_splits is None:
            num_splits = self.splits(dev, T, max_kv_len)
        elif num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        plan = self.plan_for(max_kv_len, num_splits)
        main, merge, main_args, merge_args = self._load(dev, plan)
        part_o = part_lse = None
        if num_splits > 1:
            part_o = torch.empty((T * self.num_heads * num_splits * self.latent_dim,), dtype=torch.float32, device=dev)
            part_lse = torch.empty((T * self.num_heads * num_splits,), dtype=torch.float32, device=dev)
        values = dict(q=q, cache=cache, page_table=page_table, seq_lens=seq_lens, q_seq=q_seq, out=out,
                      part_o=part_o, part_lse=part_lse, scale=float(scale), max_pages=max_pages,
                      num_pages=cache.shape[0], num_seqs=S, num_splits=num_splits)
        if plan.tma:   # full key tiles by TMA: boxes of a page run (at most a tile) x 64 channels
            from .tma import tensor_map
            values["kv_map"] = tensor_map(cache.view(-1, self.row_dim), plan.tma_box)
        main((T, num_splits), main_args(values))
        if num_splits > 1:
            merge((T,), merge_args(values))
        return out
