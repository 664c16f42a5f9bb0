"""DeepSeek-V2/V3 (latent attention, models/deepseek.py) on the CPU: configs -> ModelSpec, the
checkpoint's names (the Hub's and transformers 5's), and the step API over the latent cache:
ragged steps that mix prompt chunks with decoding sequences give transformers' logits.
(tests/models/test_pretrained.py runs every family's logits and greedy generation, these too.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import layerforge as lf
from layerforge.dsl.program import dims_from_config
from layerforge.models.deepseek import DeepseekModel, step_positions
from layerforge.models.engine import Engine, generate
from layerforge.models.families import (canonical_shapes, canonical_state_dict, definitions_for, mla_shapes,
                                        spec_from_config)
from layerforge.models.spec import ConfigError
from layerforge.runtime.mla import MLAAttention, MLAConfig
from layerforge.runtime.mla_cache import PagedLatentCache
from layerforge.runtime.moe import MoE

from .hf_tiny import MLA_FAMILIES, make_tiny, tiny_configs, tiny_loader

transformers = pytest.importorskip("transformers")


def hf_config(name: str):
    cls, kwargs = tiny_configs()[name]
    return getattr(transformers, cls)(**kwargs)


def config(name: str) -> dict:
    return hf_config(name).to_dict()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loader(tmp_path_factory, head_dim=16, dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------- configs -> spec
def test_deepseek_v3_spec_has_latent_attention_dense_then_grouped_moe_layers():
    s = spec_from_config(config("deepseek_v3"))
    assert s.mla == MLAConfig.from_hf(config("deepseek_v3")) and s.mla.q_lora_rank == 48
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 1, 32 + 32)   # one latent "head" of L + R channels
    assert {a.definition for a in s.attention} == {"mla_attn"} and len(s.attention) == 3
    assert (s.norm, s.norm_eps, s.intermediate_size, s.moe_layers) == ("rms", 1e-5, 128, (False, True, True))
    m = s.moe
    assert (m.router, m.experts, m.top_k, m.n_group, m.topk_group, m.inter, m.shared_inter) == \
        ("grouped", 8, 2, 4, 2, 32, 64)
    assert (m.norm_topk_prob, m.routed_scaling_factor, m.shared_gate) == (True, 2.5, False)
    assert hash(s) == hash(spec_from_config(config("deepseek_v3")))   # frozen and hashable, as every spec


def test_deepseek_v2_lite_routing_is_softmax_top_k_unnormalised():
    s = spec_from_config(config("deepseek_v2"))
    assert (s.moe.router, s.moe.norm_topk_prob, s.moe.shared_inter, s.mla.q_lora_rank) == ("softmax", False, 64, None)


def test_the_latent_norms_keep_eps_1e_6():
    """transformers (and DeepSeek's code) build q_a_layernorm and kv_a_layernorm with eps 1e-6,
    whatever rms_norm_eps (the decoder's norms) says."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
    cfg = hf_config("deepseek_v3")
    assert cfg.rms_norm_eps == 1e-5 and MLAConfig.from_hf(cfg).rms_norm_eps == 1e-6
    attn = DeepseekV3Attention(cfg, layer_idx=0)
    assert attn.kv_a_layernorm.variance_epsilon == attn.q_a_layernorm.variance_epsilon == 1e-6


def test_deepseek_v2_group_limited_greedy_and_scaled_greedy_take_the_limited_router():
    s = spec_from_config(config("deepseek_v2_limited"))
    m = s.moe
    assert (m.router, m.experts, m.n_group, m.topk_group, m.top_k, m.routed_scaling_factor, m.norm_topk_prob) == \
        ("limited", 8, 4, 2, 2, 16.0, False)
    assert "moe_route_limited" in [n for n, _ in definitions_for(s)]
    m = spec_from_config({**config("deepseek_v2"), "routed_scaling_factor": 2.0}).moe   # greedy, scaled: one group
    assert (m.router, m.n_group, m.topk_group, m.routed_scaling_factor) == ("limited", 1, 1, 2.0)
    assert not any(k.endswith("e_score_correction_bias") for k in canonical_shapes(s))


@pytest.mark.parametrize("change, message", [
    ({"topk_method": "noaux_tc"},
     r"^deepseek_v2 config: 'topk_method' 'noaux_tc' with 'scoring_func' 'softmax' is not supported"),
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
     r"^deepseek_v2 config: 6 experts in 4 groups, keeping 2$"),
    ({"norm_topk_prob": True}, r"^deepseek_v2 config: 'norm_topk_prob' true is not supported"),
    ({"moe_layer_freq": 2}, r"^deepseek_v2 config: 'moe_layer_freq' 2 is not supported"),
    ({"kv_lora_rank": None}, r"^deepseek_v2 config: missing 'kv_lora_rank'$"),
])
def test_deepseek_v2_routing_it_cannot_serve_is_an_error_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config({**config("deepseek_v2"), **change})


@pytest.mark.parametrize("change, message", [
    ({"topk_method": "greedy"}, r"^deepseek_v3 config: 'topk_method' 'greedy' with 'scoring_func' 'sigmoid'"),
    ({"n_group": 3}, r"^deepseek_v3 config: 8 experts in 3 groups, keeping 2$"),
    ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, r"^deepseek_v3 config: rope_type 'mrope'"),
])
def test_deepseek_v3_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_config({**config("deepseek_v3"), **change})


def test_definitions_and_bindings_leave_the_latent_block_to_runtime_mla():
    s = spec_from_config(config("deepseek_v3"))
    names = [n for n, _ in definitions_for(s)]
    assert "mla_attn" not in names and {"rms_norm", "swiglu", "moe_route_grouped"} <= set(names)
    b = dims_from_config(config("deepseek_v3"))
    assert (b["H"], b["Hq"], b["Hkv"], b["D"], b["E"], b["n_group"]) == (64, 4, 1, 64, 8, 4)


# --------------------------------------------------------------------------- checkpoint names
@pytest.mark.parametrize("name", MLA_FAMILIES)
def test_mla_shapes_are_mla_attentions_state_dict(name):
    m = spec_from_config(config(name)).mla
    assert {k: tuple(v.shape) for k, v in MLAAttention(m).state_dict().items()} == mla_shapes(m)


@pytest.mark.parametrize("name", MLA_FAMILIES)
def test_hub_and_stacked_names_give_the_same_canonical_tensors(name, tmp_path):
    """save_pretrained writes the Hub's names (experts one by one, shared_experts, the router's
    e_score_correction_bias); transformers 5 holds the experts stacked: both load alike."""
    hf = make_tiny(name, tmp_path)
    spec = spec_from_config(hf.config)
    hub = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in hub and "model.layers.1.mlp.shared_experts.up_proj.weight" in hub
    a, b = canonical_state_dict(spec, hub), canonical_state_dict(spec, hf.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: tuple(v.shape) for k, v in a.items()} == canonical_shapes(spec)
    if spec.moe.router == "grouped":
        assert torch.equal(a["layers.1.mlp.gate.e_score_correction_bias"],
                           hf.model.layers[1].mlp.gate.e_score_correction_bias)
        assert a["layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0
    assert torch.equal(a["layers.0.attn.kv_b_proj.weight"], hf.model.layers[0].self_attn.kv_b_proj.weight)


def test_moe_layers_reproduce_the_hf_blocks(tmp_path):
    hf = make_tiny("deepseek_v3", tmp_path)
    spec = spec_from_config(hf.config)
    out = canonical_state_dict(spec, load_file(str(tmp_path / "model.safetensors")))
    x = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    for i in (1, 2):
        moe = MoE(spec.moe, dtype=torch.float32)
        prefix = f"layers.{i}.mlp."
        moe.load_state_dict({k.removeprefix(prefix): v for k, v in out.items() if k.startswith(prefix)}, strict=True)
        assert moe.shared_slices == 2   # n_shared_experts 2: the shared expert in two slices of the experts' size
        with torch.no_grad():
            want = hf.model.layers[i].mlp(x[None])[0]
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_multi_token_prediction_layers_are_ignored(tmp_path):
    """DeepSeek-V3's checkpoints carry its MTP module as one more layer (model.layers.61.*), which
    transformers does not load; an unknown tensor of a real layer is still an error."""
    hf = make_tiny("deepseek_v3", tmp_path)
    spec = spec_from_config(hf.config)
    hub = load_file(str(tmp_path / "model.safetensors"))
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64),
           "model.layers.3.mlp.experts.0.up_proj.weight": torch.zeros(32, 64)}
    assert canonical_state_dict(spec, {**hub, **mtp}).keys() == canonical_state_dict(spec, hub).keys()
    with pytest.raises(ConfigError, match=r"^checkpoint: unexpected tensor 'model.layers.2.eh_proj.weight'"):
        canonical_state_dict(spec, {**hub, "model.layers.2.eh_proj.weight": torch.zeros(64, 128)})


# --------------------------------------------------------------------------- the model and its steps
def test_from_pretrained_builds_a_deepseek_model_over_a_latent_cache(loaded):
    _, ours = loaded("deepseek_v3")
    assert isinstance(ours, DeepseekModel) and [type(layer.mlp) is MoE for layer in ours.layers] == [False, True, True]
    cache = ours.make_cache(num_pages=4, max_seqs=2, max_pages_per_seq=2)
    assert isinstance(cache, PagedLatentCache) and cache.num_layers == 3 and cache.row_dim == 64
    assert not ours.capturable(1) and not ours.fuses(torch.zeros(1, 64))


def test_step_positions_follow_each_sequence_in_order():
    lens = torch.tensor([5, 0, 2]).numpy()
    ids = torch.tensor([2, 0, 0, 2, 1, 0]).numpy()
    assert step_positions(lens, ids).tolist() == [2, 5, 6, 3, 0, 7]


@pytest.mark.parametrize("name", MLA_FAMILIES)
def test_ragged_steps_mixing_prompt_chunks_and_decoding_give_transformers_logits(loaded, name, monkeypatch):
    """An engine step serves sequences decoding one token (the absorbed form over the pages) beside
    prompt chunks of others (after their cached tokens): each sequence's logits are transformers'
    over its whole text."""
    hf, ours = loaded(name)
    steps = []    # each step's sequences, as layer 0's attention sees them
    attn = ours.layers[0].attn
    monkeypatch.setattr(attn, "step", lambda x, cache, ids, pos, **kw: steps.append(ids.tolist()) or
                        type(attn).step(attn, x, cache, ids, pos, **kw))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 11, 3)]
    eng = Engine(ours, max_seqs=3, max_seq_len=32, prefill_chunk=4)
    texts, seen = {}, []
    texts[eng.add(prompts[0])] = list(prompts[0])
    for step in range(9):
        if step == 1:      # joins while the first decodes: its prompt goes in chunks beside the decode tokens
            texts[eng.add(prompts[1])] = list(prompts[1])
        if step == 3:
            texts[eng.add(prompts[2])] = list(prompts[2])
        for slot, logits in eng.step().items():
            with torch.no_grad():
                ref = hf(torch.tensor([texts[slot]])).logits[0, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            tok = (7 * step + 3 * slot) % 96
            eng.feed(slot, tok)
            texts[slot].append(tok)
            seen.append(slot)
    assert sorted(set(seen)) == [0, 1, 2] and len(texts[0]) == 5 + 8   # its prompt took two steps
    assert [0, 1, 1, 1] in steps and [0, 1, 2, 2] in steps     # decode tokens beside prompt chunks


def test_a_batch_of_prompts_generates_each_ones_tokens(loaded):
    _, ours = loaded("deepseek_v3")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 13, 2)]
    together = generate(ours, prompts, max_new_tokens=8, prefill_chunk=5)
    assert together == [generate(ours, [p], max_new_tokens=8)[0] for p in prompts]


def test_unserved_cache_and_quantisation_are_errors(tmp_path):
    make_tiny("deepseek_v2", tmp_path)
    spec = spec_from_config(tmp_path)
    with pytest.raises(ValueError, match="kv_dtype 'fp8_e4m3': the latent cache is kept in the model's dtype"):
        DeepseekModel(spec, dtype=torch.float32, kv_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="a llama spec has no latent attention"):
        DeepseekModel(spec_from_config(config("llama")), dtype=torch.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="a quantised deepseek_v2 checkpoint is not served"):
        lf.from_pretrained(tmp_path, dtype=torch.float32)
