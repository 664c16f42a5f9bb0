"""runtime/moe.py on the GPU: the expert form of the small-token product against torch on fresh
random permutations (empty experts, full experts, gathered rows), outputs poisoned first; each MoE
module against transformers' block in bf16 and float32 at 1, 7, 256 and 4097 tokens (the decode
kernels and the grouped-GEMM path), with tied experts; a step captured in a CUDA graph."""
import pytest
import torch
import torch.nn.functional as F

from layerforge.runtime.moe import EXPERT_KERNEL_ROWS, MoE, expert_product

from ..moe_blocks import H, block, run_block
from ..seeding import seeded_generator

NAMES = ["mixtral", "qwen2_moe", "qwen2_moe_mlp", "qwen3_moe", "deepseek_v3"]
TOKENS = [1, 7, 256, 4097]


def permutation(counts, gen):
    """offsets [E + 1] (int32, cuda) of the expert row counts, and a src of random tokens."""
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    P = int(offsets[-1])
    return offsets.cuda(), torch.randint(0, max(P, 1), (P,), generator=gen, dtype=torch.int32).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("counts", [[1, 0, 0, 0, 0, 0, 0, 1], [16, 0, 3, 16, 0, 7, 1, 2], [0] * 7 + [5],
                                    [8, 8, 8, 8, 8, 8, 8, 8]])
@pytest.mark.parametrize("gather", [False, True])
def test_expert_product_against_torch(counts, gated, dtype, gather):
    gen = seeded_generator("expert_product", tuple(counts), gated, dtype, gather)
    E, n, k = len(counts), 2 * 272 if gated else 200, 1000
    offsets, src = permutation(counts, gen)
    P = int(offsets[-1])
    x = (torch.randn(P + 3 if gather else P, k, generator=gen) * 0.5).to(dtype).cuda()   # sorted rows: P
    w = (torch.randn(E, n, k, generator=gen) * 0.05).to(dtype).cuda()
    out = torch.full((P, n // 2 if gated else n), float("nan"), dtype=dtype, device="cuda")
    y = expert_product(x, w, offsets, src if gather else None, rows=max(counts), gated=gated, out=out)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    rows = src.long() if gather else torch.arange(P, device="cuda")
    ref = torch.empty(P, y.shape[1], dtype=torch.float64, device="cuda")
    bounds = offsets.tolist()
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        r = x[rows[a:b]].double() @ w[e].double().T
        if gated:
            g, u = r.chunk(2, dim=-1)
            r = (F.silu(g) if gated == "silu" else F.gelu(g, approximate="tanh")) * u
        ref[a:b] = r
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("gated", [None, "silu"])
def test_expert_product_over_the_listed_experts(gated):
    """With the permutation's list of experts with rows, the grid spans only them: the same rows."""
    from layerforge.runtime.moe_kernels import moe_align
    gen = seeded_generator("expert_product_active", gated)
    E, T, n, k = 60, 5, 2 * 136 if gated else 136, 512
    ids = torch.stack([torch.randperm(E, generator=gen)[:4] for _ in range(T)]).int().cuda()
    offsets, _, src, active = moe_align(ids, E, active=True)
    x = (torch.randn(T, k, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    w = (torch.randn(E, n, k, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    out = torch.full((T * 4, n // 2 if gated else n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = expert_product(x, w, offsets, src, rows=T, gated=gated, active=active, out=out)
    ref = expert_product(x, w, offsets, src, rows=T, gated=gated)
    torch.cuda.synchronize()
    assert not torch.isnan(y).any() and torch.equal(y, ref)


@pytest.mark.parametrize("gated", [None, "silu"])
def test_expert_product_with_fixed_experts(gated):
    """The last S experts (a shared expert's slices) read their W from the second stack."""
    gen = seeded_generator("expert_product_fixed", gated)
    counts, S = [2, 0, 5, 1], 3
    E, n, k = len(counts), 2 * 136 if gated else 136, 512
    offsets, src = permutation(counts + [7] * S, gen)
    P = int(offsets[-1])
    x = (torch.randn(P, k, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    w = (torch.randn(E, n, k, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    wf = (torch.randn(S, n, k, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    out = torch.full((P, n // 2 if gated else n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = expert_product(x, w, offsets, src, rows=7, gated=gated, fixed=wf, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(y).any()
    allw, bounds = torch.cat([w, wf]).double(), offsets.tolist()
    for e in range(E + S):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        r = x[src[a:b].long()].double() @ allw[e].T
        if gated:
            g, u = r.chunk(2, dim=-1)
            r = F.silu(g) * u
        torch.testing.assert_close(y[a:b].double(), r, rtol=2e-2, atol=2e-2 * max(r.abs().max().item(), 1e-3))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_moe_matches_transformers(name, dtype, tokens, ties):
    blk, cfg = block(name, dtype=dtype, device="cuda", ties=ties)
    moe = MoE.from_hf(blk, cfg)
    x = (torch.randn(tokens, H, generator=seeded_generator("moe_gpu", name, tokens, ties))).to(dtype).cuda()
    ref = run_block(blk, x)
    with torch.no_grad():
        got = moe(x)
    torch.cuda.synchronize()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    else:
        # transformers adds the experts' rows in bf16 (index_add_), ours in f32: a few bf16 ulps
        scale = ref.float().abs().max().item()
        err = (got.float() - ref.float()).abs()
        assert err.max().item() <= 2e-2 * scale, (err.max().item(), scale)
        assert err.mean().item() <= 2e-3 * scale


@pytest.mark.parametrize("tokens", [1, EXPERT_KERNEL_ROWS, 300])
def test_moe_step_is_graph_capturable(tokens):
    blk, cfg = block("qwen2_moe", dtype=torch.bfloat16, device="cuda")
    moe = MoE.from_hf(blk, cfg)
    x = torch.randn(tokens, H, generator=seeded_generator("moe_graph", tokens)).to(torch.bfloat16).cuda()
    with torch.no_grad():
        eager = moe(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = moe(x)
        x.copy_(torch.randn(tokens, H, generator=seeded_generator("moe_graph2", tokens)).to(torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        again = moe(x)
    assert not torch.equal(eager, again)
    torch.testing.assert_close(y, again, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 7, EXPERT_KERNEL_ROWS, 300])
@pytest.mark.parametrize("wtype,group", [("u4", 128), ("u4", 32), ("i8", 0), ("i8", 64), ("f8e4m3", 0),
                                         ("f8e4m3", 128)])
def test_quantised_experts_match_their_dequantised_weights(wtype, group, tokens):
    """Quantised experts (expert kernel on the packed weights up to EXPERT_KERNEL_ROWS tokens, the
    dequantisation kernel + grouped GEMM past them) against torch's products on the same weights
    dequantised: weight-only formats within bf16's error; f8e4m3 also quantises x per 128-k chunk
    in the kernel (e4m3: 3 mantissa bits), so within fp8's."""
    blk, cfg = block("mixtral", dtype=torch.bfloat16, device="cuda")
    moe = MoE.from_hf(blk, cfg).quantize_(wtype, group)
    x = torch.randn(tokens, H, generator=seeded_generator("moe_quant", wtype, group, tokens)).to(torch.bfloat16).cuda()
    with torch.no_grad():
        got = moe(x)
        w, ids = moe.route(x)
        # W8A8: the expert kernel (per 128 k), or past it on sm_90 the grouped FP8 GEMM (W per row: x per token)
        grouped_fp8 = wtype == "f8e4m3" and tokens > EXPERT_KERNEL_ROWS and torch.cuda.get_device_capability() == (9, 0)
        per_token = grouped_fp8 and group == 0
        fp8_x = wtype == "f8e4m3" and (tokens <= EXPERT_KERNEL_ROWS or grouped_fp8)
        ref = w8a8_reference(moe, x, w, ids, per_token) if fp8_x else moe._forward_torch(x, w, ids)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    scale = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs()
    # bf16: the kernels round each expert's rows (and fp8 the activations) where the float64
    # references do not: a few bf16 ulps of the largest output, a fraction of one on average
    assert err.max().item() <= 3e-2 * scale, (err.max().item(), scale)
    assert err.mean().item() <= 4e-3 * scale


def w8a8_reference(moe, x, w, ids, per_token=False):
    """The W8A8 expert products in float64: each product's input quantised to e4m3 per 128-k chunk
    as the expert kernel does (runtime/quant.quantize_fp8_rows; per_token: one scale a row, as before
    the grouped FP8 GEMM), W dequantised; the gated activation's output rounded to bf16 between the
    products, as the kernels store it."""
    from layerforge.runtime.moe import dequantize_experts
    from layerforge.runtime.quant import dequantize_fp8_rows, quantize_fp8_rows

    def q(t):
        group = t.shape[-1] if per_token else 128
        return dequantize_fp8_rows(*quantize_fp8_rows(t, group), group)
    wgu = dequantize_experts(moe.experts.weights("gate_up_proj")).double()
    wd = dequantize_experts(moe.experts.weights("down_proj")).double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            g, u = (q(x[t]) @ wgu[e].T).chunk(2)
            h = (F.silu(g) * u).to(x.dtype)
            out[t] += float(w[t, s]) * (q(h) @ wd[e].T)
    return out.to(x.dtype)
