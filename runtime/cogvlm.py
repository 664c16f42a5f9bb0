"""CogVLM's visual-expert attention, served from a paged KV cache.

    attn = CogVLMAttention({"hidden_size": 4096, "num_attention_heads": 32}).cuda().to(torch.bfloat16)
    attn.load_state_dict(published_attention.state_dict())   # vision_expert_* / language_expert_* weights
    cache = attn.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)
    types = torch.tensor([[0, 1, 1, 1, 1, 0, 0]])              # 0 language, 1 vision (boi, patches, eoi)
    cache.allocate(0, 64)
    y = attn(x, seq_ids=[0] * 7, vision=expert_mask(types)[0], positions=position_ids(types)[0], cache=cache)
    y = attn(x_next, seq_ids=[0], vision=[False], positions=[last_position + 1], cache=cache)    # decode

CogVLM (Wang et al., 2023) gives every layer two sets of attention weights: image tokens use the
"vision expert" q/k/v and output projections, text tokens the "language expert" ones. Which set a
token uses, and where it sits for RoPE, follow the published model:
- `expert_mask`: a token takes the vision expert when it and the token after it are image tokens,
  so the last token of an image run (and a sequence's last token) takes the language expert;
- `position_ids`: an image run's first and last tokens (boi / eoi) count as text, and every token
  between them shares one position; text tokens count up by one; padding does not advance.
RoPE (neox halves, theta 10000 by default, all head dims) rotates q and k by those positions,
while the causal mask is over the tokens' order in the sequence: image tokens that share a
position still see only the tokens before them. So q and k are rotated by the stdlib `rope` row
kernel (dsl/stdlib/rows.lf) with explicit positions, the cache stores K already rotated, and
attention is the stdlib `gpt2_attn` block (causal, no rotary of its own) on the paged kernels
(runtime/attention.py): prefill tiles for a sequence's chunk of tokens, decode tiles otherwise.

The projections are torch Linear layers (cuBLAS), applied to the rows of each expert: a step of
only text tokens (decode) runs one product per projection; a mixed step gathers each expert's
rows, runs its product and scatters the results back. `attend_dense` serves a padded batch
[B, L, H] with token_type_ids (and an attention mask) as the published module takes it. CPU
tensors run every piece through the DSL's reference evaluator.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..dsl.program import Program
from .attention import PagedAttention
from .kv_cache import PagedKVCache
from .layers import LayerModule

__all__ = ["CogVLMAttention", "expert_mask", "position_ids", "LANGUAGE_TOKEN", "VISION_TOKEN"]

LANGUAGE_TOKEN, VISION_TOKEN = 0, 1


def expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] token types -> [B, L] bool: True where the token takes the vision expert (it and the
    next token are image tokens)."""
    t = torch.as_tensor(token_type_ids)
    if t.dim() != 2:
        raise ValueError(f"expert_mask: token_type_ids must be [B, L], got shape {tuple(t.shape)}")
    vis = t == VISION_TOKEN
    out = torch.zeros_like(vis)
    out[:, :-1] = vis[:, :-1] & vis[:, 1:]
    return out


def position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] token types (and 1/0 attention mask) -> [B, L] int64 RoPE positions, as CogVLM counts
    them: text tokens and an image run's first and last tokens advance by one; the tokens inside an
    image run share the position after its first token; padding does not advance."""
    t = torch.as_tensor(token_type_ids).long()
    if t.dim() != 2:
        raise ValueError(f"position_ids: token_type_ids must be [B, L], got shape {tuple(t.shape)}")
    kind = t.clone()
    if attention_mask is not None:
        m = torch.as_tensor(attention_mask, device=t.device)
        if m.shape != t.shape:
            raise ValueError(f"position_ids: attention_mask {tuple(m.shape)} must match token_type_ids "
                             f"{tuple(t.shape)}")
        kind[~m.bool()] = -1
    vis = kind == VISION_TOKEN
    text = kind == LANGUAGE_TOKEN
    prev_text = torch.zeros_like(vis)
    prev_text[:, 1:] = text[:, :-1]
    next_text = torch.zeros_like(vis)
    next_text[:, :-1] = text[:, 1:]
    # an image run's edges: its first token (after text, or at the start) and its last (before text, or at the end)
    first = vis & prev_text
    first[:, 0] |= vis[:, 0]
    last = vis & next_text
    last[:, -1] |= vis[:, -1]
    kind = torch.where(first | last, torch.full_like(kind, LANGUAGE_TOKEN), kind)
    text = kind == LANGUAGE_TOKEN
    vis = kind == VISION_TOKEN
    prev_text = torch.zeros_like(vis)
    prev_text[:, 1:] = text[:, :-1]
    step = text | (vis & prev_text)
    step[:, 0] = False
    return step.long().cumsum(-1)


class CogVLMAttention(torch.nn.Module):
    """config keys: hidden_size, num_attention_heads; optional num_multi_query_heads or
    num_key_value_heads (GQA, as CogVLM2 has), rope_theta (10000), vision_qkv_bias (False; CogVLM2:
    True), language_qkv_bias (False)."""

    def __init__(self, config: Mapping[str, Any] | Any, *, page_size: int = 16, dtype: str = "bf16",
                 program: Program | None = None):
        super().__init__()
        cfg = dict(config) if isinstance(config, Mapping) else config.to_dict()
        for key in ("hidden_size", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"CogVLMAttention: the config lacks {key!r}")
        self.hidden = int(cfg["hidden_size"])
        self.hq = int(cfg["num_attention_heads"])
        self.hkv = int(cfg.get("num_multi_query_heads") or cfg.get("num_key_value_heads") or self.hq)
        if self.hidden % self.hq or self.hq % self.hkv:
            raise ValueError(f"CogVLMAttention: hidden_size {self.hidden} must be a multiple of num_attention_heads "
                             f"{self.hq}, and that a multiple of the key/value heads {self.hkv}")
        self.d = self.hidden // self.hq
        self.theta = float(cfg.get("rope_theta", 10000.0))
        qkv = (self.hq + 2 * self.hkv) * self.d
        self.vision_expert_query_key_value = torch.nn.Linear(self.hidden, qkv, bias=bool(cfg.get("vision_qkv_bias")))
        self.vision_expert_dense = torch.nn.Linear(self.hidden, self.hidden, bias=False)
        self.language_expert_query_key_value = torch.nn.Linear(self.hidden, qkv,
                                                               bias=bool(cfg.get("language_qkv_bias")))
        self.language_expert_dense = torch.nn.Linear(self.hidden, self.hidden, bias=False)
        prog = program or Program.stdlib()
        self.rope = LayerModule(prog.specialise("rope", D=self.d, theta=self.theta, dtype=dtype))
        self.block = prog.specialise("gpt2_attn", Hq=self.hq, Hkv=self.hkv, D=self.d, dtype=dtype)
        self.page_size = page_size
        self.attention = PagedAttention(self.block, page_size=page_size)

    def make_cache(self, *, num_pages: int, max_seqs: int, max_pages_per_seq: int) -> PagedKVCache:
        w = self.language_expert_dense.weight
        return PagedKVCache(num_pages, self.page_size, self.hkv, self.d, dtype=w.dtype, device=w.device,
                            max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq)

    # ---- one step over the cache --------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, *, seq_ids, vision, positions, cache: PagedKVCache) -> torch.Tensor:
        """hidden: [T, H], the new tokens of one or more sequences (a sequence's tokens together, in
        order, for prefill); seq_ids: each token's sequence (host ints); vision: each token's expert
        (host bools, True: vision; see expert_mask); positions: each token's RoPE position (host
        ints; see position_ids). Tokens take the cache slots after their sequence's cached ones."""
        T = hidden.shape[0]
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden:
            raise ValueError(f"CogVLMAttention: hidden must be [T, {self.hidden}], got {tuple(hidden.shape)}")
        ids = [int(i) for i in _host(seq_ids, "seq_ids", T)]
        vis = _host(vision, "vision", T).astype(bool)
        pos = _host(positions, "positions", T).astype(np.int64)
        if T and pos.min() < 0:
            raise ValueError("CogVLMAttention: positions must be >= 0")
        rows = _ExpertRows(vis, hidden.device)
        qkv = rows.apply(hidden, self.vision_expert_query_key_value, self.language_expert_query_key_value)
        nq, nkv = self.hq * self.d, self.hkv * self.d
        # q and k rotated together (one row-kernel launch over their heads) at the CogVLM positions
        qk = qkv[:, :nq + nkv].reshape(T, self.hq + self.hkv, self.d).contiguous()
        qk = self.rope(qk, torch.from_numpy(pos.astype(np.int32)).to(hidden.device, non_blocking=True))
        q, k = qk.split([self.hq, self.hkv], dim=1)
        v = qkv[:, nq + nkv:].reshape(T, self.hkv, self.d)
        slots = cache.append(ids, k, v, None)
        q_seq, q_pos = cache.last_tokens
        o = self.attention.step(q.contiguous(), cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, ids,
                                q_seq, q_pos, max_kv_len=int(slots.max()) + 1 if T else 0)
        return rows.apply(o.reshape(T, self.hidden), self.vision_expert_dense, self.language_expert_dense)

    # ---- the published module's form: a padded batch ------------------------------------------
    def attend_dense(self, hidden: torch.Tensor, token_type_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, position_ids_: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """hidden [B, L, H], token_type_ids [B, L] (0 text, 1 image), attention_mask [B, L] (1 keep,
        0 padding; any padding side) -> [B, L, H]: causal attention over each row's kept tokens, as
        the published attention computes it; padded rows come back as zeros. Runs through a
        temporary cache."""
        if hidden.dim() != 3 or hidden.shape[2] != self.hidden:
            raise ValueError(f"attend_dense: hidden must be [B, L, {self.hidden}], got {tuple(hidden.shape)}")
        B, L, _ = hidden.shape
        types = torch.as_tensor(token_type_ids).cpu()
        if types.shape != (B, L):
            raise ValueError(f"attend_dense: token_type_ids {tuple(types.shape)} must be [B, L] = {(B, L)}")
        keep = (torch.ones(B, L, dtype=torch.bool) if attention_mask is None
                else torch.as_tensor(attention_mask).cpu().bool())
        if keep.shape != (B, L):
            raise ValueError(f"attend_dense: attention_mask {tuple(keep.shape)} must be [B, L] = {(B, L)}")
        pos = (position_ids(types, keep) if position_ids_ is None else torch.as_tensor(position_ids_).cpu())
        vis = expert_mask(types)
        flat = keep.reshape(-1).nonzero().squeeze(1)
        seq = flat // L
        out = torch.zeros(B * L, self.hidden, dtype=hidden.dtype, device=hidden.device)
        if flat.numel() == 0:
            return out.view(B, L, self.hidden)
        pages_per_seq = -(-L // self.page_size)
        cache = self.make_cache(num_pages=B * pages_per_seq, max_seqs=B, max_pages_per_seq=pages_per_seq)
        for b in range(B):
            cache.allocate(b, L)
        rows = flat.to(hidden.device)
        y = self(hidden.reshape(B * L, self.hidden).index_select(0, rows), seq_ids=seq.tolist(),
                 vision=vis.reshape(-1)[flat].numpy(), positions=pos.reshape(-1)[flat].numpy(), cache=cache)
        out.index_copy_(0, rows, y)
        return out.view(B, L, self.hidden)


class _ExpertRows:
    """Which rows of a step take which expert, and the per-expert product of a pair of Linears."""

    def __init__(self, vision: np.ndarray, device: torch.device):
        self.all_vision = bool(vision.all()) if vision.size else False
        self.any_vision = bool(vision.any())
        if self.any_vision and not self.all_vision:
            self.vis = torch.from_numpy(np.flatnonzero(vision)).to(device, non_blocking=True)
            self.lang = torch.from_numpy(np.flatnonzero(~vision)).to(device, non_blocking=True)

    def apply(self, x: torch.Tensor, vision_linear: torch.nn.Linear, language_linear: torch.nn.Linear
              ) -> torch.Tensor:
        if self.all_vision:
            return vision_linear(x)
        if not self.any_vision:
            return language_linear(x)
        out = x.new_empty(x.shape[0], vision_linear.out_features)
        out.index_copy_(0, self.vis, vision_linear(x.index_select(0, self.vis)))
        out.index_copy_(0, self.lang, language_linear(x.index_select(0, self.lang)))
        return out


def _host(values, name: str, n: int) -> np.ndarray:
    """Per-token values given on the host (a list, numpy array or CPU tensor): a GPU tensor is an
    error, not a silent synchronising read (the KV cache's own per-token arguments are alike)."""
    if isinstance(values, torch.Tensor) and values.device.type != "cpu":
        raise ValueError(f"CogVLMAttention: {name} must be on the host (a list, numpy array or CPU tensor), got a "
                         f"tensor on {values.device}: reading it would synchronise with the GPU")
    a = values.detach().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if a.shape != (n,):
        raise ValueError(f"CogVLMAttention: {name} must have one entry per token ({n}), got shape {a.shape}")
    return a
