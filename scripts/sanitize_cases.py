"""Small launches for compute-sanitizer (memcheck): a row kernel, MoE routing, a ragged prefill
(tensor-core prefill tiles; the wgmma kernel on Hopper), a chunked prefill and a split-KV decode
step (tensor-core and CUDA-core kernels), the same kernels on corrupt page tables, lengths and
offsets, a KV append, a document-mask prefill with its block-mask pre-pass (on sm_90 the wgmma
prefill's too, over a corrupt block mask as well, and T5 with its distance tables (the default)
and per score), MLA decodes over a paged latent cache (both kernels, TMA and cp.async tiles,
split, a corrupt page table), and small-token products (odd N
and K, gated), Mamba2's SSD scan and decode step. Run by scripts/gpu-check.sh as
    compute-sanitizer --tool memcheck --report-api-errors no python scripts/sanitize_cases.py [mla]
("mla": the MLA decode cases alone; "mlapair": its pair schedule with synced hand-offs, off by default, run alone;
"mlasync": its synced kernels alone (LAYERFORGE_MLA_SYNC_HANDOFF's schedule), which
scripts/gpu-check.sh runs under racecheck and synccheck too, expecting no report; "d256": the D256 wgmma prefill with K and V in rings of their own,
also run by main; "persist": the persistent wgmma prefill, off by default and run alone, under memcheck, racecheck
and synccheck by scripts/ab-switches.sh's part persist; "decodetma": the e4m3 decode by TMA, the same way by its part
decodetma; "xshare": u4's shared-x products, the same way by its part xshare; "many": the e4m3 decode's tile for grids
past one wave, also run by main; "prefetch": the L2 prefetch over tensors whose ends are not whole 16-byte pieces, and
the Mamba2 decode step with it, also run by main)."""
import itertools

import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention
from layerforge.runtime.kv_cache import PagedKVCache
from layerforge.runtime.layers import module


def mla_cases(bf, sync_only=False):
    """The MLA decode kernels (the wgmma kernel's seesaw schedule and its synced hand-offs too) on a partial last tile,
    splits, a page-table entry outside the cache. racecheck reports the bar.arrive hand-offs of the default wgmma
    kernel and the seesaw (the tool's model: benchmarks/probe_racecheck.py); the synced ones are the cases it can
    check. sync_only: the synced kernels alone (the corrupt-table case on one too): the MLA decode memcheck, racecheck
    and synccheck all pass clean (scripts/gpu-check.sh runs them so)."""
    from layerforge.runtime.mla_decode import MLADecode
    lens, q_seq = torch.tensor([150, 1], dtype=torch.int32, device="cuda"), torch.tensor([0, 1], dtype=torch.int32,
                                                                                           device="cuda")
    q = torch.randn(2, 64, 576, device="cuda", dtype=bf)
    for page, kernel, seesaw, sync in ((64, None, False, None), (8, None, False, None), (64, "mma", False, None),
                                       (64, "wgmma", True, None), (8, "wgmma", True, None), (64, "wgmma", False, True),
                                       (8, "wgmma", False, True)):
        if sync_only and not sync:
            continue
        lat = torch.randn(9 * 64 // page, page, 576, device="cuda", dtype=bf)
        n = -(-150 // page)
        lat_table = torch.full((2, n + 1), -1, dtype=torch.int32, device="cuda")
        lat_table[0, :n] = torch.arange(n, device="cuda") + 1
        lat_table[1, 0] = 0
        for splits in (1, 3):
            MLADecode(num_heads=64, page_size=page, kernel=kernel, seesaw=seesaw or None, sync_handoff=sync)(
                q, lat, lat_table, lens, q_seq, scale=0.07, max_kv_len=150, num_splits=splits)
    bad = lat_table.clone()
    bad[0, 1] = 10 ** 6   # outside the cache: clamped into it, never read out of bounds
    MLADecode(num_heads=64, page_size=64, sync_handoff=True if sync_only else None)(
        q, torch.randn(9, 64, 576, device="cuda", dtype=bf), bad[:, :4].contiguous(), lens, q_seq, scale=0.07,
        max_kv_len=150)


def mla_pair_cases(bf):
    """The wgmma MLA decode's pair schedule (LAYERFORGE_MLA_PAIR's: a token's two head blocks a cluster sharing each
    full key tile by TMA multicast), with synced hand-offs (the schedule racecheck follows): 128 heads (one pair a
    token) and 100 (the second block partial), pages 64 and 16, a partial last tile (cp.async, each CTA its own),
    splits 1 and 3, then a page-table entry outside the cache."""
    from layerforge.runtime.mla_decode import MLADecode
    lens = torch.tensor([150, 1], dtype=torch.int32, device="cuda")
    q_seq = torch.tensor([0, 1, 0], dtype=torch.int32, device="cuda")
    for heads, page in ((128, 64), (100, 16)):
        q = torch.randn(3, heads, 576, device="cuda", dtype=bf)
        lat = torch.randn(9 * 64 // page, page, 576, device="cuda", dtype=bf)
        n = -(-150 // page)
        table = torch.full((2, n + 1), -1, dtype=torch.int32, device="cuda")
        table[0, :n] = torch.arange(n, device="cuda") + 1
        table[1, 0] = 0
        dec = MLADecode(num_heads=heads, page_size=page, pair=True, sync_handoff=True)
        for splits in (1, 3):
            dec(q, lat, table, lens, q_seq, scale=0.07, max_kv_len=150, num_splits=splits)
        bad = table.clone()
        bad[0, 1] = 10 ** 6   # outside the cache: clamped into it, never read out of bounds
        dec(q, lat, bad, lens, q_seq, scale=0.07, max_kv_len=150)


# a document mask (packed sequences: a row sees the keys of its own document)
DOCUMENT = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention document(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]
}"""


def ragged_prefill(layer, attn, d, lens, bf, *, num_pages, max_pages, small=False):
    """`attn`'s prefill over a fresh cache of `lens` (a dict: sequence -> tokens, the whole sequences the chunks),
    unsplit and in 3 splits; with `small`, a launch of a few tokens (fewer places than SMs); then over a corrupt
    page table and lengths (clamped: wrong numbers, never an out-of-bounds access). Hq 16 / Hkv 4, pages of 16."""
    cache = PagedKVCache(num_pages, 16, 4, d, dtype=bf, device="cuda", max_seqs=len(lens), max_pages_per_seq=max_pages)
    for s, n in lens.items():
        cache.allocate(s, n)
        cache.append([s] * n, torch.randn(n, 4, d, device="cuda", dtype=bf),
                     torch.randn(n, 4, d, device="cuda", dtype=bf), layer.function.outputs[0].arg.rope)
    sizes = list(lens.values())
    cu = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(sizes), 16, d, device="cuda", dtype=bf)
    for splits in (None, 3):
        attn.prefill(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, max_q_len=max(sizes),
                     max_kv_len=max(sizes), num_splits=splits)
    if small:   # each sequence's last few tokens
        few = [min(n, 5) for n in sizes]
        attn.prefill(q[:sum(few)], cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
                     torch.tensor([0, *itertools.accumulate(few)], dtype=torch.int32, device="cuda"),
                     max_q_len=max(few), max_kv_len=max(sizes))
    bad_table = cache.page_table.clone()
    bad_table[0, 3] = 10**6
    bad_table[2, 1] = -7
    bad_lens = torch.tensor([10**6, *sizes[1:]], dtype=torch.int32, device="cuda")
    attn.prefill(q, cache.k_cache, cache.v_cache, bad_table, bad_lens, cu, max_q_len=max(sizes),
                 max_kv_len=max(sizes) + 20)
    torch.cuda.synchronize()


def d256_cases(bf):
    """The wgmma prefill at D256 (K and V in rings of their own, the planner's choice at two stages): ragged lengths
    off the tile, split-KV, a corrupt page table and lengths (sm_90 only)."""
    if torch.cuda.get_device_capability() != (9, 0):
        return
    layer = lf.stdlib().specialise("llama_attn", Hq=16, Hkv=4, D=256, dtype="bf16")
    attn = PagedAttention(layer, page_size=16, prefill="wgmma")
    assert attn.tc_plan("prefill").kv_rings, attn.tc_plan("prefill").key
    ragged_prefill(layer, attn, 256, {0: 300, 1: 1, 2: 77}, bf, num_pages=64, max_pages=20)


def document_cases(bf):
    """Document masks with their test made once a tile as bits (the default: the key's table reads once per key,
    the row's once), on the mma.sync prefill and (sm_90) the wgmma one (the default there: persistent, its key terms
    staged in shared memory) at D128 and D64 (three consumers): ragged
    lengths off the tiles, split-KV, ids in runs of 1-400 tokens, then a corrupt block mask (clamped)."""
    doc_prog = lf.loads(DOCUMENT, "document.lf", with_stdlib=False)
    lens = [700, 1, 300]
    g = torch.Generator().manual_seed(3)
    runs = torch.tensor([1, 2, 9, 33, 64, 150, 400])[torch.randint(0, 7, (3, 64), generator=g)]
    doc = torch.stack([torch.repeat_interleave(torch.arange(64), r)[:max(lens)] for r in runs]).int().cuda()
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    hopper = torch.cuda.get_device_capability() == (9, 0)
    from layerforge.runtime.block_mask import BlockMask
    for d, kernel in ((128, "tc"), (128, "wgmma"), (64, "wgmma")):
        if kernel == "wgmma" and not hopper:
            continue
        layer = doc_prog.specialise("document", Hq=16, Hkv=4, D=d, dtype="bf16")
        cache = PagedKVCache(128, 16, 4, d, dtype=bf, device="cuda", max_seqs=3, max_pages_per_seq=48)
        for s, n in enumerate(lens):
            cache.allocate(s, n)
            cache.append([s] * n, torch.randn(n, 4, d, device="cuda", dtype=bf),
                         torch.randn(n, 4, d, device="cuda", dtype=bf), layer.function.outputs[0].arg.rope)
        attn = PagedAttention(layer, page_size=16, prefill=kernel)   # wgmma: the default (persistent, keys staged)
        assert attn.tc_plan("prefill").mask_split, attn.tc_plan("prefill").key
        q = torch.randn(sum(lens), 16, d, device="cuda", dtype=bf)
        call = dict(max_q_len=max(lens), max_kv_len=max(lens), extra={"doc": doc})
        for splits in (None, 3):
            attn.prefill(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, num_splits=splits,
                         **call)
        good = attn.block_mask(cache.seq_lens, cu, **call)
        bad = BlockMask(cls=good.cls, num=torch.full_like(good.num, 10**6),
                        idx=torch.randint(-2**30, 2**30, good.idx.shape, dtype=torch.int32, device="cuda"),
                        rows=good.rows, keys=good.keys, kernel=good.kernel)
        attn.prefill(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, block_mask=bad, **call)
    torch.cuda.synchronize()


def persist_cases(bf):
    """The persistent wgmma prefill (the work queue's slots, each next row block's Q loaded early): D128 in the
    sectioned and the default order and D64 with three consumers, ragged chunks, split-KV, a corrupt page table and
    lengths; a grid of fewer places than SMs and one of many more (sm_90 only)."""
    if torch.cuda.get_device_capability() != (9, 0):
        return
    from layerforge.codegen.attention_wgmma import WGTileConfig
    for d, tiles in ((128, WGTileConfig(bn=128, stages=3, tma=True, overlap=True, persist=True, q_next=True, lpt=128)),
                     (128, WGTileConfig(bn=128, stages=3, tma=True, persist=True, q_next=True)),
                     (64, WGTileConfig(bn=128, stages=3, consumers=3, tma=True, persist=True, q_next=True, lpt=128))):
        layer = lf.stdlib().specialise("llama_attn", Hq=16, Hkv=4, D=d, dtype="bf16")
        attn = PagedAttention(layer, page_size=16, prefill="wgmma", tiles={"prefill": tiles})
        ragged_prefill(layer, attn, d, {0: 1200, 1: 1, 2: 77}, bf, num_pages=128, max_pages=80, small=True)


def e4m3_cache(lens, bf, rope, *, num_pages, max_pages, room=0):
    """A paged e4m3 cache (Hkv 8, D 128, pages of 16, per-head scales) holding `lens` (sequence -> tokens, room
    more allocated each) written by the append kernel; (cache, its K scales, its V scales)."""
    c8 = PagedKVCache(num_pages, 16, 8, 128, dtype=bf, device="cuda", max_seqs=max(lens) + 1,
                      max_pages_per_seq=max_pages, kv_dtype="fp8_e4m3", scales="per_head")
    c8.set_scales(0, torch.rand(8, device="cuda") * 0.01 + 0.02, torch.rand(8, device="cuda") * 0.005 + 0.006)
    for s, n in lens.items():
        c8.allocate(s, n + room)
        c8.append([s] * n, torch.randn(n, 8, 128, device="cuda", dtype=bf) * 2,
                  torch.randn(n, 8, 128, device="cuda", dtype=bf), rope)
    return (c8, *c8.layer_scales(0))


def decode_tma_cases(bf):
    """The e4m3 decode with its K/V tiles by TMA (LAYERFORGE_DECODE_TMA, off by default: run alone): 64- and 128-key
    tiles, whole and partial last tiles (lengths 1, 128, 129, 300), unsplit and in 3 parts, and a page table with
    entries past the cache and negative (clamped: wrong numbers, never an out-of-bounds access; sm_90 only)."""
    if torch.cuda.get_device_capability() < (9, 0):
        return
    import os
    from layerforge.codegen.attention_tc import TileConfig
    os.environ["LAYERFORGE_DECODE_TMA"] = "1"
    layer = lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    rope = layer.function.outputs[0].arg.rope
    lens = {0: 300, 1: 1, 2: 128, 3: 129}
    c8, k_sc, v_sc = e4m3_cache(lens, bf, rope, num_pages=80, max_pages=20)
    q = torch.randn(4, 32, 128, device="cuda", dtype=bf)
    ids = torch.arange(4, dtype=torch.int32, device="cuda")
    pos = torch.tensor([n - 1 for n in lens.values()], dtype=torch.int32, device="cuda")
    bad = c8.page_table.clone()
    bad[0, 1], bad[0, 2] = 10 ** 6, -5
    for bnw in (16, 32):
        tiles = TileConfig(wm=1, wn=4, mt=1, bnw=bnw, stages=3, min_blocks=2)
        a8 = PagedAttention(layer, page_size=16, kv_dtype="fp8_e4m3", tiles={"decode": tiles})
        for table, splits in ((c8.page_table, 1), (c8.page_table, 3), (bad, 1)):
            a8(q, c8.k_cache, c8.v_cache, table, c8.seq_lens, ids, pos, max_kv_len=300, num_splits=splits,
               k_scale=k_sc, v_scale=v_sc)
    torch.cuda.synchronize()


def many_ctas_cases(bf):
    """The e4m3 decode's tile for grids past one wave of the default (runtime/attention.DECODE_MANY, by default): 48
    sequences (384 CTAs), partial last tiles and single keys, unsplit and in 3 parts, and a page table with entries
    past the cache and negative (clamped: wrong numbers, never an out-of-bounds access)."""
    from layerforge.codegen.attention_tc import block_many_tile
    from layerforge.runtime.attention import DECODE_MANY
    layer = lf.stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    rope = layer.function.outputs[0].arg.rope
    lens = {s: (1, 16, 17, 129, 300, 64)[s % 6] for s in range(48)}
    c8, k_sc, v_sc = e4m3_cache(lens, bf, rope, num_pages=48 * 20, max_pages=20)
    q = torch.randn(48, 32, 128, device="cuda", dtype=bf)
    ids = torch.arange(48, dtype=torch.int32, device="cuda")
    pos = torch.tensor([n - 1 for n in lens.values()], dtype=torch.int32, device="cuda")
    runs = [(PagedAttention(layer, page_size=16, kv_dtype="fp8_e4m3"), c8, dict(k_scale=k_sc, v_scale=v_sc))]
    if block_many_tile(layer, None) is not None:   # the bf16 cache's (LAYERFORGE_DECODE_MANY_BF16, on by default)
        cache = PagedKVCache(48 * 20, 16, 8, 128, dtype=bf, device="cuda", max_seqs=48, max_pages_per_seq=20)
        for s, n in lens.items():
            cache.allocate(s, n)
            cache.append([s] * n, torch.randn(n, 8, 128, device="cuda", dtype=bf),
                         torch.randn(n, 8, 128, device="cuda", dtype=bf), rope)
        runs.append((PagedAttention(layer, page_size=16), cache, {}))
    for attn, c, scales in runs:
        bad = c.page_table.clone()
        bad[4, 1], bad[4, 2] = 10 ** 6, -5
        for table, splits in ((c.page_table, None), (c.page_table, 3), (bad, None)):
            attn(q, c.k_cache, c.v_cache, table, c.seq_lens, ids, pos, max_kv_len=300, num_splits=splits, **scales)
        torch.cuda.synchronize()
        assert any(mode == DECODE_MANY for _, mode in attn._kernels), \
            f"the many-CTA decode tile did not run ({attn.kv_dtype or 'bf16'} cache)"


def xshare_cases(bf):
    """u4's shared-x layout (off by default): K split over CTAs (the workspace and counters), one CTA per row block,
    N past a CTA's rows, fewer tokens than the plan's, a gated product with bias and residual."""
    from layerforge.codegen.gemv import plan_gemv
    from layerforge.runtime.launch import device_arch, load_plan
    from layerforge.runtime.linear import _SplitGemvLauncher
    from layerforge.runtime.quant import QuantLinear
    dev = torch.device("cuda")
    for n, k, gated, m, split in ((1040, 2048, None, 13, 3), (1000, 1152, None, 16, 1), (2 * 520, 3072, "silu", 5, 4)):
        lin = QuantLinear.from_float(torch.randn(n, k) / k ** 0.5, 128, torch.randn(n), wtype="u4", dtype=bf).cuda()
        n_out = n // 2 if gated else n
        plan = plan_gemv("bf16", n=n, k=k, max_m=16, gated=gated, bias=True, residual=bool(gated), arch=device_arch(),
                         wtype="u4", group=128, xshare=split)
        launch = load_plan(plan, dev)
        launch = _SplitGemvLauncher(plan, launch, dev) if plan.xshare > 1 else launch
        x = torch.randn(m, k, device="cuda", dtype=bf)
        out = torch.empty(m, n_out, device="cuda", dtype=bf)
        res = [torch.randn(m, n_out, device="cuda", dtype=bf)] if gated else []
        for _ in range(2):   # twice: the counters the first launch left zero
            launch((), [x, *lin.qw.kernel_tensors, lin.bias, *res, out, m])


def main():
    torch.manual_seed(0)  # the same launches every run, so a report reproduces
    prog = lf.stdlib()
    bf = torch.bfloat16
    norm = module("add_rms_norm", H=5120, dtype="bf16", device="cuda", eps=1e-5)
    x = torch.randn(7, 5120, device="cuda", dtype=bf)
    norm(x, x.clone())
    route = module("moe_route", E=64, k=8, dtype="f32", device="cuda")
    route(torch.randn(33, 64, device="cuda"))

    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    rope = layer.function.outputs[0].arg.rope
    cache = PagedKVCache(64, 16, 8, 128, dtype=bf, device="cuda", max_seqs=4, max_pages_per_seq=16)
    lens = {0: 1, 1: 37, 3: 100}
    for s, n in lens.items():
        cache.allocate(s, n + 1)
        cache.append([s] * n, torch.randn(n, 8, 128, device="cuda", dtype=bf),
                     torch.randn(n, 8, 128, device="cuda", dtype=bf), rope)
    attn = PagedAttention(layer, page_size=16)          # tensor-core kernels
    simt = PagedAttention(layer, page_size=16, kernel="simt")
    # ragged prefill (tensor-core prefill tiles): each sequence's cached tokens as new queries
    cu = torch.tensor([0, 1, 38, 38, 138], dtype=torch.int32, device="cuda")
    qr = torch.randn(138, 32, 128, device="cuda", dtype=bf)
    attn.prefill(qr, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, max_q_len=100,
                 max_kv_len=100)
    # chunked prefill: the last tokens of each sequence attend to the cache
    q_seq = torch.tensor([0, 1, 1, 1, 3, 3], dtype=torch.int32, device="cuda")
    q_pos = torch.tensor([0, 34, 35, 36, 98, 99], dtype=torch.int32, device="cuda")
    q = torch.randn(6, 32, 128, device="cuda", dtype=bf)
    attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, q_seq, q_pos, max_kv_len=100)
    simt(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, q_seq, q_pos, max_kv_len=100)
    # decode step with split-KV
    ids = [0, 1, 3]
    pos = cache.append(ids, torch.randn(3, 8, 128, device="cuda", dtype=bf),
                       torch.randn(3, 8, 128, device="cuda", dtype=bf), rope)
    q = torch.randn(3, 32, 128, device="cuda", dtype=bf)
    attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
         torch.tensor(ids, dtype=torch.int32, device="cuda"), pos.cuda(), max_kv_len=101, num_splits=4)
    # an e4m3 cache (per-head scales): the append kernel, then decode (the default widening on tensor cores, K by the
    # cvt as words on sm_90; split-KV and the CUDA-core kernel too) and chunked prefill over it
    c8, k_sc, v_sc = e4m3_cache(lens, bf, rope, num_pages=64, max_pages=16, room=1)
    q6 = torch.randn(6, 32, 128, device="cuda", dtype=bf)   # the chunked-prefill tokens above (q_seq, q_pos)
    for kernel in ("tc", "simt"):
        a8 = PagedAttention(layer, page_size=16, kernel=kernel, kv_dtype="fp8_e4m3")
        for splits in (1, 3):
            a8(q6, c8.k_cache, c8.v_cache, c8.page_table, c8.seq_lens, q_seq, q_pos, max_kv_len=100, num_splits=splits,
               k_scale=k_sc, v_scale=v_sc)
    PagedAttention(layer, page_size=16, kv_dtype="fp8_e4m3").prefill(
        qr, c8.k_cache, c8.v_cache, c8.page_table, c8.seq_lens, cu, max_q_len=100, max_kv_len=100,
        k_scale=k_sc, v_scale=v_sc)
    # corrupt inputs the host cannot check without a sync: page ids past the cache and
    # negative, lengths past the page table, a sequence id out of range, offsets past q.
    # The kernels clamp them: wrong numbers, never an out-of-bounds access.
    bad_table = cache.page_table.clone()
    bad_table[1, 0] = 10**6
    bad_table[3, 2] = -5
    bad_lens = torch.tensor([1, 10**6, 0, 5000], dtype=torch.int32, device="cuda")
    bad_seq = torch.tensor([0, 7, 3], dtype=torch.int32, device="cuda")
    for kernel in (attn, simt):
        kernel(q, cache.k_cache, cache.v_cache, bad_table, bad_lens, bad_seq, pos.cuda(), max_kv_len=256)
    bad_cu = torch.tensor([0, 1, 500, 38, 10**6], dtype=torch.int32, device="cuda")
    attn.prefill(qr, cache.k_cache, cache.v_cache, bad_table, bad_lens, bad_cu, max_q_len=100, max_kv_len=256)
    # a document mask (packed sequences): the block-mask pre-pass, then the prefill walking its lists
    doc_prog = lf.loads(DOCUMENT, "document.lf", with_stdlib=False)
    dlayer = doc_prog.specialise("document", Hq=32, Hkv=8, D=128, dtype="bf16")
    dattn = PagedAttention(dlayer, page_size=16, prefill="tc")
    doc = (torch.arange(128, device="cuda") // 37).to(torch.int32).repeat(4, 1)
    dattn.prefill(qr, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, max_q_len=100,
                  max_kv_len=100, extra={"doc": doc})
    if torch.cuda.get_device_capability() == (9, 0):
        # the same on the wgmma prefill (the documents' default on sm_90), then over
        # a corrupt block mask (counts and tile entries out of range: clamped), and T5 with its
        # distance tables (the default, asked for explicitly here) and per score
        from layerforge.runtime.block_mask import BlockMask
        wattn = PagedAttention(dlayer, page_size=16, prefill="wgmma")
        call = dict(max_q_len=100, max_kv_len=100, extra={"doc": doc})
        wattn.prefill(qr, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, **call)
        good = wattn.block_mask(cache.seq_lens, cu, **call)
        bad = BlockMask(cls=good.cls, num=torch.full_like(good.num, 10**6),
                        idx=torch.randint(-2**30, 2**30, good.idx.shape, dtype=torch.int32, device="cuda"),
                        rows=good.rows, keys=good.keys, kernel=good.kernel)
        wattn.prefill(qr, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, block_mask=bad, **call)
        t5 = lf.stdlib().specialise("t5_attn", Hq=32, Hkv=8, D=128, NB=32, dtype="bf16")
        for tables in (True, False):
            PagedAttention(t5, page_size=16, prefill="wgmma", distance_table=tables).prefill(
                qr, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, max_q_len=100,
                max_kv_len=100, extra={"rel_bias": torch.randn(32, 32, device="cuda")})
    # MLA decode: 64 heads over a paged latent cache of 576-wide rows, split in 3 (on sm_90 the wgmma
    # kernel: TMA tiles from pages of 64, cp.async from pages of 8; then mma.sync)
    mla_cases(bf)
    many_ctas_cases(bf)
    # small-token products: N and K off the tiles, 3 and 11 tokens, gated with bias and residual
    from layerforge.runtime.linear import gemv
    w = torch.randn(1000, 3000, device="cuda", dtype=bf)
    gemv(torch.randn(3, 3000, device="cuda", dtype=bf), w)
    gemv(torch.randn(11, 3000, device="cuda", dtype=bf), w, torch.randn(1000, device="cuda", dtype=bf),
         gated="silu", residual=torch.randn(11, 500, device="cuda", dtype=bf))
    # mixture of experts: the permutation (with a shared expert's fixed slices), the expert
    # kernels (decode: 5 tokens; empty experts), the grouped path (40 tokens), the combine
    from layerforge.runtime.moe import MoE, MoEConfig
    moe = MoE(MoEConfig(hidden=256, inter=128, experts=12, top_k=4, shared_inter=256, shared_gate=True),
              dtype=bf, device="cuda")
    with torch.no_grad():
        for prm in moe.parameters():
            prm.normal_(0, 0.05)
        moe(torch.randn(5, 256, device="cuda", dtype=bf))
        moe(torch.randn(40, 256, device="cuda", dtype=bf))
    # multi-LoRA decode: 3 adapters of ranks 8 / 16 over q, k, v slices, tokens of no adapter
    from layerforge.runtime.lora import AdapterBatch, LoRALinear, MultiLoRA
    lora = MultiLoRA(256, (256, 64, 64), adapters=3, max_rank=16, dtype=bf, device="cuda")
    for slot, r in enumerate((8, 16, 16)):
        for part in range(3):
            lora.set_adapter(slot, torch.randn(r, 256, device="cuda", dtype=bf),
                             torch.randn(lora.slices[part], r, device="cuda", dtype=bf), 0.5, part=part)
    lin = LoRALinear(torch.nn.Linear(256, 384, bias=True, device="cuda", dtype=bf), lora)
    ids = torch.tensor([0, -1, 2, 1, 2, -1, 0], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        lin(torch.randn(7, 256, device="cuda", dtype=bf), AdapterBatch(ids, lora.adapters))
    # Mamba2's SSD: the chunked scan (3 launches) over a length that ends mid-chunk, from a carried
    # state, with D and the z gate; B/C/x as strided splits of one row; then a decode step
    from layerforge.runtime.ssd import ssd_scan, ssd_state_update
    xbc = torch.randn(2, 100, 4 * 32 + 2 * 2 * 16, device="cuda", dtype=bf)
    xs, bs, cs = xbc.split([4 * 32, 2 * 16, 2 * 16], dim=-1)
    xs, bs, cs = xs.unflatten(-1, (4, 32)), bs.unflatten(-1, (2, 16)), cs.unflatten(-1, (2, 16))
    a_h = -torch.rand(4, device="cuda") - 0.5
    h0 = torch.randn(2, 4, 32, 16, device="cuda")
    _, last = ssd_scan(xs, torch.randn(2, 100, 4, device="cuda", dtype=bf), a_h, bs, cs,
                       D=torch.ones(4, device="cuda"), z=torch.randn(2, 100, 4, 32, device="cuda", dtype=bf),
                       dt_bias=torch.zeros(4, device="cuda"), chunk_size=64, initial_state=h0, return_final_state=True)
    ssd_state_update(last, xs[:, 0], torch.randn(2, 4, device="cuda", dtype=bf), a_h, bs[:, 0], cs[:, 0],
                     D=torch.ones(4, device="cuda"))
    # Mamba's scan kernels: the conv and the selective scan over 1500 steps (a chunk and part of
    # the next; N = 16 on float4 lanes) with states in and out, then one decode step of each
    from layerforge.runtime.scan import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
    xm = torch.randn(2, 48, 1500, device="cuda", dtype=bf)
    wm = torch.randn(48, 4, device="cuda", dtype=bf)
    ym, sm = causal_conv1d(xm, wm, torch.randn(48, device="cuda", dtype=bf),
                           initial_state=torch.randn(2, 48, 3, device="cuda", dtype=bf), return_final_state=True)
    causal_conv1d_update(xm[..., 0].contiguous(), torch.cat([sm, xm[..., :1]], -1).contiguous(), wm, None)
    am = -torch.rand(48, 16, device="cuda") - 0.1
    bm, cm = (torch.randn(2, 16, 1500, device="cuda", dtype=bf) for _ in range(2))
    _, hm = selective_scan(ym, torch.randn_like(ym), am, bm, cm, torch.ones(48, device="cuda"), torch.randn_like(ym),
                           torch.zeros(48, device="cuda"), initial_state=torch.randn(2, 48, 16, device="cuda"),
                           return_final_state=True)
    selective_state_update(hm, ym[..., 0].contiguous(), ym[..., 1].contiguous(), am, bm[..., 0].contiguous(),
                           cm[..., 0].contiguous(), None, None, None)
    d256_cases(bf)
    prefetch_cases(bf)
    torch.cuda.synchronize()
    print("sanitize cases ran")


def tail_split_cases(bf):
    """The GEMM with its last round's tiles split along K (the wgmma_split variant, off by default: run alone): a
    tail with TMA stores (16 tiles of 128 x 128 in 8 parts each), one with register stores and a residual at an odd
    width (partial tiles, K = 3000 not a multiple of the slices), and one slice of K (no split); then a few-row call
    in up to 16 parts (wgmma_split16: 40 rows, Mamba2's out_proj shape, 10 tiles in 13 parts, warps past M idle)."""
    from layerforge.runtime.linear import gemv
    for m, n, k, kernel in ((200, 1024, 4096, "wgmma_split"), (129, 1001, 3000, "wgmma_split"),
                            (64, 24, 8, "wgmma_split"), (40, 2560, 5120, "wgmma_split16")):
        x = torch.randn(m, k, device="cuda", dtype=bf)
        w = torch.randn(n, k, device="cuda", dtype=bf) / k ** 0.5
        gemv(x, w, kernel=kernel)
        gemv(x, w, residual=torch.randn(m, n, device="cuda", dtype=bf), kernel=kernel)
    torch.cuda.synchronize()
    print("tail split cases ran")


def prefetch_cases(bf):
    """The L2 prefetch (runtime/prefetch.py) over allocations that end 1-15 bytes past a whole 16-byte piece and one
    that runs past a thread's run, then a Mamba2 decode step with it on (LAYERFORGE_MAMBA_PREFETCH)."""
    import os
    from layerforge.runtime.mamba import Mamba2Mixer, Mamba2MixerConfig
    from layerforge.runtime.prefetch import prefetch_l2
    for nbytes in (1, 15, 17, 4095, 32 * 32768 + 40):
        prefetch_l2(torch.zeros(nbytes, dtype=torch.uint8, device="cuda"))
    cfg = Mamba2MixerConfig(hidden_size=64, intermediate_size=128, num_heads=8, head_dim=16, state_size=16, n_groups=1)
    mixer = Mamba2Mixer(cfg, dtype=bf, device="cuda")
    before = os.environ.get("LAYERFORGE_MAMBA_PREFETCH")
    os.environ["LAYERFORGE_MAMBA_PREFETCH"] = "1"
    try:
        mixer.step(torch.randn(2, 64, device="cuda", dtype=bf), mixer.new_state(2))
    finally:
        if before is None:
            del os.environ["LAYERFORGE_MAMBA_PREFETCH"]
        else:
            os.environ["LAYERFORGE_MAMBA_PREFETCH"] = before


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["mla"]:   # the MLA decode cases alone
        mla_cases(torch.bfloat16)
    elif sys.argv[1:] == ["mlasync"]:   # the synced MLA decode kernels alone (clean under all three tools)
        mla_cases(torch.bfloat16, sync_only=True)
    elif sys.argv[1:] == ["mlapair"]:   # the MLA decode's pair schedule alone (off by default: not in main)
        mla_pair_cases(torch.bfloat16)
    elif sys.argv[1:] == ["d256"]:   # the D256 wgmma prefill alone (K and V rings)
        d256_cases(torch.bfloat16)
    elif sys.argv[1:] == ["persist"]:   # the persistent wgmma prefill alone (off by default: not in main)
        persist_cases(torch.bfloat16)
    elif sys.argv[1:] == ["decodetma"]:   # the e4m3 decode by TMA alone (off by default: not in main)
        decode_tma_cases(torch.bfloat16)
    elif sys.argv[1:] == ["many"]:   # the e4m3 decode's many-CTA tile alone (main runs it too)
        many_ctas_cases(torch.bfloat16)
    elif sys.argv[1:] == ["xshare"]:   # u4's shared-x layout alone (off by default: not in main)
        xshare_cases(torch.bfloat16)
    elif sys.argv[1:] == ["tailsplit"]:   # the GEMM's split tail alone (off by default: not in main)
        tail_split_cases(torch.bfloat16)
    elif sys.argv[1:] == ["documents"]:   # the document masks' prefills alone, their test as bits
        document_cases(torch.bfloat16)
    elif sys.argv[1:] == ["prefetch"]:   # the L2 prefetch alone (main runs it too)
        prefetch_cases(torch.bfloat16)
    else:
        main()
