"""DeepSeek multi-head latent attention (runtime/mla.py) against transformers'
DeepseekV3Attention on the CPU: prefill, then decode steps over the latent cache (the absorbed
form) equal the model's causal attention over the whole text; YaRN scaling, with and without
a q LoRA rank. No GPU needed (the module runs the reference evaluator)."""
from __future__ import annotations

import math

import pytest
import torch

from layerforge.runtime.mla import MLAAttention, MLAConfig

transformers = pytest.importorskip("transformers")
mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def hf_config(q_lora_rank, rope):
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
        rope_parameters=rope, rms_norm_eps=1e-6, num_hidden_layers=1, intermediate_size=64,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    cfg._attn_implementation = "eager"
    return cfg


def hf_attention(cfg, x):
    torch.manual_seed(0)
    attn = mod.DeepseekV3Attention(cfg, layer_idx=0).eval()
    for name, p in attn.named_parameters():   # the norms too, so a wrong weight shows
        p.data.copy_(torch.randn_like(p) * (0.2 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    rotary = mod.DeepseekV3RotaryEmbedding(cfg)
    S = x.shape[1]
    pos = torch.arange(S)[None]
    cos, sin = rotary(x, pos)
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out, _ = attn(x, (cos, sin), mask)
    return attn, out


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("rope", [YARN, {"rope_type": "default", "rope_theta": 10000.0}])
def test_prefill_and_decode_match_deepseek_v3(q_lora_rank, rope):
    cfg = hf_config(q_lora_rank, rope)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 64, generator=g)
    hf, want = hf_attention(cfg, x)
    ours = MLAAttention(MLAConfig.from_hf(cfg))
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and not missing
    torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-5)          # prefill, no cache
    cache = ours.make_cache(2)
    got = [ours(x[:, :7], cache)]                                              # prefill 7, then 4 decode steps
    got += [ours(x[:, t:t + 1], cache) for t in range(7, 11)]
    assert cache.length == 11 and cache.rows.shape[-1] == 8 + 32               # the latent cache: R + L a token
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-4, atol=1e-5)


def test_softmax_scale_follows_yarn_mscale():
    c = MLAConfig.from_hf(hf_config(None, YARN))
    assert c.softmax_scale == pytest.approx(mod.yarn_apply_mscale(YARN, 24 ** -0.5))
    assert c.softmax_scale == pytest.approx(24 ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2)


def test_gpu_tensors_are_refused_with_the_reason():
    """No kernel serves a 576-channel latent key with 512-channel values yet: a CUDA input is a
    clear error before any work, not a wrong result."""
    import types
    ours = MLAAttention(MLAConfig.from_hf(hf_config(None, YARN)))
    with pytest.raises(NotImplementedError, match="no attention kernel"):
        ours(types.SimpleNamespace(shape=(1, 1, 64), device=torch.device("cuda")))


def test_halves_rotated_rope_is_refused():
    cfg = hf_config(None, YARN)
    cfg.rope_interleave = False
    with pytest.raises(ValueError, match="rope_interleave"):
        MLAConfig.from_hf(cfg)


def test_a_missing_key_is_an_error_naming_it():
    from layerforge.models.spec import ConfigError
    d = hf_config(None, YARN).to_dict()
    del d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="missing 'kv_lora_rank'"):
        MLAConfig.from_hf(d)
