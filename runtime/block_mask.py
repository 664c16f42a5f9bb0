"""Block masks of the tensor-core prefill: what the pre-pass of codegen/block_mask.py computes,
held so that one pass serves every layer of a forward.

    bm = attn.block_mask(seq_lens, cu_seqlens, max_q_len=4096, max_kv_len=4096, extra={"doc": doc})
    out = attn.prefill(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len=4096,
                       max_kv_len=4096, extra={"doc": doc}, block_mask=bm)

Without `block_mask=`, prefill looks the mask up in a small cache keyed on the pre-pass
kernel and on the identity (data pointer, shape) and version counter of seq_lens, cu_seqlens
and the tables, and on the scalars and sizes; a miss runs the pre-pass. The version counter
moves with every in-place torch op; a write that bypasses torch (a kernel of one's own into
the same memory) does not, so code that updates the tables that way passes its own BlockMask
or calls `clear_block_masks()`. While a CUDA graph is being captured the cache is bypassed:
the pre-pass is captured with the layer and replays with it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

CACHE_ENTRIES = 8
_CACHE: OrderedDict[tuple, tuple[BlockMask, tuple]] = OrderedDict()


@dataclass(frozen=True)
class BlockMask:
    """The block mask of one batch (codegen/block_mask.py documents the layout)."""
    cls: torch.Tensor     # uint8 [B, HB, Y, J]: 0 empty, 1 partial, 2 full
    num: torch.Tensor     # int32 [B, HB, Y]: non-empty key tiles of each row block
    idx: torch.Tensor     # int32 [B, HB, Y, J]: their (j << 1) | full, in order
    rows: int             # query rows (token x head) per row block
    keys: int             # keys per tile
    kernel: str           # the pre-pass's key (layer, tiling)

    @property
    def num_seqs(self) -> int:
        return self.cls.shape[0]

    @property
    def row_blocks(self) -> int:
        return self.cls.shape[2]

    @property
    def key_tiles(self) -> int:
        return self.cls.shape[3]

    def walked(self) -> float:
        """The fraction of the (row block, key tile) pairs the prefill kernel walks."""
        return self.num.sum().item() / max(self.cls.numel(), 1)


def cache_key(kernel: str, device, tensors, scalars: dict, sizes: tuple) -> tuple:
    return (kernel, str(device), tuple((t.data_ptr(), tuple(t.shape), t._version) for t in tensors),
            tuple(sorted((k, repr(v)) for k, v in scalars.items())), sizes)


def cached(key: tuple) -> BlockMask | None:
    hit = _CACHE.get(key)
    if hit is None:
        return None
    _CACHE.move_to_end(key)
    return hit[0]


def remember(key: tuple, mask: BlockMask, tensors) -> None:
    """Keeps the tensors alive with the entry, so their data pointers are not reused while it is held."""
    _CACHE[key] = (mask, tuple(tensors))
    while len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)


def clear_block_masks() -> None:
    _CACHE.clear()


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
