"""A whole Llama decoder layer: ours (generated RMSNorm, add+RMSNorm, SwiGLU and paged
attention kernels; cuBLAS projections) beside the same layer in torch (F.rms_norm, SDPA over
contiguous K/V, silu * up) eager and under torch.compile, in one run on one card.

    python -m benchmarks.bench_decoder [--json out.json] [--config examples/llama-3-8b/config.json]

Decode: one new token for each of `batch` sequences holding `ctx` tokens. Prefill: `batch`
prompts of `ctx` tokens. The torch layer reads K/V that are already in place (it does not
append), so it is a lower bound for a torch serving path."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from layerforge.dsl.numerics import rope_cos_sin

ROOT = Path(__file__).resolve().parents[1]


def timer(fn, device) -> float:
    if device.type == "cuda":
        from .bench_rows import bench
        return bench(fn)
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class TorchLayer(torch.nn.Module):
    """The same math in torch: the peer."""

    def __init__(self, ours, cfg):
        super().__init__()
        self.ours = ours
        self.hq, self.hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = cfg.get("head_dim") or cfg["hidden_size"] // self.hq
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))

    def forward(self, x, k, v, cos, sin, causal: bool):
        o = self.ours
        B, S, H = x.shape
        h = F.rms_norm(x, (H,), o.input_layernorm.weight, self.eps)
        a = o.self_attn
        q = F.linear(h, a.qkv_proj.weight[: self.hq * self.d]).view(B, S, self.hq, self.d).transpose(1, 2)
        q1, q2 = q[..., : self.d // 2], q[..., self.d // 2:]
        q = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        x = x + a.o_proj(att.transpose(1, 2).reshape(B, S, -1))
        h = F.rms_norm(x, (H,), o.post_attention_layernorm.weight, self.eps)
        g, u = o.mlp.gate_up_proj(h).chunk(2, dim=-1)
        return x + o.mlp.down_proj(F.silu(g) * u)


def run(cfg: dict, batch: int, ctx: int, mode: str, device: torch.device, compile_peer: bool,
        profile: bool = False) -> dict:
    from layerforge.runtime.llama_decoder import LlamaPagedDecoderLayer
    torch.manual_seed(0)
    dt = torch.bfloat16
    layer = LlamaPagedDecoderLayer(cfg, page_size=16).to(device).to(dt)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1.0 + 0.05 * torch.randn_like(p) if "layernorm" in name else 0.02 * torch.randn_like(p))
    H, hkv = cfg["hidden_size"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    new = 1 if mode == "decode" else ctx
    room = ctx + (8192 if mode == "decode" else 0)      # decode calls each append one token
    pages_per = -(-room // 16)
    cache = layer.make_cache(num_pages=batch * pages_per, max_seqs=batch, max_pages_per_seq=pages_per)
    for s in range(batch):
        cache.allocate(s, room)
    if mode == "decode":   # the context: ctx random tokens per sequence
        kv = torch.randn(batch * ctx, hkv, d, device=device, dtype=dt)
        cache.append([s for s in range(batch) for _ in range(ctx)], kv, kv, layer.self_attn.rope)
    x = torch.randn(batch * new, H, device=device, dtype=dt)
    seq_ids = [s for s in range(batch) for _ in range(new)]

    def ours():
        if mode == "prefill":   # every call is a fresh prompt
            for s in range(batch):
                cache.free(s)
                cache.allocate(s, room)
        with torch.no_grad():
            return layer(x, seq_ids=seq_ids, cache=cache)

    peer = TorchLayer(layer, cfg)
    kk = torch.randn(batch, hkv, ctx + (1 if mode == "decode" else 0), d, device=device, dtype=dt)
    pos = torch.arange(ctx, ctx + 1, device=device) if mode == "decode" else torch.arange(ctx, device=device)
    spec = layer.self_attn.rope      # the block's RoPE, Llama 3 scaling included: the same frequencies as ours
    cos, sin = rope_cos_sin(pos, d, spec.theta, spec.scaling, dtype=dt)
    xb = x.view(batch, new, H)

    def eager():
        with torch.no_grad():
            return peer(xb, kk, kk, cos, sin, mode != "decode")
    res = {"mode": mode, "batch": batch, "ctx": ctx, "ours_s": timer(ours, device), "eager_s": timer(eager, device)}
    if profile and mode == "decode":
        host_breakdown(layer, cache, x, seq_ids, device)
    if profile:   # where the host time of our layer goes (cProfile over 50 calls, top 25 by own time)
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            ours()
        if device.type == "cuda":
            torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if compile_peer and device.type == "cuda":
        compiled = torch.compile(peer)

        def comp():
            with torch.no_grad():
                return compiled(xb, kk, kk, cos, sin, mode != "decode")
        res["compile_s"] = timer(comp, device)
    return res


def host_breakdown(layer, cache, x, seq_ids, device, n: int = 200) -> None:
    """Host microseconds per call of each step of a decode call (enqueue cost, no sync;
    the GPU work here is shorter than the host work, so the queue never fills)."""
    a = layer.self_attn
    T = x.shape[0]
    h = layer.input_layernorm(x)
    qkv = a.qkv_proj(h)
    q, k, v = qkv.split(a.splits, dim=-1)
    k, v = k.view(T, a.hkv, a.d), v.view(T, a.hkv, a.d)
    qc = q.contiguous().view(T, a.hq, a.d)
    ids = torch.tensor(seq_ids, dtype=torch.int32, device=device)
    pos = cache.seq_lens.to(torch.int32)[ids.long()] - 1
    max_len = max(cache.seq_len(s) for s in set(seq_ids)) + n + 2
    o = torch.empty(T, a.hq * a.d, device=device, dtype=x.dtype)
    steps = {
        "whole layer": lambda: layer(x, seq_ids=seq_ids, cache=cache),
        "input rms_norm": lambda: layer.input_layernorm(x),
        "qkv projection": lambda: a.qkv_proj(h),
        "kv append": lambda: cache.append(seq_ids, k, v, a.rope),
        "q contiguous": lambda: q.contiguous(),
        "attention kernel": lambda: a.attention(qc, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
                                                ids, pos, max_kv_len=max_len),
        "o projection": lambda: a.o_proj(o),
        "add+rms_norm": lambda: layer.post_attention_layernorm(x, x),
        "mlp": lambda: layer.mlp(x),
    }
    print("host us per call (decode step, no sync):")
    with torch.no_grad():
        for name, fn in steps.items():
            fn()
            torch.cuda.synchronize() if device.type == "cuda" else None
            t = time.perf_counter()
            for _ in range(n):
                fn()
            dt = (time.perf_counter() - t) / n
            torch.cuda.synchronize() if device.type == "cuda" else None
            print(f"  {name:18s} {dt * 1e6:8.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--config", default=str(ROOT / "examples/llama-3-8b/config.json"))
    ap.add_argument("--cases", default="decode:64:4096,decode:1:4096,prefill:1:4096,prefill:4:1024")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a host-side profile of our layer per case")
    a = ap.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text())
    device = torch.device(a.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}  layer: {Path(a.config).parent.name}")
    print(f"{'case':22s} {'ours ms':>9s} {'eager ms':>9s} {'compile ms':>11s} {'eager/ours':>11s}")
    rows = []
    for case in a.cases.split(","):
        mode, batch, ctx = case.split(":")
        r = run(cfg, int(batch), int(ctx), mode, device, not a.no_compile, a.profile)
        rows.append(r)
        comp = r.get("compile_s")
        print(f"{f'{mode} {batch} x {ctx}':22s} {r['ours_s']*1e3:9.3f} {r['eager_s']*1e3:9.3f} "
              f"{(f'{comp*1e3:11.3f}' if comp else f'{chr(45):>11s}')} {r['eager_s'] / r['ours_s']:11.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
