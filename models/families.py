"""The model-family registry: a Hugging Face `config.json` -> `ModelSpec`, keyed by `model_type`,
and a checkpoint's tensors -> the canonical names of models/spec.py.

    spec = spec_from_config("config.json")             # or a dict, or a PretrainedConfig
    weights = canonical_state_dict(spec, tensors)      # safetensors names -> canonical names
    definitions_for(spec)                              # [(stdlib definition, bindings)] to build
    bindings_from_spec(spec)                           # model-wide DSL bindings (dims_from_config)

Each family reads the keys its transformers class reads, with that class's defaults for keys a
config.json may leave out (rope_theta, norm eps, biases), and raises `ConfigError` naming the
key for a key it needs (sizes) or a feature it cannot serve. No torch at import time: tensors
are touched only by `canonical_state_dict`; transformers is never imported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .spec import ACTIVATIONS, AttentionSpec, ConfigError, ModelSpec

if TYPE_CHECKING:
    from ..runtime.mla import MLAConfig
    from ..runtime.moe import MoEConfig
    from .mamba import MambaSpec

__all__ = ["FAMILIES", "SSM_FAMILIES", "spec_from_config", "canonical_state_dict", "checkpoint_key", "hf_names", "definitions_for",
           "bindings_from_spec", "read_config", "mla_shapes", "ConfigError"]

# transformers' activation names -> ours (spec.ACTIVATIONS)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "relu": "relu"}


# ---------------------------------------------------------------------------------------------
# Reading a config.

def read_config(config: Mapping[str, Any] | str | os.PathLike | Any) -> dict[str, Any]:
    """A config as a plain dict: a mapping, a config.json path (or its folder), or an object with
    `.to_dict()` (a transformers PretrainedConfig). Multimodal configs' `text_config` is merged in."""
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
        try:
            config = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {p}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"{p} is not JSON: {e}") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"config.json: must be a JSON object, not a {type(config).__name__}")
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg, **cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    return cfg


class _Config:
    """One family's view of a config: reads with the family's name in every error."""

    def __init__(self, family: str, cfg: Mapping[str, Any]):
        self.family = family
        self.cfg = cfg

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.family} config: {msg}")

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        v = self.cfg.get(key)
        return default if v is None else v

    def first(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        return default

    def int(self, *keys: str, default: int | None = None, positive: bool = True) -> int:
        """The first of `keys` present, an integer (> 0 unless told); missing without a default:
        an error naming the first key."""
        for k in keys:
            v = self.cfg.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
                raise self.error(f"'{k}' must be an integer, got {v!r}")
            if positive and v <= 0:
                raise self.error(f"'{k}' must be positive, got {v!r}")
            return int(v)
        if default is None:
            raise self.error(f"missing '{keys[0]}'")
        return default

    def float(self, *keys: str, default: float | None = None) -> float:
        for k in keys:
            v = self.cfg.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise self.error(f"'{k}' must be a number, got {v!r}")
            return float(v)
        if default is None:
            raise self.error(f"missing '{keys[0]}'")
        return default

    def bool(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(f"'{key}' must be true or false, got {v!r}")
        return v

    def activation(self, *keys: str, default: str | None = None, aliases: Mapping[str, str] | None = None) -> str:
        key = next((k for k in keys if self.cfg.get(k) is not None), None)
        name = self.cfg[key] if key else default
        if name is None:
            raise self.error(f"missing '{keys[0]}'")
        if aliases and name in aliases:
            name = aliases[name]
        if not isinstance(name, str) or name not in _ACTIVATIONS:
            raise self.error(f"'{key or keys[0]}' {name!r} is not supported (supported: "
                             f"{', '.join(sorted(_ACTIVATIONS))})")
        return _ACTIVATIONS[name]

    def head_dim(self, hidden: int, heads: int, key: str | None = "head_dim") -> int:
        if key and self.has(key):
            return self.int(key)
        if hidden % heads:
            raise self.error(f"hidden size {hidden} is not a multiple of num_attention_heads {heads} "
                             f"(and no '{key or 'head_dim'}')")
        return hidden // heads

    def kv_heads(self, heads: int, key: str = "num_key_value_heads") -> int:
        kv = self.int(key, default=heads)
        if heads % kv:
            raise self.error(f"'{key}' {kv} does not divide num_attention_heads {heads}")
        return kv

    def rope(self, head_dim: int, *, theta_keys: tuple[str, ...] = ("rope_theta",), default_theta: float = 10000.0,
             partial_keys: tuple[str, ...] = ("partial_rotary_factor",), default_partial: float = 1.0
             ) -> tuple[float, int, tuple | None]:
        """(theta, rotary_dim (0: the whole head), rope_scaling) from `rope_parameters`
        (transformers 5) or the top-level keys and `rope_scaling` (older configs)."""
        params: dict[str, Any] = {}
        for nested in ("rope_scaling", "rope_parameters"):   # rope_parameters wins
            sub = self.cfg.get(nested)
            if sub is None:
                continue
            if not isinstance(sub, Mapping):
                raise self.error(f"'{nested}' must be an object, got {sub!r}")
            params.update({k: v for k, v in sub.items() if v is not None})
        theta = params.get("rope_theta")
        if theta is None:
            theta = self.float(*theta_keys, default=default_theta)
        elif isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise self.error(f"'rope_parameters.rope_theta' must be a positive number, got {theta!r}")
        partial = params.get("partial_rotary_factor")
        if partial is None:
            partial = self.float(*partial_keys, default=default_partial)
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise self.error(f"'partial_rotary_factor' must be in (0, 1], got {partial!r}")
        rotary = int(head_dim * partial)          # transformers: int(head_dim * partial_rotary_factor)
        if rotary % 2 or rotary <= 0:
            raise self.error(f"rotary dim {rotary} (head_dim {head_dim} * partial_rotary_factor {partial}) "
                             "is not a positive even number")
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None
        if kind not in (None, "default"):
            from ..dsl.numerics import ROPE_TYPES, RopeParameterError, rope_scaling_from_hf
            if kind not in ROPE_TYPES:
                raise self.error(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
            rest = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()
                    if k not in ("rope_theta", "partial_rotary_factor", "type")}
            rest["rope_type"] = kind
            maxpos = self.get("max_position_embeddings")
            try:
                rope_scaling_from_hf(rest, maxpos)
            except RopeParameterError as e:
                raise self.error(f"rope_parameters: {e}") from None
            scaling = (tuple(sorted(rest.items())), maxpos)
        return float(theta), (0 if rotary == head_dim else rotary), scaling


def _layer_windows(c: _Config, n: int, window: int, sliding_default: Callable[[int], bool]) -> list[int]:
    """Per layer window (0: none): `layer_types` when the config has it, else the family's rule."""
    types = c.cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n:
            raise c.error(f"'layer_types' must list one type per layer ({n}), got {types!r}")
        bad = [t for t in types if t not in ("sliding_attention", "full_attention")]
        if bad:
            raise c.error(f"'layer_types' entry {bad[0]!r} is not supported (sliding_attention, full_attention)")
        sliding = [t == "sliding_attention" for t in types]
    else:
        sliding = [sliding_default(i) for i in range(n)]
    if any(sliding) and not window:
        raise c.error("'layer_types' has sliding_attention layers but 'sliding_window' is null")
    return [window if s else 0 for s in sliding]


def _window(c: _Config, key: str = "sliding_window") -> int:
    """A sliding window (0: none; null is none)."""
    return c.int(key, default=0) if c.has(key) else 0


def _decoder_attention(n: int, theta: float, rotary_dim: int, scaling, windows: list[int] | None = None,
                       softcap: float = 0.0, query_scalar: float = 0.0) -> tuple[AttentionSpec, ...]:
    out = []
    for i in range(n):
        consts = (("theta", float(theta)), ("rotary_dim", int(rotary_dim)), ("window", int(windows[i] if windows else 0)),
                  ("softcap", float(softcap)), ("query_scalar", float(query_scalar)))
        out.append(AttentionSpec(definition="decoder_attn", consts=consts, rope_scaling=scaling))
    return tuple(out)


def _common(c: _Config, *, hidden_keys=("hidden_size",), heads_keys=("num_attention_heads",),
            layers_keys=("num_hidden_layers",)) -> dict[str, int]:
    return {"vocab_size": c.int("vocab_size"), "hidden_size": c.int(*hidden_keys),
            "num_layers": c.int(*layers_keys), "num_heads": c.int(*heads_keys)}


# ---------------------------------------------------------------------------------------------
# The families.

def _llama_like(c: _Config, *, qkv_bias: bool | None = None, o_bias: bool | None = None, qk_norm: bool = False,
                windows: Callable[[int], list[int]] | None = None, head_dim_key: str | None = "head_dim",
                act_default: str = "silu", moe: Callable[[int], tuple[MoEConfig, tuple[bool, ...]]] | None = None
                ) -> ModelSpec:
    """A Llama-shaped decoder; moe(n): (MoEConfig, which of the n layers are MoE layers)."""
    base = _common(c)
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq, head_dim_key)
    Hkv = c.kv_heads(Hq)
    theta, rotary, scaling = c.rope(D)
    attention_bias = c.bool("attention_bias", False)
    moe_cfg, moe_layers = moe(n) if moe else (None, ())
    # a model of MoE layers only never reads intermediate_size (its dense MLP's)
    inter = c.int("intermediate_size", default=moe_cfg.inter if moe_layers and all(moe_layers) else None)
    return ModelSpec(
        model_type=c.family, **base, num_kv_heads=Hkv, head_dim=D, intermediate_size=inter,
        norm="rms", norm_eps=c.float("rms_norm_eps", default=1e-6),
        attention=_decoder_attention(n, theta, rotary, scaling, windows(n) if windows else None),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias, qk_norm=qk_norm,
        activation=c.activation("hidden_act", default=act_default), gated=True, mlp_bias=c.bool("mlp_bias", False),
        moe=moe_cfg, moe_layers=moe_layers,
        tie_word_embeddings=c.bool("tie_word_embeddings", False), extra={"config": dict(c.cfg)})


def llama(c: _Config) -> ModelSpec:
    return _llama_like(c)


def mistral(c: _Config) -> ModelSpec:
    w = _window(c)
    return _llama_like(c, windows=lambda n: [w] * n)


def _qwen_windows(c: _Config, slides: Callable[[int, int], bool] = lambda i, first: i >= first
                  ) -> Callable[[int], list[int]]:
    """Qwen2/Qwen3: a window only with use_sliding_window, on the layers i that slides(i,
    max_window_layers) picks (Qwen2/Qwen3: from max_window_layers on), or as layer_types says;
    without it, no layer has one."""
    use = c.bool("use_sliding_window", False)
    w = _window(c) if use else 0
    if use and not w:
        raise c.error("'use_sliding_window' is true but 'sliding_window' is null")

    def windows(n: int) -> list[int]:
        if not use:
            types = c.cfg.get("layer_types")
            if isinstance(types, list) and "sliding_attention" in types:
                raise c.error("'layer_types' has sliding_attention layers but 'use_sliding_window' is false")
            return [0] * n
        first = c.int("max_window_layers", default=28, positive=False)
        return _layer_windows(c, n, w, lambda i: slides(i, first))
    return windows


def granite(c: _Config) -> ModelSpec:
    """IBM Granite (3.x): Llama's structure with four multipliers: the embeddings times embedding_multiplier, the
    attention scaled by attention_multiplier (not 1 / sqrt(D)), each branch's output times residual_multiplier
    before the residual add (o's and down's weights scaled so when read), the logits over logits_scaling."""
    spec = _llama_like(c)
    emb, att = c.float("embedding_multiplier", default=1.0), c.float("attention_multiplier", default=1.0)
    res, logits = c.float("residual_multiplier", default=1.0), c.float("logits_scaling", default=1.0)
    attention = tuple(dataclasses.replace(a, consts=tuple((k, 1.0 / att ** 2 if k == "query_scalar" else v)
                                                          for k, v in a.consts)) for a in spec.attention)
    return dataclasses.replace(spec, attention=attention, embed_scale=None if emb == 1.0 else emb,
                               residual_scale=None if res == 1.0 else res,
                               logit_divisor=None if logits == 1.0 else logits)


def qwen2(c: _Config) -> ModelSpec:
    # q/k/v always have a bias, o none
    return _llama_like(c, qkv_bias=True, o_bias=False, windows=_qwen_windows(c))


def qwen3(c: _Config) -> ModelSpec:
    # RMSNorm over each q and k head; attention_bias covers q, k, v and o
    return _llama_like(c, qk_norm=True, windows=_qwen_windows(c))


def _moe_config(c: _Config, *, experts_keys: tuple[str, ...], inter_key: str, norm_topk_prob: bool,
                shared_inter: int = 0, shared_gate: bool = False, **routing) -> MoEConfig:
    """The family's runtime/moe.MoEConfig (softmax routing unless `routing` says otherwise: router,
    n_group, topk_group, routed_scaling_factor), its sizes read with the family's errors."""
    from ..runtime.moe import MoEConfig   # imports torch: only configs of MoE models pay for it
    sizes = dict(hidden=c.int("hidden_size"), inter=c.int(inter_key), experts=c.int(*experts_keys),
                 top_k=c.int("num_experts_per_tok"))
    try:
        return MoEConfig(**sizes, norm_topk_prob=norm_topk_prob, shared_inter=shared_inter, shared_gate=shared_gate,
                         activation=c.activation("hidden_act", default="silu"), **routing)
    except ValueError as e:   # top_k > experts, an activation with no gated kernel
        raise c.error(str(e).removeprefix("MoEConfig: ")) from None


def _sparse_layers(c: _Config, n: int) -> tuple[bool, ...]:
    """Qwen2/Qwen3-MoE: layer i is an MoE layer when (i + 1) % decoder_sparse_step == 0, unless
    mlp_only_layers lists it (then the dense MLP of intermediate_size)."""
    step = c.int("decoder_sparse_step", default=1)
    only = c.get("mlp_only_layers", [])
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise c.error(f"'mlp_only_layers' must be a list of layer indices, got {only!r}")
    return tuple(i not in only and (i + 1) % step == 0 for i in range(n))


def mixtral(c: _Config) -> ModelSpec:
    # every layer an MoE layer of intermediate_size experts; top-k weights always renormalised
    w = _window(c)
    moe = _moe_config(c, experts_keys=("num_local_experts", "num_experts"), inter_key="intermediate_size",
                      norm_topk_prob=True)
    return _llama_like(c, windows=lambda n: [w] * n, moe=lambda n: (moe, (True,) * n))


def qwen2_moe(c: _Config) -> ModelSpec:
    # Qwen2's attention (q/k/v bias: qkv_bias); a shared expert with a sigmoid gate in every MoE
    # layer; without layer_types, transformers 5 slides the even layers below max_window_layers
    moe = _moe_config(c, experts_keys=("num_experts",), inter_key="moe_intermediate_size",
                      norm_topk_prob=c.bool("norm_topk_prob", False),
                      shared_inter=c.int("shared_expert_intermediate_size"), shared_gate=True)
    return _llama_like(c, qkv_bias=c.bool("qkv_bias", True), o_bias=False,
                       windows=_qwen_windows(c, lambda i, first: i % 2 == 0 and i < first),
                       moe=lambda n: (moe, _sparse_layers(c, n)))


def qwen3_moe(c: _Config) -> ModelSpec:
    # Qwen3's attention (q/k norms, attention_bias); the window, with use_sliding_window, on every
    # layer; transformers 5 saves num_experts as num_local_experts
    moe = _moe_config(c, experts_keys=("num_experts", "num_local_experts"), inter_key="moe_intermediate_size",
                      norm_topk_prob=c.bool("norm_topk_prob", False))
    return _llama_like(c, qk_norm=True, windows=_qwen_windows(c, lambda i, first: True),
                       moe=lambda n: (moe, _sparse_layers(c, n)))


def _deepseek(c: _Config, *, routing: dict[str, Any], norm_topk_prob: bool, first_dense: int,
              shared_experts: int) -> ModelSpec:
    """DeepSeek-V2/V3: multi-head latent attention (runtime/mla.py) in every layer; the dense MLP of
    intermediate_size in the first first_k_dense_replace layers, MoE layers after them (routed
    experts of moe_intermediate_size; n_shared_experts of that size as one ungated shared expert)."""
    from ..runtime.mla import MLAConfig   # imports torch: only configs of MLA models pay for it
    base = _common(c)
    n = base["num_layers"]
    mla = MLAConfig.from_hf(dict(c.cfg))
    c.rope(mla.qk_rope_head_dim)          # the RoPE parameters checked as every family's (MLAConfig keeps them)
    first = c.int("first_k_dense_replace", default=first_dense, positive=False)
    if c.int("moe_layer_freq", default=1) != 1:
        raise c.error(f"'moe_layer_freq' {c.get('moe_layer_freq')} is not supported (1: every layer from "
                      "first_k_dense_replace on is an MoE layer, as transformers builds it)")
    inter = c.int("moe_intermediate_size")
    moe = _moe_config(c, experts_keys=("n_routed_experts",), inter_key="moe_intermediate_size",
                      norm_topk_prob=norm_topk_prob,
                      shared_inter=inter * c.int("n_shared_experts", default=shared_experts, positive=False), **routing)
    return ModelSpec(
        model_type=c.family, **base, num_kv_heads=1, head_dim=mla.kv_lora_rank + mla.qk_rope_head_dim,
        intermediate_size=c.int("intermediate_size", default=inter if first == 0 else None),
        norm="rms", norm_eps=c.float("rms_norm_eps", default=1e-6),
        attention=(AttentionSpec(definition="mla_attn"),) * n,
        activation=c.activation("hidden_act", default="silu"), gated=True,
        moe=moe, moe_layers=tuple(i >= first for i in range(n)), mla=mla,
        tie_word_embeddings=c.bool("tie_word_embeddings", False), extra={"config": dict(c.cfg)})


def deepseek_v3(c: _Config) -> ModelSpec:
    # noaux_tc routing: sigmoid scores plus e_score_correction_bias, the topk_group best of n_group
    # groups, renormalised (norm_topk_prob), times routed_scaling_factor
    method, scoring = c.get("topk_method", "noaux_tc"), c.get("scoring_func", "sigmoid")
    if method != "noaux_tc" or scoring != "sigmoid":
        raise c.error(f"'topk_method' {method!r} with 'scoring_func' {scoring!r} is not supported "
                      "(noaux_tc with sigmoid: DeepSeek-V3's routing)")
    routing = dict(router="grouped", n_group=c.int("n_group", default=8), topk_group=c.int("topk_group", default=4),
                   routed_scaling_factor=c.float("routed_scaling_factor", default=2.5))
    return _deepseek(c, routing=routing, norm_topk_prob=c.bool("norm_topk_prob", True), first_dense=3,
                     shared_experts=1)


def deepseek_v2(c: _Config) -> ModelSpec:
    # greedy routing: softmax over the experts, top k, not renormalised, times routed_scaling_factor;
    # moe_route serves it where that factor is 1 (DeepSeek-V2-Lite); group_limited_greedy (DeepSeek-V2:
    # softmax scores, the topk_group groups of the best experts) and greedy with another factor take
    # moe_route_limited (greedy as one group), with transformers' DeepseekV2TopkRouter's f32 logits
    method, scoring = c.get("topk_method", "greedy"), c.get("scoring_func", "softmax")
    if method not in ("greedy", "group_limited_greedy") or scoring != "softmax":
        raise c.error(f"'topk_method' {method!r} with 'scoring_func' {scoring!r} is not supported (greedy or "
                      "group_limited_greedy with softmax: DeepSeek-V2's)")
    scale = c.float("routed_scaling_factor", default=1.0)
    routing: dict[str, Any] = {}
    if method == "group_limited_greedy":
        routing = dict(router="limited", n_group=c.int("n_group"), topk_group=c.int("topk_group"),
                       routed_scaling_factor=scale)
    elif scale != 1.0:
        routing = dict(router="limited", n_group=1, topk_group=1, routed_scaling_factor=scale)
    if c.bool("norm_topk_prob", False):
        raise c.error("'norm_topk_prob' true is not supported (transformers' DeepseekV2TopkRouter never "
                      "renormalises, DeepSeek's code does: the config is ambiguous)")
    if c.bool("mlp_bias", False):
        raise c.error("'mlp_bias' true is not supported (the MoE layers' shared experts would have biases)")
    return _deepseek(c, routing=routing, norm_topk_prob=False, first_dense=0, shared_experts=2)


def _gemma_common(c: _Config, *, gemma2: bool) -> ModelSpec:
    base = _common(c)
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq)
    Hkv = c.kv_heads(Hq)
    theta, rotary, scaling = c.rope(D)
    # Gemma: `hidden_activation` (older configs) or `hidden_act`; "gelu" is the legacy name of
    # the tanh approximation (transformers rewrites it)
    act = c.activation("hidden_activation", "hidden_act", default="gelu_pytorch_tanh",
                       aliases={"gelu": "gelu_pytorch_tanh"})
    if gemma2:
        w = _window(c)
        windows = _layer_windows(c, n, w, lambda i: i % 2 == 0)
        softcap = c.float("attn_logit_softcapping", default=0.0)
        qs = c.float("query_pre_attn_scalar", default=0.0)
        final = c.float("final_logit_softcapping", default=0.0) or None
        attention = _decoder_attention(n, theta, rotary, scaling, windows, softcap, qs)
    else:
        final = None
        attention = _decoder_attention(n, theta, rotary, scaling)
    bias = c.bool("attention_bias", False)
    return ModelSpec(
        model_type=c.family, **base, num_kv_heads=Hkv, head_dim=D, intermediate_size=c.int("intermediate_size"),
        norm="rms_1p", norm_eps=c.float("rms_norm_eps", default=1e-6), attention=attention,
        qkv_bias=bias, o_bias=bias, activation=act, gated=True, sandwich_norms=gemma2,
        embed_scale=math.sqrt(H), final_logit_softcap=final,
        tie_word_embeddings=c.bool("tie_word_embeddings", True), extra={"config": dict(c.cfg)})


def gemma(c: _Config) -> ModelSpec:
    return _gemma_common(c, gemma2=False)


def gemma2(c: _Config) -> ModelSpec:
    return _gemma_common(c, gemma2=True)


def _gemma3_ropes(c: _Config, D: int) -> dict[str, tuple[float, int, tuple | None]]:
    """Gemma 3's RoPE by layer type: transformers 5's `rope_parameters` per type ({"sliding_attention": {...},
    "full_attention": {...}}), or the older keys (`rope_theta` and `rope_scaling` for the full layers,
    `rope_local_base_freq` for the sliding ones, unscaled)."""
    params = c.cfg.get("rope_parameters")
    kinds = ("sliding_attention", "full_attention")
    if isinstance(params, Mapping) and any(k in params for k in kinds):
        out = {}
        for kind in kinds:
            sub = params.get(kind)
            if not isinstance(sub, Mapping):
                raise c.error(f"'rope_parameters.{kind}' must be an object, got {sub!r}")
            out[kind] = _Config(c.family, {**c.cfg, "rope_scaling": None, "rope_parameters": sub}).rope(D)
        return out
    full = c.rope(D)
    local = c.float("rope_local_base_freq", default=10000.0)
    return {"full_attention": full, "sliding_attention": (local, full[1], None)}


def gemma3_text(c: _Config) -> ModelSpec:
    """Gemma 3 (text): Gemma 2's sandwich norms, scaled embedding, query_pre_attn_scalar and sliding layers (every
    sliding_window_pattern-th layer global, or `layer_types`), an RMSNorm (1 + w) over each q and k head, and RoPE
    of its own a layer type (the sliding layers' local base, the global ones' theta and scaling)."""
    base = _common(c)
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq)
    Hkv = c.kv_heads(Hq)
    act = c.activation("hidden_activation", "hidden_act", default="gelu_pytorch_tanh",
                       aliases={"gelu": "gelu_pytorch_tanh"})
    pattern = c.int("sliding_window_pattern", "_sliding_window_pattern", default=6)   # (transformers 5's name)
    windows = _layer_windows(c, n, _window(c), lambda i: (i + 1) % pattern != 0)
    ropes = _gemma3_ropes(c, D)
    softcap = c.float("attn_logit_softcapping", default=0.0)
    qs = c.float("query_pre_attn_scalar", default=256.0)
    attention = tuple(_decoder_attention(1, *ropes["sliding_attention" if w else "full_attention"], [w], softcap, qs)[0]
                      for w in windows)
    bias = c.bool("attention_bias", False)
    return ModelSpec(
        model_type=c.family, **base, num_kv_heads=Hkv, head_dim=D, intermediate_size=c.int("intermediate_size"),
        norm="rms_1p", norm_eps=c.float("rms_norm_eps", default=1e-6), attention=attention,
        qkv_bias=bias, o_bias=bias, activation=act, gated=True, sandwich_norms=True, qk_norm=True,
        embed_scale=math.sqrt(H), final_logit_softcap=c.float("final_logit_softcapping", default=0.0) or None,
        tie_word_embeddings=c.bool("tie_word_embeddings", True), extra={"config": dict(c.cfg)})


def phi3(c: _Config) -> ModelSpec:
    w = _window(c)
    spec = _llama_like(c, qkv_bias=False, o_bias=False, windows=lambda n: [w] * n)
    if c.bool("attention_bias", False):
        raise c.error("'attention_bias' true is not supported (Phi-3's qkv_proj has no bias)")
    return spec


def gpt_neox(c: _Config) -> ModelSpec:
    base = _common(c)
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq, None)
    theta, rotary, scaling = c.rope(D, theta_keys=("rope_theta", "rotary_emb_base"),
                                    partial_keys=("partial_rotary_factor", "rotary_pct"), default_partial=0.25)
    bias = c.bool("attention_bias", True)
    return ModelSpec(
        model_type="gpt_neox", **base, num_kv_heads=Hq, head_dim=D, intermediate_size=c.int("intermediate_size"),
        norm="layer", norm_eps=c.float("layer_norm_eps", default=1e-5), norm_bias=True,
        attention=_decoder_attention(n, theta, rotary, scaling), qkv_bias=bias, o_bias=bias,
        activation=c.activation("hidden_act", default="gelu"), gated=False, mlp_bias=True,
        residual="parallel" if c.bool("use_parallel_residual", True) else "sequential",
        tie_word_embeddings=c.bool("tie_word_embeddings", False), extra={"config": dict(c.cfg)})


def falcon(c: _Config) -> ModelSpec:
    base = _common(c, hidden_keys=("hidden_size", "n_embed"), heads_keys=("num_attention_heads", "n_head"),
                   layers_keys=("num_hidden_layers", "n_layer"))
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq, None)
    new = c.bool("new_decoder_architecture", False)
    mq = c.bool("multi_query", True)
    parallel = c.bool("parallel_attn", True)
    if new:
        Hkv = c.kv_heads(Hq, "num_kv_heads")
        if not parallel:
            raise c.error("'parallel_attn' false with 'new_decoder_architecture' is not supported "
                          "(transformers' FalconDecoderLayer cannot run it either)")
        lns = c.int("num_ln_in_parallel_attn", default=2)
        if lns not in (1, 2):
            raise c.error(f"'num_ln_in_parallel_attn' must be 1 or 2, got {lns}")
        residual = "parallel" if lns == 2 else "parallel_shared"
    else:
        if mq:
            Hkv = 1
        else:
            Hkv = c.int("num_kv_heads", default=Hq)
            if Hkv != Hq:
                raise c.error(f"'num_kv_heads' {Hkv} != num_attention_heads {Hq} without multi_query or "
                              "new_decoder_architecture (transformers cannot run it)")
        residual = "parallel_shared" if parallel else "sequential"
    if c.bool("alibi", False):
        # Falcon adds ALiBi to q.k before the 1/sqrt(D) scaling (BLOOM after it): its own block
        attention = tuple(AttentionSpec(definition="falcon_alibi_attn", consts=(("max_bias", 8.0),))
                          for _ in range(n))
        positions = "alibi"
    else:
        theta, rotary, scaling = c.rope(D)
        attention = _decoder_attention(n, theta, rotary, scaling)
        positions = "rope"
    bias = c.bool("bias", False)
    return ModelSpec(
        model_type="falcon", **base, num_kv_heads=Hkv, head_dim=D,
        intermediate_size=c.int("ffn_hidden_size", default=4 * H),
        norm="layer", norm_eps=c.float("layer_norm_epsilon", default=1e-5), norm_bias=True,
        attention=attention, qkv_bias=bias, o_bias=bias,
        activation=c.activation("activation", default="gelu"), gated=False, mlp_bias=bias,
        residual=residual, positions=positions,
        tie_word_embeddings=c.bool("tie_word_embeddings", True), extra={"config": dict(c.cfg)})


def gpt2(c: _Config) -> ModelSpec:
    base = _common(c, hidden_keys=("n_embd",), heads_keys=("n_head",), layers_keys=("n_layer",))
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq, None)
    if not c.bool("scale_attn_weights", True):
        raise c.error("'scale_attn_weights' false is not supported (gpt2_attn scales by 1/sqrt(head_dim))")
    if c.bool("scale_attn_by_inverse_layer_idx", False):
        raise c.error("'scale_attn_by_inverse_layer_idx' true is not supported")
    if c.bool("add_cross_attention", False):
        raise c.error("'add_cross_attention' true is not supported (decoder-only models)")
    return ModelSpec(
        model_type="gpt2", **base, num_kv_heads=Hq, head_dim=D, intermediate_size=c.int("n_inner", default=4 * H),
        norm="layer", norm_eps=c.float("layer_norm_epsilon", default=1e-5), norm_bias=True,
        attention=tuple(AttentionSpec(definition="gpt2_attn") for _ in range(n)), qkv_bias=True, o_bias=True,
        activation=c.activation("activation_function", default="gelu_new"), gated=False, mlp_bias=True,
        positions="learned", max_positions=c.int("n_positions"),
        tie_word_embeddings=c.bool("tie_word_embeddings", True), extra={"config": dict(c.cfg)})


def bloom(c: _Config) -> ModelSpec:
    base = _common(c, hidden_keys=("hidden_size", "n_embed"), heads_keys=("n_head", "num_attention_heads"),
                   layers_keys=("n_layer", "num_hidden_layers"))
    H, Hq, n = base["hidden_size"], base["num_heads"], base["num_layers"]
    D = c.head_dim(H, Hq, None)
    if c.bool("apply_residual_connection_post_layernorm", False):
        raise c.error("'apply_residual_connection_post_layernorm' true is not supported")
    return ModelSpec(
        model_type="bloom", **base, num_kv_heads=Hq, head_dim=D, intermediate_size=4 * H,
        norm="layer", norm_eps=c.float("layer_norm_epsilon", default=1e-5), norm_bias=True,
        attention=tuple(AttentionSpec(definition="bloom_attn", consts=(("max_bias", 8.0),)) for _ in range(n)),
        qkv_bias=True, o_bias=True, activation="gelu_tanh", gated=False, mlp_bias=True,
        positions="alibi", embed_norm=True,
        tie_word_embeddings=c.bool("tie_word_embeddings", True), extra={"config": dict(c.cfg)})


FAMILIES: dict[str, Callable[[_Config], ModelSpec]] = {
    "llama": llama, "granite": granite, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma,
    "gemma2": gemma2, "gemma3_text": gemma3_text, "phi3": phi3, "gpt_neox": gpt_neox, "falcon": falcon,
    "gpt2": gpt2, "bloom": bloom,
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe,
    "deepseek_v2": deepseek_v2, "deepseek_v3": deepseek_v3,
}


def _time_step_limit(c: _Config) -> tuple[float, float]:
    """Mamba2's time_step_limit: (lo, hi) with 0 <= lo <= hi (hi may be Infinity: transformers 5
    writes it as {"__float__": "Infinity"})."""
    v = c.get("time_step_limit", [0.0, math.inf])
    if isinstance(v, (list, tuple)):
        v = [float(x["__float__"]) if isinstance(x, Mapping) and x.get("__float__") in ("Infinity", "inf") else x
             for x in v]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or not 0 <= v[0] <= v[1]):
        raise c.error(f"'time_step_limit' must be [lo, hi] with 0 <= lo <= hi, got {v!r}")
    return float(v[0]), float(v[1])


def _ssm_common(c: _Config) -> dict[str, Any]:
    """What MambaConfig and Mamba2Config share: sizes (needed), the conv width the kernels serve
    (2 to 4), SiLU (the convolution's activation: the kernels apply SiLU only)."""
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise c.error(f"'hidden_act' {act!r} is not supported (the convolution kernels apply silu)")
    k = c.int("conv_kernel", default=4)
    if k not in (2, 3, 4):
        raise c.error(f"'conv_kernel' {k} is not supported (the convolution kernels take 2, 3 or 4)")
    return {"vocab_size": c.int("vocab_size"), "hidden_size": c.int("hidden_size"),
            "num_layers": c.int("num_hidden_layers"), "expand": c.int("expand", default=2), "conv_kernel": k,
            "state_size": c.int("state_size"), "use_bias": c.bool("use_bias", False),
            "use_conv_bias": c.bool("use_conv_bias", True), "norm_eps": c.float("layer_norm_epsilon", default=1e-5)}


def mamba(c: _Config) -> MambaSpec:
    # transformers' MambaConfig: intermediate_size = expand * hidden_size (recomputed, as it does),
    # time_step_rank "auto" = ceil(hidden_size / 16); the LM head tied by default
    from .mamba import MambaMixerConfig, MambaSpec   # imports torch: only SSM configs pay for it
    base = _ssm_common(c)
    H = base["hidden_size"]
    rank = c.get("time_step_rank", "auto")
    rank = math.ceil(H / 16) if rank == "auto" else c.int("time_step_rank")
    mixer = MambaMixerConfig(hidden_size=H, intermediate_size=base["expand"] * H, state_size=base["state_size"],
                             time_step_rank=rank, conv_kernel=base["conv_kernel"], use_bias=base["use_bias"],
                             use_conv_bias=base["use_conv_bias"])
    return MambaSpec(model_type="mamba", vocab_size=base["vocab_size"], hidden_size=H, num_layers=base["num_layers"],
                     norm_eps=base["norm_eps"], mixer=mixer, residual_in_fp32=c.bool("residual_in_fp32", True),
                     tie_word_embeddings=c.bool("tie_word_embeddings", True), extra={"config": dict(c.cfg)})


def mamba2(c: _Config) -> MambaSpec:
    # transformers' Mamba2Config: expand * hidden_size must be num_heads * head_dim; n_groups of
    # B/C shared by num_heads / n_groups heads each; the gated norm over groups of I / n_groups
    from .mamba import Mamba2MixerConfig, MambaSpec
    base = _ssm_common(c)
    H, I = base["hidden_size"], base["expand"] * base["hidden_size"]
    heads, head_dim, groups = c.int("num_heads"), c.int("head_dim"), c.int("n_groups", default=8)
    if heads * head_dim != I:
        raise c.error(f"num_heads * head_dim ({heads} * {head_dim}) is not expand * hidden_size ({I})")
    if heads % groups:
        raise c.error(f"'n_groups' {groups} does not divide num_heads {heads} (B and C heads are shared by "
                      "equal numbers of heads)")
    mixer = Mamba2MixerConfig(hidden_size=H, intermediate_size=I, num_heads=heads, head_dim=head_dim,
                              state_size=base["state_size"], n_groups=groups, conv_kernel=base["conv_kernel"],
                              use_bias=base["use_bias"], use_conv_bias=base["use_conv_bias"],
                              chunk_size=c.int("chunk_size", default=256), time_step_limit=_time_step_limit(c),
                              norm_eps=base["norm_eps"])
    return MambaSpec(model_type="mamba2", vocab_size=base["vocab_size"], hidden_size=H, num_layers=base["num_layers"],
                     norm_eps=base["norm_eps"], mixer=mixer, residual_in_fp32=c.bool("residual_in_fp32", True),
                     tie_word_embeddings=c.bool("tie_word_embeddings", False), extra={"config": dict(c.cfg)})


# state-space families: their spec is models/mamba.MambaSpec (no attention, no MLP), their model
# models/mamba.MambaModel
SSM_FAMILIES: dict[str, Callable[[_Config], MambaSpec]] = {"mamba": mamba, "mamba2": mamba2}


def spec_from_config(config: Mapping[str, Any] | str | os.PathLike | Any) -> ModelSpec:
    """The ModelSpec of a transformers config (dict, config.json path, or PretrainedConfig)."""
    cfg = read_config(config)
    kind = cfg.get("model_type")
    if kind is None:
        raise ConfigError(f"config.json: missing 'model_type' (supported: {', '.join([*FAMILIES, *SSM_FAMILIES])})")
    if kind in SSM_FAMILIES:
        return SSM_FAMILIES[kind](_Config(kind, cfg))
    if kind not in FAMILIES:
        raise ConfigError(f"config.json: model_type {kind!r} is not supported (supported: "
                          f"{', '.join([*FAMILIES, *SSM_FAMILIES])})")
    spec = FAMILIES[kind](_Config(kind, cfg))
    _check(spec)
    return spec


def _check(spec: ModelSpec) -> None:
    assert spec.activation in ACTIVATIONS and len(spec.attention) == spec.num_layers
    if spec.gated and spec.activation == "relu":
        raise ConfigError(f"{spec.model_type} config: 'hidden_act' relu is not supported in a gated MLP "
                          "(supported: silu, gelu, gelu_tanh)")
    if spec.num_heads % spec.num_kv_heads:
        raise ConfigError(f"{spec.model_type} config: {spec.num_kv_heads} kv heads do not divide "
                          f"{spec.num_heads} heads")
    assert (spec.moe is None) == (not spec.moe_layers)
    assert spec.moe is None or (len(spec.moe_layers) == spec.num_layers and spec.moe.hidden == spec.hidden_size)


# ---------------------------------------------------------------------------------------------
# Checkpoint names.

# a recipe: (op, hf names); ops: "copy", "cat" (rows, in order), "T" (a Conv1D's [in, out]),
# "heads3" (fused [H, 3, D] rows -> q, k, v), "groups" (Falcon's [Hkv, Hq/Hkv + 2, D] rows),
# "stack" (one tensor an expert -> [E, ...]), "stack_pairs" (each expert's gate, then its up:
# concatenated rows, stacked -> [E, 2F, H])
Recipe = tuple[str, tuple[str, ...]]

# the base model's prefix in a CausalLM's state dict; checkpoints saved from the base model
# (GPT-2, BLOOM) have none
_PREFIX = {"gpt_neox": "gpt_neox", "falcon": "transformer", "gpt2": "transformer", "bloom": "transformer",
           "mamba": "backbone", "mamba2": "backbone"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "attention.bias",
                     "attention.masked_bias")


def hf_names(spec: ModelSpec, *, fused_experts: bool = False) -> dict[str, Recipe]:
    """canonical name -> (op, the transformers checkpoint names it is made from), as a CausalLM's
    state_dict() names them; an MoE layer's experts as the Hub stores them (each expert's
    projections: what transformers 5's save_pretrained writes), or with fused_experts as
    transformers 5 holds them (experts.gate_up_proj, experts.down_proj: save_original_format=False)."""
    f = spec.model_type
    if f in SSM_FAMILIES:
        return _mamba_names(spec)
    out: dict[str, Recipe] = {}
    biases_ln = spec.norm_bias

    def norm(canon: str, hf: str):
        out[f"{canon}.weight"] = ("copy", (f"{hf}.weight",))
        if biases_ln:
            out[f"{canon}.bias"] = ("copy", (f"{hf}.bias",))

    def linear(canon: str, hf: str, bias: bool, op: str = "copy"):
        out[f"{canon}.weight"] = (op, (f"{hf}.weight",))
        if bias:
            out[f"{canon}.bias"] = (op if op != "T" else "copy", (f"{hf}.bias",))

    if f in ("llama", "granite", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
             "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        out["embed.weight"] = ("copy", ("model.embed_tokens.weight",))
        norm("final_norm", "model.norm")
        for i in range(spec.num_layers):
            p, L = f"model.layers.{i}", f"layers.{i}"
            a = f"{p}.self_attn"
            norm(f"{L}.attn_norm", f"{p}.input_layernorm")
            if spec.mla is not None:   # runtime/mla.MLAAttention's names are transformers'
                out.update({f"{L}.attn.{n}": ("copy", (f"{a}.{n}",)) for n in mla_shapes(spec.mla)})
            elif f == "phi3":
                linear(f"{L}.attn.qkv", f"{a}.qkv_proj", spec.qkv_bias)
            else:
                out[f"{L}.attn.qkv.weight"] = ("cat", tuple(f"{a}.{x}_proj.weight" for x in "qkv"))
                if spec.qkv_bias:
                    out[f"{L}.attn.qkv.bias"] = ("cat", tuple(f"{a}.{x}_proj.bias" for x in "qkv"))
            if spec.mla is None:
                linear(f"{L}.attn.o", f"{a}.o_proj", spec.o_bias)
            if spec.is_moe(i):
                out.update(_moe_names(spec, p, f"{L}.mlp", fused_experts))
            else:
                if f == "phi3":
                    linear(f"{L}.mlp.gate_up", f"{p}.mlp.gate_up_proj", spec.mlp_bias)
                else:
                    out[f"{L}.mlp.gate_up.weight"] = ("cat", (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"))
                    if spec.mlp_bias:
                        out[f"{L}.mlp.gate_up.bias"] = ("cat", (f"{p}.mlp.gate_proj.bias", f"{p}.mlp.up_proj.bias"))
                linear(f"{L}.mlp.down", f"{p}.mlp.down_proj", spec.mlp_bias)
            if spec.qk_norm:
                norm(f"{L}.attn.q_norm", f"{a}.q_norm")
                norm(f"{L}.attn.k_norm", f"{a}.k_norm")
            if spec.sandwich_norms:   # Gemma-2's names: post_attention_layernorm is the sandwich norm
                norm(f"{L}.post_attn_norm", f"{p}.post_attention_layernorm")
                norm(f"{L}.mlp_norm", f"{p}.pre_feedforward_layernorm")
                norm(f"{L}.post_mlp_norm", f"{p}.post_feedforward_layernorm")
            else:
                norm(f"{L}.mlp_norm", f"{p}.post_attention_layernorm")
        head = "lm_head"
    elif f == "gpt_neox":
        out["embed.weight"] = ("copy", ("gpt_neox.embed_in.weight",))
        norm("final_norm", "gpt_neox.final_layer_norm")
        for i in range(spec.num_layers):
            p, L = f"gpt_neox.layers.{i}", f"layers.{i}"
            norm(f"{L}.attn_norm", f"{p}.input_layernorm")
            norm(f"{L}.mlp_norm", f"{p}.post_attention_layernorm")
            linear(f"{L}.attn.qkv", f"{p}.attention.query_key_value", spec.qkv_bias, "heads3")
            linear(f"{L}.attn.o", f"{p}.attention.dense", spec.o_bias)
            linear(f"{L}.mlp.up", f"{p}.mlp.dense_h_to_4h", True)
            linear(f"{L}.mlp.down", f"{p}.mlp.dense_4h_to_h", True)
        head = "lm_head"          # transformers 5's name; checkpoints say embed_out (_ALIASES)
    elif f == "falcon":
        out["embed.weight"] = ("copy", ("transformer.word_embeddings.weight",))
        norm("final_norm", "transformer.ln_f")
        for i in range(spec.num_layers):
            p, L = f"transformer.h.{i}", f"layers.{i}"
            if spec.residual == "parallel":
                norm(f"{L}.attn_norm", f"{p}.ln_attn")
                norm(f"{L}.mlp_norm", f"{p}.ln_mlp")
            else:
                norm(f"{L}.attn_norm", f"{p}.input_layernorm")
                if spec.residual == "sequential":
                    norm(f"{L}.mlp_norm", f"{p}.post_attention_layernorm")
            linear(f"{L}.attn.qkv", f"{p}.self_attention.query_key_value", spec.qkv_bias, "groups")
            linear(f"{L}.attn.o", f"{p}.self_attention.dense", spec.o_bias)
            linear(f"{L}.mlp.up", f"{p}.mlp.dense_h_to_4h", spec.mlp_bias)
            linear(f"{L}.mlp.down", f"{p}.mlp.dense_4h_to_h", spec.mlp_bias)
        head = "lm_head"
    elif f == "gpt2":
        out["embed.weight"] = ("copy", ("transformer.wte.weight",))
        out["pos_embed.weight"] = ("copy", ("transformer.wpe.weight",))
        norm("final_norm", "transformer.ln_f")
        for i in range(spec.num_layers):
            p, L = f"transformer.h.{i}", f"layers.{i}"
            norm(f"{L}.attn_norm", f"{p}.ln_1")
            norm(f"{L}.mlp_norm", f"{p}.ln_2")
            linear(f"{L}.attn.qkv", f"{p}.attn.c_attn", True, "T")
            linear(f"{L}.attn.o", f"{p}.attn.c_proj", True, "T")
            linear(f"{L}.mlp.up", f"{p}.mlp.c_fc", True, "T")
            linear(f"{L}.mlp.down", f"{p}.mlp.c_proj", True, "T")
        head = "lm_head"
    elif f == "bloom":
        out["embed.weight"] = ("copy", ("transformer.word_embeddings.weight",))
        norm("embed_norm", "transformer.word_embeddings_layernorm")
        norm("final_norm", "transformer.ln_f")
        for i in range(spec.num_layers):
            p, L = f"transformer.h.{i}", f"layers.{i}"
            norm(f"{L}.attn_norm", f"{p}.input_layernorm")
            norm(f"{L}.mlp_norm", f"{p}.post_attention_layernorm")
            linear(f"{L}.attn.qkv", f"{p}.self_attention.query_key_value", True, "heads3")
            linear(f"{L}.attn.o", f"{p}.self_attention.dense", True)
            linear(f"{L}.mlp.up", f"{p}.mlp.dense_h_to_4h", True)
            linear(f"{L}.mlp.down", f"{p}.mlp.dense_4h_to_h", True)
        head = "lm_head"
    else:
        raise ConfigError(f"model_type {f!r} has no checkpoint names (supported: {', '.join(FAMILIES)})")
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = ("copy", (f"{head}.weight",))
        if spec.lm_head_bias:
            out["lm_head.bias"] = ("copy", (f"{head}.bias",))
    return out


# an MoE block's module and its experts' gate, up and down projections in Hub checkpoints
# (transformers 5 names the block `mlp` in memory, for Mixtral too)
_HUB_EXPERTS = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
_HUB_EXPERTS_DEFAULT = ("mlp", "gate_proj", "up_proj", "down_proj")
# the shared expert's module in the MoE block (its gate_proj, up_proj, down_proj)
_SHARED_EXPERT = {"deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts"}


def _moe_names(spec: ModelSpec, layer: str, canon: str, fused_experts: bool) -> dict[str, Recipe]:
    """The recipes of layer `layer`'s MoE block, under its canonical prefix `canon`
    (runtime/moe.MoE's names)."""
    m = spec.moe
    block, gate, up, down = _HUB_EXPERTS.get(spec.model_type, _HUB_EXPERTS_DEFAULT)
    hf = f"{layer}.{'mlp' if fused_experts else block}"
    out: dict[str, Recipe] = {f"{canon}.gate.weight": ("copy", (f"{hf}.gate.weight",))}
    if m.router == "grouped":
        out[f"{canon}.gate.e_score_correction_bias"] = ("copy", (f"{hf}.gate.e_score_correction_bias",))
    if fused_experts:
        out[f"{canon}.experts.gate_up_proj"] = ("copy", (f"{hf}.experts.gate_up_proj",))
        out[f"{canon}.experts.down_proj"] = ("copy", (f"{hf}.experts.down_proj",))
    else:
        experts = [f"{hf}.experts.{j}" for j in range(m.experts)]
        out[f"{canon}.experts.gate_up_proj"] = ("stack_pairs", tuple(
            n for e in experts for n in (f"{e}.{gate}.weight", f"{e}.{up}.weight")))
        out[f"{canon}.experts.down_proj"] = ("stack", tuple(f"{e}.{down}.weight" for e in experts))
    if m.shared_inter:
        s = f"{hf}.{_SHARED_EXPERT.get(spec.model_type, 'shared_expert')}"
        if m.shared_slices:   # runtime/moe.py's slices of the routed experts' size
            out[f"{canon}.shared_expert.gate_up_proj"] = ("shared_gate_up", (f"{s}.gate_proj.weight",
                                                                            f"{s}.up_proj.weight"))
            out[f"{canon}.shared_expert.down_proj"] = ("shared_down", (f"{s}.down_proj.weight",))
        else:
            out[f"{canon}.shared_expert.gate_up.weight"] = ("cat", (f"{s}.gate_proj.weight", f"{s}.up_proj.weight"))
            out[f"{canon}.shared_expert.down.weight"] = ("copy", (f"{s}.down_proj.weight",))
    if m.shared_gate:
        out[f"{canon}.shared_expert_gate.weight"] = ("copy", (f"{hf}.shared_expert_gate.weight",))
    return out


def _mamba_names(spec: MambaSpec) -> dict[str, Recipe]:
    """Mamba / Mamba2: transformers' names under `backbone.` (the mixers' are MambaMixer's and
    Mamba2Mixer's, kept); embeddings -> embed, norm_f -> final_norm."""
    out: dict[str, Recipe] = {}
    for canon in spec.canonical_shapes():
        if canon == "lm_head.weight":
            hf = canon
        else:
            hf = "backbone." + {"embed.weight": "embeddings.weight", "final_norm.weight": "norm_f.weight"}.get(canon, canon)
        out[canon] = ("copy", (hf,))
    return out


# older checkpoint names transformers 5 renames on load
_ALIASES = {"gpt_neox": {"embed_out.weight": "lm_head.weight"},
            **{f: {"backbone.embedding.weight": "backbone.embeddings.weight", "embedding.weight": "embeddings.weight"}
               for f in ("mamba", "mamba2")}}


# an image-text checkpoint's language model (read_config takes its text_config) under a prefix of its own (Gemma 3's
# Gemma3ForConditionalGeneration: `language_model.model.` as the Hub stores it, `model.language_model.` as
# transformers 5 holds it), and its other parts, not loaded (text prompts only)
_PREFIX_ALIASES = {"gemma3_text": (("language_model.model.", "model."), ("model.language_model.", "model."),
                                   ("language_model.lm_head.", "lm_head."))}
_NOT_LOADED = {"gemma3_text": ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                               "model.multi_modal_projector.")}


def checkpoint_key(spec: ModelSpec, name: str, wanted) -> tuple[str, str]:
    """(name, key) of a checkpoint tensor: its name with the family's old aliases renamed, and that
    name as hf_names' recipes spell it (the model's prefix added unless `wanted` has it bare)."""
    name = _ALIASES.get(spec.model_type, {}).get(name, name)
    for old, new in _PREFIX_ALIASES.get(spec.model_type, ()):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return name, name if name in wanted else _PREFIX.get(spec.model_type, "model") + "." + name


def canonical_state_dict(spec: ModelSpec, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers checkpoint's tensors (its safetensors names, with or without the base
    model's prefix) under the canonical names of models/spec.py: q/k/v and gate/up fused, fused
    per-head layouts reordered, Conv1D weights transposed. Rotary and causal-mask buffers are
    ignored, and so is a tied lm_head; a missing or unexpected tensor is a ConfigError naming it.
    MoE experts come one tensor an expert (Hub checkpoints) or stacked (transformers 5's
    in-memory names), and are stacked into [E, ...] tensors."""
    fused = any(name.endswith((".experts.gate_up_proj", ".experts.down_proj")) for name in tensors)
    recipes = hf_names(spec, fused_experts=fused)
    wanted = {n for _, names in recipes.values() for n in names}
    prefix = _PREFIX.get(spec.model_type, "model") + "."
    have: dict[str, Any] = {}
    unexpected = []
    tied = "lm_head.weight" if spec.tie_word_embeddings else None
    for name, t in tensors.items():
        name, key = checkpoint_key(spec, name, wanted | {tied})
        if key in wanted:
            if key in have:
                raise ConfigError(f"checkpoint: tensor {key!r} given twice (with and without the '{prefix}' prefix)")
            have[key] = t
        elif key == tied:
            continue       # transformers' state_dict lists the tied head too
        elif name.endswith(_IGNORED_SUFFIXES) or _prediction_layer(spec, name) or \
                name.startswith(_NOT_LOADED.get(spec.model_type, ())):
            continue
        else:
            unexpected.append(name)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConfigError(f"checkpoint: unexpected tensor {unexpected[0]!r}{more} for a {spec.model_type} model")
    missing = sorted(wanted - set(have))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"checkpoint: missing tensor {missing[0]!r}{more} for a {spec.model_type} model")
    import torch
    out: dict[str, Any] = {}
    for canon, (op, names) in recipes.items():
        ts = [have[n] for n in names]
        if any(type(t).__name__ == "QuantPart" for t in ts):   # a quantised Linear (models/loading.py)
            if op not in ("copy", "cat", "stack", "stack_pairs") or not all(type(t).__name__ == "QuantPart"
                                                                           for t in ts):
                raise ConfigError(f"checkpoint: {names[0]} is quantised, and the {spec.model_type} model's "
                                  f"{canon} needs it reordered ({op}): not served for quantised checkpoints")
            branch_scaled(spec, canon, ts[0])   # (refuses a scale it cannot fold in)
            if op in ("stack", "stack_pairs"):   # experts: one QuantExperts of their parts (models/loading.py)
                step = 2 if op == "stack_pairs" else 1
                out[canon] = QuantStack([list(ts[j:j + step]) for j in range(0, len(ts), step)])
            else:
                out[canon] = ts[0] if op == "copy" else list(ts)
            continue
        if op == "copy":
            t = ts[0]
        elif op == "cat":
            t = torch.cat(ts, dim=0)
        elif op == "T":
            t = ts[0].t().contiguous()
        elif op == "heads3":
            t = _heads3(spec, ts[0], names[0])
        elif op == "groups":
            t = _groups(spec, ts[0], names[0])
        elif op == "stack":
            t = torch.stack(ts)
        elif op == "stack_pairs":
            t = torch.stack([torch.cat(ts[j:j + 2], dim=0) for j in range(0, len(ts), 2)])
        elif op in ("shared_gate_up", "shared_down"):   # the shared expert cut into the experts' size
            from ..runtime.moe import shared_down_slices, shared_gate_up_slices
            fs = ts[0].shape[0 if op == "shared_gate_up" else 1]
            if fs % spec.moe.inter:
                raise ConfigError(f"checkpoint: {names[0]!r} has {fs} intermediate features, not a multiple of "
                                  f"{spec.moe.inter}")
            t = (shared_gate_up_slices(ts[0], ts[1], spec.moe.inter) if op == "shared_gate_up"
                 else shared_down_slices(ts[0], spec.moe.inter))
        else:   # pragma: no cover
            raise AssertionError(op)
        out[canon] = branch_scaled(spec, canon, t)
    _check_shapes(spec, out)
    return out


_BRANCH_OUT = re.compile(r"layers\.\d+\.(attn\.o|mlp\.down)\.(weight|bias)")


def branch_scaled(spec: ModelSpec, canon: str, t):
    """A canonical tensor with the family's residual_scale folded in where it is o's or down's weight or bias (the
    branches' outputs: Granite's residual_multiplier); any other as it is."""
    if getattr(spec, "residual_scale", None) is None or not _BRANCH_OUT.fullmatch(canon):   # (MambaSpec: none)
        return t
    import torch
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"checkpoint: {canon} is quantised: {spec.model_type}'s residual_multiplier cannot be "
                          f"folded into it (not served)")
    return t * spec.residual_scale


def _prediction_layer(spec: ModelSpec, name: str) -> bool:
    """Whether `name` is in a DeepSeek-V3 checkpoint's multi-token-prediction modules: layers past
    num_hidden_layers (model.layers.61.* in DeepSeek-V3's), which transformers does not load either."""
    m = re.match(r"(?:model\.)?layers\.(\d+)\.", name) if spec.model_type == "deepseek_v3" else None
    return m is not None and int(m.group(1)) >= spec.num_layers


def _heads3(spec: ModelSpec, t, name: str):
    """[H, 3, D] rows (each head's q, k, v together: GPT-NeoX, BLOOM) -> q rows, k rows, v rows."""
    Hq, D = spec.num_heads, spec.head_dim
    if t.shape[0] != 3 * Hq * D:
        raise ConfigError(f"checkpoint: {name!r} has {t.shape[0]} rows, expected {3 * Hq * D} (3 * heads * head_dim)")
    rest = tuple(t.shape[1:])
    return t.reshape(Hq, 3, D, *rest).transpose(0, 1).reshape(3 * Hq * D, *rest).contiguous()


def _groups(spec: ModelSpec, t, name: str):
    """Falcon's fused rows: per kv head, its Hq/Hkv query heads, then its key, then its value
    ([Hkv, Hq/Hkv + 2, D]; MHA is [H, 3, D], multi-query [Hq q heads, k, v])."""
    Hq, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    g = Hq // Hkv
    if t.shape[0] != (Hq + 2 * Hkv) * D:
        raise ConfigError(f"checkpoint: {name!r} has {t.shape[0]} rows, expected {(Hq + 2 * Hkv) * D}")
    rest = tuple(t.shape[1:])
    x = t.reshape(Hkv, g + 2, D, *rest)
    q = x[:, :g].reshape(Hq * D, *rest)
    k = x[:, g].reshape(Hkv * D, *rest)
    v = x[:, g + 1].reshape(Hkv * D, *rest)
    import torch
    return torch.cat([q, k, v], dim=0).contiguous()


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every canonical tensor the spec's model has."""
    if spec.model_type in SSM_FAMILIES:
        return spec.canonical_shapes()
    H, F, D, V = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
    nb = spec.norm_bias

    def norm(name, n=H):
        out[f"{name}.weight"] = (n,)
        if nb:
            out[f"{name}.bias"] = (n,)
    if spec.positions == "learned":
        out["pos_embed.weight"] = (spec.max_positions, H)
    if spec.embed_norm:
        norm("embed_norm")
    for i in range(spec.num_layers):
        L = f"layers.{i}"
        norm(f"{L}.attn_norm")
        if spec.mla is not None:
            out.update({f"{L}.attn.{n}": shape for n, shape in mla_shapes(spec.mla).items()})
        else:
            out[f"{L}.attn.qkv.weight"] = (spec.qkv_size, H)
            if spec.qkv_bias:
                out[f"{L}.attn.qkv.bias"] = (spec.qkv_size,)
            if spec.qk_norm:
                out[f"{L}.attn.q_norm.weight"] = (D,)
                out[f"{L}.attn.k_norm.weight"] = (D,)
            out[f"{L}.attn.o.weight"] = (H, spec.num_heads * D)
            if spec.o_bias:
                out[f"{L}.attn.o.bias"] = (H,)
        if spec.sandwich_norms:
            norm(f"{L}.post_attn_norm")
            norm(f"{L}.post_mlp_norm")
        if spec.residual != "parallel_shared":
            norm(f"{L}.mlp_norm")
        if spec.is_moe(i):
            out.update(_moe_shapes(spec, f"{L}.mlp"))
            continue
        up = "gate_up" if spec.gated else "up"
        out[f"{L}.mlp.{up}.weight"] = ((2 if spec.gated else 1) * F, H)
        out[f"{L}.mlp.down.weight"] = (H, F)
        if spec.mlp_bias:
            out[f"{L}.mlp.{up}.bias"] = ((2 if spec.gated else 1) * F,)
            out[f"{L}.mlp.down.bias"] = (H,)
    norm("final_norm")
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
        if spec.lm_head_bias:
            out["lm_head.bias"] = (V,)
    return out


def mla_shapes(m: MLAConfig) -> dict[str, tuple[int, ...]]:
    """runtime/mla.MLAAttention's tensors (transformers' DeepseekV3Attention names) and shapes."""
    H, nh, L, R = m.hidden_size, m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim
    qk = m.qk_nope_head_dim + R
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, rows: int, cols: int, bias: bool):
        out[f"{name}.weight"] = (rows, cols)
        if bias:
            out[f"{name}.bias"] = (rows,)
    if m.q_lora_rank is None:
        linear("q_proj", nh * qk, H, False)
    else:
        linear("q_a_proj", m.q_lora_rank, H, m.attention_bias)
        out["q_a_layernorm.weight"] = (m.q_lora_rank,)
        linear("q_b_proj", nh * qk, m.q_lora_rank, False)
    linear("kv_a_proj_with_mqa", L + R, H, m.attention_bias)
    out["kv_a_layernorm.weight"] = (L,)
    linear("kv_b_proj", nh * (m.qk_nope_head_dim + m.v_head_dim), L, False)
    linear("o_proj", H, nh * m.v_head_dim, m.attention_bias)
    return out


def _moe_shapes(spec: ModelSpec, canon: str) -> dict[str, tuple[int, ...]]:
    m, H = spec.moe, spec.hidden_size
    E, Fe, Fs = m.experts, m.inter, m.shared_inter
    out = {f"{canon}.gate.weight": (E, H), f"{canon}.experts.gate_up_proj": (E, 2 * Fe, H),
           f"{canon}.experts.down_proj": (E, H, Fe)}
    if m.router == "grouped":
        out[f"{canon}.gate.e_score_correction_bias"] = (E,)
    if m.shared_slices:
        out[f"{canon}.shared_expert.gate_up_proj"] = (m.shared_slices, 2 * Fe, H)
        out[f"{canon}.shared_expert.down_proj"] = (m.shared_slices, H, Fe)
    elif Fs:
        out[f"{canon}.shared_expert.gate_up.weight"] = (2 * Fs, H)
        out[f"{canon}.shared_expert.down.weight"] = (H, Fs)
    if m.shared_gate:
        out[f"{canon}.shared_expert_gate.weight"] = (1, H)
    return out


class QuantStack(list):
    """A quantised expert stack as the checkpoint holds it: for each expert, its quantised parts
    fused along N (gate then up, or down alone); models/loading.py makes the expert kernels'
    layout of it. `shape` is the stack's logical [E, N, K]."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), sum(p.shape[0] for p in self[0]), self[0][0].shape[1])


def _check_shapes(spec: ModelSpec, tensors: Mapping[str, Any]) -> None:
    want = canonical_shapes(spec)
    assert set(want) == set(tensors), sorted(set(want) ^ set(tensors))
    for name, shape in want.items():
        t = tensors[name]   # a list: quantised parts fused along N (models/loading.py)
        got = ((sum(p.shape[0] for p in t), t[0].shape[1]) if isinstance(t, list) and not isinstance(t, QuantStack)
               else tuple(t.shape))
        if got != shape:
            raise ConfigError(f"checkpoint: {name} has shape {list(got)}, the config says {list(shape)}")


# ---------------------------------------------------------------------------------------------
# DSL bindings and the definitions a model uses.

_NORM_DEFS = {"rms": ("rms_norm", "add_rms_norm"), "rms_1p": ("gemma_rms_norm", "add_gemma_rms_norm"),
              ("layer", True): ("layer_norm", "add_layer_norm"), ("layer", False): ("layer_norm_nobias",)}
_ACT_DEFS = {(True, "silu"): "swiglu", (True, "gelu"): "geglu", (True, "gelu_tanh"): "geglu_tanh",
             (False, "silu"): "silu_act", (False, "gelu"): "gelu_act", (False, "gelu_tanh"): "gelu_tanh_act",
             (False, "relu"): "relu_act"}


def _attention_bindings(a: AttentionSpec) -> dict[str, Any]:
    b: dict[str, Any] = a.const_dict()
    if a.rope_scaling is not None:
        params, maxpos = a.rope_scaling
        b["rope_scaling"] = ({k: list(v) if isinstance(v, tuple) else v for k, v in params}, maxpos)
    return b


def bindings_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """Model-wide DSL bindings: dims H, F, Hq, Hkv, D; the attention consts every layer agrees on
    (a const that differs between layers, like Gemma-2's window, is left out); `eps` (the norms'
    runtime scalar); for Llama-3 RoPE, llama_attn's rope consts besides `rope_scaling` (the
    two agree, so llama_attn takes both); for MoE models, the routing layer's consts (moe_route's E,
    k and renormalize; moe_route_grouped's, and moe_route_sigmoid's renormalize and scaling)."""
    if spec.model_type in SSM_FAMILIES:   # Mamba / Mamba2: the norms' (the scans are not DSL layers)
        return {"H": spec.hidden_size, "eps": spec.norm_eps}
    out: dict[str, Any] = {"H": spec.hidden_size, "F": spec.intermediate_size, "Hq": spec.num_heads,
                           "Hkv": spec.num_kv_heads, "D": spec.head_dim, "eps": spec.norm_eps}
    per_layer = [_attention_bindings(a) for a in spec.attention]
    for key in sorted({k for b in per_layer for k in b}, key=str):
        values = [b.get(key, _MISSING) for b in per_layer]
        if all(v == values[0] for v in values) and values[0] is not _MISSING:
            out[key] = values[0]
    if out.get("rotary_dim") == 0:   # the whole head: decoder_attn's 0, the rope row's default D
        del out["rotary_dim"]
    scaling = out.get("rope_scaling")
    if scaling is not None and scaling[0].get("rope_type") == "llama3":
        from ..dsl.program import LLAMA3_ROPE_NAMES
        for key, name in LLAMA3_ROPE_NAMES.items():
            if scaling[0].get(key) is not None:
                out[name] = scaling[0][key]
    if spec.moe is not None:
        out.update(_moe_route_bindings(spec.moe)[1])
        if spec.moe.router == "grouped":   # moe_route_sigmoid's names of the same settings (its one group)
            out.update(renormalize=spec.moe.norm_topk_prob, scaling=float(spec.moe.routed_scaling_factor))
    return out


def _moe_route_bindings(moe: MoEConfig) -> tuple[str, dict[str, Any]]:
    """The routing layer runtime/moe.MoE builds, with its bindings."""
    if moe.router == "softmax":
        return "moe_route", {"E": moe.experts, "k": moe.top_k, "renormalize": moe.norm_topk_prob}
    return "moe_route_grouped" if moe.router == "grouped" else "moe_route_limited", {"E": moe.experts, "n_group": moe.n_group, "topk_group": moe.topk_group,
                                 "k": moe.top_k, "norm_topk_prob": moe.norm_topk_prob,
                                 "routed_scaling_factor": float(moe.routed_scaling_factor)}


_MISSING = object()


def definitions_for(spec: ModelSpec) -> list[tuple[str, dict[str, Any]]]:
    """The stdlib definitions the model (models/model.py) uses, each with its bindings: its norms
    and their residual-add forms, the q/k norms (H = D) of Qwen3, its dense MLP's activation, its
    MoE layers' routing and experts' activation (F = the experts' size), and its attention block
    once per distinct const set (with the model's RoPE scaling, LongRoPE's without a fixed regime twice: short
    and long; not DeepSeek's latent attention, which is runtime/mla.py's). No rope row layer: the attention
    block and its KV append rotate q and k."""
    if spec.model_type in SSM_FAMILIES:   # Mamba / Mamba2 (models/mamba.py)
        return _ssm_definitions(spec)
    dims = {"H": spec.hidden_size, "F": spec.intermediate_size, "Hq": spec.num_heads, "Hkv": spec.num_kv_heads,
            "D": spec.head_dim}
    out: list[tuple[str, dict[str, Any]]] = []
    norm_key = ("layer", spec.norm_bias) if spec.norm == "layer" else spec.norm
    for name in _NORM_DEFS[norm_key]:
        out.append((name, {"H": spec.hidden_size}))
    if spec.qk_norm:    # Qwen3's / Gemma 3's per-head RMSNorm (models/model.py builds both of its kernels)
        out += [(name, {"H": spec.head_dim}) for name in _NORM_DEFS[spec.qk_norm_kind]]
    act = _ACT_DEFS.get((spec.gated, spec.activation))
    if act is None:
        raise ConfigError(f"{spec.model_type}: no stdlib activation for a {'gated ' * spec.gated}{spec.activation} MLP")
    if not all(spec.is_moe(i) for i in range(spec.num_layers)):
        out.append((act, {"F": spec.intermediate_size}))
    if spec.moe is not None:
        out.append(_moe_route_bindings(spec.moe))
        out.append((_ACT_DEFS[True, spec.moe.activation], {"F": spec.moe.inter}))
    out = list(dict.fromkeys(out and [(n, tuple(b.items())) for n, b in out]))
    out = [(n, dict(b)) for n, b in out]
    seen: list[tuple[str, dict[str, Any]]] = []
    for a in spec.attention:
        if a.definition == "mla_attn":   # runtime/mla.py's block, not the stdlib's: MLAAttention builds it
            continue
        b = {**dims, **_attention_bindings(a)}
        b = {k: v for k, v in b.items() if k not in ("H", "F")}
        # LongRoPE without a fixed regime: the block with its short factors and with its long ones (models/model.py
        # takes one a step, by its largest position)
        for extra in ({},) if a.longrope_threshold() is None else ({"rope_regime": "short"}, {"rope_regime": "long"}):
            if (a.definition, {**b, **extra}) not in seen:
                seen.append((a.definition, {**b, **extra}))
    out += seen
    return out


def _ssm_definitions(spec: MambaSpec) -> list[tuple[str, dict[str, Any]]]:
    """A Mamba / Mamba2 model's stdlib definitions: the block and final RMSNorms; the mixer's
    causal conv and its decode step (dsl/stdlib/ssm.lf over F = the conv's channels: Mamba's
    intermediate_size, Mamba2's conv_dim; KW = conv_kernel), which lower to the scan kernels
    (codegen/scan_lower.py); Mamba's selective scan and state update (F = intermediate_size, NS =
    state_size); Mamba2's gated RMSNorm (dsl/stdlib/mamba2.lf, over groups of I / n_groups) and the
    same norm ungated (a decode step's SSD update applies the gate). Mamba2's
    SSD kernels have no DSL definition: runtime/build.py adds their plans (model_plans)."""
    m = spec.mixer
    out: list[tuple[str, dict[str, Any]]] = [("rms_norm", {"H": spec.hidden_size})]
    conv = {"F": m.conv_dim if spec.model_type == "mamba2" else m.intermediate_size, "KW": m.conv_kernel}
    out += [("mamba_conv", conv), ("mamba_conv_step", conv)]
    if spec.model_type == "mamba":
        ssm = {"F": m.intermediate_size, "NS": m.state_size}
        out += [("selective_scan", ssm), ("selective_state_update", ssm)]
    elif m.n_groups > 1:   # prefill's gated norm; a decode step's state update applies the gate itself
        out += [("gated_grouped_rms_norm", {"H": m.intermediate_size, "G": m.n_groups}),
                ("grouped_rms_norm", {"H": m.intermediate_size, "G": m.n_groups})]
    else:
        out += [("gated_rms_norm", {"H": m.intermediate_size}), ("rms_norm", {"H": m.intermediate_size})]
    return out
