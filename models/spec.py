"""What a decoder-only model is made of, independent of the family it came from.

A family (models/families.py) reads a Hugging Face config into a `ModelSpec` and renames its
checkpoint's tensors to the canonical names below; the model (models/model.py) is built from
the spec alone. Every field is explicit: a family that cannot say what a field is raises
`ConfigError` naming the key, instead of a default that gives wrong kernels.

Canonical tensor names (those of `DecoderModel.state_dict()`; W is [out, in] as torch Linear):

    embed.weight                     [V, H]
    pos_embed.weight                 [P, H]          positions == "learned"
    embed_norm.weight / .bias        [H]             embed_norm (BLOOM)
    layers.{i}.attn_norm.weight / .bias              the norm before attention (and, with
                                                     residual == "parallel_shared", before the MLP)
    layers.{i}.attn.qkv.weight       [(Hq + 2 Hkv) D, H]   q rows, then k rows, then v rows;
                                                     each head's D rows contiguous (heads in order)
    layers.{i}.attn.qkv.bias         [(Hq + 2 Hkv) D]       qkv_bias
    layers.{i}.attn.q_norm.weight    [D]             qk_norm (Qwen3: RMSNorm over each head)
    layers.{i}.attn.k_norm.weight    [D]
    layers.{i}.attn.o.weight         [H, Hq D]       .bias [H] with o_bias
    layers.{i}.post_attn_norm.weight [H]             sandwich_norms (Gemma-2): norm of the attention output
    layers.{i}.mlp_norm.weight / .bias               the norm before the MLP (absent with "parallel_shared")
    layers.{i}.mlp.gate_up.weight    [2F, H]         gated MLPs: gate rows, then up rows (.bias with mlp_bias)
    layers.{i}.mlp.up.weight         [F, H]          plain MLPs (.bias with mlp_bias)
    layers.{i}.mlp.down.weight       [H, F]          (.bias with mlp_bias)
    layers.{i}.post_mlp_norm.weight  [H]             sandwich_norms
    final_norm.weight / .bias        [H]
    lm_head.weight                   [V, H]          absent when tie_word_embeddings
    lm_head.bias                     [V]             lm_head_bias

An MoE layer (moe_layers[i]; E = moe.experts, Fe = moe.inter, Fs = moe.shared_inter) has, in
place of the dense MLP's tensors, runtime/moe.MoE's under `layers.{i}.mlp.`:

    layers.{i}.mlp.gate.weight                     [E, H]       the router
    layers.{i}.mlp.gate.e_score_correction_bias    [E] f32      router == "grouped" (DeepSeek-V3)
    layers.{i}.mlp.experts.gate_up_proj            [E, 2Fe, H]  each expert's gate rows, then its up rows
    layers.{i}.mlp.experts.down_proj               [E, H, Fe]
    layers.{i}.mlp.shared_expert.gate_up_proj      [S, 2Fe, H]  a shared expert of Fs = S Fe (Qwen2-MoE, DeepSeek's
    layers.{i}.mlp.shared_expert.down_proj         [S, H, Fe]   n_shared_experts): in S slices of the experts' size
    layers.{i}.mlp.shared_expert.gate_up.weight    [2Fs, H]     other shared_inter: gate rows, then up rows
    layers.{i}.mlp.shared_expert.down.weight       [H, Fs]
    layers.{i}.mlp.shared_expert_gate.weight       [1, H]       shared_gate (Qwen2-MoE: sigmoid gate on it)

A model with multi-head latent attention (spec.mla: DeepSeek-V2/V3, runtime/mla.MLAConfig: nh
heads, N = qk_nope_head_dim, R = qk_rope_head_dim, L = kv_lora_rank, Dv = v_head_dim, Q =
q_lora_rank) has, in place of attn.qkv and attn.o, runtime/mla.MLAAttention's tensors (as
transformers names them) under `layers.{i}.attn.`; the biases with attention_bias:

    layers.{i}.attn.q_proj.weight                  [nh (N + R), H]   q_lora_rank null; else the next three
    layers.{i}.attn.q_a_proj.weight / .bias        [Q, H]
    layers.{i}.attn.q_a_layernorm.weight           [Q]
    layers.{i}.attn.q_b_proj.weight                [nh (N + R), Q]
    layers.{i}.attn.kv_a_proj_with_mqa.weight / .bias   [L + R, H]
    layers.{i}.attn.kv_a_layernorm.weight          [L]
    layers.{i}.attn.kv_b_proj.weight               [nh (N + Dv), L]
    layers.{i}.attn.o_proj.weight / .bias          [H, nh Dv]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # runtime/moe.py and runtime/mla.py import torch; a spec of a dense model needs none
    from ..runtime.mla import MLAConfig
    from ..runtime.moe import MoEConfig

NORMS = ("rms", "rms_1p", "layer")          # RMSNorm, Gemma's RMSNorm with (1 + w), LayerNorm (bias per norm_bias)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
RESIDUALS = ("sequential", "parallel", "parallel_shared")
POSITIONS = ("rope", "learned", "alibi", "none")


class ConfigError(ValueError):
    """A config the family cannot serve: an unknown model_type, a missing key, or a feature
    (RoPE type, head dim, ...) it does not support. The message names the key, on one line."""


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """One layer's attention: the DSL definition and the const bindings it is specialised with.

    definition: a stdlib attention block (dsl/stdlib/attention.lf): "decoder_attn" (causal;
    RoPE over the first rotary_dim dims of each head, 0 = all; window, softcap and
    query_scalar 0 = none), "bloom_attn" (ALiBi), "falcon_alibi_attn" (ALiBi added before the
    1/sqrt(D) scaling, as Falcon does), "gpt2_attn" (no positions in attention); or "mla_attn",
    DeepSeek's latent attention (runtime/mla.py's block, not the stdlib's), no consts: its sizes
    and RoPE are ModelSpec.mla's. consts: its
    const parameters (theta, rotary_dim, window, softcap, query_scalar, max_bias). rope_scaling: the config's rope parameters for scaled
    RoPE (llama3, linear, yarn, ...) as (rope_parameters dict, max_position_embeddings), or None.
    """
    definition: str
    consts: tuple[tuple[str, Any], ...] = ()
    rope_scaling: tuple[tuple[tuple[str, Any], ...], int | None] | None = None

    def const_dict(self) -> dict[str, Any]:
        return dict(self.consts)

    def longrope_threshold(self) -> float | None:
        """A LongRoPE scaling without a fixed regime (Phi-3's long-context models): its original_max_position, past
        which transformers takes the long factors (a step's largest position + 1 above it); None otherwise."""
        if self.rope_scaling is None:
            return None
        params, max_pos = self.rope_scaling
        p = dict(params)
        if p.get("rope_type") != "longrope" or p.get("regime") is not None:
            return None
        from ..dsl.numerics import rope_scaling_from_hf
        return float(rope_scaling_from_hf(p, max_pos).original_max_position)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    # norms
    norm: str                       # one of NORMS
    norm_eps: float
    norm_bias: bool = False         # LayerNorm with bias
    # attention
    attention: tuple[AttentionSpec, ...]   # one per layer
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm of each q and k head (norm_eps), before RoPE
    # MLP
    activation: str = "silu"        # one of ACTIVATIONS
    gated: bool = True              # act(gate) * up (SwiGLU / GeGLU) or act(up)
    mlp_bias: bool = False
    # block structure
    residual: str = "sequential"    # one of RESIDUALS
    sandwich_norms: bool = False    # Gemma-2: post_attn_norm and post_mlp_norm on the branch outputs
    # mixture of experts: the MoE layers' experts and routing (runtime/moe.py), and for each
    # layer whether it is one (else it has the dense MLP above, of intermediate_size)
    moe: MoEConfig | None = None
    moe_layers: tuple[bool, ...] = ()   # one per layer with moe, () without
    # multi-head latent attention (DeepSeek-V2/V3): every layer's attention is runtime/mla.MLAAttention
    # of these sizes (attention: "mla_attn" each; num_kv_heads 1 and head_dim L + R, the latent rows)
    mla: MLAConfig | None = None
    # embeddings and head
    positions: str = "rope"         # one of POSITIONS (informational: attention carries RoPE / ALiBi)
    max_positions: int | None = None    # learned positions: rows of pos_embed
    embed_scale: float | None = None    # Gemma: x * sqrt(H), in the model dtype
    embed_norm: bool = False        # BLOOM: LayerNorm after the embedding
    final_logit_softcap: float | None = None   # Gemma-2
    logit_divisor: float | None = None   # Granite: logits / logits_scaling
    # Granite: each branch's output times this before the residual add (o's and down's weights and biases are
    # scaled by it when the checkpoint is read: models/families.canonical_state_dict)
    residual_scale: float | None = None
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    # what else the family wants known (e.g. the config it came from), never read by the model
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def qk_norm_kind(self) -> str:
        """The per-head q / k norm of a qk_norm model: Gemma's (1 + w) where its norms are (Gemma 3), else
        RMSNorm (Qwen3)."""
        return "rms_1p" if self.norm == "rms_1p" else "rms"

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` is an MoE layer (runtime/moe.MoE) rather than the dense MLP."""
        return self.moe is not None and self.moe_layers[layer]
