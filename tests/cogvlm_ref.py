"""CogVLM's visual-expert attention in float64, written from the published model's description
(independently of runtime/cogvlm.py): the check for the module on CPU and GPU."""
from __future__ import annotations

import math

import torch


def ref_expert(types: list[int]) -> list[bool]:
    """A token takes the vision expert when it and the next token are image tokens."""
    return [types[i] == 1 and i + 1 < len(types) and types[i + 1] == 1 for i in range(len(types))]


def ref_positions(types: list[int], keep: list[bool]) -> list[int]:
    """Text tokens and an image run's first and last tokens advance the position by one; the tokens
    inside a run share one; padding does not advance (walked token by token)."""
    kind = [t if k else -1 for t, k in zip(types, keep)]
    L = len(kind)
    edge = [kind[i] == 1 and (i == 0 or kind[i - 1] == 0) or kind[i] == 1 and (i == L - 1 or kind[i + 1] == 0)
            for i in range(L)]
    kind = [0 if e else k for e, k in zip(edge, kind)]
    pos, out = 0, []
    for i in range(L):
        if i > 0 and (kind[i] == 0 or kind[i] == 1 and kind[i - 1] == 0):
            pos += 1
        out.append(pos)
    return out


def rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """neox RoPE over all of x's last dim, float64; x [..., L, Hx, D], pos [L]."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :], torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_attention(sd: dict, hidden: torch.Tensor, types: torch.Tensor, keep: torch.Tensor | None, *,
                  heads: int, kv_heads: int, theta: float = 10000.0) -> torch.Tensor:
    """hidden [B, L, H] -> [B, L, H] float64; rows that are padding come back as zeros."""
    B, L, H = hidden.shape
    d = H // heads
    keep = torch.ones(B, L, dtype=torch.bool) if keep is None else keep.bool().cpu()
    w = {k: v.double().cpu() for k, v in sd.items()}
    out = torch.zeros(B, L, H, dtype=torch.float64)
    for b in range(B):
        t = types[b].tolist()
        kp = keep[b].tolist()
        vis = ref_expert(t)
        pos = torch.tensor(ref_positions(t, kp))
        x = hidden[b].double().cpu()
        qkv = torch.stack([x[i] @ w[("vision" if vis[i] else "language") + "_expert_query_key_value.weight"].T
                           + w.get(("vision" if vis[i] else "language") + "_expert_query_key_value.bias", 0.0)
                           for i in range(L)])
        q = qkv[:, : heads * d].view(L, heads, d)
        k = qkv[:, heads * d: (heads + kv_heads) * d].view(L, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d:].view(L, kv_heads, d)
        q, k = rotate(q, pos, theta), rotate(k, pos, theta)
        g = heads // kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
        allowed = torch.tril(torch.ones(L, L, dtype=torch.bool)) & keep[b][None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", p, v).reshape(L, H)
        for i in range(L):
            if kp[i]:
                out[b, i] = o[i] @ w[("vision" if vis[i] else "language") + "_expert_dense.weight"].T
    return out


def random_state(H: int, heads: int, kv_heads: int, *, vision_bias: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = H // heads
    qkv = (heads + 2 * kv_heads) * d
    sd = {f"{e}_expert_query_key_value.weight": torch.randn(qkv, H, generator=g) / math.sqrt(H)
          for e in ("vision", "language")}
    sd.update({f"{e}_expert_dense.weight": torch.randn(H, H, generator=g) / math.sqrt(H) for e in ("vision", "language")})
    if vision_bias:
        sd["vision_expert_query_key_value.bias"] = torch.randn(qkv, generator=g) * 0.1
    return sd
