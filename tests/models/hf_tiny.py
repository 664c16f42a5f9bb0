"""Tiny random transformers models of every family, saved with save_pretrained (no download):
shared by the CPU tests (tests/models) and the GPU tests (tests/gpu)."""
from __future__ import annotations

import torch

# family -> (transformers config class, its arguments); head_dim 64 where the family lets us
# choose, so the GPU tests' tensor-core kernels have a specialisation
def tiny_configs(head_dim: int = 16) -> dict[str, tuple[str, dict]]:
    H = 4 * head_dim
    common = dict(vocab_size=96, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    return {
        "llama": ("LlamaConfig", dict(common, num_key_value_heads=2)),
        "llama3_scaled": ("LlamaConfig", dict(common, num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))),
        # IBM Granite: Llama with its four multipliers (embedding, attention scale, residual branches, logits)
        "granite": ("GraniteConfig", dict(common, num_key_value_heads=2, embedding_multiplier=12.0,
                                          attention_multiplier=0.125, residual_multiplier=0.22, logits_scaling=8.0)),
        "mistral": ("MistralConfig", dict(common, num_key_value_heads=2, sliding_window=6)),
        "qwen2": ("Qwen2Config", dict(common, num_key_value_heads=2)),
        "qwen3": ("Qwen3Config", dict(common, num_key_value_heads=2, head_dim=head_dim)),
        "gemma": ("GemmaConfig", dict(common, num_key_value_heads=1, head_dim=head_dim)),
        "gemma2": ("Gemma2Config", dict(common, num_key_value_heads=2, head_dim=head_dim, sliding_window=5,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                        query_pre_attn_scalar=2 * head_dim)),
        # Gemma 3 (text): a sliding layer (local base 10000) then a global one (theta 1e6, linear scaling 8), q/k norms
        "gemma3_text": ("Gemma3TextConfig", dict(common, num_key_value_heads=2, head_dim=head_dim, sliding_window=5,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 query_pre_attn_scalar=2 * head_dim, rope_parameters={
                                                     "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                                     "full_attention": dict(rope_type="linear", factor=8.0,
                                                                            rope_theta=1000000.0)})),
        "phi3": ("Phi3Config", dict(common, num_key_value_heads=2, partial_rotary_factor=0.5,
                                    pad_token_id=0)),
        # Phi-3's long-context RoPE: LongRoPE with both factor sets, the long ones past 16 positions (so that a
        # generation crosses over; the attention factor sqrt(1 + ln 16 / ln 16))
        "phi3_longrope": ("Phi3Config", dict(common, num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0,
                                             original_max_position_embeddings=16,   # (Phi3Config's own key wins)
                                             rope_parameters=dict(
                                                 rope_type="longrope", rope_theta=10000.0,
                                                 short_factor=[1.0 + 0.25 * i for i in range(head_dim // 4)],
                                                 long_factor=[2.0 + i for i in range(head_dim // 4)],
                                                 original_max_position_embeddings=16))),
        "gpt_neox": ("GPTNeoXConfig", dict(common, rotary_pct=0.25, use_parallel_residual=True)),
        "gpt_neox_seq": ("GPTNeoXConfig", dict(common, rotary_pct=0.5, use_parallel_residual=False)),
        "falcon": ("FalconConfig", dict(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                        bias=False)),
        "falcon_40b": ("FalconConfig", dict(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                            num_kv_heads=2, new_decoder_architecture=True, bias=False)),
        "falcon_alibi": ("FalconConfig", dict(vocab_size=96, hidden_size=H, num_hidden_layers=2,
                                              num_attention_heads=4, multi_query=False, alibi=True, bias=True,
                                              parallel_attn=False)),
        "gpt2": ("GPT2Config", dict(vocab_size=96, n_embd=H, n_layer=2, n_head=4, n_positions=128)),
        "bloom": ("BloomConfig", dict(vocab_size=96, hidden_size=H, n_layer=2, n_head=4)),
        # MoE: every layer sparse (Mixtral, Qwen3-MoE); Qwen2-MoE's layers 1 and 5 sparse (every
        # second one, but layer 3 in mlp_only_layers), each with a gated shared expert (2 x the
        # routed experts' size: stored in slices, as real Qwen2-MoE checkpoints are)
        "mixtral": ("MixtralConfig", dict(common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": ("Qwen2MoeConfig", dict(common, num_hidden_layers=6, num_key_value_heads=2, num_experts=8,
                                             num_experts_per_tok=2, moe_intermediate_size=H // 2,
                                             shared_expert_intermediate_size=H, decoder_sparse_step=2,
                                             mlp_only_layers=[3])),
        "qwen3_moe": ("Qwen3MoeConfig", dict(common, num_key_value_heads=2, head_dim=head_dim, num_experts=6,
                                             num_experts_per_tok=2, moe_intermediate_size=H // 2,
                                             norm_topk_prob=True)),
        # DeepSeek (latent attention: models/deepseek.py): latent 32 + RoPE 32 channels a token (the GPU
        # decode kernel takes multiples of 64); the first layer dense, then MoE layers with a shared
        # expert of n_shared_experts x moe_intermediate_size. V3: 8 experts in 4 groups, 2 kept, a q
        # LoRA, rms_norm_eps 1e-5 (the latent norms keep 1e-6); V3 with YaRN: no q LoRA, attention
        # biases, no renormalisation; V2(-Lite): greedy softmax routing. initializer_range 0.1: the
        # attention changes the logits enough to show
        "deepseek_v3": ("DeepseekV3Config", dict(common, **_mla(H), num_hidden_layers=3, q_lora_rank=48,
                                                 n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=2,
                                                 rms_norm_eps=1e-5)),
        "deepseek_v3_yarn": ("DeepseekV3Config", dict(common, **_mla(H), q_lora_rank=None, attention_bias=True,
                                                      n_routed_experts=6, n_group=2, topk_group=1, n_shared_experts=1,
                                                      norm_topk_prob=False, routed_scaling_factor=1.5,
                                                      rope_parameters=dict(
                                                          rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                          original_max_position_embeddings=64, beta_fast=32.0,
                                                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
        "deepseek_v2": ("DeepseekV2Config", dict(common, **_mla(H), q_lora_rank=None, n_routed_experts=6,
                                                 n_shared_experts=2)),
        # DeepSeek-V2's own routing (V2-Lite's is the greedy above): group_limited_greedy, scaled weights
        "deepseek_v2_limited": ("DeepseekV2Config", dict(common, **_mla(H), q_lora_rank=None, n_routed_experts=8,
                                                         n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                                         routed_scaling_factor=16.0, n_shared_experts=2)),
    }


def _mla(H: int) -> dict:
    return dict(kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
                num_experts_per_tok=2, moe_intermediate_size=H // 2, initializer_range=0.1)


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v2_limited", "deepseek_v3", "deepseek_v3_yarn")   # MoE layers too


def make_tiny(name: str, folder, *, head_dim: int = 16, seed: int = 0, dtype=torch.float32):
    """Build the family's tiny random model with transformers, save it to `folder`, return it (eval)."""
    import transformers
    cls_name, kwargs = tiny_configs(head_dim)[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).eval()
    with torch.no_grad():   # norms and biases away from their init values, so that loading them matters
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():   # DeepSeek-V3's router bias: a buffer, zero at init
            if n.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_loader(tmp_path_factory, *, head_dim: int, dtype, device: str):
    """A module-scoped cache: name -> (transformers model on `device`, lf.from_pretrained of its
    saved checkpoint in `dtype` on `device`), each family built once per test module."""
    import layerforge as lf
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            hf = make_tiny(name, folder, head_dim=head_dim)
            cache[name] = hf.to(device), lf.from_pretrained(folder, dtype=dtype, device=device)
        return cache[name]
    return get


def routed_logits(hf, ours, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(our logits, transformers' logits, agree [B, S]) of an MoE model over ids [B, S]: agree
    where every MoE layer chose the same experts for the position and for all positions before it
    (attention carries a different choice on). In bf16, rounding tips some near ties of a
    router's top k the other way: such a token gets other experts, so its output differs by
    more than rounding, and so do the later positions that attend to it."""
    from layerforge.runtime.moe import MoE
    theirs, mine = [], []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, args, out: theirs.append(out[2]))
             for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    moes = [layer.mlp for layer in ours.layers if isinstance(layer.mlp, MoE)]

    def recording(route):
        def record(x):
            weights, ids = route(x)
            mine.append(ids)
            return weights, ids
        return record
    for moe in moes:
        moe.route = recording(moe.route)
    try:
        with torch.no_grad():
            ref = hf(ids).logits
        got = ours(ids)
    finally:
        for h in hooks:
            h.remove()
        for moe in moes:
            del moe.route
    assert len(theirs) == len(mine) == len(moes) > 0
    B, S = ids.shape
    same = torch.ones(B, S, dtype=torch.bool)
    for a, b in zip(theirs, mine):
        same &= (a.sort(-1).values.cpu() == b.long().sort(-1).values.cpu()).all(-1).view(B, S)
    return got, ref, same.cumprod(-1).bool()


def engine_logits(model, prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
    """An eager Engine's logits for the prompt, then for each token of `feed` fed in turn (one sequence)."""
    from layerforge.models.engine import Engine
    eng = Engine(model, max_seqs=1, max_seq_len=64, cuda_graphs=False)
    slot = eng.add(prompt)
    got = [eng.step()[slot]]
    for tok in feed:
        eng.feed(slot, tok)
        got.append(eng.step()[slot])
    return got
