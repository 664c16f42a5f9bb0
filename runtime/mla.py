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

Two paths:
- the reference (a `LatentCache`, or no cache, on CPU tensors): the DSL's reference evaluator
  over the absorbed form;
- the paged path (a `PagedLatentCache` from runtime/mla_cache.py, or CUDA tensors): rows are
  appended by the latent-cache append kernel (RoPE on k_r at write); a decode step (one new
  token a sequence) runs the MLA decode kernel (runtime/mla_decode.py) over the pages; a prefill
  (several new tokens, with or without cached ones before them) runs the non-absorbed form
  (per-head keys [W_uk c, k_r] of 192 channels, values W_uv c of 128) through torch's
  scaled_dot_product_attention (its cuDNN backend on an H200: 1.29 ms at 1 x 4096 tokens, 128
  heads, against our kernel's 1.50), or with prefill="kernel" through our prefill kernel of the
  DSL block `MLA_PREFILL_SOURCE` (q/k head dim 192, value dim 128: the wgmma kernel on sm_90,
  mma.sync elsewhere; 1.57 x FlexAttention), keys and values laid out as pages of 64 tokens.
  On CPU tensors the paged path runs the same steps with torch ops in place of the kernels
  (the decode's float64 reference; the prefill through torch's scaled_dot_product_attention),
  so its logic is tested without a GPU. `step` is this path for a step of a model's layer: ragged tokens of several sequences,
  each sequence decoding or prefilling, over the layer's pages of a cache of many layers
  (models/deepseek.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import numpy as np
import torch.nn.functional as F

from ..dsl.attention_ref import apply_rope, rotate
from ..dsl.evaluator import evaluate
from ..dsl.numerics import rope_cos_sin, rope_scaling_from_hf, yarn_mscale
from ..dsl.program import Program
from ..models.families import _Config
from .mla_cache import PagedLatentCache
from .mla_decode import MLADecode

__all__ = ["MLA_SOURCE", "MLAConfig", "MLAAttention", "LatentCache", "PagedLatentCache"]

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

# The non-absorbed prefill: per-head q/k of nope + rope channels (RoPE already applied), values of
# their own head dim, causal over the sequence's cached tokens and the new ones
MLA_PREFILL_SOURCE = """
dims Hq, Hkv, D, Dv
dynamic B, S, Skv
attention mla_prefill(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, Dv],
                      const softmax_scale: f32 = 0.0721687836) -> T[B, S, Hq, Dv] {
    scale = softmax_scale
    mask = q_pos >= kv_pos
}
"""
PREFILL_PAGE = 64   # tokens a page of the prefill's key / value layout


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
    rope_parameters: dict = field(default_factory=dict, hash=False)   # transformers' (type, factor, ...)
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, config) -> "MLAConfig":
        """From a transformers DeepseekV2/V3 config (object or dict), read as the model registry
        reads configs: a missing or mistyped key is a ConfigError naming it; the defaults are
        transformers' (q_lora_rank null: no q LoRA). The latent norms keep eps 1e-6 whatever the
        config's rms_norm_eps (the decoder's norms): transformers' and DeepSeek's code build them so."""
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
                   attention_bias=c.bool("attention_bias", False),
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

    def __init__(self, config: MLAConfig, *, dtype=torch.float32, device=None, prefill: str = "sdpa"):
        super().__init__()
        if prefill not in ("sdpa", "kernel"):
            raise ValueError(f"MLAAttention: prefill must be 'sdpa' or 'kernel', not {prefill!r}")
        self.prefill = prefill   # the prefill's attention on CUDA: torch's SDPA (faster measured) or our kernel
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
        self._decoders: dict = {}
        self._prefills: dict = {}

    def make_cache(self, batch: int, *, max_tokens: int | None = None, page_size: int = 64,
                   paged: bool | None = None):
        """A cache for `batch` sequences (sequence b: row b of the hidden states): a LatentCache
        (the reference path), or with paged (the default on CUDA) a PagedLatentCache with pages for
        max_tokens tokens a sequence."""
        w = self.kv_a_proj_with_mqa.weight
        c = self.config
        if paged is None:
            paged = w.device.type == "cuda"
        if not paged:
            return LatentCache(batch, c.qk_rope_head_dim, c.kv_lora_rank, w.dtype, w.device)
        if max_tokens is None:
            raise ValueError("make_cache: a paged cache needs max_tokens (tokens a sequence may hold)")
        per = -(-max_tokens // page_size)
        return PagedLatentCache(batch * per, page_size, c.kv_lora_rank, c.qk_rope_head_dim, w.dtype, w.device,
                                max_seqs=batch, max_pages_per_seq=per)

    def _absorbed(self):
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]     # W_uk [nh, nope, L], W_uv [nh, v, L]

    def _project(self, hidden: torch.Tensor):
        """q_nope [B, S, nh, nope], q_rope [B, S, nh, R], the normed latent [B, S, L], k_r [B, S, R] (not rotated)."""
        c = self.config
        B, S, _ = hidden.shape
        L = c.kv_lora_rank
        if c.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(B, S, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
        kv = self.kv_a_proj_with_mqa(hidden)
        return q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:], self.kv_a_layernorm(kv[..., :L]), kv[..., L:]

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, S, ..., R] rotated at positions pos [B, S] as the append kernel rotates k_r: f32
        cos/sin of the float64 angles (dsl/numerics, attention factor included), one rounding."""
        R = self.config.qk_rope_head_dim
        cos, sin = rope_cos_sin(pos, R, float(self.rope.theta), self.rope.scaling, torch.float32)
        shape = cos.shape[:2] + (1,) * (x.dim() - 3) + cos.shape[2:]
        return rotate(x.float(), cos.view(shape), sin.view(shape), "gptj", R).to(x.dtype)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, cache: LatentCache | PagedLatentCache | None = None,
                seq_ids=None) -> torch.Tensor:
        """hidden [B, S, hidden]; with a PagedLatentCache, seq_ids (host ints, default 0..B-1) are
        the cache's sequences of the B rows."""
        if isinstance(cache, PagedLatentCache) or (cache is None and hidden.device.type == "cuda"):
            return self._forward_paged(hidden, cache, seq_ids)
        if hidden.device.type == "cuda":
            raise TypeError("MLAAttention: CUDA tensors take a PagedLatentCache (make_cache(batch, max_tokens=...)), "
                            "not the reference path's LatentCache")
        c = self.config
        B, S, _ = hidden.shape
        R = c.qk_rope_head_dim
        q_nope, q_rope, latent, k_rope = self._project(hidden)
        past = cache.length if cache is not None else 0
        pos = torch.arange(past, past + S, device=hidden.device).expand(B, S)
        k_rope = apply_rope(k_rope[:, :, None].double(), pos, self.rope, R, past + S)[:, :, 0].to(latent.dtype)
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

    def _forward_paged(self, hidden, cache, seq_ids):
        c = self.config
        B, S, _ = hidden.shape
        if cache is None:   # a prefill of the S tokens among themselves
            q_nope, q_rope, latent, k_rope = self._project(hidden)
            pos = torch.arange(S, device=hidden.device).expand(B, S)
            k_rope = self._rotate(k_rope, pos)
            out = self._prefill(q_nope, self._rotate(q_rope, pos), latent, k_rope, past=0)
            return self.o_proj(out.reshape(B, S, c.num_heads * c.v_head_dim))
        seqs = np.arange(B) if seq_ids is None else np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        if seqs.shape != (B,) or len(set(seqs.tolist())) != B:
            raise ValueError(f"MLAAttention: seq_ids must be {B} distinct sequences (one per row), got {seqs.tolist()}")
        past = np.array([cache.seq_len(int(s)) for s in seqs])
        cache.reserve(seqs, past + S)
        positions = (past[:, None] + np.arange(S)).reshape(-1)
        return self.step(hidden.reshape(B * S, -1), cache, np.repeat(seqs, S), positions).view(B, S, -1)

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, cache: PagedLatentCache, seq_ids, positions, *, layer: int = 0
             ) -> torch.Tensor:
        """A step of T tokens of one or more sequences over a paged cache (a model's layer `layer`):
        hidden [T, hidden]; seq_ids and positions (host ints [T]) each token's sequence and
        position, a sequence's tokens at consecutive positions in order, their pages allocated.
        The tokens' rows are written into layer `layer`'s pages; then a sequence with one token,
        its last, attends in the absorbed form (the decode kernel on CUDA), one with several (a
        prompt chunk, after its cached tokens or not) in the non-absorbed form. Returns [T, hidden]."""
        c = self.config
        T = hidden.shape[0]
        nh, L, R = c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
        if (cache.latent_dim, cache.rope_dim) != (L, R):
            raise ValueError(f"MLAAttention: the cache holds latent {cache.latent_dim} + rope {cache.rope_dim}, "
                             f"the layer {L} + {R}")
        ids = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        q_nope, q_rope, latent, k_rope = (t[0] for t in self._project(hidden[None]))
        pos = cache.append(ids, latent.contiguous(), k_rope.contiguous(), self.rope, positions=positions, layer=layer)
        q_rope = self._rotate(q_rope[None], pos.to(device=hidden.device, dtype=torch.int64)[None])[0]
        pos = pos.numpy().astype(np.int64)
        out = hidden.new_empty(T, nh, c.v_head_dim)
        seqs, first, counts = np.unique(ids, return_index=True, return_counts=True)
        decode = (counts == 1) & (pos[first] == cache.seq_lens_host[seqs] - 1)
        if decode.any():   # the absorbed form over the pages
            rows = first[decode]
            r = torch.from_numpy(rows).to(hidden.device)
            w_uk, w_uv = self._absorbed()
            q_lat = torch.einsum("bhn,hnl->bhl", q_nope[r], w_uk)
            q = torch.cat([q_lat, q_rope[r]], dim=-1).contiguous()          # [n, nh, L + R]: the cache's row order
            o_lat = self._decoder(cache)(q, cache.layer(layer), cache.page_table, cache.seq_lens,
                                         torch.from_numpy(ids[rows].astype(np.int32)).to(hidden.device),
                                         scale=c.softmax_scale, max_kv_len=int(pos[rows].max()) + 1)
            out[r] = torch.einsum("bhl,hvl->bhv", o_lat, w_uv)
        for s in seqs[~decode]:   # prompt chunks: over the cached tokens and the new ones
            rows = np.flatnonzero(ids == s)
            r = torch.from_numpy(rows).to(hidden.device)
            out[r] = self._prefill(q_nope[r][None], q_rope[r][None], *self._cached(cache, int(s), layer),
                                   past=int(pos[rows[0]]))[0]
        return self.o_proj(out.reshape(T, nh * c.v_head_dim))

    def _cached(self, cache: PagedLatentCache, seq: int, layer: int = 0):
        rows = cache.gather(seq, layer)[None]                               # [1, n, L + R]
        return rows[..., :self.config.kv_lora_rank], rows[..., self.config.kv_lora_rank:]

    def _prefill(self, q_nope, q_rope, latent, k_rope, *, past: int) -> torch.Tensor:
        """The non-absorbed form: q [B, S, nh, nope + R] (rotated) against keys [W_uk c, k_r] and
        values W_uv c of the n = past + S tokens of `latent` [B, n, L] and `k_rope` [B, n, R]
        (rotated); query i sees keys up to past + i. Returns [B, S, nh, v]. CUDA bf16/f16: our
        prefill kernel (`_prefill_kernel`) under prefill="kernel"; else torch's SDPA."""
        c = self.config
        B, S = q_nope.shape[:2]
        n = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, n, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        if self.prefill == "kernel" and q_nope.is_cuda and q_nope.dtype in (torch.bfloat16, torch.float16) and \
                self._prefill_attention(q_nope.dtype).kernel == "tc":   # head dims of the tensor-core kernels
            return self._prefill_kernel(q_nope, q_rope, kv, k_rope, past=past)
        k = torch.cat([kv[..., :c.qk_nope_head_dim], k_rope[:, :, None].expand(B, n, c.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        mask = torch.arange(n, device=q.device)[None] <= torch.arange(past, past + S, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., c.qk_nope_head_dim:].transpose(1, 2),
                                           attn_mask=mask, scale=c.softmax_scale)
        return o.transpose(1, 2)

    def _prefill_kernel(self, q_nope, q_rope, kv, k_rope, *, past: int) -> torch.Tensor:
        """The prefill kernel over keys [k_nope, k_r] and values, written once into pages of
        PREFILL_PAGE tokens (the padding past n is never read): kv [B, n, nh, nope + v] from
        kv_b_proj, k_rope [B, n, R]. Returns [B, S, nh, v]."""
        c = self.config
        B, S, nh = q_nope.shape[:3]
        n = kv.shape[1]
        nope, R, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        per = -(-n // PREFILL_PAGE)
        k = kv.new_empty(B, per * PREFILL_PAGE, nh, nope + R)
        v = kv.new_empty(B, per * PREFILL_PAGE, nh, dv)
        k[:, :n, :, :nope] = kv[..., :nope]
        k[:, :n, :, nope:] = k_rope[:, :, None]
        v[:, :n] = kv[..., nope:]
        q = torch.cat([q_nope, q_rope], dim=-1).reshape(B * S, nh, nope + R)
        dev = q.device
        table = torch.arange(B * per, dtype=torch.int32, device=dev).view(B, per)
        lens = torch.full((B,), n, dtype=torch.int32, device=dev)
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=dev)
        out = self._prefill_attention(q.dtype).prefill(
            q, k.view(B * per, PREFILL_PAGE, nh, nope + R), v.view(B * per, PREFILL_PAGE, nh, dv), table, lens, cu,
            max_q_len=S, max_kv_len=n)
        return out.view(B, S, nh, dv)

    def _prefill_attention(self, dtype):
        """The PagedAttention of MLA_PREFILL_SOURCE for this layer's heads, dims and scale (one per
        dtype); its kernel is "tc" where the tensor-core kernels take the head dims (multiples of 16
        from 32 to 256), else the prefill runs through SDPA."""
        attn = self._prefills.get(dtype)
        if attn is None:
            from .attention import PagedAttention
            c = self.config
            layer = Program.from_source(MLA_PREFILL_SOURCE, "mla_prefill.lf").specialise(
                "mla_prefill", Hq=c.num_heads, Hkv=c.num_heads, D=c.qk_nope_head_dim + c.qk_rope_head_dim,
                Dv=c.v_head_dim, dtype={torch.bfloat16: "bf16", torch.float16: "f16"}[dtype],
                softmax_scale=c.softmax_scale)
            attn = self._prefills[dtype] = PagedAttention(layer, page_size=PREFILL_PAGE)
        return attn

    def _decoder(self, cache: PagedLatentCache) -> MLADecode:
        key = (cache.page_size, cache.dtype)
        dec = self._decoders.get(key)
        if dec is None:
            c = self.config
            dec = self._decoders[key] = MLADecode(num_heads=c.num_heads, latent_dim=c.kv_lora_rank,
                                                  rope_dim=c.qk_rope_head_dim, page_size=cache.page_size,
                                                  dtype=cache.dtype)
        return dec
