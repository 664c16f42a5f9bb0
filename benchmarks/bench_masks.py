"""Sparse attention masks in prefill beside FlexAttention, in one run on one card (B4 H32 S4096
D128 bf16, GQA 32/8 by default):

    python -m benchmarks.bench_masks [--batch 4] [--seq 4096] [--variants]

For each mask: ours with per-tile block sparsity (codegen/mask_tiles.py), ours without it (the
same kernel with every tile masked per element: the A/B), FlexAttention (torch.compile'd
flex_attention with its block mask, built once outside the timing) and SDPA flash causal as a
yardstick. Outputs are compared with Flex's (bf16 tolerance).

--variants: the standard library's attention blocks beside Flex with the equivalent
score_mod / mask_mod (MHA 32/32, Llama GQA 32/8). Flex has no RoPE: the blocks that rotate q in
the kernel (llama, mistral, gemma2) do that work on top, and their outputs are not compared."""
from __future__ import annotations

import argparse

import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

from .bench_rows import bench

SRC = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention causal(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos
}
attention prefix_lm(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const P: int = 1024) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos or kv_pos < P
}
attention sinks(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const W: int = 1024) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and (q_pos - kv_pos < W or kv_pos < 4)
}
attention dilated(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const W: int = 2048) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and q_pos - kv_pos < W and (q_pos - kv_pos) % 2 == 0
}
attention natten(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const G: int = 64) -> T[B, S, Hq, D] {
    mask = abs(q_pos // G - kv_pos // G) <= 3 and abs(q_pos % G - kv_pos % G) <= 3
}
"""

MODS = {   # the same masks as FlexAttention mask_mods
    "causal": lambda b, h, q, k: k <= q,
    "prefix_lm": lambda b, h, q, k: (k <= q) | (k < 1024),
    "sinks": lambda b, h, q, k: (k <= q) & ((q - k < 1024) | (k < 4)),
    "dilated": lambda b, h, q, k: (k <= q) & (q - k < 2048) & ((q - k) % 2 == 0),
    "natten": lambda b, h, q, k: ((q // 64 - k // 64).abs() <= 3) & ((q % 64 - k % 64).abs() <= 3),
}


def ours(layer, q, kc, vc, table, lens, cu, seq, sparse: bool = True, extra=None):
    from layerforge.codegen import attention as A
    attn = PagedAttention(layer, page_size=64)
    out = torch.empty_like(q)
    run = lambda: attn.prefill(q, kc, vc, table, lens, cu, max_q_len=seq, max_kv_len=seq, out=out, extra=extra)
    if not sparse:   # load the kernel rendered without the tile classifier; later calls reuse it
        from layerforge.codegen import attention_tc as TC
        orig = A.tile_context
        A.tile_context = lambda *a, **k: {}
        TC._render.cache_clear()
        try:
            run()
        finally:
            A.tile_context = orig
            TC._render.cache_clear()
    run()
    return bench(run), out


def problem(B, S, hq, hkv, d, page, seed):
    """Random q and a paged cache of B whole prompts of S tokens (pages in order), the ragged
    prefill's offsets, and the same q/k/v as [B, H, S, D] views for Flex and SDPA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B * S, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kc = torch.randn(B * S // page, page, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(kc.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.arange(B * S // page, dtype=torch.int32, device="cuda").view(B, S // page)
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device="cuda")
    views = tuple(x.view(B, S, x.shape[-2], d).transpose(1, 2) for x in (q, kc, vc))
    return q, kc, vc, table, lens, cu, views


def variants(B: int, S: int) -> None:
    """The stdlib's blocks beside Flex with the same score / mask (B4 S4096 D128 bf16)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from layerforge.dsl.numerics import alibi_slopes
    prog = lf.stdlib()
    d, page = 128, 64
    causal = lambda b, h, q, k: k <= q                                       # noqa: E731
    window = lambda b, h, q, k: (k <= q) & (q - k < 1024)                    # noqa: E731
    slopes = alibi_slopes(32, 8.0).float().cuda()
    cases = [  # name, Hq, Hkv, consts, mask_mod, score_mod, rope
        ("gpt2_attn", 32, 32, {}, causal, None, False),
        ("llama_attn", 32, 8, {}, causal, None, True),
        ("mistral_attn", 32, 32, {"window": 1024}, window, None, True),
        ("gemma2_attn", 32, 32, {"window": 0}, causal, lambda s, b, h, q, k: 50.0 * torch.tanh(s / 50.0), True),
        ("bloom_attn", 32, 32, {}, causal, lambda s, b, h, q, k: s + slopes[h] * (k - q), False),
        ("bert_attn", 32, 32, {}, None, None, False),
    ]
    print(f"\n{'stdlib block':>14} {'ours ms':>8} {'flex ms':>8} {'ours/flex':>9} {'max err':>8}")
    for name, hq, hkv, consts, mask_mod, score_mod, rope in cases:
        q, kc, vc, table, lens, cu, (qq, kk, vv) = problem(B, S, hq, hkv, d, page, seed=1)
        extra = {"kv_len": lens.clone()} if name == "bert_attn" else None
        layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=d, dtype="bf16", **consts)
        t_ours, out = ours(layer, q, kc, vc, table, lens, cu, S, extra=extra)
        torch._dynamo.reset()   # a fresh compile per case (past the recompile limit Flex runs unfused)
        flex = torch.compile(flex_attention, dynamic=False)
        bm = create_block_mask(mask_mod, None, None, S, S, device="cuda") if mask_mod else None
        run = lambda: flex(qq, kk, vv, score_mod=score_mod, block_mask=bm, enable_gqa=hq != hkv)   # noqa: E731
        ref = run()
        t_flex = bench(run)
        err = "rope" if rope else f"{(out.view(B, S, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item():.4f}"
        print(f"{name:>14} {t_ours * 1e3:>8.3f} {t_flex * 1e3:>8.3f} {t_flex / t_ours:>9.2f} {err:>8}", flush=True)
        torch.cuda.empty_cache()


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--only", default=None, help="one mask ('none': no mask, e.g. with --variants)")
    ap.add_argument("--variants", action="store_true", help="also the stdlib's blocks beside Flex")
    a = ap.parse_args()
    B, S, hq, hkv, d, page = a.batch, a.seq, 32, 8, 128, 64
    prog = lf.loads(SRC, "masks.lf", with_stdlib=False)
    q, kc, vc, table, lens, cu, (qq, kk, vv) = problem(B, S, hq, hkv, d, page, seed=0)
    flex = torch.compile(flex_attention, dynamic=False)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                                               enable_gqa=True))
    print(f"{torch.cuda.get_device_name()}  B{B} H{hq}/{hkv} S{S} D{d} bf16; SDPA flash causal {flash * 1e3:.3f} ms")
    print(f"{'mask':>10} {'density':>8} {'ours ms':>8} {'dense ms':>9} {'flex ms':>8} {'ours/flex':>9} {'sparse gain':>11} {'max err':>8}")
    for name, mod in MODS.items():
        if a.only and name != a.only:
            continue
        layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=d, dtype="bf16")
        torch._dynamo.reset()   # a fresh compile per mask (past the recompile limit Flex runs unfused)
        flex = torch.compile(flex_attention, dynamic=False)
        t_sparse, out = ours(layer, q, kc, vc, table, lens, cu, S, True)
        t_dense, _ = ours(layer, q, kc, vc, table, lens, cu, S, False)
        bm = create_block_mask(mod, None, None, S, S, device="cuda")
        ref = flex(qq, kk, vv, block_mask=bm, enable_gqa=True)
        t_flex = bench(lambda: flex(qq, kk, vv, block_mask=bm, enable_gqa=True))
        got = out.view(B, S, hq, d).transpose(1, 2)
        err = (got.float() - ref.float()).abs().max().item()
        qi = torch.arange(S, device="cuda")
        density = mod(0, 0, qi[:, None], qi[None, :]).float().mean().item()
        print(f"{name:>10} {density:>8.3f} {t_sparse * 1e3:>8.3f} {t_dense * 1e3:>9.3f} {t_flex * 1e3:>8.3f} "
              f"{t_flex / t_sparse:>9.2f} {t_dense / t_sparse:>11.2f} {err:>8.4f}", flush=True)
    if a.variants:
        variants(B, S)


if __name__ == "__main__":
    main()
