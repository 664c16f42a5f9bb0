"""A Llama-style attention layer served from a paged KV cache.

    layer = LlamaPagedAttention(config).cuda().to(torch.bfloat16)
    layer.load_state_dict(hf_llama_attention.state_dict())      # q_proj/k_proj/v_proj/o_proj (q/k/v fused)
    cache = layer.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)
    cache.allocate(0, 100); cache.allocate(1, 100)
    y = layer(x, seq_ids=[0] * 7 + [1] * 3, cache=cache)       # prefill: 7 tokens of seq 0, 3 of seq 1
    y = layer(x_next, seq_ids=[0, 1], cache=cache)               # one decode step for both

The projections are torch Linear layers (cuBLAS; q, k and v as one); the new K/V go into the cache through the
generated append kernel (K rotated on the way), and attention runs the tensor-core kernels
generated from the DSL's `llama_attn` block, specialised from the config: prefill tiles when
a step brings several tokens of a sequence (tokens grouped by sequence, in sequence order),
decode tiles otherwise.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..dsl.program import Program
from . import ops
from .attention import PagedAttention
from .fused_linear import fuse_parts, split_parts
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
        # q, k and v as one projection (one GEMM); loaded from and saved as q_proj/k_proj/v_proj
        self.qkv_proj = torch.nn.Linear(self.hidden, (self.hq + 2 * self.hkv) * self.d, bias=bias)
        self._register_state_dict_hook(_split_qkv)
        self.o_proj = torch.nn.Linear(self.hq * self.d, self.hidden, bias=bias)
        prog = program or Program.stdlib()
        layer = prog.specialise("llama_attn", config=dict(cfg), Hq=self.hq, Hkv=self.hkv, D=self.d, dtype=dtype)
        self.block = layer
        self.rope = layer.function.outputs[0].arg.rope
        self.page_size = page_size
        self.attention = PagedAttention(layer, page_size=page_size)

    def make_cache(self, *, num_pages: int, max_seqs: int, max_pages_per_seq: int) -> PagedKVCache:
        w = self.qkv_proj.weight
        return PagedKVCache(num_pages, self.page_size, self.hkv, self.d, dtype=w.dtype, device=w.device,
                            max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq)

    def forward(self, hidden: torch.Tensor, *, seq_ids, cache: PagedKVCache) -> torch.Tensor:
        """hidden: [T, H], the new tokens of one or more sequences; seq_ids: the sequence of
        each token (host ints). Tokens of a sequence take the positions after its cached ones."""
        if torch.compiler.is_compiling():
            return self._traced_forward(hidden, seq_ids, cache)
        T = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.splits, dim=-1)
        # k and v stay strided views of the fused output (the append kernel takes token strides)
        positions = cache.append(seq_ids, k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d), self.rope)
        # every token went to its sequence's end, so the longest sequence is the last position + 1;
        # the tokens' sequences and positions were uploaded by the append
        q_seq, q_pos = cache.last_tokens
        o = self._attend(q, cache, [int(i) for i in seq_ids], cache.page_table, cache.seq_lens, q_seq, q_pos,
                         max_kv_len=int(positions.max()) + 1 if T else 0)
        return self.o_proj(o.view(T, self.hq * self.d))

    def _traced_forward(self, hidden: torch.Tensor, seq_ids, cache: PagedKVCache) -> torch.Tensor:
        """forward() under torch.compile / torch.export: the append and the attention are custom
        ops (runtime/ops.py). What eager reads from the host after the append cannot be traced, so
        here: seq_ids is a list the graph specialises on (prefill or decode is chosen from it when
        tracing; a decode step of a fixed batch traces once), the kernels' max_kv_len is the
        page table's capacity (an upper bound: the kernels read the lengths from seq_lens; only
        the split-KV heuristic sees it), and the tokens' sequences and positions on the device
        come out of the append op."""
        T = hidden.shape[0]
        ids = [int(i) for i in seq_ids]
        q, k, v = self.qkv_proj(hidden).split(self.splits, dim=-1)
        _, q_seq, q_pos = ops.kv_append(cache, ids, k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d),
                                        self.rope)
        page_table, seq_lens = ops.cache_tables(cache)
        o = self._attend(q, cache, ids, page_table, seq_lens, q_seq, q_pos,
                         max_kv_len=page_table.shape[1] * self.page_size)
        return self.o_proj(o.view(T, self.hq * self.d))

    def _attend(self, q, cache: PagedKVCache, ids: list[int], page_table, seq_lens, q_seq, q_pos, *,
                max_kv_len: int) -> torch.Tensor:
        q = q.contiguous().view(len(ids), self.hq, self.d)
        return self.attention.step(q, cache.k_cache, cache.v_cache, page_table, seq_lens, ids, q_seq, q_pos,
                                   max_kv_len=max_kv_len)

    @property
    def splits(self) -> tuple[int, int, int]:
        return (self.hq * self.d, self.hkv * self.d, self.hkv * self.d)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers' q_proj / k_proj / v_proj -> the fused projection (q rows, then k, then v)
        fuse_parts(state_dict, prefix, "qkv_proj", _QKV)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_QKV = ("q_proj", "k_proj", "v_proj")


def _split_qkv(module: LlamaPagedAttention, state_dict, prefix, local_metadata):
    return split_parts(state_dict, prefix, "qkv_proj", _QKV, module.splits)
