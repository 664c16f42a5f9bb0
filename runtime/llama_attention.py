"""A Llama-style attention layer served from a paged KV cache.

    layer = LlamaPagedAttention(config).cuda().to(torch.bfloat16)
    layer.load_state_dict(hf_llama_attention.state_dict())      # q_proj/k_proj/v_proj/o_proj
    cache = layer.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)
    cache.allocate(0, 100); cache.allocate(1, 100)
    y = layer(x, seq_ids=[0] * 7 + [1] * 3, cache=cache)       # prefill: 7 tokens of seq 0, 3 of seq 1
    y = layer(x_next, seq_ids=[0, 1], cache=cache)               # one decode step for both

The projections are torch Linear layers (cuBLAS); the new K/V go into the cache through the
generated append kernel (K rotated on the way), and attention is the generated paged kernel
of the DSL's `llama_attn` block, specialised from the config.
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
        ids = torch.as_tensor(list(seq_ids), dtype=torch.int32)
        involved = sorted(set(ids.tolist()))
        max_len = max(cache.seq_len(s) for s in involved)
        q_seq = ids.to(hidden.device, non_blocking=True)
        q_pos = positions.to(hidden.device, non_blocking=True)
        o = self.attention(q.contiguous(), cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
                           q_seq, q_pos, max_kv_len=max_len)
        return self.o_proj(o.view(T, self.hq * self.d))
