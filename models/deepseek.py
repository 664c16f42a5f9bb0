"""Decoder models with DeepSeek's multi-head latent attention (model_type deepseek_v2 and
deepseek_v3, spec.mla): DecoderModel's embedding, norms, dense MLPs, MoE layers and LM head
around runtime/mla.MLAAttention layers, over one paged latent cache (runtime/mla_cache.py: a
layer of pages per decoder layer, a token's row its normed latent and rotated RoPE key).

    model = lf.from_pretrained("path/to/DeepSeek-V2-Lite", dtype=torch.bfloat16, device="cuda")
    cache = model.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)   # a PagedLatentCache
    cache.allocate(0, 7)
    logits = model.step(ids, [0] * 7, cache)          # DecoderModel's step API, engine and generate()

A step plans each token's position once (after its sequence's length, in order: LatentStep);
each layer writes its tokens' rows at those positions and attends (MLAAttention.step): a
sequence decoding one token in the absorbed form (the MLA decode kernel on CUDA), a prompt
chunk in the non-absorbed form. The latent cache is managed from the host at every step, so
decode steps are not captured in CUDA graphs (capturable() is False); DecoderModel's fused
decode layer is not used (its attention is the dense q/k/v product), nor are fp8 caches;
quantize_() quantises the dense MLPs only (MLA and the MoE layers stay in the model's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..dsl.program import Program
from ..runtime.mla import MLAAttention, MLAConfig
from ..runtime.mla_cache import PagedLatentCache
from ..runtime.pages import KVCacheError
from .model import DecoderModel, _torch_dtype
from .spec import ModelSpec

__all__ = ["DeepseekModel", "LatentAttention", "LatentStep", "step_positions"]


def step_positions(lengths: np.ndarray, seq_ids: np.ndarray) -> np.ndarray:
    """Each token's position in a step: after its sequence's length (lengths[seq]), a sequence's
    tokens in order of appearance (as PagedKVCache.begin_step places them). int64 [T]."""
    _, inverse, counts = np.unique(seq_ids, return_inverse=True, return_counts=True)
    rank = np.empty(seq_ids.size, dtype=np.int64)
    rank[np.argsort(inverse.reshape(-1), kind="stable")] = (np.arange(seq_ids.size)
                                                           - np.repeat(np.cumsum(counts) - counts, counts))
    return lengths[seq_ids] + rank


@dataclass
class LatentStep:
    """What every layer's MLA needs for one step (DecoderModel's StepContext for a latent cache):
    each token's sequence and position, host int64 [T], planned once for all layers."""
    cache: PagedLatentCache
    seq_ids: np.ndarray
    positions: np.ndarray
    q_pos: torch.Tensor | None = None   # DecoderModel.embed_tokens' positions: only learned embeddings read them


class LatentAttention(MLAAttention):
    """Layer `index`'s MLA in a model: forward(x [T, H], step: LatentStep) -> [T, H] writes the
    step's rows into the layer's pages and attends; other arguments are MLAAttention's forward."""

    def __init__(self, config: MLAConfig, index: int, *, dtype: torch.dtype, device=None):
        super().__init__(config, dtype=dtype, device=device)
        self.index = index

    def forward(self, hidden, cache=None, seq_ids=None):
        if isinstance(cache, LatentStep):
            return self.step(hidden, cache.cache, cache.seq_ids, cache.positions, layer=self.index)
        return super().forward(hidden, cache, seq_ids)


class DeepseekModel(DecoderModel):
    """A DecoderModel whose layers' attention is MLA (spec.mla) over a PagedLatentCache."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | str = torch.bfloat16, device=None,
                 page_size: int = 16, program: Program | None = None, kv_dtype: str | None = None,
                 kv_scales: str = "per_tensor"):
        if spec.mla is None:
            raise ValueError(f"DeepseekModel: a {spec.model_type} spec has no latent attention (spec.mla)")
        if kv_dtype is not None:
            raise ValueError(f"DeepseekModel: kv_dtype {kv_dtype!r}: the latent cache is kept in the model's dtype")
        super().__init__(spec, dtype=dtype, device=device, page_size=page_size, program=program)

    def _make_attention(self, index: int, prog: Program, dname: str, device) -> torch.nn.Module:
        return LatentAttention(self.spec.mla, index, dtype=_torch_dtype(dname), device=device)

    def make_cache(self, *, num_pages: int, max_seqs: int, max_pages_per_seq: int) -> PagedLatentCache:
        m = self.spec.mla
        return PagedLatentCache(num_pages, self.page_size, m.kv_lora_rank, m.qk_rope_head_dim, self.dtype,
                                self.device, max_seqs, max_pages_per_seq, num_layers=self.spec.num_layers)

    def context(self, cache: PagedLatentCache, seq_ids: list[int]) -> LatentStep:
        if not isinstance(cache, PagedLatentCache):
            raise TypeError("DeepseekModel: a step takes the PagedLatentCache of make_cache(), not a "
                            f"{type(cache).__name__}")
        ids = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= cache.max_seqs):
            bad = int(ids[(ids < 0) | (ids >= cache.max_seqs)][0])
            raise KVCacheError(f"seq_id {bad} is out of range [0, max_seqs={cache.max_seqs})")
        return LatentStep(cache, ids, step_positions(cache.seq_lens_host, ids))

    def fuses(self, x: torch.Tensor) -> bool:
        return False

    def capturable(self, tokens: int) -> bool:
        return False
