"""The paged-KV attention kernels against the reference evaluator in float64: every stdlib
variant, GQA ratios 1/4/8/32, head dims 64/128/256, page sizes 16/64, decode and chunked
prefill over ragged sequences (length 1, not multiples of a page), split-KV, fully masked
rows. Each case runs three ways: the tensor-core kernel in the per-token form ("tc") and in
the ragged cu_seqlens form ("tc-ragged"), and the CUDA-core kernel ("simt"). The cache is
filled here with torch (K rotated by the reference's RoPE), so these
tests do not depend on the append kernel."""
import itertools
import math

import pytest
import torch

import layerforge as lf
from layerforge.dsl.attention_ref import apply_rope
from layerforge.codegen.row import LoweringError
from layerforge.codegen.attention_tc import TileConfig
from layerforge.runtime.attention import PagedAttention

from ..seeding import seeded_generator


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(params=["tc", "tc-ragged", "simt"])
def form(request):
    return request.param


def build_cache(ks, vs, page_size, spec, dtype, gen):
    """Random page placement; K rotated at its positions (as the append kernel stores it)."""
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    pages_per = [max(1, math.ceil(k.shape[0] / page_size)) for k in ks]
    total = sum(pages_per) + 3
    perm = torch.randperm(total, generator=gen).tolist()
    kc = torch.full((total, page_size, hkv, d), float("nan"), dtype=dtype, device="cuda")
    vc = torch.full((total, page_size, hkv, vs[0].shape[2]), float("nan"), dtype=dtype, device="cuda")
    max_pages = max(pages_per) + 1
    table = torch.full((len(ks), max_pages), -1, dtype=torch.int32)
    for s, (k, v) in enumerate(zip(ks, vs)):
        n = k.shape[0]
        kr = k.double()
        if spec.rope is not None and n:
            kr = apply_rope(kr[None], torch.arange(n, device="cuda")[None], spec.rope, int(spec.rope.rotary_dim))[0]
        for i in range(pages_per[s]):
            pg = perm.pop()
            table[s, i] = pg
            lo, hi = i * page_size, min(n, (i + 1) * page_size)
            if hi > lo:
                kc[pg, : hi - lo] = kr[lo:hi].to(dtype)
                vc[pg, : hi - lo] = v[lo:hi]
    lens = torch.tensor([k.shape[0] for k in ks], dtype=torch.int32)
    return kc, vc, table.cuda(), lens.cuda()


def run_case(prog, form, name, hq, hkv, d, page, lens, new, dtype=torch.bfloat16, extra_fn=None, splits=None,
             tiles=None, prefill=None, dv=None, identity=False, **consts):
    """lens: total kv length per sequence; new: query tokens per sequence (the last ones);
    prefill: PagedAttention's prefill kernel (None: its default for the device); dv: the value
    head dim of a block that declares one (its dim Dv; None: values of D). identity (the
    per-token forms, one token for each of the first sequences, none for the rest): the call
    without q_seq / q_pos (token t is sequence t, at its last position) is the one checked
    against the reference, and a second call with them spelled out must give the same bits."""
    # seeded by the problem, not the form or tiles: every kernel of a case sees the same inputs
    gen = seeded_generator(name, hq, hkv, d, page, tuple(lens), tuple(new), dtype, consts, *((dv,) if dv else ()))
    kw = dict(Hq=hq, Hkv=hkv, D=d, **consts, **({"Dv": dv} if dv else {}))
    if name == "t5_attn":
        kw["NB"] = 32
    dt = "bf16" if dtype == torch.bfloat16 else "f16"
    layer = prog.specialise(name, dtype=dt, **kw)
    spec = layer.function.outputs[0].arg
    ks = [torch.randn(n, hkv, d, generator=gen).to(dtype).cuda() for n in lens]
    vs = [torch.randn(n, hkv, dv or d, generator=gen).to(dtype).cuda() for n in lens]
    qs = [torch.randn(m, hq, d, generator=gen).to(dtype).cuda() for m in new]
    kc, vc, table, seq_lens = build_cache(ks, vs, page, spec, dtype, gen)
    extra = extra_fn(len(lens), gen) if extra_fn else {}
    q = torch.cat(qs)
    q_seq = torch.cat([torch.full((m,), s, dtype=torch.int32) for s, m in enumerate(new)]).cuda()
    q_pos = torch.cat([torch.arange(n - m, n, dtype=torch.int32) for n, m in zip(lens, new)]).cuda()
    attn = PagedAttention(layer, page_size=page, kernel="simt" if form == "simt" else "tc", tiles=tiles, prefill=prefill)
    if prefill is not None and form == "tc-ragged" and max(new) * (hq // hkv) > 16:
        assert attn.tc_plan("prefill").key.endswith("sm90a") == (prefill == "wgmma")
    out = q.new_full((q.shape[0], hq, dv or d), float("nan"))
    if form == "tc-ragged":
        cu = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32, device="cuda")
        attn.prefill(q, kc, vc, table, seq_lens, cu, max_q_len=max(new), max_kv_len=max(lens), extra=extra,
                     out=out, num_splits=splits)
    elif identity:
        T = q.shape[0]
        assert form != "tc-ragged" and list(new) == [1] * T + [0] * (len(new) - T), "token t is sequence t"
        attn(q, kc, vc, table, seq_lens, max_kv_len=max(lens), extra=extra, out=out, num_splits=splits)
        # spelled out: arange and seq_lens - 1 (what q_seq / q_pos above are for these tokens)
        assert torch.equal(q_seq, torch.arange(T, dtype=torch.int32, device="cuda"))
        assert torch.equal(q_pos, seq_lens[:T] - 1)
        given = torch.full_like(out, float("nan"))
        attn(q, kc, vc, table, seq_lens, q_seq, q_pos, max_kv_len=max(lens), extra=extra, out=given,
             num_splits=splits)
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), given.view(torch.int16)), "q_seq / q_pos None changed the bits"
    else:
        attn(q, kc, vc, table, seq_lens, q_seq, q_pos, max_kv_len=max(lens), extra=extra, out=out,
             num_splits=splits)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "NaN in output"
    start = 0
    for s, (n, m) in enumerate(zip(lens, new)):
        if m == 0:   # (a sequence without query tokens: a page-table row past the identity form's tokens)
            continue
        ins = {"q": qs[s][None], "k": ks[s][None], "v": vs[s][None]}
        for p in layer.function.params[3:]:
            if p.kind == "tensor":
                t = extra[p.name]
                ins[p.name] = t[s:s + 1] if str(p.shape[0]) == "B" else t   # per-sequence tables
        ref = reference_rows(layer, ins, n, m)
        got = out[start:start + m].double()
        start += m
        err = (got - ref).norm() / ref.norm().clamp_min(1e-6)
        assert err < 2e-2, f"{name} seq {s} (len {n}, {m} new): relative error {err:.3g}"
        if ref.abs().max() == 0:
            assert (got == 0).all(), "a fully masked row must give zeros"


def reference_rows(layer, ins, n, m, budget=1 << 28):
    """The float64 reference of a sequence's m query rows (the last of its n positions) over its n keys, evaluated in
    blocks of query rows whose scores stay under `budget` bytes: each row's attention depends on its own position and
    the sequence's keys only, and a long context's whole block (900 rows x 20000 keys x 16 heads in float64, with the
    evaluator's intermediates) ran GPUs shared by a dozen test workers out of memory."""
    hq = ins["q"].shape[2]
    rows = max(1, budget // (8 * n * hq))
    dev = ins["q"].device
    parts = []
    for a in range(0, m, rows):
        b = min(m, a + rows)
        part = dict(ins, q=ins["q"][:, a:b])
        parts.append(lf.evaluate(layer.function, part, precision="float64",
                                 q_positions=torch.arange(n - m + a, n - m + b, device=dev)[None],
                                 kv_positions=torch.arange(n, device=dev)[None])[0][0])
    return torch.cat(parts)


VARIANTS = ["llama_attn", "mistral_attn", "gemma2_attn", "bloom_attn", "gpt2_attn"]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("page", [16, 64])
def test_decode_variants(prog, form, name, page):
    consts = {"window": 37} if name in ("mistral_attn", "gemma2_attn") else {}
    run_case(prog, form, name, 32, 8, 128, page, lens=[1, 17, 100, 300], new=[1, 1, 1, 1], **consts)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 8), (32, 4), (32, 1)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_ratios_and_head_dims(prog, form, hq, hkv, d):
    run_case(prog, form, "llama_attn", hq, hkv, d, 16, lens=[5, 33, 70], new=[5, 3, 1])


def test_chunked_prefill_ragged(prog, form):
    run_case(prog, form, "llama_attn", 32, 8, 128, 16, lens=[1, 7, 64, 129, 250], new=[1, 7, 30, 129, 17])


def test_f16(prog, form):
    run_case(prog, form, "gemma2_attn", 16, 8, 128, 16, lens=[40, 90], new=[4, 1], dtype=torch.float16, window=32)


def test_bert_padding_and_fully_masked_rows(prog, form):
    def extra(nseq, gen):
        return {"kv_len": torch.tensor([3, 0, 20][:nseq], dtype=torch.int32).cuda()}
    run_case(prog, form, "bert_attn", 8, 8, 64, 16, lens=[10, 10, 20], new=[10, 10, 20], extra_fn=extra)


def test_t5_relative_bias(prog, form):
    def extra(nseq, gen):
        return {"rel_bias": torch.randn(32, 8, generator=gen).cuda()}
    run_case(prog, form, "t5_attn", 8, 8, 64, 16, lens=[12, 200], new=[12, 3], extra_fn=extra)
    run_case(prog, form, "t5_attn", 8, 8, 64, 16, lens=[12, 200], new=[12, 3], extra_fn=extra, bidirectional=False)


YARN_BLOCK = """
attention yarn_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    rope(theta = 500000.0, style = neox, type = yarn, factor = 16.0, original_max_position = 4096)
    mask = q_pos >= kv_pos
}
"""


def test_yarn_rope_scales_the_rotation(form):
    """A yarn block: q rotated in the kernel by the scaled frequencies, cos and sin times the
    attention factor (K in the cache as the append kernel stores it), at positions past the
    original context."""
    prog = lf.Program.from_source(YARN_BLOCK, "yarn.lf", with_stdlib=True)
    run_case(prog, form, "yarn_attn", 32, 8, 128, 16, lens=[5000, 300], new=[3, 300])


@pytest.mark.parametrize("ctx", [1, 255, 4096, 32768])
def test_decode_long_contexts_with_split_kv(prog, form, ctx):
    run_case(prog, form, "llama_attn", 32, 8, 128, 64, lens=[ctx, max(1, ctx // 3)], new=[1, 1])
    run_case(prog, form, "llama_attn", 32, 8, 128, 64, lens=[ctx], new=[1], splits=7)


def test_bad_inputs_fail_before_launch(prog):
    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    attn = PagedAttention(layer, page_size=16)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(4, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(2, 2, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    qs = torch.zeros(2, dtype=torch.int32, device="cuda")
    with pytest.raises(lf.LayerInputError, match="q must be"):
        attn(q[:, :16].contiguous(), kc, kc, table, lens, qs, qs, max_kv_len=1)
    with pytest.raises(lf.LayerInputError, match="KV heads|dim 2 must be 8"):
        attn(q, kc[:, :, :4].contiguous(), kc, table, lens, qs, qs, max_kv_len=1)
    with pytest.raises(lf.LayerInputError, match="past the page table"):
        attn(q, kc, kc, table, lens, qs, qs, max_kv_len=33)
    # views the kernels cannot move in 16-byte pieces: refused, not a misaligned-address fault
    odd = torch.empty(2 * 32 * 128 + 1, device="cuda", dtype=torch.bfloat16)
    for name, args, kw in [("q", (odd[1:].view(2, 32, 128), kc, kc), {}),
                           ("out", (q, kc, kc), {"out": odd[1:].view(2, 32, 128)})]:
        with pytest.raises(lf.LayerInputError, match=f"'{name}' must start at a 16-byte aligned address"):
            attn(*args, table, lens, qs, qs, max_kv_len=1, **kw)
    with pytest.raises(LoweringError, match="head dim 72"):     # not a multiple of 16: no kernel
        PagedAttention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=72, dtype="bf16")).plan.source()
    with pytest.raises(LoweringError, match="head dim 96"):     # over an fp8 cache 96 has the CUDA-core kernel only
        PagedAttention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=96, dtype="bf16"), kernel="tc",
                       kv_dtype="fp8_e4m3").tc_plan("prefill")
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    with pytest.raises(lf.LayerInputError, match="cu_seqlens"):
        attn.prefill(q, kc, kc, table, lens, cu[:2], max_q_len=1, max_kv_len=1)
    with pytest.raises(lf.LayerInputError, match="max_q_len"):
        attn.prefill(q, kc, kc, table, lens, cu, max_q_len=5, max_kv_len=2)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn"])
def test_prefill_long_ragged(prog, name, d):
    """Whole prompts (and one chunk over a cached prefix) through the tensor-core prefill
    tiles: lengths 1, not multiples of a tile, past several row blocks."""
    consts = {"window": 200} if name != "llama_attn" else {}
    run_case(prog, "tc-ragged", name, 16, 4, d, 16, lens=[700, 1, 333, 900], new=[700, 1, 333, 77], **consts)


@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_prefill_matches_sdpa(prog, hq, hkv):
    """Causal prefill of two ragged sequences against F.scaled_dot_product_attention."""
    import torch.nn.functional as F
    layer = prog.specialise("gpt2_attn", Hq=hq, Hkv=hkv, D=128, dtype="bf16")
    spec = layer.function.outputs[0].arg
    gen = seeded_generator(hq, hkv)
    lens = [1000, 257]
    ks = [torch.randn(n, hkv, 128, generator=gen).bfloat16().cuda() for n in lens]
    vs = [torch.randn(n, hkv, 128, generator=gen).bfloat16().cuda() for n in lens]
    qs = [torch.randn(n, hq, 128, generator=gen).bfloat16().cuda() for n in lens]
    kc, vc, table, seq_lens = build_cache(ks, vs, 64, spec, torch.bfloat16, gen)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device="cuda")
    attn = PagedAttention(layer, page_size=64)
    out = attn.prefill(torch.cat(qs), kc, vc, table, seq_lens, cu, max_q_len=max(lens), max_kv_len=max(lens))
    torch.cuda.synchronize()
    for s, n in enumerate(lens):
        want = F.scaled_dot_product_attention(qs[s].transpose(0, 1)[None], ks[s].transpose(0, 1)[None],
                                              vs[s].transpose(0, 1)[None], is_causal=True,
                                              enable_gqa=hq != hkv)[0].transpose(0, 1)
        got = out[cu[s]:cu[s + 1]]
        assert not torch.isnan(got).any()
        err = (got.double() - want.double()).norm() / want.double().norm()
        assert err < 2e-2, f"seq {s}: relative error {err:.3g} against SDPA"


# Prefill tile shapes chosen by hand (spills allowed): 64-key tiles forced, in softmax steps of
# 32 keys, and 48-key tiles.
_TILE = dict(wm=4, wn=1, mt=2, stages=2, min_blocks=2, qreg=False)
ALT_TILES = [TileConfig(bnw=64, **_TILE), TileConfig(bnw=64, ksub=32, **_TILE), TileConfig(bnw=48, **_TILE)]


@pytest.mark.parametrize("tiles", ALT_TILES, ids=lambda t: t.label)
@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn", "bert_attn"])
def test_prefill_alternative_tiles(prog, name, tiles):
    consts = {"window": 200} if name in ("mistral_attn", "gemma2_attn") else {}
    extra_fn = (lambda nseq, gen: {"kv_len": torch.tensor([700, 1, 100, 900][:nseq], dtype=torch.int32).cuda()}) \
        if name == "bert_attn" else None
    run_case(prog, "tc-ragged", name, 16, 4, 128, 16, lens=[700, 1, 333, 900], new=[700, 1, 333, 77],
             tiles={"prefill": tiles}, extra_fn=extra_fn, **consts)


@pytest.mark.parametrize("splits", [None, 5])
def test_prefill_tiles_with_split_kv(prog, splits):
    """A short chunk over a long cached prefix on few CTAs: the prefill tiles split the keys
    (automatically: 8 CTAs; or 5 splits) and the merge kernel combines them."""
    run_case(prog, "tc-ragged", "llama_attn", 8, 8, 128, 64, lens=[4096], new=[20], splits=splits)


def test_prefill_tiles_f16(prog):
    run_case(prog, "tc-ragged", "gemma2_attn", 16, 8, 128, 16, lens=[300, 90], new=[300, 40], dtype=torch.float16,
             window=64)


@pytest.mark.parametrize("name", ["prefix_lm", "sinks", "dilated", "natten", "by_head"])
@pytest.mark.parametrize("form", ["tc", "tc-ragged"])
def test_block_sparse_masks(form, name):
    """Masks whose tiles the kernels skip or run unmasked (codegen/mask_tiles.py): prefix-LM,
    sinks + window, dilated, a 2-D neighbourhood and a per-head mask, long ragged prompts."""
    from ..codegen.test_mask_tiles import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    run_case(prog, form, name, 8, 2, 128, 16, lens=[700, 1, 333, 900], new=[700, 1, 333, 77])
    run_case(prog, form, name, 16, 4, 64, 64, lens=[1000, 257], new=[1000, 3])


@pytest.mark.parametrize("name", ["natten32", "natten64", "natten128", "strided", "outside", "never"])
def test_masks_split_over_a_warps_key_slice(name):
    """The mma.sync kernels' lf_mask_kt (a mask's kv_pos // 2^j, % 2^j split over a warp's key slice; |x| against
    constants as unsigned compares): prefill on the mma.sync kernel (prefill="tc", the sm_80 path) and decode."""
    from ..codegen.test_mask_key_split import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    run_case(prog, "tc-ragged", name, 8, 2, 128, 16, lens=[700, 1, 333, 900], new=[700, 1, 333, 77], prefill="tc")
    run_case(prog, "tc-ragged", name, 16, 4, 64, 64, lens=[1000, 257], new=[1000, 3], prefill="tc")
    run_case(prog, "tc", name, 8, 2, 128, 16, lens=[700, 1, 333, 900], new=[1, 1, 1, 1])


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("window", [0, 40])
def test_attention_sinks(form, window, splits):
    """gpt-oss sinks: one logit per row in the softmax denominator (counted once across split-KV
    parts and key slices), decode, chunked prefill and long prompts."""
    from ..dsl.test_attention_sinks import SINKS
    prog = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    sinks = lambda n, gen: {"sinks": (torch.randn(8, generator=gen) * 2).cuda()}   # noqa: E731
    run_case(prog, form, "sink_attn", 8, 2, 128, 16, lens=[700, 1, 333, 90], new=[700, 1, 1, 7],
             extra_fn=sinks, splits=splits, window=window)
    run_case(prog, form, "sink_attn", 8, 2, 64, 16, lens=[1], new=[1], extra_fn=sinks, splits=splits, window=window)


@pytest.mark.parametrize("name", ["prefix_table", "head_window"])
@pytest.mark.parametrize("form", ["tc", "tc-ragged"])
def test_block_sparse_masks_from_tables(form, name):
    """Masks whose tiles are classified from i32 table values loaded at run time (one index
    over the tile): per-sequence prefix lengths, per-head windows."""
    from ..codegen.test_mask_tiles import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    tables = {"prefix_table": lambda n, gen: {"prefix": torch.randint(0, 400, (n,), generator=gen, dtype=torch.int32).cuda()},
              "head_window": lambda n, gen: {"win": torch.randint(1, 300, (8,), generator=gen, dtype=torch.int32).cuda()}}
    run_case(prog, form, name, 8, 8, 128, 16, lens=[700, 1, 333, 900], new=[700, 1, 333, 77], extra_fn=tables[name])


@pytest.mark.parametrize("d", [80, 96, 160])
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn", "bloom_attn"])
def test_cuda_core_kernel_other_head_dims(prog, name, d):
    """Head dims off 64/128/256 on the CUDA-core kernel (GPUs before sm_80, f32, fp8 caches;
    the tensor-core kernel's: tests/gpu/test_attention_dims.py): ragged decode and chunked
    prefill, with and without split-KV."""
    run_case(prog, "simt", name, 8, 2, d, 16, lens=[1, 37, 300], new=[1, 5, 1])
    run_case(prog, "simt", name, 8, 2, d, 16, lens=[1000], new=[1], splits=4)


# A decode step of every sequence in order without q_seq / q_pos (issue 11: the kernels read
# neither array, so no global read waits ahead of a CTA's first page-table and K/V loads).
IDENTITY_CASES = {
    "decode": dict(name="llama_attn", lens=[1, 17, 100, 300], new=[1, 1, 1, 1]),
    "split_kv": dict(name="llama_attn", lens=[4096, 1000], new=[1, 1], splits=7),
    "window": dict(name="mistral_attn", lens=[1, 17, 100, 1000], new=[1, 1, 1, 1], splits=3, window=37),
    "spare_rows": dict(name="gemma2_attn", lens=[300, 33, 700, 5], new=[1, 1, 0, 0], window=64),
}


@pytest.mark.parametrize("case", list(IDENTITY_CASES))
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_identity_decode_without_q_seq_q_pos(prog, kernel, case):
    """q_seq / q_pos None against arange / seq_lens - 1 spelled out: the same bits, on the
    tensor-core and CUDA-core kernels, split-KV forced, a sliding window (and split), and fewer
    tokens than page-table rows; each against the reference."""
    kw = dict(IDENTITY_CASES[case])
    name = kw.pop("name")
    run_case(prog, kernel, name, 32, 8, 128, 16, identity=True, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_ctas_decode_bf16_switch(prog, monkeypatch, loaded_modes, dtype):
    """LAYERFORGE_DECODE_MANY_BF16 (on by default; set here so the test holds either way): bf16 / f16 decode grids past
    one wave of the default tile
    (52 sequences x 8 KV heads) take the tile of more, smaller CTAs (runtime/attention.DECODE_MANY): per-token and
    ragged (2 tokens a sequence), pages of 16 and 64, a window and soft-capping, lengths on and off the tiles'
    multiples, against the float64 reference; 8 sequences keep the default tile."""
    from layerforge.runtime.attention import DECODE_MANY
    monkeypatch.setenv("LAYERFORGE_DECODE_MANY_BF16", "1")
    modes = loaded_modes
    gen = torch.Generator().manual_seed(12)
    lens = [int(n) for n in torch.randint(1, 700, (48,), generator=gen)] + [64, 65, 1, 2048]
    for form, name, page, new, consts in (("tc", "llama_attn", 16, 1, {}), ("tc", "llama_attn", 64, 1, {}),
                                          ("tc-ragged", "llama_attn", 16, 2, {}),
                                          ("tc", "mistral_attn", 16, 1, {"window": 37}),
                                          ("tc", "gemma2_attn", 16, 1, {})):
        modes.clear()
        run_case(prog, form, name, 32, 8, 128, page, lens, [new] * len(lens), dtype=dtype, **consts)
        assert DECODE_MANY in modes, (form, name, modes)
    modes.clear()
    run_case(prog, "tc", "llama_attn", 32, 8, 128, 16, lens[:8], [1] * 8, dtype=dtype)
    assert "decode" in modes and DECODE_MANY not in modes, modes
