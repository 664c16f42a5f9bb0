"""Reference semantics of an attention block.

    s[b, h, i, j] = scale * <rope(q)[b, i, h], rope(k)[b, j, kv_h(h)]>   (f32 or f64)
    s = score(s, b, h, kv_h, q_pos_i, kv_pos_j)          # the block's `score` expression
    p = softmax over j of s where mask(...) else -inf     # the block's `mask` expression
    out[b, i, h] = sum_j p[b, h, i, j] * v[b, j, kv_h(h)]

A row whose every key is masked gives zeros (never NaN). Positions default to
q_pos = Skv - Sq + i (queries aligned with the end of the keys) and kv_pos = j.
"""
from __future__ import annotations

import torch

from .ir import AttentionSpec, Node, RopeSpec, toposort
from .numerics import rope_cos_sin


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float, dtype, scaling=None,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [..., rotary_dim/2] for integer positions (dsl/numerics.rope_cos_sin)."""
    return rope_cos_sin(positions, rotary_dim, theta, scaling, dtype, seq_len)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, rotary_dim: int,
               seq_len: int | None = None) -> torch.Tensor:
    """x: [B, S, H, D] in a float dtype; positions: [B, S]. Rotates the first rotary_dim channels.
    seq_len (default: the largest position + 1) picks the frequencies of length-dependent types."""
    cos, sin = rope_tables(positions, rotary_dim, spec.theta, x.dtype, spec.scaling, seq_len)
    return rotate(x, cos[:, :, None, :], sin[:, :, None, :], spec.style, rotary_dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, rotary_dim: int) -> torch.Tensor:
    """x [..., D] with its first rotary_dim channels rotated pair by pair (cos, sin broadcast
    to [..., rotary_dim / 2]); neox pairs the halves, gptj interleaved channels."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if style == "neox":
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:  # gptj: pairs (0,1), (2,3), ...
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def attention_reference(ev, n: Node) -> torch.Tensor:
    spec: AttentionSpec = n.arg
    q, k, v = (ev.arg(n, i) for i in range(3))
    if not spec.batched:
        q, k, v = q[None], k[None], v[None]
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    cdt = torch.float64 if ev.f64 else torch.float32
    dev = q.device

    qpos = ev.q_positions
    kvpos = ev.kv_positions
    if qpos is None:
        qpos = (torch.arange(Sq, device=dev) + (Skv - Sq)).expand(B, Sq)
    if kvpos is None:
        kvpos = torch.arange(Skv, device=dev).expand(B, Skv)
    qpos, kvpos = qpos.to(dev).reshape(B, Sq), kvpos.to(dev).reshape(B, Skv)

    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if spec.rope is not None:
        rd = ev.int_of(spec.rope.rotary_dim)
        seq_len = int(max(qpos.max(), kvpos.max())) + 1 if qpos.numel() and kvpos.numel() else 0
        qf = apply_rope(qf, qpos, spec.rope, rd, seq_len)
        if not ev.k_rotated:
            kf = apply_rope(kf, kvpos, spec.rope, rd, seq_len)
        if not ev.f64:  # the program stores the rotated q, k in its dtype
            qf, kf = qf.to(q.dtype).to(cdt), kf.to(k.dtype).to(cdt)
    group = Hq // Hkv
    kf = kf.repeat_interleave(group, dim=2)
    vf = vf.repeat_interleave(group, dim=2)
    scale = ev.value(spec.scale).to(cdt)
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale

    b_idx = (torch.arange(B, device=dev) + ev.batch_offset).view(B, 1, 1, 1)
    h_idx = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
    env = {
        "b": b_idx.to(torch.int32), "h": h_idx.to(torch.int32), "kv_h": (h_idx // group).to(torch.int32),
        "q_pos": qpos.view(B, 1, Sq, 1).to(torch.int32), "kv_pos": kvpos.view(B, 1, 1, Skv).to(torch.int32),
        "score": s,
    }
    if spec.score is not None:
        s = _subgraph(ev, spec.score, env).to(cdt)
    s = s.expand(B, Hq, Sq, Skv)
    if spec.mask is not None:
        m = _subgraph(ev, spec.mask, env).expand(B, Hq, Sq, Skv)
        s = s.masked_fill(~m, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    sink = None
    if spec.sink is not None:   # a logit in each row's denominator that weighs no value
        sink = _subgraph(ev, spec.sink, env).to(cdt).expand(B, Hq, Sq, 1)
        row_max = torch.maximum(row_max, sink)
    empty = torch.isneginf(row_max)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max))
    denom = p.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - torch.where(empty, torch.zeros_like(row_max), row_max))
    p = torch.where(empty, torch.zeros_like(p), p / torch.where(empty, torch.ones_like(denom), denom))
    out = torch.einsum("bhij,bjhd->bihd", p, vf)
    if not spec.batched:
        out = out[0]
    return ev.out(out, n)


def _subgraph(ev, root: Node, env: dict) -> torch.Tensor:
    """Evaluate a score/mask sub-graph with the attention variables bound to broadcast grids."""
    saved = ev.attn_env
    ev.attn_env = env
    nodes = toposort([root])
    try:
        for m in nodes:  # sub-graph values depend on env: evaluate them fresh
            ev.memo.pop(id(m), None)
        for m in nodes:
            ev.memo[id(m)] = ev.eval_node(m)
        return ev.memo[id(root)]
    finally:
        for m in nodes:
            if m.op.value not in ("input",):
                ev.memo.pop(id(m), None)
        ev.attn_env = saved
