"""DeepSeek-V2/V3 multi-head latent attention (MLA), as transformers' `DeepseekV3Attention`,
over a latent cache in the absorbed form.

Each token keeps what every head's keys and values derive from: its compressed latent
c = RMSNorm(kv_a(x))[:L] (kv_lora_rank L = 512) and its rotated RoPE key k_r (R = 64 channels),
576 numbers a token for all heads together. With W_uk / W_uv the per-head parts of kv_b_proj,
head h's score is q_nope_h . (W_uk,h c) + q_rope_h . k_r = (W_uk,h^T q_nope_h) . c + q_rope_h . k_r
and its output W_uv,h sum_j p_j c_j. So attention runs as multi-query attention with one KV
head: queries [q_rope, W_uk^T q_nope] of R + L channels against keys [k_r, c], values c (L
channels), then each head's result goes through W_uv and o_proj. The block is written in the
DSL (`MLA_SOURCE`): RoPE on the first R channels (interleaved pairs, as DeepSeek's
rope_interleave), YaRN from the numerics module, the softmax scale qk_head_dim^-1/2 times
YaRN's mscale(factor, mscale_all_dim)^2 (transformers' yarn_apply_mscale).

This module runs the reference evaluator (CPU tensors, or any device through torch): the
kernels have no specialisation for a 576-channel key with 512-channel values yet (issue 11's
MLA decode kernel), and a GPU launch is refused with that reason rather than run wrongly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..dsl.attention_ref import apply_rope
from ..dsl.evaluator import evaluate
from ..dsl.numerics import rope_scaling_from_hf, yarn_mscale
from ..dsl.program import Program
from ..models.families import _Config

__all__ = ["MLA_SOURCE", "MLAConfig", "MLAAttention", "LatentCache"]

MLA_SOURCE = """
dims Hq, Hkv, D, Dv
dynamic B, S, Skv
# q: [rope part, no-rope part mapped into the latent]; k: [rotated RoPE key, latent]; v: the latent
attention mla_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, Dv],
                   const theta: f32 = 10000.0, const rope_dim: int = 64,
                   const softmax_scale: f32 = 0.0721687836) -> T[B, S, Hq, Dv] {
    rope(theta = theta, style = gptj, dim = rope_dim)
    scale = softmax_scale
    mask = q_pos >= kv_pos
}
"""


@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_parameters: dict = field(default_factory=dict)   # transformers' rope_parameters (type, factor, ...)
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, config) -> "MLAConfig":
        """From a transformers DeepseekV2/V3 config (object or dict), read as the model registry
        reads configs: a missing or mistyped key is a ConfigError naming it; the defaults are
        transformers' (q_lora_rank null: no q LoRA)."""
        d = config if isinstance(config, dict) else config.to_dict()
        c = _Config(str(d.get("model_type") or "deepseek_v3"), d)
        if not c.bool("rope_interleave", True):
            raise c.error("'rope_interleave' false (halves-rotated RoPE) is not served; DeepSeek-V2/V3 "
                          "checkpoints rotate interleaved pairs")
        rp = dict(c.first("rope_parameters", "rope_scaling", default={}))
        theta = float(rp["rope_theta"]) if rp.get("rope_theta") is not None else c.float("rope_theta", default=10000.0)
        return cls(hidden_size=c.int("hidden_size"), num_heads=c.int("num_attention_heads"),
                   q_lora_rank=c.int("q_lora_rank") if c.has("q_lora_rank") else None,
                   kv_lora_rank=c.int("kv_lora_rank"), qk_nope_head_dim=c.int("qk_nope_head_dim"),
                   qk_rope_head_dim=c.int("qk_rope_head_dim"), v_head_dim=c.int("v_head_dim"),
                   rms_norm_eps=c.float("rms_norm_eps", default=1e-6), attention_bias=c.bool("attention_bias", False),
                   rope_theta=theta, rope_parameters=rp,
                   max_position_embeddings=c.int("max_position_embeddings") if c.has("max_position_embeddings") else None)

    @property
    def rope_scaling(self):
        return rope_scaling_from_hf(self.rope_parameters, self.max_position_embeddings)

    @property
    def softmax_scale(self) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        rp = self.rope_parameters
        if rp.get("rope_type", rp.get("type", "default")) not in ("default", None) and rp.get("mscale_all_dim"):
            scale *= yarn_mscale(float(rp["factor"]), float(rp["mscale_all_dim"])) ** 2
        return scale


class LatentCache:
    """Per sequence of a batch, the tokens' [rotated RoPE key, latent] rows (R + L channels),
    contiguous and grown as tokens arrive (the reference path's cache)."""

    def __init__(self, batch: int, rope_dim: int, latent_dim: int, dtype, device):
        self.rows = torch.empty(batch, 0, 1, rope_dim + latent_dim, dtype=dtype, device=device)

    @property
    def length(self) -> int:
        return self.rows.shape[1]

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        self.rows = torch.cat([self.rows, rows], dim=1)
        return self.rows


class _RMSNorm(torch.nn.Module):
    def __init__(self, n: int, eps: float, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLAAttention(torch.nn.Module):
    """Loads transformers' DeepseekV3Attention weights (same names: q_proj or q_a_proj /
    q_a_layernorm / q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj).
    forward(hidden [B, S, H], cache=None) -> [B, S, H]: without a cache, the S tokens attend
    causally among themselves; with a LatentCache, they follow the tokens already in it."""

    def __init__(self, config: MLAConfig, *, dtype=torch.float32, device=None):
        super().__init__()
        c = self.config = config
        H, nh = c.hidden_size, c.num_heads
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        lin = lambda i, o, bias: torch.nn.Linear(i, o, bias=bias, dtype=dtype, device=device)   # noqa: E731
        if c.q_lora_rank is None:
            self.q_proj = lin(H, nh * qk, False)
        else:
            self.q_a_proj = lin(H, c.q_lora_rank, c.attention_bias)
            self.q_a_layernorm = _RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype, device)
            self.q_b_proj = lin(c.q_lora_rank, nh * qk, False)
        self.kv_a_proj_with_mqa = lin(H, c.kv_lora_rank + c.qk_rope_head_dim, c.attention_bias)
        self.kv_a_layernorm = _RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype, device)
        self.kv_b_proj = lin(c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim), False)
        self.o_proj = lin(nh * c.v_head_dim, H, c.attention_bias)
        for p in self.parameters():
            p.requires_grad_(False)
        kw = {}
        if c.rope_scaling is not None:
            kw["rope_scaling"] = (dict(c.rope_parameters), c.max_position_embeddings)
        self.layer = Program.from_source(MLA_SOURCE, "mla.lf").specialise(
            "mla_attn", Hq=nh, Hkv=1, D=c.qk_rope_head_dim + c.kv_lora_rank, Dv=c.kv_lora_rank,
            dtype={torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype],
            theta=c.rope_theta, rope_dim=c.qk_rope_head_dim, softmax_scale=c.softmax_scale, **kw)
        self.rope = self.layer.function.outputs[0].arg.rope

    def make_cache(self, batch: int) -> LatentCache:
        w = self.kv_a_proj_with_mqa.weight
        return LatentCache(batch, self.config.qk_rope_head_dim, self.config.kv_lora_rank, w.dtype, w.device)

    def _absorbed(self):
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]     # W_uk [nh, nope, L], W_uv [nh, v, L]

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, cache: LatentCache | None = None) -> torch.Tensor:
        c = self.config
        B, S, _ = hidden.shape
        if hidden.device.type == "cuda":
            raise NotImplementedError("MLAAttention: no attention kernel for a 576-channel latent key with "
                                      "512-channel values yet; run it on CPU tensors (the reference)")
        R, L = c.qk_rope_head_dim, c.kv_lora_rank
        if c.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(B, S, c.num_heads, c.qk_nope_head_dim + R)
        q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        kv = self.kv_a_proj_with_mqa(hidden)
        latent, k_rope = self.kv_a_layernorm(kv[..., :L]), kv[..., L:]
        past = cache.length if cache is not None else 0
        pos = torch.arange(past, past + S, device=hidden.device).expand(B, S)
        k_rope = apply_rope(k_rope[:, :, None].double(), pos, self.rope, R, past + S)[:, :, 0].to(kv.dtype)
        rows = torch.cat([k_rope, latent], dim=-1)[:, :, None]            # [B, S, 1, R + L]
        keys = cache.append(rows) if cache is not None else rows
        w_uk, w_uv = self._absorbed()
        q_lat = torch.einsum("bshn,hnl->bshl", q_nope, w_uk)
        q_full = torch.cat([q_rope, q_lat], dim=-1)
        n = keys.shape[1]
        (o_lat,) = evaluate(self.layer.function, {"q": q_full, "k": keys, "v": keys[..., R:]},
                            q_positions=pos, kv_positions=torch.arange(n, device=hidden.device).expand(B, n),
                            k_rotated=True)
        out = torch.einsum("bshl,hvl->bshv", o_lat, w_uv).reshape(B, S, c.num_heads * c.v_head_dim)
        return self.o_proj(out)
