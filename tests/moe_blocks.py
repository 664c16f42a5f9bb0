"""transformers' MoE blocks with small random configs, shared by the CPU and GPU tests of
runtime/moe.py: Mixtral, Qwen2-MoE (gated shared expert, in slices and as its own MLP), Qwen3-MoE,
DeepSeek-V3 (grouped routing, shared experts)."""
from __future__ import annotations

import torch

from .seeding import seeded_generator

H = 128


def configs():
    import transformers
    return {
        "mixtral": transformers.MixtralConfig(hidden_size=H, intermediate_size=256, num_local_experts=8,
                                              num_experts_per_tok=2),
        # shared expert of 2 x the routed size: stored as 2 slices, read by the expert kernels
        "qwen2_moe": transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=64, num_experts=12,
                                                 num_experts_per_tok=4, shared_expert_intermediate_size=128,
                                                 norm_topk_prob=False),
        # ... of a size that does not cut into slices: its own GatedMLP
        "qwen2_moe_mlp": transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=64, num_experts=12,
                                                     num_experts_per_tok=4, shared_expert_intermediate_size=160,
                                                     norm_topk_prob=False),
        "qwen3_moe": transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=64, num_experts=16,
                                                 num_experts_per_tok=4, norm_topk_prob=True),
        "deepseek_v3": transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=64, n_routed_experts=32,
                                                     num_experts_per_tok=4, n_group=4, topk_group=2,
                                                     n_shared_experts=1, routed_scaling_factor=2.5),
    }


def block(name: str, *, dtype=torch.float32, device="cpu", ties: bool = False):
    """The transformers block `name` with seeded normal weights (std 0.1; the router's 0.5 so the
    choices are clear). ties: experts 1 and 3 get the same router row and the same weights, so
    every token that scores one scores the other the same (a tie broken either way gives the
    same output)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cls = {"mixtral": MixtralSparseMoeBlock, "qwen2_moe": Qwen2MoeSparseMoeBlock, "qwen2_moe_mlp": Qwen2MoeSparseMoeBlock,
           "qwen3_moe": Qwen3MoeSparseMoeBlock, "deepseek_v3": DeepseekV3MoE}[name]
    cfg = configs()[name]
    blk = cls(cfg)
    gen = seeded_generator("moe_block", name, ties)
    with torch.no_grad():
        for pname, p in list(blk.named_parameters()) + list(blk.named_buffers()):
            std = 0.5 if pname == "gate.weight" else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        if ties:
            blk.gate.weight[3] = blk.gate.weight[1]
            blk.experts.gate_up_proj[3] = blk.experts.gate_up_proj[1]
            blk.experts.down_proj[3] = blk.experts.down_proj[1]
            if hasattr(blk.gate, "e_score_correction_bias"):
                blk.gate.e_score_correction_bias[3] = blk.gate.e_score_correction_bias[1]
    return blk.to(device=device, dtype=dtype).eval(), cfg


def run_block(blk, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return blk(x.unsqueeze(0)).squeeze(0)
