"""The MoE permutation kernels (codegen/moe.py through runtime/moe_kernels.py) against their torch
references on fresh random inputs, outputs poisoned first (int32 max, NaN): the align kernel
exact for every pair count (1 to 65536, not only multiples of 32), expert count and
distribution (all pairs to one expert, empty experts, ids out of range); the gather exact; the
combine within one rounding of a float64 reference, with and without the shared expert, its
gate and the residual, bf16 and f16; the three chained; the align kernel under CUDA graph
capture; alignment and device errors."""
import pytest
import torch

from layerforge.runtime.moe_kernels import (MoEInputError, moe_align, moe_align_reference, moe_combine,
                                            moe_combine_reference, moe_gather, moe_gather_reference)

from ..devices import requires_gpu
from ..seeding import seeded_generator

pytestmark = [pytest.mark.gpu, requires_gpu]

I32_POISON = torch.iinfo(torch.int32).max
DTYPES = [torch.bfloat16, torch.float16]
RTOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}   # one unit in the last place: one rounding apart
ATOL = 1e-5


def poisoned_align_outputs(pairs: int, experts: int):
    return tuple(torch.full((n,), I32_POISON, dtype=torch.int32, device="cuda") for n in (experts + 1, pairs, pairs))


def draw_ids(kind: str, tokens: int, k: int, experts: int, gen) -> torch.Tensor:
    if kind == "uniform":
        ids = torch.randint(0, experts, (tokens, k), generator=gen, dtype=torch.int32)
    elif kind == "one_expert":
        ids = torch.full((tokens, k), experts // 2, dtype=torch.int32)
    elif kind == "empty_experts":   # every third expert only
        ids = torch.randint(0, -(-experts // 3), (tokens, k), generator=gen, dtype=torch.int32) * 3
    elif kind == "skewed":          # most pairs to expert 0, the rest anywhere
        ids = torch.randint(0, experts, (tokens, k), generator=gen, dtype=torch.int32)
        ids[torch.rand(tokens, k, generator=gen) < 0.8] = 0
    elif kind == "out_of_range":    # clamped into [0, E)
        ids = torch.randint(-5, experts + 5, (tokens, k), generator=gen, dtype=torch.int32)
    else:
        raise ValueError(kind)
    return ids.cuda()


def check_align(ids: torch.Tensor, experts: int):
    t, k = ids.shape
    out = poisoned_align_outputs(t * k, experts)
    got = moe_align(ids, experts, out=out)
    torch.cuda.synchronize()
    assert all(g is o for g, o in zip(got, out))
    offsets, pos, src = got
    ref = moe_align_reference(ids.cpu(), experts)
    for name, g, r in zip(("offsets", "pos", "src"), got, ref):
        bad = (g.cpu() != r).sum().item()
        assert bad == 0, f"{name}: {bad} of {r.numel()} differ"
    # the permutation's own identities, independent of the reference
    assert offsets[0].item() == 0 and offsets[-1].item() == t * k
    assert torch.equal(src[pos.long()].cpu(), torch.arange(t * k) // k)
    assert torch.equal(torch.sort(pos.cpu()).values, torch.arange(t * k, dtype=torch.int32))


TOKENS = [1, 7, 31, 32, 33, 1000, 4096, 8192]   # with k = 8: 32768 and 65536 pairs


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("experts", [8, 60, 64, 128, 256])
def test_align_matches_reference(experts, k, tokens):
    gen = seeded_generator("moe_align", experts, k, tokens)
    check_align(draw_ids("uniform", tokens, k, experts, gen), experts)


@pytest.mark.parametrize("pairs", [1, 7, 31, 32, 33, 1000, 32768, 65536])
@pytest.mark.parametrize("kind", ["one_expert", "empty_experts", "skewed", "out_of_range"])
@pytest.mark.parametrize("experts", [8, 64, 256, 512])
def test_align_distributions(experts, kind, pairs):
    gen = seeded_generator("moe_align_kind", experts, kind, pairs)
    check_align(draw_ids(kind, pairs, 1, experts, gen), experts)


def test_align_without_pairs_writes_zero_offsets():
    out = poisoned_align_outputs(0, 16)
    offsets, pos, src = moe_align(torch.zeros(0, 2, dtype=torch.int32, device="cuda"), 16, out=out)
    torch.cuda.synchronize()
    assert offsets.tolist() == [0] * 17 and pos.numel() == src.numel() == 0


def test_align_under_cuda_graph_capture():
    experts, tokens, k = 64, 300, 4
    gen = seeded_generator("moe_align_graph")
    ids = draw_ids("uniform", tokens, k, experts, gen)
    out = poisoned_align_outputs(tokens * k, experts)
    moe_align(ids, experts, out=out)   # loads the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_align(ids, experts, out=out)
    for trial in range(3):
        ids.copy_(draw_ids("skewed" if trial else "uniform", tokens, k, experts, gen))
        for o in out:
            o.fill_(I32_POISON)
        graph.replay()
        torch.cuda.synchronize()
        for g, r in zip(out, moe_align_reference(ids.cpu(), experts)):
            assert torch.equal(g.cpu(), r)


@pytest.mark.parametrize("slots", [1, 7, 33, 1000, 32768])
@pytest.mark.parametrize("hidden", [64, 2880, 4096, 7168])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_copies_rows(dtype, hidden, slots):
    gen = seeded_generator("moe_gather", dtype, hidden, slots)
    tokens = max(1, slots // 4)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).cuda()
    src = torch.randint(-2, tokens + 2, (slots,), generator=gen, dtype=torch.int32).cuda()   # a few clamped
    out = torch.full((slots, hidden), float("nan"), dtype=dtype, device="cuda")
    got = moe_gather(x, src, out=out)
    torch.cuda.synchronize()
    assert got is out and not torch.isnan(got).any()
    assert torch.equal(got.cpu(), moe_gather_reference(x.cpu(), src.cpu()))


def check_combine(y, pos, w, dtype, **extra):
    t, h = w.shape[0], y.shape[1]
    out = torch.full((t, h), float("nan"), dtype=dtype, device="cuda")
    got = moe_combine(y, pos, w, out=out, **extra)
    torch.cuda.synchronize()
    assert got is out and not torch.isnan(got).any()
    cpu = {name: v.cpu() if v is not None else None for name, v in extra.items()}
    ref = moe_combine_reference(y.cpu(), pos.cpu(), w.cpu(), precision="float64", **cpu)
    assert torch.allclose(got.cpu().double(), ref.double(), rtol=RTOL[dtype], atol=ATOL), \
        (got.cpu().double() - ref.double()).abs().max()
    return got


OPTIONS = [dict(), dict(shared=True), dict(shared=True, gate=True), dict(shared=True, gate=True, residual=True),
           dict(residual=True)]


@pytest.mark.parametrize("tokens", [1, 33, 1000])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "_".join(o) or "routed")
@pytest.mark.parametrize("hidden,k", [(4096, 2), (2880, 4), (7168, 8), (64, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_matches_reference(dtype, hidden, k, opts, tokens):
    gen = seeded_generator("moe_combine", dtype, hidden, k, tuple(opts), tokens)
    ids = torch.randint(0, 16, (tokens, k), generator=gen, dtype=torch.int32).cuda()
    _, pos, _ = moe_align(ids, 16)
    y = torch.randn(tokens * k, hidden, generator=gen).to(dtype).cuda()
    w = torch.softmax(torch.randn(tokens, k, generator=gen), -1).cuda()
    rows = lambda: torch.randn(tokens, hidden, generator=gen).to(dtype).cuda()   # noqa: E731
    extra = dict(shared=rows() if opts.get("shared") else None,
                 gate_logit=(torch.randn(tokens, 1, generator=gen) * 3).to(dtype).cuda() if opts.get("gate") else None,
                 residual=rows() if opts.get("residual") else None)
    check_combine(y, pos, w, dtype, **extra)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_clamps_positions(dtype):
    gen = seeded_generator("moe_combine_clamp", dtype)
    tokens, k, hidden = 50, 2, 256
    y = torch.randn(tokens * k, hidden, generator=gen).to(dtype).cuda()
    pos = torch.randint(-3, tokens * k + 3, (tokens * k,), generator=gen, dtype=torch.int32).cuda()
    check_combine(y, pos, torch.rand(tokens, k, generator=gen).cuda(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_align_gather_combine_chain(dtype):
    """Identity experts that scale their rows by 1 + e: combine(gather(x)) is the per-token sum of
    w[t, s] * (1 + ids[t, s]) * x[t], plus the residual."""
    gen = seeded_generator("moe_chain", dtype)
    tokens, k, experts, hidden = 777, 8, 60, 2048
    ids = draw_ids("uniform", tokens, k, experts, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).cuda()
    w = torch.softmax(torch.randn(tokens, k, generator=gen), -1).cuda()
    offsets, pos, src = moe_align(ids, experts)
    xs = moe_gather(x, src)
    scale = torch.repeat_interleave(torch.arange(experts, device="cuda") + 1.0, (offsets[1:] - offsets[:-1]).long())
    y = (xs.double() * scale[:, None]).to(dtype)
    got = moe_combine(y, pos, w, residual=x)
    want = ((w.double() * (1.0 + ids.double())).sum(-1, keepdim=True) + 1.0) * x.double()
    torch.cuda.synchronize()
    assert not torch.isnan(got).any()
    # y rounded each scaled row to dtype once more than `want` did: two units in the last place
    assert torch.allclose(got.double(), want, rtol=2 * RTOL[dtype], atol=ATOL)


def test_misaligned_and_misplaced_inputs_are_errors():
    x = torch.zeros(4 * 64 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(4, 64)   # 2-byte aligned
    src = torch.zeros(8, dtype=torch.int32, device="cuda")
    with pytest.raises(MoEInputError, match="16-byte boundary"):
        moe_gather(x, src)
    with pytest.raises(MoEInputError, match="'src' is on cpu"):
        moe_gather(torch.zeros(4, 64, dtype=torch.bfloat16, device="cuda"), src.cpu())
    with pytest.raises(MoEInputError, match="'offsets' must be a contiguous torch.int32 \\[9\\] on cuda"):
        moe_align(src.view(4, 2), 8, out=(torch.zeros(9, dtype=torch.int32),) * 3)


@pytest.mark.parametrize("tokens", [1, 7, 33, 1000, 4096])
@pytest.mark.parametrize("experts,k,fixed", [(60, 4, 4), (256, 8, 1), (8, 2, 3), (12, 4, 2)])
def test_align_with_fixed_experts(experts, k, fixed, tokens):
    """Every token also visits the fixed experts E .. E + fixed - 1 (a shared expert's slices):
    they sort last, each holding every token in order."""
    gen = seeded_generator("moe_align_fixed", experts, k, fixed, tokens)
    ids = draw_ids("uniform", tokens, k, experts, gen)
    pairs = tokens * (k + fixed)
    out = poisoned_align_outputs(pairs, experts + fixed)
    offsets, pos, src = moe_align(ids, experts, fixed=fixed, out=out)
    torch.cuda.synchronize()
    ref = moe_align_reference(ids.cpu(), experts, fixed)
    for name, g, r in zip(("offsets", "pos", "src"), (offsets, pos, src), ref):
        assert torch.equal(g.cpu(), r), name
    assert offsets[experts].item() == tokens * k and offsets[-1].item() == pairs
    assert torch.equal(src[tokens * k:].cpu(), torch.arange(tokens, dtype=torch.int32).repeat(fixed))


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,fixed", [(1, 4, 4), (33, 8, 1), (1000, 2, 2)])
def test_combine_with_fixed_rows(tokens, k, fixed, dtype, gate):
    """The fixed experts' rows weigh sigmoid(gate_logit[t]) (Qwen2-MoE's shared gate) or 1."""
    gen = seeded_generator("moe_combine_fixed", tokens, k, fixed, dtype, gate)
    ids = torch.randint(0, 16, (tokens, k), generator=gen, dtype=torch.int32).cuda()
    _, pos, _ = moe_align(ids, 16, fixed=fixed)
    y = torch.randn(tokens * (k + fixed), 256, generator=gen).to(dtype).cuda()
    w = torch.softmax(torch.randn(tokens, k, generator=gen), -1).cuda()
    g = (torch.randn(tokens, generator=gen) * 3).to(dtype).cuda() if gate else None
    out = torch.full((tokens, 256), float("nan"), dtype=dtype, device="cuda")
    got = moe_combine(y, pos, w, gate_logit=g, fixed=fixed, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(got).any()
    ref = moe_combine_reference(y.cpu(), pos.cpu(), w.cpu(), gate_logit=None if g is None else g.cpu(),
                                fixed=fixed, precision="float64")
    assert torch.allclose(got.cpu().double(), ref.double(), rtol=RTOL[dtype], atol=ATOL)


@pytest.mark.parametrize("tokens", [1, 7, 1000])
@pytest.mark.parametrize("experts,k,fixed", [(60, 4, 4), (256, 8, 1), (8, 2, 0), (512, 8, 0)])
def test_align_lists_the_experts_with_pairs(experts, k, fixed, tokens):
    """active: the experts with pairs (in any order: an atomic counter) in the first n entries,
    n in the last; the other outputs as without the list."""
    from layerforge.runtime.moe_kernels import moe_active_reference
    gen = seeded_generator("moe_align_active", experts, k, fixed, tokens)
    ids = draw_ids("uniform", tokens, k, experts, gen)
    offsets, pos, src, active = moe_align(ids, experts, fixed=fixed, active=True)
    torch.cuda.synchronize()
    ref = moe_align_reference(ids.cpu(), experts, fixed)
    for g, r in zip((offsets, pos, src), ref):
        assert torch.equal(g.cpu(), r)
    want = moe_active_reference(ref[0])
    n = int(want[-1])
    assert int(active[-1]) == n and sorted(active[:n].tolist()) == want[:n].tolist()
