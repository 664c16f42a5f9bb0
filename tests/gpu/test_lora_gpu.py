"""runtime/lora.py on the GPU: the shrink and expand kernels against float64 torch on fresh random
adapters of ranks 8 to 64 (slots with nothing loaded, slices an adapter leaves alone, tokens
without an adapter), outputs poisoned first: the shrink writes exactly the entries within the
ranks, the expand reads nothing else and touches only the tokens with an adapter; LoRALinear on
every route (decode kernels, dense and grouped GEMMs) against the same reference; a tiny Llama
with four PEFT adapters against PEFT in float32; steps captured in CUDA graphs equal eager ones."""
from __future__ import annotations

import pytest
import torch

from layerforge.runtime import lora as lora_mod
from layerforge.runtime.lora import DECODE_ROWS, AdapterBatch, LoRALinear, MultiLoRA

from ..seeding import seeded_generator

DTYPES = [torch.bfloat16, torch.float16]
SLOT_RANKS = (8, 16, 0, 64, 32)    # slot 2: nothing loaded


def store(k: int, slices: tuple[int, ...], dtype, gen) -> MultiLoRA:
    """Slots of SLOT_RANKS (slice s: rank - 3 s, so ranks not multiples of 8 too); slot 1 leaves
    slice 1 alone."""
    lora = MultiLoRA(k, slices, adapters=len(SLOT_RANKS), max_rank=64, dtype=dtype, device="cuda")
    for e, r in enumerate(SLOT_RANKS):
        for s, w in enumerate(slices):
            if r == 0 or (e, s) == (1, 1):
                continue
            rr = r - 3 * s
            lora.set_adapter(e, (torch.randn(rr, k, generator=gen) / k ** 0.5).to(dtype),
                             (torch.randn(w, rr, generator=gen) / rr ** 0.5).to(dtype), 0.5 + 0.25 * e, part=s)
    return lora


def draw_ids(tokens: int, gen) -> torch.Tensor:
    """Slots, -1 and an id past the slots (no adapter either), on the device."""
    return torch.randint(-1, len(SLOT_RANKS) + 1, (tokens,), generator=gen, dtype=torch.int32).cuda()


def reference_v(lora: MultiLoRA, x: torch.Tensor, batch: AdapterBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(v float64 [T, S R], mask of the entries within the token's ranks)."""
    T, S, R = x.shape[0], len(lora.slices), lora.rank
    slot = batch.slot.long().cpu()
    a = lora.lora_a.double().cpu()
    ranks = lora.ranks.cpu()
    v = torch.zeros(T, S * R, dtype=torch.float64)
    mask = torch.zeros(T, S * R, dtype=torch.bool)
    for t in range(T):
        e = int(slot[t])
        if e == lora.adapters:
            continue
        v[t] = x[t].double().cpu() @ a[e].T
        for s in range(S):
            mask[t, s * R:s * R + int(ranks[e, s])] = True
    return v, mask


def reference_delta(lora: MultiLoRA, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    """The adapters' delta in float64 on the device."""
    f64 = MultiLoRA(lora.in_features, lora.slices, adapters=lora.adapters, max_rank=lora.rank, dtype=torch.float64,
                    device="cuda")
    f64.lora_a.copy_(lora.lora_a)
    f64.lora_b.copy_(lora.lora_b)
    f64._host = lora._host
    return f64.reference(x.double(), batch)


def close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-2, floor: float = 0.0) -> None:
    """got within rel of ref's largest magnitude (or within `floor`: a delta that is all zeros, no
    token with an adapter, still differs from it by the output's own rounding)."""
    assert not got.isnan().any()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= max(rel * ref.abs().max().item(), floor), (err, ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slices", [(200,), (256, 64, 64)])
@pytest.mark.parametrize("tokens", [1, 7, 16, 64])
def test_shrink_writes_the_entries_within_the_ranks(tokens, slices, dtype):
    gen = seeded_generator("lora_shrink_gpu", tokens, slices, dtype)
    lora = store(1000, slices, dtype, gen)
    x = torch.randn(tokens, 1000, generator=gen).to(dtype).cuda()
    batch = AdapterBatch(draw_ids(tokens, gen), lora.adapters)
    out = torch.full((tokens, len(slices) * lora.rank), float("nan"), dtype=dtype, device="cuda")
    v = lora.shrink(x, batch, out=out)
    torch.cuda.synchronize()
    ref, mask = reference_v(lora, x, batch)
    assert v.data_ptr() == out.data_ptr()
    got = v.cpu().double()
    assert not got[mask].isnan().any() and got[~mask].isnan().all()
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slices", [(200,), (256, 64, 64)])
@pytest.mark.parametrize("tokens", [1, 7, 16, 64])
def test_expand_adds_into_the_base_output_in_place(tokens, slices, dtype):
    """v is NaN outside the ranks (what the shrink leaves): the expand must not read it; tokens
    without an adapter keep their row bit for bit."""
    gen = seeded_generator("lora_expand_gpu", tokens, slices, dtype)
    lora = store(1000, slices, dtype, gen)
    x = torch.randn(tokens, 1000, generator=gen).to(dtype).cuda()
    batch = AdapterBatch(draw_ids(tokens, gen), lora.adapters)
    ref_v, mask = reference_v(lora, x, batch)
    v = torch.where(mask, ref_v, torch.nan).to(dtype).cuda()
    base = torch.randn(tokens, sum(slices), generator=gen).to(dtype).cuda()
    y = base.clone()
    assert lora.expand(y, v, batch, out=y).data_ptr() == y.data_ptr()
    torch.cuda.synchronize()
    none = (batch.slot == lora.adapters)
    assert torch.equal(y[none], base[none])
    close(y.double() - base.double(), reference_delta(lora, x, batch), rel=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_expand_of_every_slots_columns_into_a_new_output(tokens, dtype):
    """The folded form: y [T, O + slots S R] (the base product, then every slot's v, rows a
    non-multiple-of-O apart), the bias added, out poisoned first: every row written, tokens of no
    adapter get y + bias."""
    gen = seeded_generator("lora_expand_all_gpu", tokens, dtype)
    slices = (256, 64, 64)
    lora = store(1000, slices, dtype, gen)
    O, SR = sum(slices), len(slices) * lora.rank
    x = torch.randn(tokens, 1000, generator=gen).to(dtype).cuda()
    batch = AdapterBatch(draw_ids(tokens, gen), lora.adapters)
    y = torch.randn(tokens, O + lora.adapters * SR, generator=gen).to(dtype).cuda()
    for t, e in enumerate(batch.slot.tolist()):   # each token's own slot block holds its v
        if e < lora.adapters:
            y[t, O + e * SR:O + (e + 1) * SR] = (x[t].double() @ lora.lora_a[e].double().T).to(dtype)
    bias = torch.randn(O, generator=gen).to(dtype).cuda()
    out = torch.full((tokens, O), float("nan"), dtype=dtype, device="cuda")
    lora.expand(y, y[:, O:], batch, out=out, bias=bias)
    torch.cuda.synchronize()
    base = y[:, :O].double() + bias.double()
    none = (batch.slot == lora.adapters)
    assert not out.isnan().any()
    torch.testing.assert_close(out[none].double(), base[none], rtol=1e-2, atol=1e-2)
    # out - base carries out's bf16/f16 rounding of base (2^-8 of it) even where the delta is 0
    close(out.double() - base, reference_delta(lora, x, batch), rel=2e-2, floor=1e-2 * base.abs().max().item())


ROUTES = [(1, "kernels"), (16, "kernels"), (DECODE_ROWS, "kernels"), (DECODE_ROWS + 1, "dense"), (300, "dense"),
          (300, "grouped"), (4097, "dense")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slices", [(200,), (256, 64, 64)])
@pytest.mark.parametrize("tokens", [1, 300, 4097])
def test_mask_scales_each_tokens_slot_and_zeros_the_rest(tokens, slices, dtype):
    """The dense route's mask kernel against torch's two-launch form, on v with rows wider than
    the slots' columns (a view of a wider product), tokens of no adapter among them, vm poisoned."""
    gen = seeded_generator("lora_mask", tokens, slices, dtype)
    lora = store(64, slices, dtype, gen)
    E, S, R = lora.adapters, len(slices), lora.rank
    batch = AdapterBatch(draw_ids(tokens, gen), E)
    wide = torch.randn(tokens, E * S * R + 24, generator=gen).to("cuda", dtype)
    v = wide[:, 8:8 + E * S * R]                       # rows E S R + 24 apart, 16-byte aligned
    torch.cuda.synchronize()
    ms = batch.onehot.unsqueeze(-1) * lora.scales[:E]
    want = (v.view(tokens, E, S, R).transpose(1, 2).float() * ms.transpose(1, 2).unsqueeze(-1)).to(dtype)
    torch.empty(tokens * S * E * R * 2, dtype=dtype, device="cuda").fill_(float("nan"))   # poison the allocator
    got = lora.mask(v, batch)
    torch.cuda.synchronize()
    assert got.shape == (tokens, S, E, R) and not torch.isnan(got).any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 300, 4097])
def test_mask_with_x_makes_the_k_extended_operand(tokens, dtype):
    """mask(..., x=x) writes [x | vm] in one launch: x's rows exactly, then the masked v, into a
    poisoned buffer whose every element is written."""
    gen = seeded_generator("lora_mask_x", tokens, dtype)
    slices = (256, 64, 64)
    lora = store(64, slices, dtype, gen)
    E, S, R, K = lora.adapters, len(slices), lora.rank, 1032
    batch = AdapterBatch(draw_ids(tokens, gen), E)
    v = torch.randn(tokens, E * S * R, generator=gen).to("cuda", dtype)
    x = torch.randn(tokens, K, generator=gen).to("cuda", dtype)
    want = lora.mask(v, batch).reshape(tokens, -1)   # the plain mask kernel (test above)
    xe = torch.full((tokens, K + E * S * R), float("nan"), dtype=dtype, device="cuda")
    assert lora.mask(v, batch, out=xe, x=x) is xe
    torch.cuda.synchronize()
    assert torch.equal(xe[:, :K], x) and torch.equal(xe[:, K:], want)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,route", ROUTES)
def test_lora_linear_on_every_route(tokens, route, dtype, fold, monkeypatch):
    """Decode steps folded (one product x [W; A]^T, then the expand with the bias) or not (the
    shrink, the base product with its bias, the expand in place); prefill on the GEMM routes."""
    # the store's 5 slots x rank 64 pass DENSE_MAX_RANKS (grouped by default): each prefill route forced
    monkeypatch.setattr(lora_mod, "DENSE_MAX_RANKS", 0 if route == "grouped" else 1 << 20)
    gen = seeded_generator("lora_linear_gpu", tokens, route, dtype, fold)
    lora = store(1024, (6144, 1024, 1024), dtype, gen)   # O 8192: the slots' 5 x 3 x 64 A rows fold
    base = torch.nn.Linear(1024, 8192, bias=True, dtype=dtype, device="cuda")
    with torch.no_grad():
        base.weight.copy_(torch.randn(8192, 1024, generator=gen) / 32)
        base.bias.copy_(torch.randn(8192, generator=gen))
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    lin = LoRALinear(base, lora, fold=fold)
    assert (lin.folded() is not None) == fold and lora_mod.FOLD_MAX * 5 * 3 * 64 <= 8192
    x = torch.randn(tokens, 1024, generator=gen).to(dtype).cuda()
    batch = AdapterBatch(draw_ids(tokens, gen), lora.adapters)
    assert lora.route(x) == route
    with torch.no_grad():
        got = lin(x, batch)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    close(got, ref + reference_delta(lora, x, batch))
    if route != "kernels":   # the delta writes every row (zeros without an adapter)
        out = torch.full((tokens, 8192), float("nan"), dtype=dtype, device="cuda")
        lora.delta(x, batch, out, route)
        torch.cuda.synchronize()
        assert not out.isnan().any() and out[batch.slot == lora.adapters].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 9, 16, DECODE_ROWS, 300, 1000])
def test_k_extended_storage_on_decode_and_prefill(tokens, dtype, monkeypatch):
    """KEXT with STRIDED_W (the defaults; set here all the same): W's rows K + S slots R apart
    with the B blocks after them; decode steps read W and the A rows at that stride (the
    small-token kernel's ldw up to 16 rows, cuBLAS past), prefill is one GEMM over [x | vm]:
    both against float64, with the bias."""
    import layerforge.runtime.linear as linear
    monkeypatch.setattr(lora_mod, "KEXT", True)
    monkeypatch.setattr(linear, "STRIDED_W", True)
    monkeypatch.setattr(lora_mod, "DENSE_MAX_RANKS", 1 << 20)
    gen = seeded_generator("lora_kext_gpu", tokens, dtype)
    lora = store(1024, (6144, 1024, 1024), dtype, gen)
    base = torch.nn.Linear(1024, 8192, bias=True, dtype=dtype, device="cuda")
    with torch.no_grad():
        base.weight.copy_(torch.randn(8192, 1024, generator=gen) / 32)
        base.bias.copy_(torch.randn(8192, generator=gen))
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    lin = LoRALinear(base, lora)
    assert lin.kext_weight() is not None and lin.folded() is not None and not base.weight.is_contiguous()
    x = torch.randn(tokens, 1024, generator=gen).to(dtype).cuda()
    batch = AdapterBatch(draw_ids(tokens, gen), lora.adapters)
    with torch.no_grad():
        got = lin(x, batch)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    close(got, ref + reference_delta(lora, x, batch))


@pytest.mark.parametrize("tokens", [16, DECODE_ROWS, 300])
@pytest.mark.parametrize("fold", [True, False])
def test_a_step_is_graph_capturable(tokens, fold):
    """The batch is made inside the capture (its permutation is part of the graph): a replay with
    new ids and new x equals the eager call."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the LoRA kernels and routes need sm_80+ (elsewhere the torch route reads token counts)")
    gen = seeded_generator("lora_graph", tokens, fold)
    lora = store(1024, (6144, 1024, 1024), torch.bfloat16, gen)
    base = torch.nn.Linear(1024, 8192, bias=True, dtype=torch.bfloat16, device="cuda")
    lin = LoRALinear(base, lora, fold=fold)
    x = torch.randn(tokens, 1024, generator=gen).to(torch.bfloat16).cuda()
    ids = draw_ids(tokens, gen)
    with torch.no_grad():
        lin(x, AdapterBatch(ids, lora.adapters))   # kernels load outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = lin(x, AdapterBatch(ids, lora.adapters))
        x.copy_(torch.randn(tokens, 1024, generator=gen).to(torch.bfloat16))
        ids.copy_(draw_ids(tokens, gen))
        g.replay()
        torch.cuda.synchronize()
        eager = lin(x, AdapterBatch(ids, lora.adapters))
    torch.testing.assert_close(y, eager, rtol=0, atol=0)


# ---- a model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import layerforge as lf
    from layerforge.models.lora import attach_adapters

    from ..models.hf_tiny import make_tiny
    from ..models.lora_adapters import make_adapters, peft_with
    root = tmp_path_factory.mktemp("lora_llama_gpu")
    hf = make_tiny("llama", root / "base", head_dim=64)
    folders = make_adapters(hf, "llama", root)
    pm = peft_with(hf, folders).cuda()
    model = lf.from_pretrained(root / "base", dtype=torch.bfloat16, device="cuda")
    return pm, model, attach_adapters(model, folders)


def test_model_prefill_and_a_mixed_decode_step_match_peft(llama):
    from ..models.lora_adapters import peft_logits
    pm, model, adapters = llama
    names = ["a2", None, "a0", "a3", "a1"]
    ids = torch.randint(0, 96, (5, 37), generator=torch.Generator().manual_seed(1)).cuda()
    got = adapters.forward(ids, names)                          # prefill: 185 tokens, the dense route
    cache = model.make_cache(num_pages=5 * 3, max_seqs=5, max_pages_per_seq=3)
    for b in range(5):
        cache.allocate(b, 37)
    seq = [b for b in range(5) for _ in range(36)]
    adapters.step(ids[:, :36].reshape(-1), seq, cache, adapters=[names[b] for b in seq])
    last = adapters.step(ids[:, 36], list(range(5)), cache, adapters=names)   # 5 tokens: the kernels
    for i, name in enumerate(names):
        ref = peft_logits(pm, ids[i:i + 1], name)
        close(got[i], ref[0], rel=3e-2)
        close(last[i], ref[0, -1], rel=3e-2)


def test_model_decode_step_graph_equals_eager(llama):
    """A decode step of the model with per-token adapters captured as models/graphs.py captures
    one (the cache bookkeeping on the device), the adapter choice inside the graph."""
    from layerforge.models.model import StepContext
    _, model, adapters = llama
    B = 8
    cache = model.make_cache(num_pages=B * 2, max_seqs=B, max_pages_per_seq=2)
    for b in range(B):
        cache.allocate(b, 5)
    prompt = torch.randint(0, 96, (B * 4,), generator=torch.Generator().manual_seed(2)).cuda()
    seq = [b for b in range(B) for _ in range(4)]
    choice = torch.tensor([0, 1, -1, 2, 3, 0, 1, 2], dtype=torch.int32, device="cuda")
    adapters.step(prompt, seq, cache, adapters=choice.repeat_interleave(4))
    tokens = torch.randint(0, 96, (B,), generator=torch.Generator().manual_seed(3)).cuda()
    slots = torch.arange(B, device="cuda")
    lens = cache._seq_lens.clone()

    def body():   # models/graphs.DecodeGraphs._body's bookkeeping, then the step with the adapters
        pos = cache._seq_lens.index_select(0, slots)
        cache._seq_lens.index_copy_(0, slots, pos + 1)
        pages = cache._page_table[slots, torch.div(pos, cache.page_size, rounding_mode="floor").long()]
        ctx = StepContext(cache, slots.to(torch.int32), pos, cache.max_pages_per_seq * cache.page_size,
                          meta=torch.cat([pages, pos]))
        with adapters.use(choice):
            return model.step_logits(tokens.to(torch.int32), ctx)
    with torch.no_grad():
        eager = body()
        cache._seq_lens.copy_(lens)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = body()
        cache._seq_lens.copy_(lens)
        g.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
