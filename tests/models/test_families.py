"""models/families.py: Hugging Face configs -> ModelSpec, checkpoints -> canonical names, and the
config binding (dims_from_config, module(config=...), build --config) that goes through it."""
import argparse
import inspect
import json

import pytest
import torch

import layerforge as lf
from layerforge.dsl.program import dims_from_config
from layerforge.models.families import (FAMILIES, bindings_from_spec, canonical_shapes, canonical_state_dict,
                                        definitions_for, hf_names, spec_from_config)
from layerforge.models.spec import AttentionSpec, ConfigError
from layerforge.runtime.moe import MoE, MoEConfig

transformers = pytest.importorskip("transformers")


def consts(spec, i=0):
    return spec.attention[i].const_dict()


# --------------------------------------------------------------------------- configs -> spec
LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 500000.0, "max_position_embeddings": 8192}


def test_llama():
    s = spec_from_config(LLAMA)
    assert (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size) == (64, 4, 2, 16, 96)
    assert (s.norm, s.norm_eps, s.activation, s.gated, s.residual) == ("rms", 1e-5, "silu", True, "sequential")
    assert not (s.qkv_bias or s.o_bias or s.mlp_bias or s.tie_word_embeddings or s.qk_norm)
    assert s.attention[0] == AttentionSpec(definition="decoder_attn", consts=(
        ("theta", 500000.0), ("rotary_dim", 0), ("window", 0), ("softcap", 0.0), ("query_scalar", 0.0)))
    assert len(s.attention) == 2


def test_llama_bias_keys_and_transformers_5_rope_parameters():
    s = spec_from_config({**LLAMA, "attention_bias": True, "mlp_bias": True, "head_dim": 32,
                          "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (s.qkv_bias, s.o_bias, s.mlp_bias, s.head_dim, consts(s)["theta"]) == (True, True, True, 32, 1e6)


def test_llama3_and_yarn_rope_scaling_go_in_the_attention_spec_and_reach_the_block():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    s = spec_from_config({**LLAMA, "rope_scaling": rope, "max_position_embeddings": 131072})
    params, maxpos = s.attention[0].rope_scaling
    assert dict(params) == {**rope, "rope_type": "llama3"} and maxpos == 131072
    b = dims_from_config({**LLAMA, "rope_scaling": rope})
    assert b["rope_factor"] == 8.0   # llama_attn's consts, as before
    for name in ("decoder_attn", "llama_attn"):
        layer = lf.stdlib().specialise(name, dtype="bf16", config={**LLAMA, "rope_scaling": rope})
        assert layer.function.outputs[0].arg.rope.scaling.rope_type == "llama3"
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = {**LLAMA, "rope_parameters": yarn, "max_position_embeddings": 131072}
    layer = lf.stdlib().specialise("decoder_attn", dtype="bf16", config=cfg)
    assert layer.function.outputs[0].arg.rope.scaling.rope_type == "yarn"
    assert dict(layer.consts)["theta"] == 1e6


def test_mistral_window_and_null_window():
    s = spec_from_config({**LLAMA, "model_type": "mistral", "sliding_window": 4096})
    assert [consts(s, i)["window"] for i in range(2)] == [4096, 4096]
    s = spec_from_config({**LLAMA, "model_type": "mistral", "sliding_window": None})
    assert consts(s)["window"] == 0


def test_qwen2_bias_and_sliding_window_rule():
    base = {**LLAMA, "model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 128}
    s = spec_from_config(base)
    assert (s.qkv_bias, s.o_bias) == (True, False)
    assert [a.const_dict()["window"] for a in s.attention] == [0, 0, 0, 0]
    s = spec_from_config({**base, "use_sliding_window": True, "max_window_layers": 2})
    assert [a.const_dict()["window"] for a in s.attention] == [0, 0, 128, 128]
    s = spec_from_config({**base, "use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert [a.const_dict()["window"] for a in s.attention] == [128, 0, 128, 0]


def test_qwen3_qk_norm_and_attention_bias():
    s = spec_from_config({**LLAMA, "model_type": "qwen3", "head_dim": 32, "attention_bias": True})
    assert (s.qk_norm, s.qkv_bias, s.o_bias, s.head_dim) == (True, True, True, 32)
    assert ("rms_norm", {"H": 32}) in definitions_for(s) and ("add_rms_norm", {"H": 32}) in definitions_for(s)


GEMMA = {"model_type": "gemma", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "gelu_pytorch_tanh"}


def test_gemma():
    s = spec_from_config(GEMMA)
    assert (s.norm, s.activation, s.gated, s.embed_scale, s.head_dim, s.tie_word_embeddings) == \
        ("rms_1p", "gelu_tanh", True, 8.0, 32, True)
    assert not s.sandwich_norms and s.final_logit_softcap is None
    # hidden_activation (older configs) wins; "gelu" is the tanh approximation's legacy name
    assert spec_from_config({**GEMMA, "hidden_activation": "gelu"}).activation == "gelu_tanh"


def test_gemma2_soft_caps_query_scalar_and_alternating_windows():
    cfg = {**GEMMA, "model_type": "gemma2", "sliding_window": 512, "attn_logit_softcapping": 50.0,
           "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 144, "hidden_activation": "gelu_pytorch_tanh"}
    s = spec_from_config(cfg)
    assert s.sandwich_norms and s.final_logit_softcap == 30.0
    assert [a.const_dict()["window"] for a in s.attention] == [512, 0, 512, 0]   # i % 2 == 0 slides
    assert consts(s)["softcap"] == 50.0 and consts(s)["query_scalar"] == 144.0
    s = spec_from_config({**cfg, "layer_types": ["full_attention"] * 3 + ["sliding_attention"]})
    assert [a.const_dict()["window"] for a in s.attention] == [0, 0, 0, 512]
    # one attention definition per distinct const set
    attn = [(n, b) for n, b in definitions_for(s) if n == "decoder_attn"]
    assert sorted(b["window"] for _, b in attn) == [0, 512]
    # the model-wide binding leaves out the window the layers disagree on
    assert "window" not in bindings_from_spec(s) and bindings_from_spec(s)["softcap"] == 50.0


def test_phi3_partial_rotary_and_window():
    cfg = {**LLAMA, "model_type": "phi3", "partial_rotary_factor": 0.5, "sliding_window": 2047,
           "rms_norm_eps": 1e-5}
    s = spec_from_config(cfg)
    assert consts(s)["rotary_dim"] == 8 and consts(s)["window"] == 2047 and not s.qkv_bias


def test_gemma3_text_layers_take_their_rope_and_window():
    """Gemma 3's older config keys (gemma-3-1b's): every sliding_window_pattern-th layer global with rope_theta and
    rope_scaling, the others sliding with rope_local_base_freq unscaled; the per-head q / k norms are Gemma's
    (1 + w) kernels; transformers 5's rope_parameters by layer type read the same."""
    cfg = {**LLAMA, "model_type": "gemma3_text", "head_dim": 16, "num_hidden_layers": 7, "sliding_window": 512,
           "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 256}
    s = spec_from_config(cfg)
    assert [a.const_dict()["window"] for a in s.attention] == [512] * 5 + [0, 512]
    assert [a.const_dict()["theta"] for a in s.attention] == [10000.0] * 5 + [1000000.0, 10000.0]
    assert [a.rope_scaling is not None for a in s.attention] == [False] * 5 + [True, False]
    assert s.qk_norm and s.sandwich_norms and s.norm == "rms_1p" and s.attention[0].const_dict()["query_scalar"] == 256
    assert ("gemma_rms_norm", {"H": 16}) in definitions_for(s)
    new = {**cfg, "rope_theta": None, "rope_local_base_freq": None, "rope_scaling": None, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}}
    assert spec_from_config(new).attention == s.attention
    with pytest.raises(ConfigError, match="rope_parameters.full_attention' must be an object"):
        spec_from_config({**new, "rope_parameters": {"sliding_attention": {"rope_theta": 10000.0}}})


NEOX = {"model_type": "gpt_neox", "vocab_size": 100, "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "layer_norm_eps": 1e-5, "use_parallel_residual": True, "hidden_act": "gelu"}


def test_gpt_neox():
    s = spec_from_config(NEOX)
    assert (s.residual, s.norm, s.norm_bias, s.gated, s.activation, s.qkv_bias, s.mlp_bias) == \
        ("parallel", "layer", True, False, "gelu", True, True)
    assert consts(s)["rotary_dim"] == 16 and consts(s)["theta"] == 10000.0
    s = spec_from_config({**NEOX, "use_parallel_residual": False, "rotary_pct": None,
                          "rope_parameters": {"rope_theta": 5000.0, "partial_rotary_factor": 0.5}})
    assert s.residual == "sequential" and consts(s)["rotary_dim"] == 32 and consts(s)["theta"] == 5000.0


FALCON = {"model_type": "falcon", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 8, "layer_norm_epsilon": 1e-5, "bias": False, "alibi": False}


@pytest.mark.parametrize("extra, residual, kv", [
    ({"multi_query": True, "parallel_attn": True}, "parallel_shared", 1),          # falcon-7b
    ({"multi_query": False, "parallel_attn": False}, "sequential", 8),            # falcon-rw
    ({"new_decoder_architecture": True, "num_kv_heads": 2}, "parallel", 2),       # falcon-40b
    ({"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1}, "parallel_shared", 2),
])
def test_falcon_variants(extra, residual, kv):
    s = spec_from_config({**FALCON, **extra})
    assert (s.residual, s.num_kv_heads, s.intermediate_size, s.norm, s.activation) == (residual, kv, 256, "layer", "gelu")
    assert s.attention[0].definition == "decoder_attn"


@pytest.mark.parametrize("heads", [4, 6])
def test_falcon_alibi_uses_its_own_block_and_matches_FalconAttention(heads):
    """Falcon adds ALiBi before the 1/sqrt(D) scaling: falcon_alibi_attn, not bloom_attn (which
    gives a different answer here)."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor
    cfg = transformers.FalconConfig(vocab_size=64, hidden_size=heads * 8, num_hidden_layers=1,
                                    num_attention_heads=heads, multi_query=False, alibi=True, bias=True,
                                    parallel_attn=False, attn_implementation="eager")
    spec = spec_from_config(cfg)
    assert spec.attention[0] == AttentionSpec(definition="falcon_alibi_attn", consts=(("max_bias", 8.0),))
    assert spec.positions == "alibi"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    attn = model.transformer.h[0].self_attention
    B, S, D = 2, 9, 8
    x = torch.randn(B, S, cfg.hidden_size)
    causal = torch.full((S, S), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        alibi = build_alibi_tensor(torch.ones(B, S), heads, torch.float32)
        if "alibi" in inspect.signature(type(attn).forward).parameters:   # transformers before 5.25
            want, _ = attn(x, alibi=alibi, attention_mask=causal, output_attentions=True)
        else:   # later: FalconModel adds alibi / sqrt(D) to the mask, the same bias before the 1/sqrt(D) scaling
            mask = (alibi.reshape(B, heads, 1, S) / D ** 0.5).masked_fill(causal < -1, torch.finfo(torch.float32).min)
            want, _ = attn(x, attention_mask=mask, output_attentions=True)
        out = canonical_state_dict(spec, model.state_dict())
        y = x @ out["layers.0.attn.qkv.weight"].T + out["layers.0.attn.qkv.bias"]
        q, k, v = (t.reshape(B, S, heads, D) for t in y.split(heads * D, dim=-1))
    results = {}
    for name in ("falcon_alibi_attn", "bloom_attn"):
        layer = lf.stdlib().specialise(name, dtype="f32", Hq=heads, Hkv=heads, D=D)
        (o,) = lf.evaluate(layer.function, {"q": q, "k": k, "v": v})
        with torch.no_grad():
            results[name] = attn.dense(o.reshape(B, S, -1))
    # transformers rounds slope * position to bf16 for non-power-of-two head counts
    tol = dict(rtol=1e-4, atol=1e-4) if heads & (heads - 1) == 0 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results["falcon_alibi_attn"], want, **tol)
    assert not torch.allclose(results["bloom_attn"], want, rtol=1e-2, atol=1e-2)


GPT2 = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": None,
        "n_positions": 128, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}


def test_gpt2():
    s = spec_from_config(GPT2)
    assert (s.hidden_size, s.num_heads, s.head_dim, s.intermediate_size, s.num_layers) == (64, 4, 16, 256, 2)
    assert (s.positions, s.max_positions, s.activation, s.gated, s.tie_word_embeddings) == \
        ("learned", 128, "gelu_tanh", False, True)
    assert s.attention[0] == AttentionSpec(definition="gpt2_attn")
    assert spec_from_config({**GPT2, "n_inner": 100}).intermediate_size == 100


BLOOM = {"model_type": "bloom", "vocab_size": 100, "hidden_size": 64, "n_head": 4, "n_layer": 2,
         "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": False}


def test_bloom():
    s = spec_from_config(BLOOM)
    assert (s.embed_norm, s.positions, s.activation, s.intermediate_size, s.qkv_bias, s.mlp_bias) == \
        (True, "alibi", "gelu_tanh", 256, True, True)
    assert s.attention[0] == AttentionSpec(definition="bloom_attn", consts=(("max_bias", 8.0),))
    with pytest.raises(ConfigError, match="'apply_residual_connection_post_layernorm' true is not supported"):
        spec_from_config({**BLOOM, "apply_residual_connection_post_layernorm": True})


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 20, 112])
def test_bloom_alibi_slopes_are_transformers(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from layerforge.dsl.numerics import alibi_slopes
    alibi = build_alibi_tensor(torch.ones(1, 3), heads, torch.float64)   # slope * position
    torch.testing.assert_close(alibi[:, 0, 1], alibi_slopes(heads, 8.0), rtol=1e-6, atol=0)


MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}
QWEN2_MOE = {**LLAMA, "model_type": "qwen2_moe", "num_hidden_layers": 6, "num_experts": 8, "num_experts_per_tok": 4,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 80, "decoder_sparse_step": 2,
             "mlp_only_layers": [3]}
QWEN3_MOE = {**LLAMA, "model_type": "qwen3_moe", "head_dim": 32, "num_experts": 16, "num_experts_per_tok": 4,
             "moe_intermediate_size": 32, "norm_topk_prob": True}


def test_mixtral_every_layer_is_an_moe_layer_of_renormalised_top_k():
    s = spec_from_config(MIXTRAL)
    assert s.moe == MoEConfig(hidden=64, inter=96, experts=8, top_k=2, norm_topk_prob=True)
    assert s.moe_layers == (True, True) and s.is_moe(1) and consts(s)["window"] == 0
    s = spec_from_config({**MIXTRAL, "sliding_window": 4096})
    assert [consts(s, i)["window"] for i in range(2)] == [4096, 4096]


def test_qwen2_moe_sparse_step_mlp_only_layers_and_the_gated_shared_expert():
    s = spec_from_config(QWEN2_MOE)
    assert s.moe_layers == (False, True, False, False, False, True)    # (i + 1) % 2 == 0, not layer 3
    assert s.moe == MoEConfig(hidden=64, inter=32, experts=8, top_k=4, norm_topk_prob=False, shared_inter=80,
                              shared_gate=True)
    assert (s.intermediate_size, s.qkv_bias, s.o_bias, s.qk_norm) == (96, True, False, False)
    assert not spec_from_config({**QWEN2_MOE, "qkv_bias": False}).qkv_bias
    # without layer_types, transformers 5 slides the even layers below max_window_layers
    s = spec_from_config({**QWEN2_MOE, "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 4})
    assert [a.const_dict()["window"] for a in s.attention] == [128, 0, 128, 0, 0, 0]


def test_qwen3_moe_qk_norms_and_only_moe_layers():
    s = spec_from_config(QWEN3_MOE)
    assert (s.qk_norm, s.moe_layers, s.moe.norm_topk_prob, s.moe.experts, s.moe.shared_inter) == \
        (True, (True, True), True, 16, 0)
    assert [a.const_dict()["window"] for a in s.attention] == [0, 0]
    s = spec_from_config({**QWEN3_MOE, "use_sliding_window": True, "sliding_window": 64})
    assert [a.const_dict()["window"] for a in s.attention] == [64, 64]   # every layer (Qwen3MoeAttention)
    # transformers 5 saves num_experts as num_local_experts; a model of MoE layers needs no intermediate_size
    cfg = {k: v for k, v in QWEN3_MOE.items() if k not in ("num_experts", "intermediate_size")}
    s = spec_from_config({**cfg, "num_local_experts": 16})
    assert s.moe.experts == 16 and s.intermediate_size == 32


def test_moe_bindings_and_definitions():
    s = spec_from_config(QWEN2_MOE)
    b = bindings_from_spec(s)
    assert (b["E"], b["k"], b["renormalize"], b["F"]) == (8, 4, False, 96)
    defs = definitions_for(s)
    assert ("moe_route", {"E": 8, "k": 4, "renormalize": False}) in defs
    assert ("swiglu", {"F": 96}) in defs and ("swiglu", {"F": 32}) in defs   # dense layers, experts
    defs = definitions_for(spec_from_config(MIXTRAL))
    assert [b for n, b in defs if n == "swiglu"] == [{"F": 96}]
    assert ("moe_route", {"E": 8, "k": 2, "renormalize": True}) in defs
    assert [b for n, b in definitions_for(spec_from_config(QWEN3_MOE)) if n == "swiglu"] == [{"F": 32}]
    layer = lf.stdlib().specialise("moe_route", dtype="bf16", config=MIXTRAL)
    assert dict(layer.consts) == {"k": 2, "renormalize": True} and dict(layer.dims) == {"E": 8}


def test_a_config_file_path_and_a_pretrained_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert spec_from_config(tmp_path / "config.json") == spec_from_config(LLAMA)
    assert spec_from_config(str(tmp_path)) == spec_from_config(LLAMA)
    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    assert spec_from_config(cfg) == spec_from_config(LLAMA)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cfg, message", [
    ({"model_type": "foo"}, "config.json: model_type 'foo' is not supported (supported: llama, granite, mistral"),
    ({"hidden_size": 8}, "config.json: missing 'model_type'"),
    ({k: v for k, v in LLAMA.items() if k != "num_attention_heads"}, "llama config: missing 'num_attention_heads'"),
    ({k: v for k, v in GPT2.items() if k != "n_embd"}, "gpt2 config: missing 'n_embd'"),
    ({k: v for k, v in BLOOM.items() if k != "n_head"}, "bloom config: missing 'n_head'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "ntk-parts", "factor": 2.0}}, "llama config: rope_type 'ntk-parts' is not supported"),
    ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     "llama config: rope_parameters: yarn rope needs original_max_position"),
    ({**NEOX, "rotary_pct": 0.05}, "gpt_neox config: rotary dim 3 (head_dim 64 * partial_rotary_factor 0.05) is not "
                                 "a positive even number"),
    ({**LLAMA, "hidden_size": 66}, "llama config: hidden size 66 is not a multiple of num_attention_heads 4"),
    ({**LLAMA, "num_key_value_heads": 3}, "llama config: 'num_key_value_heads' 3 does not divide num_attention_heads 4"),
    ({**LLAMA, "hidden_act": "tanh"}, "llama config: 'hidden_act' 'tanh' is not supported (supported: gelu"),
    ({**LLAMA, "hidden_act": "relu"}, "llama config: 'hidden_act' relu is not supported in a gated MLP"),
    ({**LLAMA, "num_hidden_layers": "2"}, "llama config: 'num_hidden_layers' must be an integer"),
    ({**GEMMA, "model_type": "gemma2", "layer_types": ["sliding_attention"]},
     "gemma2 config: 'layer_types' must list one type per layer (4)"),
    ({**LLAMA, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": None},
     "qwen2 config: 'use_sliding_window' is true but 'sliding_window' is null"),
    ({**GPT2, "scale_attn_by_inverse_layer_idx": True}, "gpt2 config: 'scale_attn_by_inverse_layer_idx' true"),
    ({**FALCON, "multi_query": False, "num_kv_heads": 2}, "falcon config: 'num_kv_heads' 2 != num_attention_heads 8"),
    ({k: v for k, v in MIXTRAL.items() if k != "num_experts_per_tok"}, "mixtral config: missing 'num_experts_per_tok'"),
    ({**MIXTRAL, "num_experts_per_tok": 9}, "mixtral config: top_k 9 > experts 8"),
    ({**QWEN2_MOE, "mlp_only_layers": "3"}, "qwen2_moe config: 'mlp_only_layers' must be a list of layer indices"),
    ({k: v for k, v in QWEN2_MOE.items() if k != "shared_expert_intermediate_size"},
     "qwen2_moe config: missing 'shared_expert_intermediate_size'"),
    ({k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}, "qwen3_moe config: missing 'num_experts'"),
])
def test_errors_are_one_line_and_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as e:
        spec_from_config(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the config binding's defects
def test_mistral_null_window_binds_no_window():
    cfg = {**LLAMA, "model_type": "mistral", "sliding_window": None}
    assert dims_from_config(cfg)["window"] == 0
    for name in ("decoder_attn", "mistral_attn"):   # mistral_attn's default was 4096
        layer = lf.stdlib().specialise(name, dtype="bf16", config=cfg)
        assert dict(layer.consts)["window"] == 0


def test_mistral_window_0_means_no_window_in_the_reference():
    q = torch.randn(1, 6, 2, 8)
    k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    outs = []
    for name, extra in [("mistral_attn", {"window": 0}), ("decoder_attn", {}), ("gemma2_attn", {"window": 0, "softcap": 0.0})]:
        layer = lf.stdlib().specialise(name, dtype="f32", Hq=2, Hkv=2, D=8, **extra)
        (o,) = lf.evaluate(layer.function, {"q": q, "k": k, "v": v})
        outs.append(o)
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[2], outs[1])


def test_falcon_num_kv_heads_binds_hkv():
    b = dims_from_config({**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2})
    assert (b["Hq"], b["Hkv"], b["D"], b["F"]) == (8, 2, 8, 256)
    assert dims_from_config({**FALCON, "multi_query": True})["Hkv"] == 1


def test_gpt_neox_rotary_pct_binds_the_rotary_dim():
    b = dims_from_config(NEOX)
    assert b["rotary_dim"] == 16 and b["theta"] == 10000.0
    layer = lf.stdlib().specialise("decoder_attn", dtype="bf16", config=NEOX)
    assert layer.function.outputs[0].arg.rope.rotary_dim == 16


def test_gpt2_keys_bind_dims():
    b = dims_from_config(GPT2)
    assert {k: b[k] for k in ("H", "Hq", "Hkv", "D", "F")} == {"H": 64, "Hq": 4, "Hkv": 4, "D": 16, "F": 256}
    layer = lf.stdlib().specialise("gpt2_attn", dtype="bf16", config=GPT2)
    assert dict(layer.dims) == {"D": 16, "Hkv": 4, "Hq": 4}


def test_qwen2_without_use_sliding_window_binds_no_window():
    cfg = {**LLAMA, "model_type": "qwen2", "sliding_window": 131072, "use_sliding_window": False}
    assert dims_from_config(cfg)["window"] == 0
    assert dict(lf.stdlib().specialise("decoder_attn", dtype="bf16", config=cfg).consts)["window"] == 0


@pytest.mark.parametrize("name, cfg, eps", [("rms_norm", {**LLAMA, "rms_norm_eps": 1e-5}, 1e-5),
                                            ("gemma_rms_norm", {**GEMMA, "rms_norm_eps": 3e-6}, 3e-6),
                                            ("layer_norm", {**GPT2, "layer_norm_epsilon": 2e-5}, 2e-5)])
def test_module_takes_eps_from_the_config(name, cfg, eps):
    from layerforge.runtime.layers import module
    m = module(name, config=cfg, dtype="f32")
    assert m._scalars["eps"] == eps
    assert module(name, config=cfg, dtype="f32", eps=0.5)._scalars["eps"] == 0.5   # explicit wins
    assert dims_from_config(cfg)["eps"] == eps


def test_configs_without_a_known_model_type_bind_as_before():
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "sliding_window": 128, "rope_theta": 1e4}
    assert dims_from_config(cfg) == {"H": 64, "Hq": 4, "Hkv": 4, "D": 16, "theta": 1e4, "window": 128}
    glm = {**cfg, "model_type": "glm4_moe", "n_routed_experts": 8}   # not a family: read by key names
    assert dims_from_config(glm)["E"] == 8


def test_a_config_the_registry_refuses_is_an_error_in_the_binding():
    with pytest.raises(ConfigError, match="bloom config: 'apply_residual_connection_post_layernorm' true"):
        dims_from_config({**BLOOM, "apply_residual_connection_post_layernorm": True})


# --------------------------------------------------------------------------- build --config
def build_args(config, **kw):
    return argparse.Namespace(config=str(config), layers=None, file=None, dims=None, **kw)


def test_build_picks_only_the_models_definitions(tmp_path):
    from layerforge.runtime.build import model_definitions
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GEMMA, "model_type": "gemma2", "sliding_window": 512,
                                "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 144}))
    defs = model_definitions(lf.stdlib(), build_args(path))
    names = [n for n, _ in defs]
    assert names == ["gemma_rms_norm", "add_gemma_rms_norm", "geglu_tanh", "decoder_attn", "decoder_attn"]
    assert [b["window"] for n, b in defs if n == "decoder_attn"] == [512, 0]
    # --layers, a DSL file, or a config of no known model_type: every definition the bindings fit, as before
    assert model_definitions(lf.stdlib(), argparse.Namespace(config=str(path), layers="rms_norm", file=None,
                                                             dims=None)) is None
    (tmp_path / "other.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    assert model_definitions(lf.stdlib(), build_args(tmp_path / "other.json")) is None
    # --dims override the definitions' bindings
    defs = model_definitions(lf.stdlib(), argparse.Namespace(config=str(path), layers=None, file=None,
                                                             dims=["theta=20000.0"]))
    assert all(b["theta"] == 20000.0 for n, b in defs if n == "decoder_attn")


def test_plans_for_model_takes_per_definition_bindings():
    pytest.importorskip("layerforge.runtime.nvrtc")
    from layerforge.runtime.build import plans_for_model
    spec = spec_from_config({**LLAMA, "model_type": "qwen3", "head_dim": 32})
    defs = [(n, b) for n, b in definitions_for(spec) if n in ("rms_norm", "swiglu")]
    plans, skipped = plans_for_model(lf.stdlib(), bindings_from_spec(spec), "bf16", "sm_90", definitions=defs)
    assert not skipped
    assert sorted(p.key for p in plans) == ["rms_norm_h32_bf16_sm90", "rms_norm_h64_bf16_sm90", "swiglu_f96_bf16_sm90"]


# --------------------------------------------------------------------------- checkpoints
TINY = dict(vocab_size=64, num_hidden_layers=2)


def hf_configs():
    t = transformers
    return {
        "llama": t.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                               attention_bias=True, **TINY),
        "mistral": t.MistralConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   **TINY),
        "qwen2": t.Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, **TINY),
        "qwen3": t.Qwen3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, **TINY),
        "gemma": t.GemmaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=16, **TINY),
        "gemma2": t.Gemma2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, **TINY),
        "granite": t.GraniteConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   residual_multiplier=0.5, **TINY),
        "gemma3_text": t.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, **TINY),
        "phi3": t.Phi3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=0, **TINY),
        "gpt_neox": t.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, **TINY),
        "falcon_mq": t.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=True, bias=True, **TINY),
        "falcon_mha": t.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=False, parallel_attn=False,
                                     **TINY),
        "falcon_new": t.FalconConfig(hidden_size=32, num_attention_heads=8, num_kv_heads=2,
                                     new_decoder_architecture=True, **TINY),
        "gpt2": t.GPT2Config(n_embd=32, n_head=4, n_positions=16, vocab_size=64, n_layer=2, bos_token_id=0,
                             eos_token_id=0),
        "bloom": t.BloomConfig(hidden_size=32, n_head=4, vocab_size=64, n_layer=2),
        "mixtral": t.MixtralConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   num_local_experts=4, num_experts_per_tok=2, **TINY),
        "qwen2_moe": t.Qwen2MoeConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, decoder_sparse_step=2,
                                      **{**TINY, "num_hidden_layers": 4}),
        "qwen3_moe": t.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                      **TINY),
    }


@pytest.fixture(scope="module")
def hf_models():
    torch.manual_seed(0)
    out = {}
    for name, cfg in hf_configs().items():
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        for p in model.parameters():   # biases and norms non-trivial, so a misplaced row shows
            torch.nn.init.normal_(p, std=0.5)
        out[name] = (cfg, model)
    return out


def test_every_family_is_covered():
    # DeepSeek's latent attention has no q/k/v rows: tests/models/test_deepseek.py covers its families
    assert {k.split("_")[0] if k.startswith("falcon") else k for k in hf_configs()} == \
        set(FAMILIES) - {"deepseek_v2", "deepseek_v3"}


@pytest.mark.parametrize("name", list(hf_configs()))
def test_canonical_state_dict_names_and_shapes(hf_models, name):
    cfg, model = hf_models[name]
    spec = spec_from_config(cfg)
    sd = model.state_dict()
    out = canonical_state_dict(spec, sd)
    assert {k: tuple(v.shape) for k, v in out.items()} == canonical_shapes(spec)
    assert ("lm_head.weight" in out) == (not spec.tie_word_embeddings)
    assert set(hf_names(spec)) == set(out)


@pytest.mark.parametrize("name", list(hf_configs()))
def test_canonical_qkv_rows_reproduce_the_hf_projections(hf_models, name):
    cfg, model = hf_models[name]
    spec = spec_from_config(cfg)
    out = canonical_state_dict(spec, model.state_dict())
    Hq, Hkv, D, H = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    B, S = 2, 5
    x = torch.randn(B, S, H)
    for i in range(spec.num_layers):
        w, b = out[f"layers.{i}.attn.qkv.weight"], out.get(f"layers.{i}.attn.qkv.bias")
        y = x @ w.T + (b if b is not None else 0)
        q, k, v = y.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        got = (q.view(B, S, Hq, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D))
        with torch.no_grad():
            want = hf_qkv(name, model, i, x, cfg)
        for g, wnt, what in zip(got, want, "qkv"):
            torch.testing.assert_close(g, wnt, rtol=1e-5, atol=1e-4, msg=f"{name} layer {i} {what}")
        # the output projection and the MLP's first projection too
        with torch.no_grad():
            o_in = torch.randn(B, S, Hq * D)
            o_w, o_b = out[f"layers.{i}.attn.o.weight"], out.get(f"layers.{i}.attn.o.bias")
            torch.testing.assert_close(o_in @ o_w.T + (o_b if o_b is not None else 0), hf_o(name, model, i, o_in),
                                       rtol=1e-5, atol=1e-4)


def hf_qkv(name, model, i, x, cfg):
    """transformers' q [B, S, Hq, D], k and v [B, S, Hkv, D] for layer i's input x (before RoPE)."""
    B, S, _ = x.shape
    if name in ("llama", "granite", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral",
                "qwen2_moe", "qwen3_moe"):
        a = model.model.layers[i].self_attn
        D = a.head_dim
        return tuple(p(x).view(B, S, -1, D) for p in (a.q_proj, a.k_proj, a.v_proj))
    if name == "phi3":
        a = model.model.layers[i].self_attn
        D, Hq, Hkv = a.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = a.qkv_proj(x)
        qp = Hq * D
        return (qkv[..., :qp].view(B, S, Hq, D), qkv[..., qp:qp + Hkv * D].view(B, S, Hkv, D),
                qkv[..., qp + Hkv * D:].view(B, S, Hkv, D))
    if name == "gpt_neox":
        a = model.gpt_neox.layers[i].attention
        qkv = a.query_key_value(x).view(B, S, -1, 3 * a.head_size)
        return qkv.chunk(3, dim=-1)
    if name.startswith("falcon"):
        a = model.transformer.h[i].self_attention
        fused = a.query_key_value(x)
        if hasattr(a, "_split_heads"):   # transformers before 5.25: its own split
            q, k, v = a._split_heads(fused)
            if a.new_decoder_architecture:   # keys/values broadcast to every query head: one per group
                g = a.num_heads // cfg.num_kv_heads
                k, v = k[:, :, ::g], v[:, :, ::g]
            return q, k, v
        # later ones split in forward, the same layouts: per KV group its queries, then its key and its value
        # (the new architecture); every query head, then one key and one value (multi-query); per head its
        # query, key and value (the original multi-head)
        if a.new_decoder_architecture:
            grouped = fused.view(B, S, cfg.num_kv_heads, -1, a.head_dim)
            return grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
        if a.multi_query:
            return fused.view(B, S, -1, a.head_dim).split([a.num_heads, 1, 1], dim=2)
        return fused.view(B, S, a.num_heads, 3, a.head_dim).unbind(3)
    if name == "gpt2":
        a = model.transformer.h[i].attn
        q, k, v = a.c_attn(x).split(a.split_size, dim=2)
        return tuple(t.view(B, S, a.num_heads, a.head_dim) for t in (q, k, v))
    if name == "bloom":
        a = model.transformer.h[i].self_attention
        fused = a.query_key_value(x).view(B, S, a.num_heads, 3, a.head_dim)
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
    raise AssertionError(name)


def hf_o(name, model, i, o):
    if name in ("llama", "granite", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
                "qwen2_moe", "qwen3_moe"):
        # (Granite's branch output, times residual_multiplier: folded into the canonical o weight)
        return model.model.layers[i].self_attn.o_proj(o) * getattr(model.config, "residual_multiplier", 1.0)
    if name == "gpt_neox":
        return model.gpt_neox.layers[i].attention.dense(o)
    if name.startswith("falcon") or name == "bloom":
        return model.transformer.h[i].self_attention.dense(o)
    if name == "gpt2":
        return model.transformer.h[i].attn.c_proj(o)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["gpt2", "phi3", "gemma2", "gpt_neox", "falcon_new"])
def test_canonical_mlp_and_norm_weights_reproduce_the_hf_modules(hf_models, name):
    cfg, model = hf_models[name]
    spec = spec_from_config(cfg)
    out = canonical_state_dict(spec, model.state_dict())
    x = torch.randn(3, spec.hidden_size)
    up = "gate_up" if spec.gated else "up"
    y = x @ out[f"layers.0.mlp.{up}.weight"].T + out.get(f"layers.0.mlp.{up}.bias", 0)
    with torch.no_grad():
        if name == "gpt2":
            torch.testing.assert_close(y, model.transformer.h[0].mlp.c_fc(x), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(out["pos_embed.weight"], model.transformer.wpe.weight)
        elif name == "phi3":
            torch.testing.assert_close(y, model.model.layers[0].mlp.gate_up_proj(x), rtol=1e-5, atol=1e-4)
        elif name == "gemma2":
            mlp = model.model.layers[0].mlp
            torch.testing.assert_close(y, torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), rtol=1e-5, atol=1e-4)
            layer = model.model.layers[0]
            assert torch.equal(out["layers.0.post_attn_norm.weight"], layer.post_attention_layernorm.weight)
            assert torch.equal(out["layers.0.mlp_norm.weight"], layer.pre_feedforward_layernorm.weight)
            assert torch.equal(out["layers.0.post_mlp_norm.weight"], layer.post_feedforward_layernorm.weight)
        elif name == "gpt_neox":
            torch.testing.assert_close(y, model.gpt_neox.layers[0].mlp.dense_h_to_4h(x), rtol=1e-5, atol=1e-4)
            assert torch.equal(out["lm_head.weight"], model.lm_head.weight)
        elif name == "falcon_new":
            assert torch.equal(out["layers.0.attn_norm.weight"], model.transformer.h[0].ln_attn.weight)
            assert torch.equal(out["layers.0.mlp_norm.bias"], model.transformer.h[0].ln_mlp.bias)


def test_checkpoint_names_without_the_base_prefix_and_ignored_buffers(hf_models):
    cfg, model = hf_models["gpt2"]
    spec = spec_from_config(cfg)
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 16, 16)        # old GPT-2 checkpoints' causal-mask buffers
    sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    out = canonical_state_dict(spec, sd)
    assert set(out) == set(canonical_shapes(spec))
    cfg, model = hf_models["gpt_neox"]     # hub checkpoints name the head embed_out
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    assert torch.equal(canonical_state_dict(spec_from_config(cfg), sd)["lm_head.weight"], model.lm_head.weight)


def test_a_missing_or_unexpected_tensor_is_an_error_naming_it(hf_models):
    cfg, model = hf_models["llama"]
    spec = spec_from_config(cfg)
    sd = dict(model.state_dict())
    del sd["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ConfigError, match=r"^checkpoint: missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        canonical_state_dict(spec, sd)
    sd = {**model.state_dict(), "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    with pytest.raises(ConfigError, match=r"^checkpoint: unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        canonical_state_dict(spec, sd)
    sd = {**model.state_dict(), "model.embed_tokens.weight": torch.zeros(64, 31)}
    with pytest.raises(ConfigError, match=r"^checkpoint: embed.weight has shape \[64, 31\], the config says \[64, 32\]"):
        canonical_state_dict(spec, sd)


MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def hub_tensors(model, folder):
    """The model's tensors as save_pretrained writes them: the Hub's names, one tensor an expert."""
    from safetensors.torch import load_file
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("name", MOE)
def test_moe_experts_load_from_hub_names_and_from_stacked_names_alike(hf_models, name, tmp_path):
    cfg, model = hf_models[name]
    spec = spec_from_config(cfg)
    hub = hub_tensors(model, tmp_path)
    assert any(".experts.0." in k for k in hub) and not any(k.endswith("experts.down_proj") for k in hub)
    stacked = model.state_dict()    # transformers 5 in memory: experts.gate_up_proj [E, 2F, H], experts.down_proj
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in stacked)
    a, b = canonical_state_dict(spec, hub), canonical_state_dict(spec, stacked)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: tuple(v.shape) for k, v in a.items()} == canonical_shapes(spec)


@pytest.mark.parametrize("name", MOE)
def test_canonical_moe_weights_reproduce_the_hf_blocks(hf_models, name, tmp_path):
    """Each MoE layer's canonical tensors (from the Hub's per-expert names) in runtime/moe.MoE give
    the transformers block's output; Qwen2-MoE's dense layers keep the dense MLP's names."""
    cfg, model = hf_models[name]
    spec = spec_from_config(cfg)
    out = canonical_state_dict(spec, hub_tensors(model, tmp_path))
    x = torch.randn(7, spec.hidden_size) * 0.1
    for i in range(spec.num_layers):
        prefix = f"layers.{i}.mlp."
        mine = {k.removeprefix(prefix): v for k, v in out.items() if k.startswith(prefix)}
        with torch.no_grad():
            want = model.model.layers[i].mlp(x[None])[0]
        if not spec.is_moe(i):
            assert set(mine) == {"gate_up.weight", "down.weight"}
            g, u = (x @ mine["gate_up.weight"].T).chunk(2, dim=-1)
            got = (torch.nn.functional.silu(g) * u) @ mine["down.weight"].T
        else:
            moe = MoE(spec.moe, dtype=torch.float32)
            moe.load_state_dict(mine, strict=True)
            got = moe(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=f"{name} layer {i}")
    assert [spec.is_moe(i) for i in range(spec.num_layers)] == \
        ([False, True, False, True] if name == "qwen2_moe" else [True, True])


def test_a_missing_expert_is_an_error_naming_it(hf_models, tmp_path):
    cfg, model = hf_models["mixtral"]
    hub = hub_tensors(model, tmp_path)
    del hub["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(ConfigError, match=r"^checkpoint: missing tensor 'model.layers.1.block_sparse_moe.experts.3.w2"):
        canonical_state_dict(spec_from_config(cfg), hub)
