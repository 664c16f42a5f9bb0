"""The reference evaluator against Hugging Face `transformers` modules, on CPU.

Every module is built from a tiny random config (nothing is downloaded) with its weights
re-drawn so that attention is far from uniform. Where a module fuses projections around
the math, the test runs the module's own projections, hands the [B, S, H, D] tensors to
the DSL definition and applies the module's output projection, so the whole module output
is compared. Modes as in reference_checks: f32, bf16 (the module cast to bf16, so its own
rounding differs from the program's) and float64 against the module's functions in float64.
"""
from __future__ import annotations

import pytest
import torch

import layerforge as lf

from .reference_checks import BF16, F32, F64, MODES, assert_matches, run, stdlib

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    create_bidirectional_mask, create_causal_mask, create_sliding_window_causal_mask)

TINY = dict(vocab_size=11, num_hidden_layers=1, intermediate_size=24)


def redraw(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Replace every parameter with N(0, std) draws (construction alone leaves some at zero
    or uninitialised, and small weights make attention nearly uniform)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.eval()


def module_tol(mode, want: torch.Tensor) -> dict:
    """bf16: the module rounds every intermediate (projections, rotation, scores, probabilities)
    to bf16, the program only its stored values; allow a few ulps of the output's scale."""
    if mode is BF16:
        return {"rtol": 2e-2, "atol": 2e-2 * float(want.abs().max())}
    return {}


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, S, H, D], the DSL's layout."""
    return t.reshape(*t.shape[:-1], -1, head_dim)


# --------------------------------------------------------------------------- norms
# The HF norms and gated MLPs upcast to f32 internally whatever their dtype, so they have no
# float64 path; tests/dsl/test_reference_vs_torch.py holds these layers to float64 formulas.
HF_MODES = [F32, BF16]


@pytest.mark.parametrize("mode", HF_MODES, ids=str)
@pytest.mark.parametrize("N,H", [(1, 7), (5, 64), (3, 1536)])
def test_rms_norm_matches_LlamaRMSNorm(mode, N, H):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = redraw(LlamaRMSNorm(H, eps=1e-6), std=1.0).to(mode.storage)
    x = mode.inp(torch.randn(N, H) * 3)
    (y,) = run("rms_norm", mode, {"x": x, "w": norm.weight.detach()}, H=H)
    with torch.no_grad():
        want = norm.to(mode.ref)(mode.to_ref(x))
    assert_matches(y, want, mode)


@pytest.mark.parametrize("mode", HF_MODES, ids=str)
@pytest.mark.parametrize("N,H", [(1, 7), (5, 64), (3, 1536)])
@pytest.mark.parametrize("cls", ["gemma", "gemma2"])
def test_gemma_rms_norm_matches_GemmaRMSNorm_one_plus_weight(mode, N, H, cls):
    import importlib
    mod = importlib.import_module(f"transformers.models.{cls}.modeling_{cls}")
    norm = getattr(mod, f"{cls.capitalize()}RMSNorm")(H, eps=1e-6)
    norm = redraw(norm, std=0.5).to(mode.storage)
    x = mode.inp(torch.randn(N, H) * 3)
    (y,) = run("gemma_rms_norm", mode, {"x": x, "w": norm.weight.detach()}, H=H)
    with torch.no_grad():
        want = norm.to(mode.ref)(mode.to_ref(x))
        plain = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
                 * norm.weight.double())
    assert_matches(y, want, mode)
    assert (y.double() - plain).abs().max() > 0.1  # (1 + w), not w


# --------------------------------------------------------------------------- activations and MLPs
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("hf_name,name", [("silu", "silu_act"), ("gelu", "gelu_act"),
                                          ("gelu_pytorch_tanh", "gelu_tanh_act"), ("relu", "relu_act")])
def test_activation_matches_ACT2FN(mode, hf_name, name):
    x = mode.inp(torch.randn(3, 37) * 4)
    (y,) = run(name, mode, {"x": x}, F=37)
    assert_matches(y, ACT2FN[hf_name](mode.to_ref(x)), mode)


@pytest.mark.parametrize("mode", HF_MODES, ids=str)
@pytest.mark.parametrize("family,act,name", [("llama", "silu", "swiglu"), ("llama", "gelu", "geglu"),
                                             ("gemma", "gelu_pytorch_tanh", "geglu_tanh")])
def test_gated_activation_inside_the_hf_mlp(mode, family, act, name):
    # down(act(gate(x)) * up(x)) with the DSL's activation on the fused [gate | up] projection.
    # (Gemma rewrites hidden_act="gelu" to the tanh form, so exact GeGLU goes through LlamaMLP.)
    import importlib
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cfg = getattr(transformers, f"{family.capitalize()}Config")(hidden_size=40, num_attention_heads=4,
                                                                hidden_act=act, **TINY)
    mlp = redraw(getattr(mod, f"{family.capitalize()}MLP")(cfg)).to(mode.storage)
    assert mlp.act_fn is ACT2FN[act] or type(mlp.act_fn) is type(ACT2FN[act])
    x = mode.inp(torch.randn(5, 40))
    with torch.no_grad():
        gu = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        (h,) = run(name, mode, {"gu": gu}, F=cfg.intermediate_size)
        got = mlp.down_proj(h)
        want = mlp(x)
    assert_matches(got, want, mode, **module_tol(mode, want))


# --------------------------------------------------------------------------- rotary embeddings
@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("partial", [1.0, 0.25])
def test_rope_neox_matches_GPTNeoX_rotary_embedding(mode, partial):
    from transformers.models.gpt_neox import modeling_gpt_neox as neox
    cfg = transformers.GPTNeoXConfig(hidden_size=128, num_attention_heads=4, rotary_pct=partial,
                                     rotary_emb_base=10000, **TINY)
    D = 32
    rd = int(D * partial)
    rot = neox.GPTNeoXRotaryEmbedding(cfg)
    S, H = 7, 4
    x = mode.inp(torch.randn(1, H, S, D))
    pos = torch.tensor([[3, 9, 17, 18, 40, 41, 63]])
    cos, sin = rot(x, pos)
    assert cos.shape[-1] == rd
    want, _ = neox.apply_rotary_pos_emb(x, x, cos, sin)
    (y,) = run("rope", mode, {"x": x[0].transpose(0, 1), "pos": pos[0].to(torch.int32)}, D=D, rotary_dim=rd)
    assert_matches(y, want[0].transpose(0, 1), mode, **module_tol(mode, want))


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_gptj_matches_GPTJ_interleaved_rotation(mode, rotary_dim):
    from transformers.models.gptj import modeling_gptj as gptj
    S, H, D = 6, 3, 16
    table = gptj.create_sinusoidal_positions(64, rotary_dim)
    pos = torch.tensor([[0, 5, 6, 20, 33, 62]])
    x = mode.inp(torch.randn(1, S, H, D))
    sin, cos = torch.split(table[pos].to(x.dtype), rotary_dim // 2, dim=-1)
    want = torch.cat([gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)
    (y,) = run("rope", mode, {"x": x[0], "pos": pos[0].to(torch.int32)}, D=D, rotary_dim=rotary_dim, neox=False)
    assert_matches(y, want[0], mode, **module_tol(mode, want))


# --------------------------------------------------------------------------- Llama attention
def llama_config(Hq, Hkv, D=8, theta=500000.0):
    return transformers.LlamaConfig(hidden_size=48, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                                    rope_theta=theta, attn_implementation="eager", **TINY)


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4), (4, 1)], ids=["gqa4", "mha", "mqa"])
@pytest.mark.parametrize("offset", [0, 37])
def test_llama_attn_matches_LlamaAttention_eager(mode, Hq, Hkv, offset):
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    cfg = llama_config(Hq, Hkv)
    attn = redraw(LlamaAttention(cfg, layer_idx=0)).to(mode.storage)
    B, S, D = 2, 7, cfg.head_dim
    x = mode.inp(torch.randn(B, S, cfg.hidden_size))
    pos = (torch.arange(S) + offset).expand(B, S)
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None)
        want, _ = attn(x, position_embeddings=cos_sin, attention_mask=mask)
        q, k, v = (heads(p(x), D) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    (o,) = run("llama_attn", mode, {"q": q, "k": k, "v": v}, q_positions=pos, kv_positions=pos,
               config=cfg.to_dict(), theta=cfg.rope_parameters["rope_theta"])
    with torch.no_grad():
        got = attn.o_proj(o.reshape(B, S, -1))
    assert_matches(got, want, mode, **module_tol(mode, want))


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
def test_llama_attn_decode_step_matches_LlamaAttention_with_cache(mode):
    # prefill 8 tokens into a DynamicCache, then one step: the DSL aligns the query to the last key
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    cfg = llama_config(8, 2)
    attn = redraw(LlamaAttention(cfg, layer_idx=0)).to(mode.storage)
    rope = LlamaRotaryEmbedding(cfg)
    B, S, D = 2, 9, cfg.head_dim
    x = mode.inp(torch.randn(B, S, cfg.hidden_size))
    pos = torch.arange(S).expand(B, S)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        pre = x[:, :-1]
        mask = create_causal_mask(config=cfg, inputs_embeds=pre, attention_mask=None, cache=None)
        attn(pre, position_embeddings=rope(pre, pos[:, :-1]), attention_mask=mask, cache=cache)
        want, _ = attn(x[:, -1:], position_embeddings=rope(x, pos[:, -1:]), attention_mask=None, cache=cache)
        q = heads(attn.q_proj(x[:, -1:]), D)
        k, v = heads(attn.k_proj(x), D), heads(attn.v_proj(x), D)
    (o,) = run("llama_attn", mode, {"q": q, "k": k, "v": v}, Hq=8, Hkv=2, D=D, theta=500000.0)
    with torch.no_grad():
        got = attn.o_proj(o.reshape(B, 1, -1))
    assert_matches(got, want, mode, **module_tol(mode, want))


def test_llama_attn_float64_matches_hf_rotation_and_head_repeat():
    # HF's own apply_rotary_pos_emb and repeat_kv in float64, attention written out (HF's eager
    # softmax runs in f32). The cos/sin tables follow compute_default_rope_parameters in float64.
    from transformers.models.llama import modeling_llama as llama
    B, S, Hq, Hkv, D, theta = 2, 7, 8, 2, 16, 500000.0
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    pos = torch.arange(S).expand(B, S) + 1000
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    qh, kh = llama.apply_rotary_pos_emb(qh, kh, emb.cos(), emb.sin())
    kh, vh = llama.repeat_kv(kh, Hq // Hkv), llama.repeat_kv(vh, Hq // Hkv)
    scores = qh @ kh.transpose(2, 3) * D ** -0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    want = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)
    (o,) = run("llama_attn", F64, {"q": q, "k": k, "v": v}, q_positions=pos, kv_positions=pos,
               Hq=Hq, Hkv=Hkv, D=D, theta=theta)
    assert_matches(o, want, F64)


# --------------------------------------------------------------------------- Gemma-2 attention
@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4)], ids=["gqa2", "mha"])
def test_gemma2_attn_matches_Gemma2Attention_soft_capped_sliding_window(mode, Hq, Hkv):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
    cfg = transformers.Gemma2Config(hidden_size=32, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=16,
                                    sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                    layer_types=["sliding_attention"], rope_theta=1000.0,
                                    attn_implementation="eager", **TINY)
    attn = redraw(Gemma2Attention(cfg, layer_idx=0), std=0.5).to(mode.storage)
    assert attn.sliding_window == 4
    B, S, D = 2, 10, cfg.head_dim  # longer than the window
    x = mode.inp(torch.randn(B, S, cfg.hidden_size))
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        cos_sin = Gemma2RotaryEmbedding(cfg)(x, pos)
        mask = create_sliding_window_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None)
        want, probs = attn(x, position_embeddings=cos_sin, attention_mask=mask)
        q, k, v = (heads(p(x), D) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert probs[..., -1, : S - 4].abs().max() == 0  # the window cuts keys off
    (o,) = run("gemma2_attn", mode, {"q": q, "k": k, "v": v}, config=cfg.to_dict(),
               theta=cfg.rope_parameters["rope_theta"], query_scalar=float(cfg.query_pre_attn_scalar))
    with torch.no_grad():
        got = attn.o_proj(o.reshape(B, S, -1))
        raw = torch.einsum("bihd,bjhd->bhij", q.float(), k.float().repeat_interleave(Hq // Hkv, 2)) / 24 ** 0.5
    assert raw.abs().max() > 2 * cfg.attn_logit_softcapping  # the cap is exercised
    assert_matches(got, want, mode, **module_tol(mode, want))


# --------------------------------------------------------------------------- GPT-2, BLOOM, BERT, T5
@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
def test_gpt2_attn_matches_GPT2Attention(mode):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    cfg = transformers.GPT2Config(n_embd=48, n_head=6, n_layer=1, vocab_size=11, attn_implementation="sdpa")
    attn = redraw(GPT2Attention(cfg, layer_idx=0), std=0.2).to(mode.storage)
    B, S, D = 2, 7, 8
    x = mode.inp(torch.randn(B, S, 48))
    with torch.no_grad():
        want, _ = attn(x)  # no mask: sdpa's own is_causal
        q, k, v = (heads(t, D) for t in attn.c_attn(x).split(48, dim=-1))
    (o,) = run("gpt2_attn", mode, {"q": q, "k": k, "v": v}, Hq=6, Hkv=6, D=D)
    with torch.no_grad():
        got = attn.c_proj(o.reshape(B, S, -1))
    assert_matches(got, want, mode, **module_tol(mode, want))


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("n_head", [6, 8])
def test_bloom_attn_matches_BloomAttention_with_alibi(mode, n_head):
    from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor
    cfg = transformers.BloomConfig(hidden_size=8 * n_head, n_head=n_head, n_layer=1, vocab_size=11,
                                   attn_implementation="eager")
    attn = redraw(BloomAttention(cfg, layer_idx=0), std=0.3).to(mode.storage)
    B, S, D = 2, 9, 8
    x = mode.inp(torch.randn(B, S, cfg.hidden_size))
    with torch.no_grad():
        alibi = build_alibi_tensor(torch.ones(B, S), n_head, x.dtype)
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=torch.ones(B, S), cache=None)
        want, _ = attn(x, torch.zeros_like(x), alibi, mask)
        fused = attn.query_key_value(x).view(B, S, n_head, 3, D)
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
    (o,) = run("bloom_attn", mode, {"q": q, "k": k, "v": v}, Hq=n_head, Hkv=n_head, D=D)
    with torch.no_grad():
        got = attn.dense(o.reshape(B, S, -1))
    assert_matches(got, want, mode, **module_tol(mode, want))


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
def test_bert_attn_matches_BertSelfAttention_with_padding_mask(mode):
    from transformers.models.bert.modeling_bert import BertSelfAttention
    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, vocab_size=11, num_hidden_layers=1,
                                  attn_implementation="eager")
    attn = redraw(BertSelfAttention(cfg, layer_idx=0), std=0.3).to(mode.storage)
    B, S, D = 3, 8, 8
    x = mode.inp(torch.randn(B, S, 32))
    lengths = torch.tensor([8, 5, 1])
    padding = (torch.arange(S)[None] < lengths[:, None]).long()
    with torch.no_grad():
        mask = create_bidirectional_mask(config=cfg, inputs_embeds=x, attention_mask=padding)
        want, _ = attn(x, attention_mask=mask)
        q, k, v = (heads(p(x), D) for p in (attn.query, attn.key, attn.value))
    (o,) = run("bert_attn", mode, {"q": q, "k": k, "v": v, "kv_len": lengths.to(torch.int32)}, Hq=4, Hkv=4, D=D)
    assert_matches(o, want.reshape(B, S, 4, D), mode, **module_tol(mode, want))


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
def test_t5_attn_matches_T5Attention_relative_bias(mode, is_decoder):
    from transformers.models.t5.modeling_t5 import T5Attention
    cfg = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, is_decoder=is_decoder, num_layers=1,
                                d_ff=16, vocab_size=11, attn_implementation="eager")
    attn = redraw(T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0), std=0.3).to(mode.storage)
    B, S, D = 2, 30, 8  # distances up to 29: log buckets and the clamp at max_distance
    x = mode.inp(torch.randn(B, S, 32))
    with torch.no_grad():
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None,
                                  allow_is_causal_skip=False) if is_decoder else None
        want, _, _ = attn(x, mask=mask)
        q, k, v = (heads(p(x), D) for p in (attn.q, attn.k, attn.v))
    rel_bias = attn.relative_attention_bias.weight.detach().float()
    (o,) = run("t5_attn", mode, {"q": q, "k": k, "v": v, "rel_bias": rel_bias}, Hq=4, Hkv=4, D=D, NB=8,
               max_distance=16, bidirectional=not is_decoder)
    with torch.no_grad():
        got = attn.o(o.reshape(B, S, -1))
    assert_matches(got, want, mode, **module_tol(mode, want))


# --------------------------------------------------------------------------- MoE routing
@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_moe_route_matches_Mixtral_router_and_moe_block(mode, top_k):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8,
                                     num_experts_per_tok=top_k, num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=11, num_hidden_layers=1)
    block = redraw(MixtralSparseMoeBlock(cfg), std=0.3).to(mode.storage)
    x = mode.inp(torch.randn(2, 5, 32))
    with torch.no_grad():
        logits, want_w, want_idx = block.gate(x)
        want_out = block(x)
    w, idx = run("moe_route", mode, {"logits": logits}, config=cfg.to_dict())
    # exact ties (bf16 logits have few values) go to the lowest index in the DSL; torch.topk
    # leaves their order open: where the choices differ, the logits must tie
    differ = idx.long() != want_idx
    assert torch.equal(logits.gather(-1, idx.long())[differ], logits.gather(-1, want_idx)[differ])
    assert_matches(w, want_w, F32, dtype=torch.float32)
    with torch.no_grad():  # the experts, weighted by the DSL's routing, give the block's output
        got = block.experts(x.view(-1, 32), want_idx, w).view_as(want_out)
    assert_matches(got, want_out, mode, **module_tol(mode, want_out))


@pytest.mark.parametrize("top_k,E", [(1, 8), (4, 16), (8, 64)])
@pytest.mark.parametrize("norm_topk_prob,scaling", [(True, 2.5), (False, 1.0)])
def test_moe_route_sigmoid_matches_DeepseekV3_router_with_one_group(top_k, E, norm_topk_prob, scaling):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=E, num_experts_per_tok=top_k, n_group=1,
                                        topk_group=1, norm_topk_prob=norm_topk_prob, routed_scaling_factor=scaling,
                                        moe_intermediate_size=8, num_attention_heads=4, num_key_value_heads=4,
                                        **TINY)
    router = redraw(DeepseekV3TopkRouter(cfg))
    router.e_score_correction_bias.normal_(0.0, 0.5)
    x = torch.randn(6, 32)
    with torch.no_grad():
        logits, want_w, want_idx = router(x)  # unsorted top-k
    w, idx = run("moe_route_sigmoid", F32, {"logits": logits, "bias": router.e_score_correction_bias},
                 config=cfg.to_dict(), scaling=scaling)
    order, want_order = idx.long().sort(dim=-1), want_idx.sort(dim=-1)
    assert torch.equal(order.values, want_order.values)
    assert_matches(w.gather(-1, order.indices), want_w.gather(-1, want_order.indices), F32, dtype=torch.float32)


# --------------------------------------------------------------------------- model configs
def test_config_binding_reads_rope_theta_from_a_transformers_5_config():
    layer = stdlib().specialise("llama_attn", dtype="f32", config=llama_config(8, 2).to_dict())
    assert dict(layer.consts).get("theta") == 500000.0


def test_config_binding_reads_gemma2_query_pre_attn_scalar():
    cfg = transformers.Gemma2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    query_pre_attn_scalar=24, **TINY)
    layer = stdlib().specialise("gemma2_attn", dtype="f32", config=cfg.to_dict())
    assert dict(layer.consts).get("query_scalar") == 24


def check_scaled_llama_attn(mode, rope: dict, max_position: int, **specialise_extra):
    """A LlamaAttention whose config carries `rope` (rope_parameters) against llama_attn built
    from the same config, at positions up to 9011 (past the original context); and without the
    scaling, the same inputs give a different answer (the check can fail). Returns the block."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    cfg = transformers.LlamaConfig(hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                   rope_parameters=rope, max_position_embeddings=max_position,
                                   attn_implementation="eager", **TINY)
    attn = redraw(LlamaAttention(cfg, layer_idx=0)).to(mode.storage)
    B, S, D = 2, 7, cfg.head_dim
    x = mode.inp(torch.randn(B, S, cfg.hidden_size))
    pos = (torch.arange(S) * 1500 + 11).expand(B, S)
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None)
        want, _ = attn(x, position_embeddings=cos_sin, attention_mask=mask)
        q, k, v = (heads(p(x), D) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    layer = lf.stdlib().specialise("llama_attn", config=cfg.to_dict(), dtype=mode.dsl_dtype, **specialise_extra)
    (o,) = run("llama_attn", mode, {"q": q, "k": k, "v": v}, q_positions=pos, kv_positions=pos, config=cfg.to_dict(),
               **specialise_extra)
    with torch.no_grad():
        got = attn.o_proj(o.reshape(B, S, -1))
    # transformers computes the angles in f32: position * 2^-24 rad of rounding (9011 * 6e-8 =
    # 5e-4 rad) against the float64 angles here, so f32 gets that much room
    tol = module_tol(mode, want) if mode is BF16 else {"rtol": 2e-3, "atol": 1e-3 * float(want.abs().max())}
    assert_matches(got, want, mode, **tol)
    (o0,) = run("llama_attn", mode, {"q": q, "k": k, "v": v}, q_positions=pos, kv_positions=pos,
                Hq=8, Hkv=2, D=D, theta=rope["rope_theta"])
    with torch.no_grad():
        assert not torch.allclose(attn.o_proj(o0.reshape(B, S, -1)).float(), want.float(), atol=1e-2)
    return layer


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama_attn_with_llama3_rope_scaling_matches_LlamaAttention(mode, factor):
    """Llama 3.1+ configs scale the rotary frequencies (rope_type "llama3"). With D 8 and theta
    500000 the four wavelengths (6, 167, 4446, 118k) fall in every band of the rule: kept,
    smoothed between original/high and original/low, and divided by the factor."""
    from layerforge.dsl.numerics import Llama3Scaling
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    layer = check_scaled_llama_attn(mode, rope, 131072)
    assert layer.function.outputs[0].arg.rope.scaling == Llama3Scaling(factor=factor, low_freq_factor=1.0,
                                                                       high_freq_factor=4.0, original_max_position=8192)


SCALED_ROPES = {  # D 8: four frequencies, spread over each rule's bands
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=500000.0, factor=16.0, original_max_position_embeddings=4096),
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.5, 2.0, 4.0],
                     long_factor=[1.0, 3.0, 9.0, 30.0], original_max_position_embeddings=4096),
}


@pytest.mark.parametrize("mode", [F32, BF16], ids=str)
@pytest.mark.parametrize("kind", list(SCALED_ROPES))
def test_llama_attn_with_a_configs_rope_scaling_matches_LlamaAttention(mode, kind):
    """linear, yarn (cos/sin scaled by its attention factor) and longrope (the long regime:
    positions past original_max_position) from a config's rope_parameters reach the block."""
    extra = {"rope_regime": "long"} if kind == "longrope" else {}
    layer = check_scaled_llama_attn(mode, SCALED_ROPES[kind], 65536, **extra)
    assert layer.function.outputs[0].arg.rope.scaling.rope_type == kind


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "yarn", "factor": 4.0}, "the model's RoPE scaling: yarn rope needs original_max_position"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' depends on the sequence length"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 4096}, "rope type 'longrope' depends on the sequence length"),
    ({"rope_type": "ntk-parts", "factor": 2.0}, "unknown rope type 'ntk-parts'"),
])
def test_rope_scalings_a_block_cannot_apply_are_clear_errors(rope, message):
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 8192, "rope_scaling": rope}
    with pytest.raises(lf.DSLError, match=message):
        stdlib().specialise("llama_attn", config=cfg, dtype="bf16")
    stdlib().specialise("rms_norm", config=cfg, dtype="bf16")   # layers without RoPE do not care


def test_a_rope_row_layer_does_not_drop_a_configs_scaling():
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    with pytest.raises(lf.DSLError, match="RoPE scaling 'yarn' is not applied by 'rope'"):
        stdlib().specialise("rope", config=cfg, dtype="bf16")


def test_llama3_inverse_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from layerforge.dsl.numerics import rope_inv_freq
    for factor, low, high, original in [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 4096)]:
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=low,
                    high_freq_factor=high, original_max_position_embeddings=original)
        cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters=rope,
                                       max_position_embeddings=131072)
        want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        assert attention_factor == 1.0
        got = rope_inv_freq(500000.0, 128, (factor, low, high, float(original)))
        torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)   # theirs is f32
        assert not torch.allclose(got, rope_inv_freq(500000.0, 128)), "the scaling must change something"


@pytest.mark.parametrize("mode", [F64, F32], ids=str)
def test_rope_llama3_layer_rotates_like_transformers(mode):
    """The row layer writes Llama 3's rule in the DSL. Expected: rotation by the float64
    frequencies that the test above checks against transformers."""
    from layerforge.dsl.numerics import rope_inv_freq
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, rope_parameters=rope,
                                   max_position_embeddings=131072)
    inv = rope_inv_freq(500000.0, 64, (8.0, 1.0, 4.0, 8192.0))
    pos = torch.tensor([0, 1, 100, 2047, 5000, 8191, 9000, 20000])
    x = torch.randn(len(pos), 3, 64, dtype=torch.float32).double()
    ang = pos.double()[:, None, None] * inv

    def rotate(a):
        x1, x2 = x[..., :32], x[..., 32:]
        return torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], dim=-1)

    layer = stdlib().specialise("rope_llama3", config=cfg.to_dict(), dtype=mode.dsl_dtype)
    (y,) = lf.evaluate(layer.function, {"x": mode.inp(x), "pos": pos.to(torch.int32)}, precision=mode.precision)
    # the f32 program computes the frequencies and angles in f32: ~ position * 2^-24 rad each
    atol = 1e-9 if mode is F64 else 20000 * 2.0**-24 * 8 * float(x.abs().max())
    torch.testing.assert_close(y.double(), rotate(ang), rtol=0, atol=atol)
    plain = pos.double()[:, None, None] * rope_inv_freq(500000.0, 64)
    assert (y.double() - rotate(plain)).abs().max() > 100 * atol, "the scaling must change the rotation"
