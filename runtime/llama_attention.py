"""A Llama-style attention layer served from a paged KV cache.

    layer = LlamaPagedAttention(config).cuda().to(torch.bfloat16)
    layer.load_state_dict(hf_llama_attention.state_dict())      # q_proj/k_proj/v_proj/o_proj
    cache = layer.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)
    cache.allocate(0, 100); cache.allocate(1, 100)
    y = layer(x, seq_ids=[0] * 7 + [1] * 3, cache=cache)       # prefill: 7 tokens of seq 0, 3 of seq 1
    y = layer(x_next, seq_ids=[0, 1], cache=cache)               # one decode step for both

The projections are torch Linear layers (cuBLAS); the new K/V go into the cache through the
generated append kernel (K rotated on the way), and attention runs the tensor-core kernels
generated from the DSL's `llama_attn` block, specialised from the config: prefill tiles when
a step brings several tokens of a sequence (tokens grouped by sequence, in sequence order),
decode tiles otherwise.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..dsl.program import Program
from .attention import PagedAttention
from .kv_cache import PagedKVCache


class LlamaPagedAttention(torch.nn.Module):
    def __init__(self, config: Mapping[str, Any] | Any, *, page_size: int = 16, dtype: str = "bf16",
                 program: Program | None = None):
        super().__init__()
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        self.hidden = cfg["hidden_size"]
        self.hq = cfg["num_attention_heads"]
        self.hkv = cfg.get("num_key_value_heads") or self.hq
        self.d = cfg.get("head_dim") or self.hidden // self.hq
        bias = bool(cfg.get("attention_bias", False))
        self.q_proj = torch.nn.Linear(self.hidden, self.hq * self.d, bias=bias)
        self.k_proj = torch.nn.Linear(self.hidden, self.hkv * self.d, bias=bias)
        self.v_proj = torch.nn.Linear(self.hidden, self.hkv * self.d, bias=bias)
        self.o_proj = torch.nn.Linear(self.hq * self.d, self.hidden, bias=bias)
        prog = program or Program.stdlib()
        layer = prog.specialise("llama_attn", config=dict(cfg), Hq=self.hq, Hkv=self.hkv, D=self.d, dtype=dtype)
        self.block = layer
        self.rope = layer.function.outputs[0].arg.rope
        self.page_size = page_size
        self.attention = PagedAttention(layer, page_size=page_size)

    def make_cache(self, *, num_pages: int, max_seqs: int, max_pages_per_seq: int) -> PagedKVCache:
        w = self.q_proj.weight
        return PagedKVCache(num_pages, self.page_size, self.hkv, self.d, dtype=w.dtype, device=w.device,
                            max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq)

    def forward(self, hidden: torch.Tensor, *, seq_ids, cache: PagedKVCache) -> torch.Tensor:
        """hidden: [T, H], the new tokens of one or more sequences; seq_ids: the sequence of
        each token (host ints). Tokens of a sequence take the positions after its cached ones."""
        T = hidden.shape[0]
        q = self.q_proj(hidden).view(T, self.hq, self.d)
        k = self.k_proj(hidden).view(T, self.hkv, self.d)
        v = self.v_proj(hidden).view(T, self.hkv, self.d)
        positions = cache.append(seq_ids, k, v, self.rope)
        ids = [int(i) for i in seq_ids]
        max_len = max(cache.seq_len(s) for s in set(ids))
        q = q.contiguous()
        counts = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        if max(counts.values()) > 1 and ids == sorted(ids):
            # prefill / chunked prefill: each sequence's tokens are one ragged chunk (prefill tiles)
            S = cache.page_table.shape[0]
            cu = [0] * (S + 1)
            for s in range(S):
                cu[s + 1] = cu[s] + counts.get(s, 0)
            cu_t = torch.tensor(cu, dtype=torch.int32).to(hidden.device, non_blocking=True)
            o = self.attention.prefill(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu_t,
                                       max_q_len=max(counts.values()), max_kv_len=max_len)
        else:
            # decode (or tokens in any order): one chunk per token
            q_seq = torch.tensor(ids, dtype=torch.int32).to(hidden.device, non_blocking=True)
            q_pos = positions.to(hidden.device, non_blocking=True)
            o = self.attention(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, q_seq, q_pos,
                               max_kv_len=max_len)
        return self.o_proj(o.view(T, self.hq * self.d))
