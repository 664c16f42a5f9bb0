"""Mamba and Mamba2 on the CPU (runtime/mamba.py over the scan references, models/mamba.py):
the mixers against transformers' MambaMixer / Mamba2Mixer torch paths in float32, prefill then
16 decode steps with the conv and SSM states held against transformers' cache at every step;
tiny random MambaForCausalLM / Mamba2ForCausalLM saved with save_pretrained and loaded with
from_pretrained: logits and greedy generation equal transformers'; ragged steps over the state
cache; the registry's reading of the configs and its errors. No download."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import layerforge as lf
from layerforge.models.families import canonical_shapes, canonical_state_dict, hf_names, spec_from_config
from layerforge.models.mamba import MambaModel, MambaSpec
from layerforge.models.spec import ConfigError
from layerforge.runtime.mamba import (Mamba2Mixer, Mamba2MixerConfig, MambaMixer, MambaMixerConfig, MambaStateCache,
                                      StateCacheError)

from ..seeding import seeded_generator

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402  (after the importorskip)

# tiny configs: Mamba2 with 2 groups of B/C over 8 heads and chunks of 16 (the SSD kernels' smallest
# head_dim, state and chunk; the mixer test's 37-token prompts end in a short chunk); sizes small
# enough for the float64 references' step-by-step loops
NO_SPECIAL = dict(eos_token_id=None, pad_token_id=None, bos_token_id=None)
CONFIGS = {
    "mamba": ("MambaConfig", dict(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=96, expand=2,
                                  conv_kernel=4, time_step_rank=5, **NO_SPECIAL)),
    "mamba_bias_untied": ("MambaConfig", dict(hidden_size=24, state_size=4, num_hidden_layers=2, vocab_size=80,
                                              conv_kernel=3, use_bias=True, use_conv_bias=False,
                                              tie_word_embeddings=False, residual_in_fp32=False, **NO_SPECIAL)),
    "mamba2": ("Mamba2Config", dict(hidden_size=64, state_size=16, num_hidden_layers=2, vocab_size=96, num_heads=8,
                                    head_dim=16, n_groups=2, chunk_size=16, conv_kernel=4, **NO_SPECIAL)),
    "mamba2_tied_limit": ("Mamba2Config", dict(hidden_size=32, state_size=16, num_hidden_layers=2, vocab_size=80,
                                               num_heads=4, head_dim=16, n_groups=1, chunk_size=16, conv_kernel=2,
                                               use_bias=True, tie_word_embeddings=True,
                                               time_step_limit=(0.05, 2.0), **NO_SPECIAL)),
}
MIXERS = ["mamba", "mamba_bias_untied", "mamba2", "mamba2_tied_limit"]


def hf_config(name: str, **over):
    cls, kwargs = CONFIGS[name]
    return getattr(transformers, cls)(**{**kwargs, **over})


def randomise_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights drawn so that every part of the mixer shows: A = -exp(A_log) spread over
    [0.5, 4), dt_bias / dt_proj.bias around softplus^-1 of 0.01..0.5, the rest N(0, 0.3)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3.5 + 0.5))
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                dt = torch.exp(torch.rand(p.shape, generator=gen) * math.log(50.0)) * 0.01
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def hf_mixer(name: str, gen: torch.Generator):
    cfg = hf_config(name)
    block = (transformers.models.mamba.modeling_mamba.MambaMixer if cfg.model_type == "mamba"
             else transformers.models.mamba2.modeling_mamba2.Mamba2Mixer)
    m = hf_group_norms_(block(cfg, layer_idx=0).eval())
    randomise_(m, gen)
    return cfg, m


def ours_mixer(cfg, hf, dtype=torch.float32, device="cpu"):
    spec = spec_from_config(cfg)
    mixer = (MambaMixer if cfg.model_type == "mamba" else Mamba2Mixer)(spec.mixer, dtype=dtype, device=device)
    mixer.load_state_dict(hf.state_dict())   # transformers' names and shapes as they are
    return mixer


def hf_run(mixer, x, cache):
    """transformers' mixer on x with its cache: the keyword is `cache` from transformers 5.2x on,
    `cache_params` before (a stray `cache=` there is swallowed by **kwargs and runs cacheless)."""
    params = inspect.signature(type(mixer).forward).parameters
    return mixer(x, **{("cache" if "cache" in params else "cache_params"): cache})


def hf_group_norms_(model: torch.nn.Module) -> torch.nn.Module:
    """Mamba2's gated RMSNorm normalises each of the n_groups groups of the row (mamba_ssm's
    RMSNormGated with group_size = intermediate_size / ngroups; transformers since 5.2x). Older
    transformers (5.17) normalise the whole row, so a reference with n_groups > 1 built there gets
    the per-group form here: the rest of its mixer stays transformers' own. Returns model."""
    for mixer in [m for m in model.modules() if hasattr(m, "n_groups") and hasattr(m, "norm")]:
        norm = mixer.norm
        if hasattr(norm, "group_size") or mixer.n_groups == 1:
            continue
        size = norm.weight.numel() // mixer.n_groups

        def grouped(self, hidden, gate=None, size=size):
            dtype = hidden.dtype
            h = hidden.float()
            if gate is not None:
                h = h * torch.nn.functional.silu(gate.float())
            g = h.unflatten(-1, (-1, size))
            g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * g.flatten(-2).to(dtype)
        norm.forward = grouped.__get__(norm)
    return model


def hf_states(cache):
    layer = cache.layers[0]
    return layer.conv_states[0], layer.recurrent_states[0]


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Within rtol of the reference's largest magnitude (the scans' sums cancel: elementwise
    relative error means nothing near zero); NaN never passes."""
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=rtol * max(ref.abs().max().item(), 1.0))


# --------------------------------------------------------------------------- mixers
@pytest.mark.parametrize("name", MIXERS)
def test_mixer_prefill_then_16_decode_steps_match_transformers_and_its_cache(name):
    gen = seeded_generator("mamba_mixer", name)
    cfg, hf = hf_mixer(name, gen)
    mixer = ours_mixer(cfg, hf)
    B, L, H = 2, 37, cfg.hidden_size
    x = torch.randn(B, L, H, generator=gen)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        ref = hf_run(hf, x, cache)
    state = mixer.new_state(B)
    close(mixer(x, state), ref)
    conv, ssm = hf_states(cache)
    assert state.conv.shape == conv.shape and state.ssm.shape == ssm.shape and state.ssm.dtype == torch.float32
    close(state.conv, conv)
    close(state.ssm, ssm)
    for i in range(16):
        xi = torch.randn(B, 1, H, generator=gen)
        with torch.no_grad():
            ref = hf_run(hf, xi, cache)
        y = mixer.step(xi if i % 2 else xi[:, 0], state)     # [B, 1, H] and [B, H] both
        assert y.shape == (xi.shape if i % 2 else xi[:, 0].shape)
        close(y.view_as(ref), ref)
        conv, ssm = hf_states(cache)
        close(state.conv, conv)
        close(state.ssm, ssm)


def test_mixer_forward_without_state_equals_with_one():
    gen = seeded_generator("mamba_mixer_stateless")
    cfg, hf = hf_mixer("mamba2", gen)
    mixer = ours_mixer(cfg, hf)
    x = torch.randn(1, 9, cfg.hidden_size, generator=gen)
    torch.testing.assert_close(mixer(x), mixer(x, mixer.new_state(1)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_prefill_in_two_chunks_continues_the_states(name):
    """A prompt run as 5 then 8 tokens (the second chunk continuing from the states the first
    left) equals the prompt in one prefill: outputs and states."""
    gen = seeded_generator("mamba_chunks", name)
    cfg, hf = hf_mixer(name, gen)
    mixer = ours_mixer(cfg, hf)
    x = torch.randn(2, 13, cfg.hidden_size, generator=gen)
    whole, parts = mixer.new_state(2), mixer.new_state(2)
    y = mixer(x, whole)
    y2 = torch.cat([mixer(x[:, :5], parts), mixer(x[:, 5:], parts)], dim=1)
    close(y2, y)
    close(parts.conv, whole.conv)
    close(parts.ssm, whole.ssm)


def test_mixer_input_errors_before_any_work():
    gen = seeded_generator("mamba_mixer_errors")
    cfg, hf = hf_mixer("mamba", gen)
    mixer = ours_mixer(cfg, hf)
    H = cfg.hidden_size
    with pytest.raises(ValueError, match=r"hidden must be \[B, L >= 1, 32\]"):
        mixer(torch.randn(2, 3, H + 1))
    with pytest.raises(ValueError, match="must be torch.float32"):
        mixer(torch.randn(2, 3, H, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"state.conv must be torch.float32 \[3, 64, 4\]"):
        mixer(torch.randn(3, 4, H), mixer.new_state(2))
    with pytest.raises(ValueError, match=r"hidden must be \[B, 1, 32\] or \[B, 32\]"):
        mixer.step(torch.randn(2, 2, H), mixer.new_state(2))
    with pytest.raises(ValueError, match="needs the sequences' state"):
        mixer.step(torch.randn(2, H), None)


def test_mixer_configs_refuse_what_the_kernels_cannot_serve():
    with pytest.raises(ValueError, match="conv_kernel 5"):
        MambaMixerConfig(hidden_size=8, intermediate_size=16, state_size=4, time_step_rank=1, conv_kernel=5)
    with pytest.raises(ValueError, match="n_groups 3 does not divide num_heads 4"):
        Mamba2MixerConfig(hidden_size=16, intermediate_size=32, num_heads=4, head_dim=8, state_size=4, n_groups=3)


# --------------------------------------------------------------------------- the state cache
def test_state_cache_slots_reset_on_allocate_and_are_checked():
    cache = MambaStateCache(num_layers=2, max_seqs=4, conv_shape=(6, 4), ssm_shape=(6, 3), dtype=torch.float32)
    cache.allocate(1)
    cache.conv[:, 1] = 5.0
    cache.ssm[:, 1] = 7.0
    cache.free(1)
    cache.allocate(1)   # reused: a new sequence starts from zeros
    assert cache.conv[:, 1].abs().sum() == 0 and cache.ssm[:, 1].abs().sum() == 0
    with pytest.raises(StateCacheError, match="slot 2 is not allocated"):
        cache.check([1, 2])
    with pytest.raises(StateCacheError, match=r"slot 4 is out of range \[0, max_seqs=4\)"):
        cache.allocate(4)
    cache.allocate(3)
    with pytest.raises(StateCacheError, match="repeat"):
        cache.check([3, 3])
    with pytest.raises(StateCacheError, match="free: slot 0 is not allocated"):
        cache.free(0)
    # consecutive slots are views of the cache; others are gathered and committed back
    s = cache.states(0, [1])
    assert s.conv.data_ptr() == cache.conv[0, 1].data_ptr()
    g = cache.states(1, [3, 1])
    g.ssm.fill_(2.0)
    assert cache.ssm[1, 3].abs().sum() == 0
    cache.commit(1, [3, 1], g)
    assert (cache.ssm[1, [1, 3]] == 2.0).all() and cache.ssm[0].abs().sum() == 0


# --------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (transformers model, ours loaded with from_pretrained from its save_pretrained folder)."""
    out = {}
    for name in MIXERS:
        cfg = hf_config(name)
        cls = transformers.MambaForCausalLM if cfg.model_type == "mamba" else transformers.Mamba2ForCausalLM
        torch.manual_seed(0)
        hf = hf_group_norms_(cls(cfg).eval())
        randomise_(hf, seeded_generator("mamba_model", name))
        if cfg.tie_word_embeddings:
            hf.tie_weights()
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        ours = lf.from_pretrained(folder, dtype=torch.float32)
        out[name] = (hf, ours)
    return out


@pytest.mark.parametrize("name", MIXERS)
def test_model_logits_match_transformers(tiny_models, name):
    hf, ours = tiny_models[name]
    assert isinstance(ours, MambaModel) and ours.spec.model_type == hf.config.model_type
    assert (ours.lm_head is None) == hf.config.tie_word_embeddings
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=seeded_generator("mamba_logits", name))
    with torch.no_grad():
        ref = hf(ids).logits
    close(ours(ids), ref)


@pytest.mark.parametrize("name", MIXERS)
def test_greedy_generation_equals_transformers(tiny_models, name):
    """Two prompts of different lengths generated together; transformers runs each alone (a
    state-space model has no padding-free batch of ragged prompts)."""
    hf, ours = tiny_models[name]
    gen = seeded_generator("mamba_generate", name)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 4)]
    got = ours.generate(prompts, max_new_tokens=12)
    for p, g in zip(prompts, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert g == ref[0, len(p):].tolist()
    assert len(set(got[0])) > 1     # not a degenerate model repeating one token


def test_ragged_steps_over_arbitrary_slots_equal_separate_runs(tiny_models):
    """One step with a 6-token prompt chunk, a 3-token one and two more 3-token ones in other
    slots (batched by length, gathered slots), then decode steps over slots out of order: each
    sequence's logits are those of its own run."""
    hf, ours = tiny_models["mamba2"]
    V = hf.config.vocab_size
    gen = seeded_generator("mamba_ragged")
    prompts = {4: torch.randint(0, V, (6,), generator=gen), 0: torch.randint(0, V, (3,), generator=gen),
               2: torch.randint(0, V, (3,), generator=gen), 5: torch.randint(0, V, (3,), generator=gen)}
    cache = ours.make_cache(max_seqs=6)
    for s in prompts:
        cache.allocate(s)
    order = [4, 0, 5, 2]
    toks = torch.cat([prompts[s] for s in order])
    seq_ids = [s for s in order for _ in range(len(prompts[s]))]
    logits = ours.step(toks.int(), seq_ids, cache)
    for i, s in enumerate(order):
        close(logits[i], ours(prompts[s][None])[0, -1])
    nxt = {s: int(logits[i].argmax()) for i, s in enumerate(order)}
    dec_order = [5, 0, 4]       # not consecutive: gathered and written back; slot 2 sits out
    out = ours.step(torch.tensor([nxt[s] for s in dec_order], dtype=torch.int32), dec_order, cache)
    for i, s in enumerate(dec_order):
        full = torch.cat([prompts[s], torch.tensor([nxt[s]])])
        close(out[i], ours(full[None])[0, -1])
    assert list(cache.lengths[[0, 2, 4, 5]]) == [4, 3, 7, 4]
    # every token's logits, and the errors of a step
    cache.allocate(1)
    all_logits = ours.step(prompts[0].int(), [1] * 3, cache, logits="all")
    close(all_logits, ours(prompts[0][None])[0])
    with pytest.raises(ValueError, match="must be together"):
        ours.step(torch.zeros(3, dtype=torch.int32), [4, 5, 4], cache)
    with pytest.raises(StateCacheError, match="slot 3 is not allocated"):
        ours.step(torch.zeros(1, dtype=torch.int32), [3], cache)


def test_sampling_with_top_k_1_is_greedy_and_a_seed_repeats(tiny_models):
    _, ours = tiny_models["mamba"]
    prompts = [[1, 2, 3, 4], [5, 6]]
    greedy = ours.generate(prompts, max_new_tokens=6)
    assert ours.generate(prompts, max_new_tokens=6, do_sample=True, top_k=1, seed=3) == greedy
    a = ours.generate(prompts, max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    assert a == ours.generate(prompts, max_new_tokens=6, do_sample=True, temperature=1.5, seed=11)
    stop = greedy[0][2]
    got = ours.generate(prompts, max_new_tokens=6, stop_tokens=[stop])
    assert got[0] == greedy[0][:greedy[0].index(stop) + 1]


# --------------------------------------------------------------------------- the registry
def test_mamba_spec_reads_transformers_keys_and_defaults():
    s = spec_from_config(hf_config("mamba").to_dict())
    assert isinstance(s, MambaSpec) and s.model_type == "mamba"
    assert (s.hidden_size, s.num_layers, s.vocab_size, s.norm_eps, s.tie_word_embeddings, s.residual_in_fp32) == \
        (32, 2, 96, 1e-5, True, True)
    assert s.mixer == MambaMixerConfig(hidden_size=32, intermediate_size=64, state_size=8, time_step_rank=5,
                                       conv_kernel=4, use_bias=False, use_conv_bias=True)
    # time_step_rank "auto": ceil(hidden_size / 16); the other keys' transformers defaults
    bare = {"model_type": "mamba", "hidden_size": 40, "num_hidden_layers": 1, "vocab_size": 10, "state_size": 16}
    s = spec_from_config(bare)
    assert (s.mixer.time_step_rank, s.mixer.intermediate_size, s.mixer.conv_kernel, s.tie_word_embeddings) == \
        (3, 80, 4, True)


def test_mamba2_spec_reads_transformers_keys_and_defaults():
    s = spec_from_config(hf_config("mamba2_tied_limit").to_dict())
    assert s.model_type == "mamba2" and s.tie_word_embeddings
    assert s.mixer == Mamba2MixerConfig(hidden_size=32, intermediate_size=64, num_heads=4, head_dim=16, state_size=16,
                                        n_groups=1, conv_kernel=2, use_bias=True, use_conv_bias=True, chunk_size=16,
                                        time_step_limit=(0.05, 2.0), norm_eps=1e-5)
    bare = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10, "state_size": 16,
            "num_heads": 16, "head_dim": 8}
    m = spec_from_config(bare).mixer
    assert (m.n_groups, m.chunk_size, m.time_step_limit, m.conv_dim) == (8, 256, (0.0, math.inf), 128 + 2 * 8 * 16)
    assert not spec_from_config(bare).tie_word_embeddings


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "mamba2 config: missing 'hidden_size'"),
    ({"state_size": None}, "missing 'state_size'"),
    ({"num_heads": None}, "missing 'num_heads'"),
    ({"n_groups": 3}, "'n_groups' 3 does not divide num_heads 16"),
    ({"head_dim": 4}, r"num_heads \* head_dim \(16 \* 4\) is not expand \* hidden_size \(128\)"),
    ({"hidden_act": "gelu"}, "'hidden_act' 'gelu' is not supported"),
    ({"conv_kernel": 5}, "'conv_kernel' 5 is not supported"),
    ({"time_step_limit": [0.5, 0.1]}, "'time_step_limit' must be"),
    ({"chunk_size": 0}, "'chunk_size' must be positive"),
])
def test_mamba2_config_errors_name_the_key(change, message):
    cfg = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10, "state_size": 16,
           "num_heads": 16, "head_dim": 8, "n_groups": 4}
    with pytest.raises(ConfigError, match=message):
        spec_from_config({**cfg, **change})


def test_mamba_config_errors_name_the_key():
    cfg = {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10, "state_size": 16}
    with pytest.raises(ConfigError, match="mamba config: missing 'vocab_size'"):
        spec_from_config({**cfg, "vocab_size": None})
    with pytest.raises(ConfigError, match="'time_step_rank' must be an integer"):
        spec_from_config({**cfg, "time_step_rank": "large"})
    with pytest.raises(ConfigError, match="supported: .*mamba, mamba2"):
        spec_from_config({**cfg, "model_type": "jamba"})


def test_checkpoint_names_old_embedding_name_and_errors():
    cfg = hf_config("mamba")
    spec = spec_from_config(cfg)
    hf = transformers.MambaForCausalLM(cfg)
    sd = hf.state_dict()
    out = canonical_state_dict(spec, sd)
    assert {k: tuple(v.shape) for k, v in out.items()} == canonical_shapes(spec) == spec.canonical_shapes()
    assert set(hf_names(spec)) == set(out) and "lm_head.weight" not in out      # tied
    assert out["layers.1.mixer.conv1d.weight"] is sd["backbone.layers.1.mixer.conv1d.weight"]
    # state-spaces' converted checkpoints name the embedding backbone.embedding
    old = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in sd.items()}
    assert canonical_state_dict(spec, old)["embed.weight"] is sd["backbone.embeddings.weight"]
    with pytest.raises(ConfigError, match="missing tensor 'backbone.layers.0.mixer.A_log'"):
        canonical_state_dict(spec, {k: v for k, v in sd.items() if not k.endswith("0.mixer.A_log")})
    with pytest.raises(ConfigError, match="unexpected tensor 'backbone.layers.0.mixer.extra'"):
        canonical_state_dict(spec, {**sd, "backbone.layers.0.mixer.extra": sd["backbone.norm_f.weight"]})
    bad = {**sd, "backbone.layers.0.mixer.A_log": torch.zeros(3, 3)}
    with pytest.raises(ConfigError, match=r"layers.0.mixer.A_log has shape \[3, 3\]"):
        canonical_state_dict(spec, bad)
