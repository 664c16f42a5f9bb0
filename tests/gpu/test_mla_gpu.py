"""The MLA kernels on the GPU: the decode kernel against the float64 reference (outputs and
every cache row outside the sequences poisoned with NaN first; split-KV 1, several and the
heuristic's; ragged lengths with 1-token sequences, partial last pages and an empty sequence;
pages in random order; head counts that fill 64-head blocks or not), the append kernel against
the cache's torch path, and MLAAttention (bf16) against transformers' DeepseekV3Attention in
bf16 and in float64."""
import math

import pytest
import torch

from layerforge.dsl.ir import RopeSpec
from layerforge.runtime.mla import MLAAttention, MLAConfig
from layerforge.runtime.mla_cache import PagedLatentCache
from layerforge.runtime.mla_decode import MLADecode, mla_decode_reference

from ..seeding import seeded_generator


def build_cache(lens, page, dk, gen, dtype=torch.bfloat16, spare=3):
    """Random page placement; rows past each sequence's length (and spare pages) are NaN."""
    pages_per = [max(1, math.ceil(n / page)) for n in lens]
    total = sum(pages_per) + spare
    perm = torch.randperm(total, generator=gen).tolist()
    cache = torch.full((total, page, dk), float("nan"), dtype=dtype)
    table = torch.full((len(lens), max(pages_per) + 1), -1, dtype=torch.int32)   # a spare column of -1
    at = 0
    for b, n in enumerate(lens):
        for j in range(pages_per[b]):
            p = perm[at]
            at += 1
            table[b, j] = p
            k = min(page, n - j * page)
            if k > 0:
                cache[p, :k] = torch.randn(k, dk, generator=gen).to(dtype)
    return cache.cuda(), table.cuda()


def run_decode(heads, latent, rope, page, lens, num_splits, scale, tag, keys=None, kernel=None, overlap=False):
    """overlap: False, True (the wgmma kernel's overlap schedule), "seesaw" (its seesaw schedule), "sync" (the default
    schedule with bar.sync on both sides of the consumers' hand-offs: sync_handoff), "ovsync" (the overlap schedule
    with them), "fine" (the default schedule with a full barrier a column block and an empty one a consumer) or "pair"
    (the default schedule with a token's two head blocks a cluster sharing each key tile by TMA multicast); a "+staged"
    suffix: O out through shared memory (staged_out); "+evict": the key tiles' TMA copies hinted L2 evict_first."""
    gen = seeded_generator("mla_decode", heads, latent, rope, page, tuple(lens), num_splits, tag, keys, kernel, overlap)
    staged = isinstance(overlap, str) and overlap.endswith("+staged")
    evict = isinstance(overlap, str) and overlap.endswith("+evict")
    if staged or evict:
        base = overlap.rsplit("+", 1)[0]
        overlap = {"default": False, "overlap": True}.get(base, base)
    seesaw, sync, fine, pair = overlap == "seesaw", overlap in ("sync", "ovsync"), overlap == "fine", overlap == "pair"
    overlap = overlap is True or overlap == "ovsync"
    dk = latent + rope
    cache, table = build_cache(lens, page, dk, gen)
    T = len(lens) + 1
    q_seq = torch.randint(0, len(lens), (T,), generator=gen, dtype=torch.int32)
    q_seq[: len(lens)] = torch.randperm(len(lens), generator=gen).to(torch.int32)   # every sequence, then a repeat
    q = torch.randn(T, heads, dk, generator=gen).to(torch.bfloat16).cuda()
    seq_lens = torch.tensor(lens, dtype=torch.int32).cuda()
    q_seq = q_seq.cuda()
    dec = MLADecode(num_heads=heads, latent_dim=latent, rope_dim=rope, page_size=page, keys=keys, kernel=kernel,
                    overlap=overlap, seesaw=seesaw or None, sync_handoff=True if sync else None,
                    fine=True if fine else None, pair=True if pair else None, staged_out=True if staged else None,
                    evict=True if evict else None)
    if kernel is not None:
        assert dec.plan.kernel == kernel
    if seesaw:
        assert dec.plan.seesaw
    if sync:
        assert dec.plan.sync_handoff and dec.plan.overlap == overlap
    if fine:
        assert dec.plan.fine and dec.plan.kernel == "wgmma"
    if pair:
        assert dec.plan.pair and dec.plan.kernel == "wgmma"
    if staged:
        assert dec.plan.staged_out and dec.plan.kernel == "wgmma"
    if evict:
        assert dec.plan.evict and dec.plan.kernel == "wgmma"
    out = torch.full((T, heads, latent), float("nan"), dtype=torch.bfloat16, device="cuda")
    dec(q, cache, table, seq_lens, q_seq, scale=scale, max_kv_len=max(lens), num_splits=num_splits, out=out)
    want = mla_decode_reference(q.cpu(), cache.cpu(), table.cpu(), seq_lens.cpu(), q_seq.cpu(), scale=scale,
                                latent_dim=latent)
    got = out.cpu().double()
    assert torch.isfinite(got).all(), "NaN or inf in the output (a poisoned row was read, or a row not written)"
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    return got, want


LENS = [1, 37, 64, 200, 513, 1]   # one token, partial last pages, a whole page, several pages


# None: the arch's default (sm_90: the wgmma kernel, TMA tiles from pages of 16 keys up); the wgmma kernel's
# overlap and seesaw schedules, its default with synced hand-offs and with fine barriers; then mma.sync with 64- and
# 32-key tiles
VARIANTS = [(None, None, False), (None, "wgmma", True), (None, "wgmma", "seesaw"), (None, "wgmma", "sync"),
            (None, "wgmma", "fine"), (64, "mma", False), (32, None, False)]


@pytest.mark.parametrize("keys,kernel,overlap", VARIANTS)
@pytest.mark.parametrize("num_splits", [1, 3, 8, None])
@pytest.mark.parametrize("page", [64, 16, 32])
def test_decode_deepseek_shape(page, num_splits, keys, kernel, overlap):
    run_decode(128, 512, 64, page, LENS, num_splits, 192 ** -0.5, "base", keys, kernel, overlap)


@pytest.mark.parametrize("kernel,overlap", [(None, False), ("wgmma", "seesaw"), ("wgmma", "sync"), ("wgmma", "fine"),
                                            ("mma", False)])
@pytest.mark.parametrize("heads", [16, 100, 4])
def test_decode_head_counts(heads, kernel, overlap):
    run_decode(heads, 512, 64, 64, LENS, None, 192 ** -0.5, "heads", kernel=kernel, overlap=overlap)


@pytest.mark.parametrize("kernel,overlap", [(None, False), ("wgmma", True), ("wgmma", "seesaw"), ("wgmma", "sync"),
                                            ("wgmma", "ovsync"), ("wgmma", "fine"), ("mma", False)])
@pytest.mark.parametrize("page", [1, 8])   # pages under TMA's: every tile by cp.async
def test_decode_smaller_latent_and_small_pages(page, kernel, overlap):
    run_decode(32, 256, 64, page, [1, 5, 70, 200], 2, 0.1, "small", kernel=kernel, overlap=overlap)


@pytest.mark.parametrize("keys,kernel,overlap", VARIANTS)
def test_decode_peaked_scores_rescale_exactly(keys, kernel, overlap):
    """Large scores: the running maximum moves many times along a long sequence (lazy rescaling)."""
    run_decode(64, 512, 64, 64, [3000, 17], 4, 0.5, "peaked", keys, kernel, overlap)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("heads,page", [(128, 64), (128, 16), (100, 32), (256, 64)])
def test_decode_pair_shares_tiles_between_head_blocks(heads, page, num_splits):
    """The pair schedule (a token's two head blocks a cluster; each CTA copies half of a full tile's column blocks into
    both by TMA multicast): partial last tiles (cp.async, each CTA its own), splits, a repeated sequence, heads past
    HQ in the second block (100), two pairs a token (256)."""
    run_decode(heads, 512, 64, page, LENS, num_splits, 192 ** -0.5, "pair", kernel="wgmma", overlap="pair")


STAGED = ["default+staged", "overlap+staged", "seesaw+staged", "sync+staged", "pair+staged"]


@pytest.mark.parametrize("overlap", STAGED)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_staged_out_every_schedule(overlap, num_splits):
    """O through shared memory in 16-byte stores (a whole output) or 8-byte f32 pieces (a split's part), on every
    schedule: 128 heads (two blocks), pages of 64 and of 16 keys, the partial tiles and the repeated sequence."""
    for page in (64, 16):
        run_decode(128, 512, 64, page, LENS, num_splits, 192 ** -0.5, "staged", kernel="wgmma", overlap=overlap)


@pytest.mark.parametrize("overlap", ["default+staged", "sync+staged"])
def test_decode_staged_out_partial_head_block_small_latent(overlap):
    """Heads past HQ in the last block are never stored (100 heads), latent 256 (LH 128), pages under TMA's."""
    run_decode(100, 256, 64, 8, [1, 5, 70, 200], 2, 0.1, "staged-small", kernel="wgmma", overlap=overlap)
    run_decode(100, 256, 64, 8, [1, 5, 70, 200], 1, 0.1, "staged-small1", kernel="wgmma", overlap=overlap)


EVICT = ["default+evict", "overlap+evict", "seesaw+evict", "sync+evict", "fine+evict"]


@pytest.mark.parametrize("overlap", EVICT)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_evict_every_schedule(overlap, num_splits):
    """The key tiles' TMA copies hinted L2 evict_first, on every schedule that copies by TMA: 128 heads (two blocks
    reading each tile), pages of 64 and of 16 keys, the partial tiles (cp.async, unhinted) and the repeated sequence;
    then large scores along a long sequence."""
    for page in (64, 16):
        run_decode(128, 512, 64, page, LENS, num_splits, 192 ** -0.5, "evict", kernel="wgmma", overlap=overlap)
    run_decode(64, 512, 64, 64, [3000, 17], 4, 0.5, "evict-peaked", kernel="wgmma", overlap=overlap)


def test_decode_pair_peaked_scores_and_an_empty_sequence():
    run_decode(128, 512, 64, 64, [3000, 17], 4, 0.5, "pair-peaked", kernel="wgmma", overlap="pair")
    got, _ = run_decode(128, 512, 64, 64, [0, 40, 1], 16, 0.05, "pair-empty", kernel="wgmma", overlap="pair")
    assert got.abs().sum() > 0


def test_decode_runs_the_pair_or_the_unpaired_kernel_by_split_length():
    """The default at 128 heads: the paired kernel where a split holds MLADecode.PAIR_MIN_KEYS keys or more, the
    unpaired one below (MLADecode.plan_for); both against float64 on the same inputs, both plans loaded."""
    lens = [2 * MLADecode.PAIR_MIN_KEYS + 77, 300, 1]
    gen = seeded_generator("mla_decode_pair_by_splits", tuple(lens))
    cache, table = build_cache(lens, 64, 576, gen)
    q = torch.randn(4, 128, 576, generator=gen).to(torch.bfloat16).cuda()
    q_seq = torch.tensor([0, 1, 2, 0], dtype=torch.int32).cuda()
    seq_lens = torch.tensor(lens, dtype=torch.int32).cuda()
    want = mla_decode_reference(q.cpu(), cache.cpu(), table.cpu(), seq_lens.cpu(), q_seq.cpu(), scale=0.05,
                                latent_dim=512)
    dec = MLADecode(num_heads=128, page_size=64)
    if not dec.plan.pair:
        pytest.skip("this GPU's default MLA decode does not pair head blocks (not sm_90, or LAYERFORGE_MLA_PAIR=0)")
    for splits, paired in ((1, True), (2, True), (3, False), (8, False)):
        assert dec.plan_for(max(lens), splits).pair == paired
        out = torch.full((4, 128, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
        dec(q, cache, table, seq_lens, q_seq, scale=0.05, max_kv_len=max(lens), num_splits=splits, out=out)
        got = out.cpu().double()
        assert torch.isfinite(got).all(), splits
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert len(dec._kernels) == 2


def test_decode_f16_on_the_default_kernel():
    heads, lens, page = 64, [300, 65], 64
    gen = seeded_generator("mla_decode_f16", heads, tuple(lens))
    cache, table = build_cache(lens, page, 576, gen, dtype=torch.float16)
    q = torch.randn(3, heads, 576, generator=gen).half().cuda()
    seq_lens, q_seq = torch.tensor(lens, dtype=torch.int32).cuda(), torch.tensor([0, 1, 0], dtype=torch.int32).cuda()
    out = torch.full((3, heads, 512), float("nan"), dtype=torch.float16, device="cuda")
    MLADecode(num_heads=heads, page_size=page, dtype=torch.float16)(q, cache, table, seq_lens, q_seq, scale=0.05,
                                                                     max_kv_len=300, out=out)
    want = mla_decode_reference(q.cpu(), cache.cpu(), table.cpu(), seq_lens.cpu(), q_seq.cpu(), scale=0.05, latent_dim=512)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernel,overlap", [(None, False), ("wgmma", "seesaw"), ("wgmma", "sync"), ("wgmma", "fine"),
                                            ("mma", False)])
def test_decode_more_splits_than_tiles_and_an_empty_sequence(kernel, overlap):
    got, _ = run_decode(64, 512, 64, 64, [0, 40, 1], 16, 0.05, "empty", kernel=kernel, overlap=overlap)
    # the empty sequence's tokens are zeros, the others' not
    assert got.abs().sum() > 0


def test_decode_checks_before_launch():
    from layerforge.dsl.evaluator import LayerInputError
    dec = MLADecode(num_heads=16, page_size=64)
    q = torch.zeros(2, 16, 576, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(4, 64, 576, dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(2, 2, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(LayerInputError, match="q_seq"):
        dec(q, cache, table, lens, torch.zeros(3, dtype=torch.int32, device="cuda"), scale=1.0, max_kv_len=1)
    with pytest.raises(LayerInputError, match="cache"):
        dec(q, cache[:, :16], table, lens, torch.zeros(2, dtype=torch.int32, device="cuda"), scale=1.0, max_kv_len=1)
    with pytest.raises(LayerInputError, match="max_kv_len"):
        dec(q, cache, table, lens, torch.zeros(2, dtype=torch.int32, device="cuda"), scale=1.0, max_kv_len=129)
    # rows move in 16-byte pieces (q and the cache by cp.async / TMA, O by the staged 16-byte stores): a view at an
    # odd offset is refused before the launch, not a misaligned access
    out = torch.zeros(2 * 16 * 512 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(2, 16, 512)
    with pytest.raises(LayerInputError, match="'out' must start at a 16-byte aligned address"):
        dec(q, cache, table, lens, torch.zeros(2, dtype=torch.int32, device="cuda"), scale=1.0, max_kv_len=1, out=out)
    q_odd = torch.zeros(2 * 16 * 576 + 3, dtype=torch.bfloat16, device="cuda")[3:].view(2, 16, 576)
    with pytest.raises(LayerInputError, match="'q' must start at a 16-byte aligned address"):
        dec(q_odd, cache, table, lens, torch.zeros(2, dtype=torch.int32, device="cuda"), scale=1.0, max_kv_len=1)


@pytest.mark.parametrize("page", [64, 16])
def test_append_kernel_matches_the_torch_path(page):
    from layerforge.dsl.numerics import rope_scaling_from_hf
    yarn = rope_scaling_from_hf({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}, 163840)
    rope = RopeSpec(10000.0, "gptj", 64, yarn)
    caches = [PagedLatentCache(16, page, 512, 64, torch.bfloat16, dev, max_seqs=3, max_pages_per_seq=8)
              for dev in ("cpu", "cuda")]
    gen = seeded_generator("mla_append", page)
    kv = torch.randn(150, 576 + 8, generator=gen).to(torch.bfloat16)   # a strided view, as kv_a_proj's output
    seqs = [2] * 100 + [0] * 49 + [1]
    for c in caches:
        c.reserve([0, 1, 2], [49, 1, 100])
        x = kv.to(c.device)
        c.append(seqs[:120], x[:120, :512], x[:120, 512:576], rope)
        c.append(seqs[120:], x[120:, :512], x[120:, 512:576], rope)       # a second call continues the sequences
    for s in range(3):
        cpu, gpu = caches[0].gather(s), caches[1].gather(s).cpu()
        assert torch.equal(gpu[:, :512], cpu[:, :512])
        torch.testing.assert_close(gpu[:, 512:].float(), cpu[:, 512:].float(), rtol=1e-2, atol=1e-2)
    assert caches[1].seq_lens.tolist() == [49, 1, 100]
    assert torch.equal(caches[1].page_table.cpu(), caches[0].page_table)


# ---- the layer ---------------------------------------------------------------------------
def hf_modules():
    transformers = pytest.importorskip("transformers")
    return transformers, pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")


def tiny_config(q_lora_rank, yarn):
    transformers, _ = hf_modules()
    rope = ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0} if yarn
            else {"rope_type": "default", "rope_theta": 10000.0})
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=256, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=q_lora_rank,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=512,
        rope_parameters=rope, rms_norm_eps=1e-6, num_hidden_layers=1, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    cfg._attn_implementation = "eager"
    return cfg


def hf_reference(cfg, x, dtype, device):
    _, mod = hf_modules()
    torch.manual_seed(0)
    attn = mod.DeepseekV3Attention(cfg, layer_idx=0).eval()
    for name, p in attn.named_parameters():
        p.data.copy_(torch.randn_like(p) * (0.05 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    attn = attn.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    S = x.shape[1]
    cos, sin = mod.DeepseekV3RotaryEmbedding(cfg).to(device)(x, torch.arange(S, device=device)[None])
    mask = torch.full((S, S), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]
    with torch.no_grad():
        out, _ = attn(x, (cos, sin), mask)
    return attn, out


def close_to(got, want, tol):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all()
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    assert (got - want).abs().max() <= 8 * tol * want.abs().max()


@pytest.mark.parametrize("prefill", ["sdpa", "kernel"])
@pytest.mark.parametrize("q_lora_rank", [None, 96])
@pytest.mark.parametrize("yarn", [True, False])
def test_layer_matches_deepseek_v3_bf16_and_float64(q_lora_rank, yarn, prefill):
    cfg = tiny_config(q_lora_rank, yarn)
    x = torch.randn(3, 70, 256, generator=seeded_generator("mla_layer", q_lora_rank, yarn))
    hf, want_bf16 = hf_reference(cfg, x, torch.bfloat16, "cuda")
    _, want_f64 = hf_reference(cfg, x, torch.float64, "cpu")
    ours = MLAAttention(MLAConfig.from_hf(cfg), dtype=torch.bfloat16, device="cuda", prefill=prefill)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected
    close_to(ours(x.cuda().bfloat16()), want_f64, 2e-2)                  # prefill without a cache
    cache = ours.make_cache(3, max_tokens=80, page_size=16)
    got = [ours(x[:, :61].cuda().bfloat16(), cache)]                     # prefill 61, then 9 decode steps
    got += [ours(x[:, t:t + 1].cuda().bfloat16(), cache) for t in range(61, 70)]
    got = torch.cat(got, dim=1)
    close_to(got, want_f64, 2e-2)
    close_to(got, want_bf16, 3e-2)
    close_to(got[:, 61:], want_f64[:, 61:], 2e-2)                          # the decode steps alone
