"""A Llama decoder layer from generated kernels: the layer a model stacks.

    layer = LlamaPagedDecoderLayer(config).cuda().to(torch.bfloat16)
    layer.load_state_dict(hf_llama_decoder_layer.state_dict())   # the same keys as transformers
    cache = layer.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)
    cache.allocate(0, 100)
    y = layer(x, seq_ids=[0] * 7, cache=cache)     # prefill 7 tokens of sequence 0
    y = layer(x_next, seq_ids=[0], cache=cache)     # one decode step

    h   = x + attention(rms_norm(x))                 input_layernorm, self_attn
    out = h + down(swiglu(gate_up(rms_norm(h))))     post_attention_layernorm (fused with the add), mlp

Generated kernels: RMSNorm, the residual add fused with the second RMSNorm (`add_rms_norm`:
one pass returns both the normalised rows and the sum), SwiGLU, and the attention kernels
of `LlamaPagedAttention`. The projections are torch Linear layers (cuBLAS); gate and up are
one fused [2F, H] projection, loaded from and saved as transformers' gate_proj / up_proj.
CPU tensors run the reference evaluator through the same modules.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..dsl.program import Program
from .fused_linear import fuse_parts, split_parts
from .kv_cache import PagedKVCache
from .layers import LayerModule
from .llama_attention import LlamaPagedAttention


class LlamaGatedMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one projection and the SwiGLU kernel."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool = False, program: Program, dtype: str):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = torch.nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=bias)
        self.act = LayerModule(program.specialise("swiglu", F=intermediate, dtype=dtype))
        self._register_state_dict_hook(_split_gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers' gate_proj / up_proj -> the fused projection (gate rows first)
        fuse_parts(state_dict, prefix, "gate_up_proj", _GATE_UP)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_GATE_UP = ("gate_proj", "up_proj")


def _split_gate_up(module: LlamaGatedMLP, state_dict, prefix, local_metadata):
    return split_parts(state_dict, prefix, "gate_up_proj", _GATE_UP, [module.intermediate] * 2)


class LlamaPagedDecoderLayer(torch.nn.Module):
    def __init__(self, config: Mapping[str, Any] | Any, *, page_size: int = 16, dtype: str = "bf16",
                 program: Program | None = None):
        super().__init__()
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        prog = program or Program.stdlib()
        hidden, eps = cfg["hidden_size"], float(cfg.get("rms_norm_eps", 1e-6))
        self.input_layernorm = LayerModule(prog.specialise("rms_norm", H=hidden, dtype=dtype), eps=eps)
        self.self_attn = LlamaPagedAttention(cfg, page_size=page_size, dtype=dtype, program=prog)
        self.post_attention_layernorm = LayerModule(prog.specialise("add_rms_norm", H=hidden, dtype=dtype), eps=eps)
        self.mlp = LlamaGatedMLP(hidden, cfg["intermediate_size"], bias=bool(cfg.get("mlp_bias", False)),
                                 program=prog, dtype=dtype)

    def make_cache(self, *, num_pages: int, max_seqs: int, max_pages_per_seq: int) -> PagedKVCache:
        return self.self_attn.make_cache(num_pages=num_pages, max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq)

    def forward(self, hidden: torch.Tensor, *, seq_ids, cache: PagedKVCache) -> torch.Tensor:
        """hidden: [T, H], the new tokens of one or more sequences (see LlamaPagedAttention)."""
        attn = self.self_attn(self.input_layernorm(hidden), seq_ids=seq_ids, cache=cache)
        normed, h = self.post_attention_layernorm(attn, hidden)     # h = hidden + attn, in the same pass
        return h + self.mlp(normed)
