"""Sparse attention masks in prefill beside FlexAttention, in one run on one card (B4 H32 S4096
D128 bf16, GQA 32/8 by default):

    python -m benchmarks.bench_masks [--batch 4] [--seq 4096] [--variants] [--wgmma [--wgmma-tiles n64s3]]

For each mask: ours with per-tile block sparsity (codegen/mask_tiles.py; for masks that read
tables at positions, the block-mask pre-pass of codegen/block_mask.py; for score terms of the
query-key distance, the per-tile tables of codegen/distance_terms.py), ours without them (the
same kernel with every tile masked and scored per element: the A/B), FlexAttention
(torch.compile'd flex_attention with its block mask) and SDPA flash causal as a yardstick.
Block masks are built outside the kernels' timing and timed on their own: ours ("pre ms", the
pre-pass, once per batch and shared by the layers; "ours+pre" adds it) beside Flex's
create_block_mask ("flex bm ms"). Outputs are compared with Flex's (bf16 tolerance).

--wgmma (sm_90): for the table cases, also the prefill variant that is not the default, one
more line per case with its kernel time, its own pre-pass, its error against Flex, its tile
label and its speed over the default's line: "document tc", the document mask on the mma.sync
kernel's block-mask lists (prefill="tc"; the default is the wgmma kernel with the mask's key
terms staged, measured faster; with LAYERFORGE_WGMMA_KEY_STAGE=0 the default is mma.sync and
the line is "document wg", prefill="wgmma"); "t5 per-score" / "rel_bias per-score", the wgmma
kernel without its distance tables (distance_table=False; the tables are the default).
--wgmma-tiles picks the wgmma kernel's WGTileConfig (n<keys>s<stages>), else the planner's.
--head-dim: D (64 / 128 / 256; 128 by default).
--ab-switch NAME[,NAME...]: after each mask's line, ours again under every setting of the named environment
switches (0 / 1 each, all combinations), three rounds in turns, in the same process: one line per setting with
its rounds' kernel ms, its speed over Flex (best round), its error against Flex and its kernel's label.

--variants: the standard library's attention blocks beside Flex with the equivalent
score_mod / mask_mod (MHA 32/32, Llama GQA 32/8). Flex has no RoPE: the blocks that rotate q in
the kernel (llama, mistral, gemma2) do that work on top, and their outputs are not compared."""
from __future__ import annotations

import argparse
import contextlib
import itertools

import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

from .bench_attention import env_switch_set
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
attention document(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]
}
attention t5(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], rel_bias: f32[32, Hq]) -> T[B, S, Hq, D] {
    score = score + rel_bias[t5_bucket(kv_pos - q_pos, num_buckets = 32, max_distance = 128, bidirectional = false), h]
    mask = kv_pos <= q_pos
}
attention rel_bias(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], bias: f32[129, Hq]) -> T[B, S, Hq, D] {
    score = score + bias[min(max(kv_pos - q_pos, -64), 64) + 64, h]
    mask = kv_pos <= q_pos
}
"""

MODS = {   # the same masks as FlexAttention mask_mods
    "causal": lambda b, h, q, k: k <= q,
    "prefix_lm": lambda b, h, q, k: (k <= q) | (k < 1024),
    "sinks": lambda b, h, q, k: (k <= q) & ((q - k < 1024) | (k < 4)),
    "dilated": lambda b, h, q, k: (k <= q) & (q - k < 2048) & ((q - k) % 2 == 0),
    "natten": lambda b, h, q, k: ((q // 64 - k // 64).abs() <= 3) & ((q % 64 - k % 64).abs() <= 3),
}
TABLE_CASES = ("document", "t5", "rel_bias")   # masks and scores over tables (table_case builds them)


def doc_ids(B: int, S: int, seed: int = 0) -> torch.Tensor:
    """Packed sequences: documents of 128-1024 tokens (uniform), ids rising along each row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < S:
            lengths.append(int(torch.randint(128, 1025, (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:S])
    return torch.stack(rows).int().cuda()


def table_case(name: str, B: int, S: int, hq: int):
    """(extra inputs of ours, Flex mask_mod, Flex score_mod) of a table case."""
    from layerforge.dsl.numerics import t5_bucket_table
    causal = lambda b, h, q, k: k <= q                                        # noqa: E731
    g = torch.Generator().manual_seed(1)
    if name == "document":
        doc = doc_ids(B, S)
        return {"doc": doc}, lambda b, h, q, k: (k <= q) & (doc[b, k] == doc[b, q]), None
    if name == "t5":   # causal buckets: distances 0..128 (farther: the last bucket)
        bias = torch.randn(32, hq, generator=g).cuda()
        buckets = torch.tensor(t5_bucket_table(32, 128, False), dtype=torch.int64, device="cuda")
        return ({"rel_bias": bias}, causal,
                lambda s, b, h, q, k: s + bias[buckets[(q - k).clamp(0, 128)], h])
    bias = torch.randn(129, hq, generator=g).cuda()
    return {"bias": bias}, causal, lambda s, b, h, q, k: s + bias[(k - q).clamp(-64, 64) + 64, h]


@contextlib.contextmanager
def per_element():
    """Kernels rendered without per-tile work: no tile classes, block masks or distance tables
    (every tile masked and scored per element: the A/B). Kernels loaded inside stay loaded."""
    from layerforge.codegen import attention as A
    from layerforge.codegen import attention_tc as TC
    from layerforge.codegen import attention_wgmma as W
    from layerforge.runtime import attention as RA
    saved = (A.tile_context, TC.needs_block_mask, RA.needs_block_mask, TC.distance_term, W.distance_term,
             W.needs_block_mask, W.block_mask_split)

    def clear():
        TC._render.cache_clear()
        W._render.cache_clear()   # else the wgmma plan (equal to the sparse run's) gets its cached source
        A._attention_kernels.cache_clear()   # the ABIs: block-mask arguments, shared memory
    A.tile_context = lambda *a, **k: {}
    TC.needs_block_mask = RA.needs_block_mask = W.needs_block_mask = lambda layer: False
    W.block_mask_split = lambda layer: None   # (documents: the wgmma kernel's per-score test, as mma.sync's)
    TC.distance_term = W.distance_term = lambda score: None
    clear()
    try:
        yield
    finally:
        (A.tile_context, TC.needs_block_mask, RA.needs_block_mask, TC.distance_term, W.distance_term,
         W.needs_block_mask, W.block_mask_split) = saved
        clear()


def ours(layer, q, kc, vc, table, lens, cu, seq, sparse: bool = True, extra=None, **module):
    """(kernel seconds, output, pre-pass seconds or None, the module). A block mask is built
    first and passed, so the kernel's time holds no pre-pass; the pre-pass is timed on its own.
    module: PagedAttention's options (prefill=, distance_table=, tiles=)."""
    from layerforge.codegen.block_mask import needs_block_mask
    attn = PagedAttention(layer, page_size=64, **module)
    out = torch.empty_like(q)
    bm = None
    if not sparse:   # load the kernel rendered without per-tile work; later calls reuse it
        with per_element():
            attn.prefill(q, kc, vc, table, lens, cu, max_q_len=seq, max_kv_len=seq, out=out, extra=extra)
    elif needs_block_mask(layer):
        bm = attn.block_mask(lens, cu, max_q_len=seq, max_kv_len=seq, extra=extra)
    run = lambda: attn.prefill(q, kc, vc, table, lens, cu, max_q_len=seq, max_kv_len=seq, out=out, extra=extra,  # noqa: E731
                               block_mask=bm)
    run()
    pre = bench(lambda: attn.block_mask(lens, cu, max_q_len=seq, max_kv_len=seq, extra=extra)) if bm else None
    return bench(run), out, pre, attn


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
        t_ours, out, _, _ = ours(layer, q, kc, vc, table, lens, cu, S, extra=extra)
        torch._dynamo.reset()   # a fresh compile per case (past the recompile limit Flex runs unfused)
        flex = torch.compile(flex_attention, dynamic=False)
        bm = create_block_mask(mask_mod, None, None, S, S, device="cuda") if mask_mod else None
        run = lambda: flex(qq, kk, vv, score_mod=score_mod, block_mask=bm, enable_gqa=hq != hkv)   # noqa: E731
        ref = run()
        t_flex = bench(run)
        err = "rope" if rope else f"{(out.view(B, S, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item():.4f}"
        print(f"{name:>14} {t_ours * 1e3:>8.3f} {t_flex * 1e3:>8.3f} {t_flex / t_ours:>9.2f} {err:>8}", flush=True)
        torch.cuda.empty_cache()


def flex_block_mask(create_block_mask, mod, B, S):
    """Flex's block-mask builder for the case, its mask evaluation compiled where this torch
    offers that (`_compile`), else as it is."""
    try:
        create_block_mask(mod, B, None, S, S, device="cuda", _compile=True)
        return lambda: create_block_mask(mod, B, None, S, S, device="cuda", _compile=True)
    except TypeError:
        return lambda: create_block_mask(mod, B, None, S, S, device="cuda")


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--only", default=None, help="one mask ('none': no mask, e.g. with --variants)")
    ap.add_argument("--variants", action="store_true", help="also the stdlib's blocks beside Flex")
    ap.add_argument("--wgmma", action="store_true",
                    help="the table cases also on the wgmma variant that is not the default (documents on its "
                         "block-mask lists; t5 / rel_bias without distance tables)")
    ap.add_argument("--wgmma-tiles", default=None, help="its WGTileConfig as n<keys>s<stages> (e.g. n64s3)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ab-switch", default=None, metavar="NAME[,NAME...]",
                    help="ours again with each environment switch 0 / 1 (all combinations), three rounds in turns")
    a = ap.parse_args()
    wg_module = None
    if a.wgmma:
        from layerforge.codegen.attention_wgmma import WGTileConfig
        wg_module = {"prefill": "wgmma"}
        if a.wgmma_tiles:
            bn, stages = a.wgmma_tiles.removeprefix("n").split("s")
            wg_module["tiles"] = {"prefill": WGTileConfig(bn=int(bn), stages=int(stages))}
    B, S, hq, hkv, d, page = a.batch, a.seq, 32, 8, a.head_dim, 64
    prog = lf.loads(SRC, "masks.lf", with_stdlib=False)
    q, kc, vc, table, lens, cu, (qq, kk, vv) = problem(B, S, hq, hkv, d, page, seed=0)
    flex = torch.compile(flex_attention, dynamic=False)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                                               enable_gqa=True))
    print(f"{torch.cuda.get_device_name()}  B{B} H{hq}/{hkv} S{S} D{d} bf16; SDPA flash causal {flash * 1e3:.3f} ms")
    print(f"{'mask':>10} {'density':>8} {'ours ms':>8} {'pre ms':>7} {'ours+pre':>8} {'dense ms':>9} {'flex ms':>8} "
          f"{'flex bm ms':>10} {'ours/flex':>9} {'sparse gain':>11} {'max err':>8}  kernel")
    for name in [*MODS, *TABLE_CASES]:
        if a.only and name != a.only:
            continue
        if name in MODS:
            extra, mod, score_mod = None, MODS[name], None
        else:
            extra, mod, score_mod = table_case(name, B, S, hq)
        layer = prog.specialise(name, Hq=hq, Hkv=hkv, D=d, dtype="bf16")
        torch._dynamo.reset()   # a fresh compile per mask (past the recompile limit Flex runs unfused)
        flex = torch.compile(flex_attention, dynamic=False)
        t_sparse, out, t_pre, attn = ours(layer, q, kc, vc, table, lens, cu, S, True, extra)
        t_dense, _, _, _ = ours(layer, q, kc, vc, table, lens, cu, S, False, extra)
        make_bm = flex_block_mask(create_block_mask, mod, B if extra and "doc" in extra else None, S)
        bm = make_bm()
        t_flex_bm = bench(make_bm)
        ref = flex(qq, kk, vv, score_mod=score_mod, block_mask=bm, enable_gqa=True)
        t_flex = bench(lambda: flex(qq, kk, vv, score_mod=score_mod, block_mask=bm, enable_gqa=True))
        got = out.view(B, S, hq, d).transpose(1, 2)
        err = (got.float() - ref.float()).abs().max().item()
        qi = torch.arange(S, device="cuda")
        density = sum(mod(b, 0, qi[:, None], qi[None, :]).float().mean().item() for b in range(B)) / B
        pre = f"{t_pre * 1e3:>7.3f}" if t_pre else f"{'-':>7}"
        print(f"{name:>10} {density:>8.3f} {t_sparse * 1e3:>8.3f} {pre} {(t_sparse + (t_pre or 0)) * 1e3:>8.3f} "
              f"{t_dense * 1e3:>9.3f} {t_flex * 1e3:>8.3f} {t_flex_bm * 1e3:>10.3f} {t_flex / t_sparse:>9.2f} "
              f"{t_dense / t_sparse:>11.2f} {err:>8.4f}  {attn.tc_plan('prefill').key.split('_p64_')[1]}", flush=True)
        if wg_module and name in TABLE_CASES:   # the variant that is not the default, beside it
            per_score = name != "document"   # t5 / rel_bias: the per-score kernel (tables are the default)
            other = "tc" if attn.prefill_kernel == "wgmma" else "wg"   # documents: the other prefill kernel
            module = ({**wg_module, "distance_table": False} if per_score
                      else {**wg_module, "prefill": "tc", "tiles": None} if other == "tc" else wg_module)
            t_wg, out_wg, t_wpre, wg = ours(layer, q, kc, vc, table, lens, cu, S, True, extra, **module)
            err_wg = (out_wg.view(B, S, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item()
            wpre = f"{t_wpre * 1e3:>7.3f}" if t_wpre else f"{'-':>7}"
            label = f"{name} per-score" if per_score else f"{name} {other}"
            print(f"{label:>10} {density:>8.3f} {t_wg * 1e3:>8.3f} {wpre} {(t_wg + (t_wpre or 0)) * 1e3:>8.3f} "
                  f"{'-':>9} {t_flex * 1e3:>8.3f} {t_flex_bm * 1e3:>10.3f} {t_flex / t_wg:>9.2f} {'-':>11} "
                  f"{err_wg:>8.4f}  {wg.tc_plan('prefill').key.split('_p64_')[1]} "
                  f"({t_sparse / t_wg:.2f}x the line above)", flush=True)
        if a.ab_switch:
            ab_lines(a.ab_switch.split(","), lambda: ours(layer, q, kc, vc, table, lens, cu, S, True, extra),
                     lambda o: (o.view(B, S, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item(), t_flex)
    if a.variants:
        variants(B, S)


def ab_lines(names: list[str], run, error, t_flex: float, rounds: int = 3) -> None:
    """--ab-switch: `run` (ours(...)'s tuple) under every 0 / 1 setting of `names`, `rounds` rounds in turns (a new
    module each time: its plan reads the switches), then a line per setting."""
    settings = list(itertools.product("01", repeat=len(names)))
    times: dict[tuple, list[float]] = {c: [] for c in settings}
    info: dict[tuple, tuple[float, str]] = {}
    for _ in range(rounds):
        for c in settings:
            with contextlib.ExitStack() as stack:   # each set for the run, checked read by its plan, restored
                for name, v in zip(names, c):
                    stack.enter_context(env_switch_set(name, v))
                t, out, _, attn = run()
            times[c].append(t)
            info[c] = (error(out), attn.tc_plan("prefill").key.split("_p64_")[1])
    for c in settings:
        label = ",".join(f"{n.removeprefix('LAYERFORGE_')}={v}" for n, v in zip(names, c))
        ms = " / ".join(f"{t * 1e3:.3f}" for t in times[c])
        print(f"    {label}: {ms} ms, {t_flex / min(times[c]):.2f}x Flex, err {info[c][0]:.4f}  {info[c][1]}",
              flush=True)


if __name__ == "__main__":
    main()
