"""Multi-LoRA projections (runtime/lora.py) on the CPU: a batch mixing adapters of ranks 8, 16,
32 and 64 and tokens without one equals PEFT's mixed-adapter forward of the same adapters (one
projection, and q/k/v as slices of one fused projection); the GEMM routes of longer steps (dense
over every slot, grouped in slot order) and the decode kernels' algorithm (emulated step by step
from the templates' index math) equal the reference; the slot mapping of ids; the fused-path
keywords; the errors."""
from __future__ import annotations

import pytest
import torch

from layerforge.codegen.lora import expand_grid, plan_lora_expand, plan_lora_shrink, shrink_grid
from layerforge.runtime.linear import rms_norm
from layerforge.runtime.lora import (AdapterBatch, AdapterContext, LoRAInputError, LoRALinear, MultiLoRA,
                                     lora_scale, unfold)

from ..seeding import seeded_generator

RANKS = (8, 16, 32, 64)


class _Proj(torch.nn.Module):
    """A model of named projections for PEFT to adapt."""

    def __init__(self, k: int, outs: dict[str, int]):
        super().__init__()
        for name, o in outs.items():
            setattr(self, name, torch.nn.Linear(k, o))
        self.names = tuple(outs)

    def forward(self, x):
        return torch.cat([getattr(self, n)(x) for n in self.names], dim=-1)


def peft_model(k: int, outs: dict[str, int], seed: int):
    """A PeftModel with adapters a0..a3 of RANKS on every projection (random A and B, different
    alphas, a0 with rsLoRA), in eval mode; the test skips without peft."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = None
    for i, r in enumerate(RANKS):
        cfg = LoraConfig(r=r, lora_alpha=r + 4 * i + 1, target_modules=list(outs), init_lora_weights=False,
                         use_rslora=i == 0)
        if model is None:
            model = get_peft_model(_Proj(k, outs), cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", cfg)
    return model.eval()


def store_from_peft(model, k: int, outs: dict[str, int], dtype=torch.float32) -> MultiLoRA:
    lora = MultiLoRA(k, tuple(outs.values()), adapters=len(RANKS), max_rank=max(RANKS), dtype=dtype)
    for part, name in enumerate(outs):
        layer = getattr(model.base_model.model, name)
        for i in range(len(RANKS)):
            a = f"a{i}"
            lora.set_adapter(i, layer.lora_A[a].weight.to(dtype), layer.lora_B[a].weight.to(dtype), layer.scaling[a],
                             part=part)
    return lora


def mixed_ids(tokens: int, gen) -> torch.Tensor:
    """Every adapter and 'none' (-1) at least once, the rest random."""
    ids = torch.randint(-1, len(RANKS), (tokens,), generator=gen)
    ids[:len(RANKS) + 1] = torch.arange(-1, len(RANKS))
    return ids[torch.randperm(tokens, generator=gen)].to(torch.int32)


def peft_names(ids: torch.Tensor) -> list[str]:
    return [f"a{i}" if i >= 0 else "__base__" for i in ids.tolist()]


# ---- against PEFT ------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [5, 37, 100])
def test_one_projection_equals_peft_per_token(tokens):
    K, O = 64, 48
    model = peft_model(K, {"proj": O}, seed=1)
    layer = model.base_model.model.proj
    lin = LoRALinear(layer.base_layer, store_from_peft(model, K, {"proj": O}))
    gen = seeded_generator("lora_proj", tokens)
    x = torch.randn(tokens, K, generator=gen)
    ids = mixed_ids(tokens, gen)
    with torch.no_grad():
        want = model(x, adapter_names=peft_names(ids))
        alone = [model.base_model.model.proj.base_layer(x)]
    got = lin(x, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - alone[0])[ids >= 0].abs().max() > 0.1   # the adapters do something
    torch.testing.assert_close(got[ids < 0], alone[0][ids < 0], rtol=0, atol=0)


def test_fused_qkv_slices_equal_three_peft_projections():
    """q, k, v adapted separately by PEFT = one fused projection whose slices carry them."""
    K, outs = 64, {"q": 64, "k": 32, "v": 32}
    model = peft_model(K, outs, seed=2)
    m = model.base_model.model
    fused = torch.nn.Linear(K, 128)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([getattr(m, n).base_layer.weight for n in outs]))
        fused.bias.copy_(torch.cat([getattr(m, n).base_layer.bias for n in outs]))
    lin = LoRALinear(fused, store_from_peft(model, K, outs))
    gen = seeded_generator("lora_qkv")
    x = torch.randn(2, 9, K, generator=gen)            # leading dims kept
    ids = mixed_ids(18, gen)
    with torch.no_grad():
        want = model(x.view(18, K), adapter_names=peft_names(ids)).view(2, 9, 128)
    torch.testing.assert_close(lin(x, ids), want, rtol=1e-5, atol=1e-5)


def test_a_slice_an_adapter_leaves_alone_gets_nothing():
    K = 32
    lora = MultiLoRA(K, (16, 16), adapters=2, max_rank=8, dtype=torch.float32)
    gen = seeded_generator("lora_partial")
    lora.set_adapter(1, torch.randn(4, K, generator=gen), torch.randn(16, 4, generator=gen), 2.0, part=1)
    x = torch.randn(6, K, generator=gen)
    d = lora.reference(x, AdapterBatch(torch.tensor([1, 1, 0, -1, 1, 0]), 2))
    assert d[:, :16].abs().max() == 0 and d[[2, 3, 5]].abs().max() == 0
    assert d[[0, 1, 4], 16:].abs().min() > 0
    assert lora.adapter_rank(1, 1) == 4 and lora.adapter_rank(1, 0) == 0


# ---- the routes --------------------------------------------------------------------------------
def random_store(k: int, slices: tuple[int, ...], ranks_by_slot, dtype, gen, *, max_rank: int = 64) -> MultiLoRA:
    """Slot e has rank about ranks_by_slot[e] on every slice (0: none loaded) but slice 1 of slot 1
    (left alone)."""
    lora = MultiLoRA(k, slices, adapters=len(ranks_by_slot), max_rank=max_rank, dtype=dtype)
    for e, r in enumerate(ranks_by_slot):
        for s, w in enumerate(slices):
            if (e, s) == (1, 1) or r == 0:
                continue
            rr = max(1, r - 3 * s)   # ranks differ across slices too (and need not be multiples of 8)
            lora.set_adapter(e, (torch.randn(rr, k, generator=gen) / k ** 0.5).to(dtype),
                             (torch.randn(w, rr, generator=gen) / rr ** 0.5).to(dtype), 0.5 + e + s, part=s)
    return lora


@pytest.mark.parametrize("slices", [(48,), (64, 16, 16), (40, 40)])
@pytest.mark.parametrize("route", ["dense", "grouped"])
def test_prefill_routes_equal_the_reference(route, slices):
    """The GEMM routes' compositions (moe_align / moe_gather's references, one product a slot on
    the CPU) in bf16: every row written, tokens without an adapter zero."""
    gen = seeded_generator("lora_route", route, slices)
    lora = random_store(64, slices, RANKS, torch.bfloat16, gen)
    x = torch.randn(90, 64, generator=gen).to(torch.bfloat16)
    batch = AdapterBatch(mixed_ids(90, gen), len(RANKS))
    ref = lora.reference(x, batch).float()
    out = torch.full((90, sum(slices)), float("nan"), dtype=torch.bfloat16)
    lora.delta(x, batch, out, route)
    assert not out.isnan().any()
    assert out[batch.ids < 0].abs().max() == 0
    err = (out.float() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err


def emulate_shrink(lora: MultiLoRA, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    """templates/cuda/lora_shrink.cu.jinja, CTA by CTA (v starts as NaN: what the kernel does not
    write stays NaN; the K split and the reductions are a sum's order)."""
    plan = plan_lora_shrink("bf16", k=lora.in_features, rank=lora.rank, slices=len(lora.slices))
    R, S, RB, MT = plan.rank, plan.slices, plan.rows_per_cta, plan.tokens_per_cta
    T = x.shape[0]
    offsets, _, src = (t.tolist() for t in batch.permutation)
    ranks = lora.ranks.view(-1).tolist()
    a = lora.lora_a.float()
    v = torch.full((T, S * R), float("nan"), dtype=x.dtype)
    gx, gy, gz = shrink_grid(plan.rows, lora.adapters, T, RB, MT)
    assert (gx, gy, gz) == plan.abi.grid_for(lora.adapters, T)
    for bx in range(gx):
        for e in range(gy):
            for bz in range(gz):
                r0, row0, rows_e, m0 = bx * RB, offsets[e], offsets[e + 1] - offsets[e], bz * MT
                if m0 >= rows_e:
                    continue
                live = min(RB, ranks[e * S + r0 // R] - r0 % R)
                if live <= 0:
                    continue
                for m in range(min(MT, rows_e - m0)):
                    t = min(max(src[row0 + m0 + m], 0), T - 1)
                    for i in range(live):
                        v[t, r0 + i] = (x[t].float() @ a[e, r0 + i]).to(x.dtype)
    return v


def emulate_expand(lora: MultiLoRA, y: torch.Tensor, v: torch.Tensor, batch: AdapterBatch, out: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """templates/cuda/lora_expand.cu.jinja: out = y + bias + v B^T scale, CTA by CTA and thread by
    thread, with the grid MultiLoRA.expand launches (no group of no adapter when out is y)."""
    plan = plan_lora_expand("bf16", slices=lora.slices, rank=lora.rank, bias=bias is not None)
    R, S, NT, MB, JC, O, E = plan.rank, len(plan.slices), plan.threads, plan.tokens_per_cta, plan.chunk, plan.out, \
        lora.adapters
    T = y.shape[0]
    groups = E if out.data_ptr() == y.data_ptr() else E + 1
    vslot = S * R if v.shape[1] == E * S * R else 0
    offsets, _, src = (t.tolist() for t in batch.permutation)
    ranks, scales = lora.ranks.view(-1).tolist(), lora.scales.view(-1).tolist()
    b = lora.lora_b.float()
    gx, gy, gz = expand_grid(O, groups, T, NT, MB)
    assert (gx, gy, gz) == plan.abi.grid_for(groups, T)
    for bx in range(gx):
        for g in range(gy):
            for bz in range(gz):
                row0, rows_g, m0 = offsets[g], offsets[g + 1] - offsets[g], bz * MB
                if m0 >= rows_g:
                    continue
                M = min(MB, rows_g - m0)
                tok = [min(max(src[row0 + m0 + i], 0), T - 1) if i < M else 0 for i in range(MB)]
                vs = torch.zeros(MB, S * R)
                if g < E:
                    for m in range(M):
                        for c in range(S * R):
                            if c % R < ranks[g * S + c // R]:
                                vs[m, c] = v[tok[m], g * vslot + c].float()
                assert not vs.isnan().any()          # the kernel reads only what the shrink wrote
                for x in range(NT):
                    n = (bx * NT + x) * 8
                    if n >= O:
                        continue
                    acc, scale = torch.zeros(MB, 8), 0.0
                    if g < E:
                        s = sum(n >= c for c in plan.starts[1:])
                        rank, scale = ranks[g * S + s], scales[g * S + s]
                        for j0 in range(0, rank, JC):
                            for jj in range(JC):    # rows past the rank: zeros in b and in vs
                                acc += vs[:, s * R + j0 + jj, None] * b[g, j0 + jj, n:n + 8]
                    for m in range(M):
                        yv = y[tok[m], n:n + 8].float() + (0 if bias is None else bias[n:n + 8].float())
                        out[tok[m], n:n + 8] = (yv + scale * acc[m]).to(out.dtype)
    return out


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("slices", [(48,), (64, 16, 16)])
def test_the_decode_kernels_algorithm_is_the_reference(slices, tokens):
    """The unfolded decode route: shrink, base product, expand added into it in place."""
    gen = seeded_generator("lora_emulated", slices, tokens)
    lora = random_store(64, slices, (8, 20, 64, 0), torch.bfloat16, gen)   # slot 3: no adapter loaded
    x = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16)
    batch = AdapterBatch(torch.randint(-1, 5, (tokens,), generator=gen, dtype=torch.int32), 4)
    base = torch.randn(tokens, sum(slices), generator=gen).to(torch.bfloat16)
    y = base.clone()
    got = emulate_expand(lora, y, emulate_shrink(lora, x, batch), batch, out=y)
    ref = base.float() + _reference_f32(lora, x, batch)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    untouched = batch.slot >= 3
    assert torch.equal(got[untouched], base[untouched])


@pytest.mark.parametrize("tokens", [1, 16, 64])
@pytest.mark.parametrize("slices", [(48,), (64, 16, 16)])
def test_the_folded_decode_route_is_the_reference(slices, tokens):
    """One product x [W; A_all]^T (the base output, then every slot's v), then the expand into a
    new output with the bias: tokens of no adapter get the base product."""
    gen = seeded_generator("lora_folded", slices, tokens)
    lora = random_store(64, slices, (8, 20, 64, 0), torch.bfloat16, gen)
    base = torch.nn.Linear(64, sum(slices), dtype=torch.bfloat16)
    lin = LoRALinear(base, lora)
    wf = lin.folded()
    O = sum(slices)
    assert wf is not None and wf.shape == (O + 4 * len(slices) * 64, 64)
    x = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16)
    batch = AdapterBatch(torch.randint(-1, 5, (tokens,), generator=gen, dtype=torch.int32), 4)
    y = (x.float() @ wf.float().t()).to(torch.bfloat16)          # what the folded product gives
    out = torch.full((tokens, O), float("nan"), dtype=torch.bfloat16)
    got = emulate_expand(lora, y, y[:, O:], batch, out, bias=lin.bias)
    ref = torch.nn.functional.linear(x.float(), base.weight.float(), base.bias.float()) + _reference_f32(lora, x, batch)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_folding_keeps_one_copy_of_w_and_follows_the_adapters():
    gen = seeded_generator("lora_fold_storage")
    base = torch.nn.Linear(32, 24, bias=False)
    w0 = base.weight.detach().clone()
    lora = MultiLoRA(32, (16, 8), adapters=2, max_rank=8, dtype=torch.float32)
    lin = LoRALinear(base, lora)
    wf = lin.folded()
    assert lin.weight is base.weight and torch.equal(base.weight, w0)
    assert wf.shape == (24 + 2 * 2 * 8, 32) and wf.untyped_storage().data_ptr() == base.weight.untyped_storage().data_ptr()
    a = torch.randn(5, 32, generator=gen)
    lora.set_adapter(1, a, torch.randn(8, 5, generator=gen), 1.0, part=1)
    assert torch.equal(lin.folded()[24 + (1 * 2 + 1) * 8:][:5], a)   # slot 1, slice 1's rows
    lin.to(torch.float64)                                              # copies apart: no longer folded
    assert lin.folded() is None
    unfold(base)
    assert base.weight.untyped_storage().nbytes() == 24 * 32 * 8 and torch.equal(base.weight, w0.double())
    assert LoRALinear(torch.nn.Linear(32, 24), MultiLoRA(32, 24, adapters=1, max_rank=8), fold=False).folded() is None


def test_k_extended_storage_is_one_gemm_over_x_and_vm(monkeypatch):
    """KEXT (with runtime/linear.STRIDED_W): a projection with more outputs than inputs keeps
    [W | B-blocks; A | 0] in one buffer; W's and A's rows K + S slots R apart; the folded decode
    view and the prefill weight are views of it; [x | vm] @ [W | B-blocks]^T (vm: the mask's) is
    the base product plus each token's delta; set_adapter and clear_adapter after the fold reach
    the B blocks; the shrink kernel refuses the strided A rows; unfold restores a compact W."""
    import layerforge.runtime.linear as linear
    import layerforge.runtime.lora as lora_mod
    monkeypatch.setattr(lora_mod, "KEXT", True)
    monkeypatch.setattr(linear, "STRIDED_W", True)
    gen = seeded_generator("lora_kext")
    K, slices, E, R = 32, (224, 160), 3, 8   # O >= FOLD_MAX slots S R: the decode fold's bound
    base = torch.nn.Linear(K, sum(slices), bias=False)
    w0 = base.weight.detach().clone()
    lora = MultiLoRA(K, slices, adapters=E, max_rank=R, dtype=torch.float32)
    lora.set_adapter(0, torch.randn(5, K, generator=gen), torch.randn(224, 5, generator=gen), 0.5, part=0)
    lin = LoRALinear(base, lora)
    C = E * len(slices) * R
    assert base.weight.stride() == (K + C, 1) and torch.equal(base.weight, w0)
    wf, wx = lin.folded(), lin.kext_weight()
    assert wf.shape == (384 + C, K) and wf.stride() == (K + C, 1) and wx.shape == (384, K + C)
    for e in range(E):   # after the fold too: slot 1 on both slices, slot 2 on slice 1
        for part in range(2):
            if (e, part) in ((1, 0), (1, 1), (2, 1)):
                r = 3 + e + part
                lora.set_adapter(e, torch.randn(r, K, generator=gen), torch.randn(slices[part], r, generator=gen),
                                 0.25 * (e + 1), part=part)
    lora.set_adapter(2, torch.randn(4, K, generator=gen), torch.randn(224, 4, generator=gen), 2.0, part=0)
    lora.clear_adapter(2, 0)
    ids = torch.tensor([0, 1, 2, -1, 1, 0, 2, 5], dtype=torch.int32)
    batch = AdapterBatch(ids, E)
    x = torch.randn(8, K, generator=gen)
    v = x @ lora.lora_a[:E].reshape(E * len(slices) * R, K).t()
    xe = torch.empty(8, K + C)
    xe[:, :K] = x
    lora.mask(v, batch, out=xe[:, K:])
    got = xe @ lin.kext_weight().t()
    want = x @ w0.t() + lora.reference(x, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.folded()[:384], w0)
    with pytest.raises(LoRAInputError, match="K-extended storage"):
        lora.shrink(x, batch)
    unfold(base)
    assert base.weight.is_contiguous() and torch.equal(base.weight, w0)
    # o- and down-like projections (outputs not past inputs) keep the compact fold
    lin2 = LoRALinear(torch.nn.Linear(64, 32, bias=False), MultiLoRA(64, 32, adapters=2, max_rank=8, dtype=torch.float32))
    assert lin2.kext_weight() is None and lin2.weight.is_contiguous() and lin2.folded() is not None


def _reference_f32(lora: MultiLoRA, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
    f32 = MultiLoRA(lora.in_features, lora.slices, adapters=lora.adapters, max_rank=lora.rank, dtype=torch.float32)
    f32.lora_a.copy_(lora.lora_a)
    f32.lora_b.copy_(lora.lora_b)
    f32._host = lora._host
    return f32.reference(x.float(), batch)


def test_grids_cover_every_row_and_column_once():
    assert shrink_grid(48, 4, 64, 8, 4) == (6, 4, 16)
    assert plan_lora_shrink("bf16", k=4096, rank=16, slices=3).abi.grid_for(4, 64) == (6, 4, 16)
    assert expand_grid(6144, 5, 64, 64, 8) == (12, 5, 8)
    assert expand_grid(6152, 1, 1, 64, 8) == (13, 1, 1)


# ---- the step's choice -------------------------------------------------------------------------
def test_ids_outside_the_slots_are_no_adapter():
    batch = AdapterBatch(torch.tensor([2, -1, 0, 7, -5, 3, 1], dtype=torch.int64), 4)
    assert batch.ids.dtype == torch.int32
    assert batch.slot.tolist() == [2, 4, 0, 4, 4, 3, 1]
    offsets, pos, src = batch.permutation
    assert offsets.tolist() == [0, 1, 2, 3, 4, 7]            # "no adapter" sorts last
    assert src.tolist() == [2, 6, 0, 5, 1, 3, 4]
    assert batch.sorted_slot.tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert batch.onehot.sum(1).tolist() == [1, 0, 1, 0, 0, 1, 1]


def test_the_context_batch_serves_calls_without_ids_and_none_is_the_base():
    gen = seeded_generator("lora_context")
    base = torch.nn.Linear(32, 24)
    lora = random_store(32, (24,), (8, 8), torch.float32, gen, max_rank=8)
    ctx = AdapterContext(2)
    lin = LoRALinear(base, lora, context=ctx)
    x = torch.randn(5, 32, generator=gen)
    ids = torch.tensor([0, 1, -1, 1, 0])
    assert torch.equal(lin(x), base(x))
    ctx.batch = AdapterBatch(ids, 2)
    torch.testing.assert_close(lin(x), lin(x, ids), rtol=0, atol=0)
    assert not torch.allclose(lin(x), base(x))


def test_fused_path_keywords_run_unfused_with_the_same_meaning():
    """gated / residual / norm (runtime/linear.gemv's keywords, which the models' fused layers
    pass): norm first, adapters on the normalised x, the activation over the adapted halves."""
    gen = seeded_generator("lora_keywords")
    base = torch.nn.Linear(32, 48, bias=False)
    lora = random_store(32, (24, 24), (8, 16), torch.float32, gen, max_rank=16)
    lin = LoRALinear(base, lora)
    x, r = torch.randn(6, 32, generator=gen), torch.randn(6, 24, generator=gen)
    gamma = torch.rand(32, generator=gen) + 0.5
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    h = lin(rms_norm(x, gamma, 1e-5), ids)
    g, u = h.chunk(2, dim=-1)
    want = torch.nn.functional.silu(g) * u + r
    got = lin(x, ids, gated="silu", residual=r, norm=(gamma, 1e-5))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_state_dict_names_stay_the_base_projections():
    base = torch.nn.Linear(16, 8)
    lin = LoRALinear(base, MultiLoRA(16, 8, adapters=2, max_rank=8, dtype=torch.float32))
    assert sorted(lin.state_dict()) == ["bias", "weight"]
    assert lin.weight is base.weight and not isinstance(lin, torch.nn.Linear)


def test_scales():
    assert lora_scale(16, 8) == 2.0 and lora_scale(16, 64, rslora=True) == 2.0


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda lo: lo.set_adapter(0, torch.randn(9, 16), torch.randn(8, 9), 1.0), r"lora_a must be \[r, 16\] with 1 <= r <= 8"),
    (lambda lo: lo.set_adapter(0, torch.randn(4, 16), torch.randn(8, 5), 1.0), r"lora_b must be \[8, 4\]"),
    (lambda lo: lo.set_adapter(2, torch.randn(4, 16), torch.randn(8, 4), 1.0), r"slot must be an int in \[0, 2\)"),
    (lambda lo: lo.set_adapter(0, torch.randn(4, 16), torch.randn(8, 4), 1.0, part=1), r"slice must be"),
    (lambda lo: lo.set_adapter(0, torch.randn(4, 16), torch.randn(8, 4), float("nan")), "scale must be finite"),
    (lambda lo: lo.reference(torch.randn(3, 16), AdapterBatch(torch.zeros(4, dtype=torch.int32), 2)),
     "4 adapter ids for 3 tokens"),
    (lambda lo: lo.reference(torch.randn(3, 16), AdapterBatch(torch.zeros(3, dtype=torch.int32), 3)),
     "3 slots, the projection's adapters 2"),
    (lambda lo: AdapterBatch(torch.zeros(3, 1, dtype=torch.int32), 2), "1-D integer tensor"),
    (lambda lo: AdapterBatch(torch.zeros(3), 2), "1-D integer tensor"),
    (lambda lo: lo.delta(torch.randn(3, 16), AdapterBatch(torch.zeros(3, dtype=torch.int32), 2),
                         torch.empty(3, 8), "kernels"), "route must be"),
])
def test_input_errors(call, match):
    with pytest.raises(LoRAInputError if "route" not in match else ValueError, match=match):
        call(MultiLoRA(16, 8, adapters=2, max_rank=8, dtype=torch.float32))


@pytest.mark.parametrize("kw,match", [
    (dict(max_rank=300), "past the 256"), (dict(out_features=(8,) * 5), "1 to 4 output slices"),
    (dict(adapters=0), "adapters must be a positive int"), (dict(adapters=512), "at most 511"),
])
def test_store_errors(kw, match):
    args = dict(in_features=16, out_features=8, adapters=2, max_rank=8) | kw
    with pytest.raises(ValueError, match=match):
        MultiLoRA(args.pop("in_features"), args.pop("out_features"), **args)


def test_base_and_store_sizes_must_agree():
    with pytest.raises(ValueError, match="16 -> 8, the adapters 16 -> 12"):
        LoRALinear(torch.nn.Linear(16, 8), MultiLoRA(16, (6, 6), adapters=1, max_rank=8))


def test_a_quantised_base_stays_a_submodule_and_gets_the_adapters():
    from layerforge.runtime.quant import QuantLinear
    gen = seeded_generator("lora_quant_base")
    q = QuantLinear.from_float(torch.randn(48, 64, generator=gen).to(torch.bfloat16), 32, wtype="u4")
    lora = random_store(64, (32, 16), (8, 16), torch.bfloat16, gen, max_rank=16)
    lin = LoRALinear(q, lora)
    assert lin.base is q and lin.weight is None and lin.folded() is None
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    batch = AdapterBatch(torch.tensor([0, 1, -1, 1, 0]), 2)
    torch.testing.assert_close(lin(x, batch), q(x) + lora.reference(x, batch), rtol=0, atol=0)
