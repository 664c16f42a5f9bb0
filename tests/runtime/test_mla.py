"""DeepSeek multi-head latent attention (runtime/mla.py) against transformers'
DeepseekV3Attention on the CPU: prefill, then decode steps over the latent cache (the absorbed
form) equal the model's causal attention over the whole text; YaRN scaling, with and without
a q LoRA rank; the paged path (the GPU path's steps, with torch ops for the kernels) the same
way. No GPU needed."""
from __future__ import annotations

import math

import pytest
import torch

import types

from layerforge.runtime.mla import MLAAttention, MLAConfig, PagedLatentCache
from layerforge.runtime.mla_decode import mla_decode_reference

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


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("rope", [YARN, {"rope_type": "default", "rope_theta": 10000.0}])
def test_paged_path_matches_deepseek_v3(q_lora_rank, rope):
    """The GPU path's steps on the CPU (f32): rows appended into pages of 4 tokens (RoPE at
    write), a prefill of 7 through the non-absorbed form (SDPA), 4 decode steps through the
    absorbed decode over the pages; the batch's rows are sequences 2 and 0 of a 3-sequence cache."""
    cfg = hf_config(q_lora_rank, rope)
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(2))
    hf, want = hf_attention(cfg, x)
    ours = MLAAttention(MLAConfig.from_hf(cfg))
    ours.load_state_dict(hf.state_dict(), strict=False)
    torch.testing.assert_close(ours._forward_paged(x, None, None), want, rtol=1e-4, atol=1e-5)   # no cache
    cache = PagedLatentCache(12, 4, 32, 8, torch.float32, "cpu", max_seqs=3, max_pages_per_seq=4)
    cache.allocate(1, 5)                       # another sequence's pages first: the pages are not in order
    got = [ours(x[:, :7], cache, seq_ids=[2, 0])]
    got += [ours(x[:, t:t + 1], cache, seq_ids=[2, 0]) for t in range(7, 11)]
    assert [cache.seq_len(s) for s in (0, 1, 2)] == [11, 0, 11]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-4, atol=1e-5)


def test_absorbed_decode_equals_the_non_absorbed_form():
    """softmax(scale [W_uk^T q_nope | q_r] . [c | k_r]) c, then W_uv, is per-head attention with
    keys [W_uk c | k_r] and values W_uv c (float64, random weights, ragged lengths over pages)."""
    g = torch.Generator().manual_seed(3)
    nh, nope, R, L, v, page = 3, 16, 8, 32, 12, 4
    w_uk, w_uv = torch.randn(nh, nope, L, generator=g, dtype=torch.float64), torch.randn(nh, v, L, generator=g, dtype=torch.float64)
    lens = [1, 4, 9]
    cache = torch.full((10, page, L + R), float("nan"), dtype=torch.float64)
    table = torch.tensor([[7, -1, -1], [2, -1, -1], [5, 0, 9]], dtype=torch.int32)
    rows = [torch.randn(n, L + R, generator=g, dtype=torch.float64) for n in lens]
    for b, n in enumerate(lens):
        for i in range(n):
            cache[table[b, i // page], i % page] = rows[b][i]
    q_nope, q_r = torch.randn(3, nh, nope, generator=g, dtype=torch.float64), torch.randn(3, nh, R, generator=g, dtype=torch.float64)
    q = torch.cat([torch.einsum("thn,hnl->thl", q_nope, w_uk), q_r], dim=-1)
    o_lat = mla_decode_reference(q, cache, table, torch.tensor(lens, dtype=torch.int32),
                                 torch.tensor([2, 0, 1], dtype=torch.int32), scale=0.3, latent_dim=L)
    got = torch.einsum("thl,hvl->thv", o_lat, w_uv)
    for t, b in enumerate([2, 0, 1]):
        c, kr = rows[b][:, :L], rows[b][:, L:]
        k = torch.cat([torch.einsum("hnl,jl->hjn", w_uk, c), kr[None].expand(nh, -1, -1)], dim=-1)
        vals = torch.einsum("hvl,jl->hjv", w_uv, c)
        p = torch.softmax(torch.einsum("hd,hjd->hj", torch.cat([q_nope[t], q_r[t]], dim=-1), k) * 0.3, dim=-1)
        torch.testing.assert_close(got[t], torch.einsum("hj,hjv->hv", p, vals))


def test_cuda_rows_need_a_paged_cache():
    ours = MLAAttention(MLAConfig.from_hf(hf_config(None, YARN)))
    cuda_like = types.SimpleNamespace(shape=(1, 1, 64), device=torch.device("cuda"))
    with pytest.raises(TypeError, match="PagedLatentCache"):
        ours(cuda_like, ours.make_cache(1, paged=False))


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


def test_prefill_route_is_checked():
    """The prefill's attention on CUDA: "sdpa" (the default: torch's cuDNN backend measured faster
    on an H200) or "kernel" (our prefill kernel of MLA_PREFILL_SOURCE); anything else is an error."""
    cfg = MLAConfig(hidden_size=64, num_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=16, v_head_dim=16)
    assert MLAAttention(cfg).prefill == "sdpa" and MLAAttention(cfg, prefill="kernel").prefill == "kernel"
    with pytest.raises(ValueError, match="'sdpa' or 'kernel'"):
        MLAAttention(cfg, prefill="flash")
