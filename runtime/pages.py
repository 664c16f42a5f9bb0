"""Page bookkeeping shared by the paged caches (runtime/kv_cache.py's K/V cache and
runtime/mla_cache.py's latent cache): which pages each sequence owns and how long it is.

The host mirrors (numpy) are the truth and are never behind; the device tensors the kernels
read (`page_table` int32 [max_seqs, max_pages_per_seq], -1 where no page; `seq_lens` int32
[max_seqs]) receive the changes queued since the last flush, in stream order, without a
synchronisation. Pages come from a stack, lowest first, so the same calls place the same
pages.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..dsl.evaluator import LayerInputError

__all__ = ["PagedSequences", "KVCacheError", "OutOfPagesError", "columns"]

_I32_MAX = 2 ** 31 - 1
_MAX_POSITION = 1 << 24  # positions are converted to f32 for the RoPE angle: exact up to 2^24


class KVCacheError(ValueError):
    """A cache call that cannot be served (sequence out of range, too many tokens, ...)."""


class OutOfPagesError(KVCacheError):
    """allocate() could not find enough free pages (nothing was changed)."""


def columns(updates: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A queue of index -> value updates as two int32 arrays."""
    keys = np.fromiter(updates.keys(), dtype=np.int32, count=len(updates))
    values = np.fromiter(updates.values(), dtype=np.int32, count=len(updates))
    return keys, values


class PagedSequences:
    """Sequences over a pool of pages. Subclasses call `_init_pages` from their constructor."""

    def _init_pages(self, what: str, num_pages: int, page_size: int, max_seqs: int, max_pages_per_seq: int,
                    device) -> torch.device:
        """Checks the sizes and the device (returned as a torch.device with its index)."""
        if num_pages > _I32_MAX or max_seqs * max_pages_per_seq > _I32_MAX:
            raise ValueError(f"{what}: page numbers and page_table indices must fit int32")
        if max_pages_per_seq * page_size > _MAX_POSITION:
            raise ValueError(f"{what}: max_pages_per_seq * page_size = {max_pages_per_seq * page_size} "
                             f"tokens; positions past 2^24 are not exact in the f32 RoPE angle")
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{what}: device must be a CUDA device or the CPU, got {device}")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.max_seqs, self.max_pages_per_seq = int(max_seqs), int(max_pages_per_seq)
        self._page_table = torch.full((self.max_seqs, self.max_pages_per_seq), -1, dtype=torch.int32, device=device)
        self._seq_lens = torch.zeros(self.max_seqs, dtype=torch.int32, device=device)
        # host mirrors (the truth) and the changes not yet written to the device tensors
        self._pt = np.full((self.max_seqs, self.max_pages_per_seq), -1, dtype=np.int32)
        self._lens = np.zeros(self.max_seqs, dtype=np.int64)
        self._npages = np.zeros(self.max_seqs, dtype=np.int64)
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() gives the lowest page first
        self._queued_pt: dict[int, int] = {}    # flat page_table index -> value
        self._queued_lens: dict[int, int] = {}  # sequence -> length
        return device

    # ---- the device tensors and their host mirrors --------------------------------------
    @property
    def page_table(self) -> torch.Tensor:
        """int32 [max_seqs, max_pages_per_seq] on the device (queued changes flushed first)."""
        self.flush()
        return self._page_table

    @property
    def seq_lens(self) -> torch.Tensor:
        """int32 [max_seqs] on the device (queued changes flushed first)."""
        self.flush()
        return self._seq_lens

    @property
    def page_table_host(self) -> np.ndarray:
        """A read-only view of the host mirror of page_table (current, never behind)."""
        view = self._pt.view()
        view.flags.writeable = False
        return view

    @property
    def seq_lens_host(self) -> np.ndarray:
        """A read-only view of the host mirror of seq_lens (int64; current, never behind)."""
        view = self._lens.view()
        view.flags.writeable = False
        return view

    def flush(self) -> None:
        """Write queued allocate()/free()/length changes to the device page_table and seq_lens
        (torch ops on the current stream; no synchronisation)."""
        if not (self._queued_pt or self._queued_lens):
            return
        len_seqs, len_values = columns(self._queued_lens)
        pt_index, pt_values = columns(self._queued_pt)
        self._apply_torch(len_seqs, len_values, pt_index, pt_values)
        self._queued_pt.clear()
        self._queued_lens.clear()

    def _apply_torch(self, len_seqs, len_values, pt_index, pt_values) -> None:
        """Scatter length and page-table updates into the device tensors (pinned uploads)."""
        def upload(x: np.ndarray, dtype) -> torch.Tensor:
            t = torch.from_numpy(x.astype(dtype))
            if self._seq_lens.device.type == "cuda":
                return t.pin_memory().to(self._seq_lens.device, non_blocking=True)
            return t

        if len_seqs.size:
            self._seq_lens[upload(len_seqs, np.int64)] = upload(len_values, np.int32)
        if pt_index.size:
            self._page_table.view(-1)[upload(pt_index, np.int64)] = upload(pt_values, np.int32)

    # ---- sequences and pages ------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def seq_len(self, seq_id: int) -> int:
        return int(self._lens[self._seq(seq_id)])

    def pages(self, seq_id: int) -> list[int]:
        s = self._seq(seq_id)
        return self._pt[s, : self._npages[s]].tolist()

    def capacity(self, seq_id: int) -> int:
        """Tokens the sequence's pages hold."""
        return int(self._npages[self._seq(seq_id)]) * self.page_size

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow sequence `seq_id`'s pages until they hold `num_tokens` tokens in all (never
        shrinks; its tokens stay where they are). Returns its pages. Raises OutOfPagesError,
        changing nothing, when too few pages are free."""
        s = self._seq(seq_id)
        n = operator.index(num_tokens)
        if n < 0:
            raise ValueError(f"allocate: num_tokens must be >= 0, got {n}")
        need = -(-n // self.page_size)
        if need > self.max_pages_per_seq:
            raise KVCacheError(f"allocate: sequence {s} needs {need} pages for {n} tokens; at most "
                               f"max_pages_per_seq = {self.max_pages_per_seq} "
                               f"({self.max_pages_per_seq * self.page_size} tokens)")
        have = int(self._npages[s])
        if need - have > len(self._free):
            raise OutOfPagesError(f"allocate: sequence {s} needs {need - have} more pages for {n} tokens; "
                                  f"{len(self._free)} of {self.num_pages} are free")
        for j in range(have, need):
            page = self._free.pop()
            self._pt[s, j] = page
            self._queued_pt[s * self.max_pages_per_seq + j] = page
        self._npages[s] = max(have, need)
        return self.pages(s)

    def reserve(self, seq_ids, num_tokens) -> None:
        """allocate() for many sequences at once: each seq_ids[i] gets pages for num_tokens[i]
        tokens (an int: the same for all). Only sequences short of pages reach allocate(), so a
        decode step's check costs a few numpy operations, whatever the batch."""
        ids = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        n = np.broadcast_to(np.asarray(num_tokens, dtype=np.int64), ids.shape)
        if ids.size and (ids.min() < 0 or ids.max() >= self.max_seqs):
            bad = int(ids[(ids < 0) | (ids >= self.max_seqs)][0])
            raise KVCacheError(f"seq_id {bad} is out of range [0, max_seqs={self.max_seqs})")
        short = np.flatnonzero(-(-n // self.page_size) > self._npages[ids])
        for i in short.tolist():
            self.allocate(int(ids[i]), int(n[i]))

    def free(self, seq_id: int) -> None:
        """Return sequence `seq_id`'s pages to the free list; its length becomes 0."""
        s = self._seq(seq_id)
        n = int(self._npages[s])
        self._free.extend(reversed(self._pt[s, :n].tolist()))
        for j in range(n):
            self._queued_pt[s * self.max_pages_per_seq + j] = -1
        self._pt[s, :n] = -1
        self._npages[s] = 0
        if self._lens[s] or s in self._queued_lens:
            self._queued_lens[s] = 0
        self._lens[s] = 0

    # ---- where an append's tokens go ---------------------------------------------------
    def _place(self, seq_ids, T: int, positions):
        """An append's placement, checked before anything changes: (ids int64 [T], pages int32
        [T], positions int64 [T], the sequences whose length changes, their new lengths).
        Without `positions` a sequence's tokens go after its length in order of appearance."""
        ids = self._host_ints("seq_ids", seq_ids, T)
        bad = np.flatnonzero((ids < 0) | (ids >= self.max_seqs))
        if bad.size:
            raise KVCacheError(f"append: seq_ids[{bad[0]}] = {ids[bad[0]]} is out of range "
                               f"[0, max_seqs={self.max_seqs})")
        distinct = positions is None and T <= 4096 and len(set(ids.tolist())) == T
        if distinct:   # a decode step: one token per sequence, each at its sequence's end
            seqs, inverse = ids, None
            pos = self._lens[ids]
        else:
            seqs, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)
            if positions is None:  # after each sequence's length, in order of appearance
                order = np.argsort(inverse, kind="stable")
                rank = np.empty(T, dtype=np.int64)
                rank[order] = np.arange(T) - np.repeat(np.cumsum(counts) - counts, counts)
                pos = self._lens[ids] + rank
            else:
                pos = self._host_ints("positions", positions, T)
                bad = np.flatnonzero(pos < 0)
                if bad.size:
                    raise KVCacheError(f"append: positions[{bad[0]}] = {pos[bad[0]]} is negative")

        P = self.page_size
        capacity = self._npages[ids] * P
        bad = np.flatnonzero(pos >= capacity)
        if bad.size:
            t, s = int(bad[0]), int(ids[bad[0]])
            need = int(pos[ids == s].max()) + 1
            raise KVCacheError(f"append: token {t} of sequence {s} goes to position {pos[t]}, past the "
                               f"{self._npages[s]} page(s) of {P} it has (capacity {capacity[t]}); "
                               f"call allocate({s}, {need}) first")
        if positions is not None:
            key = ids * (self.max_pages_per_seq * P) + pos
            if np.unique(key).size != T:
                _, first, cnt = np.unique(key, return_index=True, return_counts=True)
                t = int(first[np.flatnonzero(cnt > 1)[0]])
                raise KVCacheError(f"append: position {pos[t]} of sequence {ids[t]} is written twice in one call")
        pages = self._pt[ids, pos // P]
        bad = np.flatnonzero((pages < 0) | (pages >= self.num_pages))
        if bad.size:
            t, s = int(bad[0]), int(ids[bad[0]])
            raise KVCacheError(f"append: page_table[{s}, {pos[t] // P}] = {pages[t]} (for token {t} at position "
                               f"{pos[t]}) is not a page in [0, num_pages={self.num_pages})")
        if distinct:
            ends = pos + 1
        else:
            ends = np.zeros(seqs.size, dtype=np.int64)
            if T:
                np.maximum.at(ends, inverse, pos + 1)
            ends = np.maximum(ends, self._lens[seqs])
        changed = ends != self._lens[seqs]
        return ids, pages.astype(np.int32), pos, seqs[changed], ends[changed]

    # ---- checks -------------------------------------------------------------------------
    def _seq(self, seq_id) -> int:
        try:
            s = operator.index(seq_id)
        except TypeError:
            raise KVCacheError(f"seq_id must be an int, got {type(seq_id).__name__}") from None
        if not 0 <= s < self.max_seqs:
            raise KVCacheError(f"seq_id {s} is out of range [0, max_seqs={self.max_seqs})")
        return s

    def _check_dtype_device(self, name: str, x) -> None:
        """An appended tensor is a torch.Tensor of the cache's dtype on its device."""
        if not isinstance(x, torch.Tensor):
            raise LayerInputError(f"append: '{name}' must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise LayerInputError(f"append: '{name}' must be {self.dtype} (the cache's dtype), got {x.dtype}")
        if x.device != self.device:
            raise LayerInputError(f"append: '{name}' is on {x.device}, the cache on {self.device}")

    @staticmethod
    def _host_ints(name: str, values, count: int) -> np.ndarray:
        """Per-token integers given on the host (a list, numpy array or CPU tensor), as int64."""
        if isinstance(values, torch.Tensor):
            if values.device.type != "cpu":
                raise LayerInputError(
                    f"append: '{name}' must be on the host (a list, numpy array or CPU tensor), got a tensor "
                    f"on {values.device}: the cache is managed from Python, and reading it would synchronise")
            if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
                raise LayerInputError(f"append: '{name}' must hold integers, got {values.dtype}")
            out = values.numpy()
        else:
            out = np.asarray(values)
            if out.size == 0:
                out = out.astype(np.int64)
            if out.dtype.kind not in "iu":
                raise LayerInputError(f"append: '{name}' must hold integers, got {out.dtype}")
        if out.shape != (count,):
            raise LayerInputError(f"append: '{name}' must have shape [{count}] (one per token), got {list(out.shape)}")
        return out.astype(np.int64)
