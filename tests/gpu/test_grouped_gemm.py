"""The generated grouped GEMM (codegen/gemm.py `groups`, runtime/moe.grouped_product; sm_90 only)
against float64 per group: empty groups, groups of 1, 127, 128, 129 and many tiles of rows, N and
K off the tiles, rows past the last group's end left as they were, bf16 and f16, the gated
activations, outputs poisoned with NaN first; the launch under graph capture with the row counts
changing between replays (the offsets are read by the kernel, not the host); MoE blocks on it
against transformers at a long step."""
import pytest
import torch
import torch.nn.functional as F

from layerforge.runtime import moe as moe_mod
from layerforge.runtime.linear import LinearInputError
from layerforge.runtime.moe import MoE, grouped_product

from ..moe_blocks import H, block, run_block
from ..seeding import seeded_generator

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the grouped wgmma GEMM needs an sm_90 GPU", allow_module_level=True)

ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def reference(xs, w, offsets, gated):
    """float64 rows of each group, rows past offsets[-1] None."""
    bounds = offsets.tolist()
    out = []
    for e in range(w.shape[0]):
        r = xs[bounds[e]:bounds[e + 1]].double() @ w[e].double().T
        if gated:
            g, u = r.chunk(2, dim=-1)
            r = ACT[gated](g) * u
        out.append(r)
    return torch.cat(out), bounds[-1]


def check(counts, n, k, dtype, gated, extra=0, tag="grouped"):
    gen = seeded_generator(tag, tuple(counts), n, k, dtype, gated, extra)
    E = len(counts)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32, device="cuda")
    P = int(offsets[-1]) + extra
    xs = (torch.randn(P, k, generator=gen) * 0.5).to(dtype).cuda()
    w = (torch.randn(E, n, k, generator=gen) * 0.05).to(dtype).cuda()
    out = torch.full((P, n // 2 if gated else n), float("nan"), dtype=dtype, device="cuda")
    y = grouped_product(xs, w, offsets, gated=gated, out=out)
    torch.cuda.synchronize()
    ref, end = reference(xs, w, offsets, gated)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y[:end]).any(), "a row of a group was not written"
    assert torch.isnan(y[end:]).all(), "a row past the last group was written"
    torch.testing.assert_close(y[:end].double(), ref, rtol=2e-2, atol=2e-2 * max(ref.abs().max().item(), 1e-3))


CLUSTERS = [1, 2]   # runtime/moe.GROUPED_CLUSTER: CTA pairs sharing W's tiles by TMA multicast


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("counts", [[128, 0, 129, 1, 127, 0, 0, 300], [0] * 7 + [5], [257], [1, 1, 1, 1],
                                    [0, 1000, 0, 0, 2, 0]])
def test_grouped_gemm_against_float64(counts, gated, dtype, cluster, monkeypatch):
    monkeypatch.setattr(moe_mod, "GROUPED_CLUSTER", cluster)
    check(counts, 2 * 272 if gated else 200, 1000, dtype, gated)


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("n,k,gated", [(3000, 1000, None), (2 * 1408, 2048, "silu"), (2048, 1408, None),
                                       (2 * 1500, 1000, "gelu")])
def test_grouped_gemm_shapes_off_the_tiles(n, k, gated, cluster, monkeypatch):
    monkeypatch.setattr(moe_mod, "GROUPED_CLUSTER", cluster)
    gen = seeded_generator("grouped_counts", n, k)
    counts = torch.randint(0, 300, (12,), generator=gen).tolist()
    counts[3] = 0
    check(counts, n, k, torch.bfloat16, gated, extra=37, tag="grouped_shapes")


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_grouped_gemm_many_groups(cluster, monkeypatch):
    """60 experts (Qwen1.5-MoE) and 160 (more than one pass of the table's warp scan)."""
    monkeypatch.setattr(moe_mod, "GROUPED_CLUSTER", cluster)
    for E in (60, 160):
        gen = seeded_generator("grouped_many", E)
        counts = torch.randint(0, 70, (E,), generator=gen).tolist()
        check(counts, 2 * 272, 512, torch.bfloat16, "silu", tag="grouped_many")


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_grouped_gemm_replays_with_new_counts(cluster, monkeypatch):
    """Captured once; replayed after the offsets (and rows) change in place: the new groups."""
    monkeypatch.setattr(moe_mod, "GROUPED_CLUSTER", cluster)
    gen = seeded_generator("grouped_graph")
    E, n, k, P = 8, 2 * 272, 512, 900
    xs = (torch.randn(P, k, generator=gen) * 0.5).bfloat16().cuda()
    w = (torch.randn(E, n, k, generator=gen) * 0.05).bfloat16().cuda()
    offsets = torch.tensor([0, 100, 100, 300, 301, 500, 700, 850, 900], dtype=torch.int32, device="cuda")
    out = torch.empty(P, n // 2, dtype=torch.bfloat16, device="cuda")
    grouped_product(xs, w, offsets, gated="silu", out=out)     # load outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        grouped_product(xs, w, offsets, gated="silu", out=out)
    offsets.copy_(torch.tensor([0, 0, 0, 450, 451, 452, 453, 454, 900], dtype=torch.int32))
    xs.copy_((torch.randn(P, k, generator=gen) * 0.5).bfloat16())
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref, _ = reference(xs, w, offsets, "silu")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_grouped_gemm_bad_offsets_touch_nothing_outside():
    """Offsets past P, negative or decreasing (a caller's bug): the kernel clamps them into [0, P],
    so nothing outside out is written (a guard band after it stays poisoned) and no row of xs past
    P is read."""
    gen = seeded_generator("grouped_bad_offsets")
    E, n, k, P = 4, 2 * 136, 256, 300
    xs = (torch.randn(P, k, generator=gen) * 0.5).bfloat16().cuda()
    w = (torch.randn(E, n, k, generator=gen) * 0.05).bfloat16().cuda()
    buf = torch.full((P + 64, n // 2), float("nan"), dtype=torch.bfloat16, device="cuda")
    for bad in ([0, 200, 100, 500, 900], [-50, 10, 20, 30, 300], [0, 0, 0, 0, 10 ** 6]):
        offsets = torch.tensor(bad, dtype=torch.int32, device="cuda")
        grouped_product(xs, w, offsets, gated="silu", out=buf[:P])
        torch.cuda.synchronize()
        assert torch.isnan(buf[P:]).all(), bad


def test_grouped_gemm_refuses_what_it_cannot_take():
    xs = torch.zeros(16, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(4, 32, 64, dtype=torch.bfloat16, device="cuda")
    off = torch.zeros(5, dtype=torch.int32, device="cuda")
    with pytest.raises(LinearInputError, match="offsets"):
        grouped_product(xs, w, off[:4])
    with pytest.raises(LinearInputError, match="groups"):
        grouped_product(xs, w[:0], off[:1])
    with pytest.raises(LinearInputError, match="dtype"):
        grouped_product(xs.half(), w, off)
    with pytest.raises(LinearInputError, match="multiple of 8"):
        grouped_product(xs[:, :60], w[:, :, :60].contiguous(), off)
    with pytest.raises(LinearInputError, match="gated"):
        grouped_product(xs, w, off, gated="relu")
    with pytest.raises(LinearInputError, match="out"):
        grouped_product(xs, w, off, out=torch.empty(16, 31, dtype=torch.bfloat16, device="cuda"))
    assert grouped_product(xs[:0], w, off).shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_moe_on_the_grouped_gemm_matches_transformers(name, dtype, monkeypatch):
    monkeypatch.setattr(moe_mod, "GROUPED_KERNEL", True)
    blk, cfg = block(name, dtype=dtype, device="cuda")
    moe = MoE.from_hf(blk, cfg)
    x = torch.randn(1100, H, generator=seeded_generator("moe_grouped_gemm", name)).to(dtype).cuda()
    ref = run_block(blk, x)
    with torch.no_grad():
        got = moe(x)
    torch.cuda.synchronize()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    scale = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs()
    assert err.max().item() <= 2e-2 * scale, (err.max().item(), scale)
    assert err.mean().item() <= 2e-3 * scale


@pytest.mark.parametrize("gated", [None, "silu"])
def test_grouped_tma_store_equals_register_stores(gated, monkeypatch):
    """The grouped product's TMA-store epilogue (a warpgroup's 64 rows inside one group) and its
    register stores (the groups' last rows) write the same bits as the register stores alone, and
    rows past the last group stay poisoned; group ends at and off multiples of 64."""
    gen = seeded_generator("grouped_tma_store", gated)
    counts = [64, 0, 200, 1, 128, 65, 300, 7]
    E, n, k = len(counts), 2 * 520 if gated else 520, 384
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32, device="cuda")
    P = int(offsets[-1]) + 40
    xs = (torch.randn(P, k, generator=gen) * 0.5).bfloat16().cuda()
    w = (torch.randn(E, n, k, generator=gen) * 0.05).bfloat16().cuda()
    outs = {}
    for store in (True, False):
        monkeypatch.setattr(moe_mod, "GROUPED_TMA_STORE", store)
        out = torch.full((P, n // 2 if gated else n), float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped_product(xs, w, offsets, gated=gated, out=out)
        torch.cuda.synchronize()
        outs[store] = out
    end = int(offsets[-1])
    assert torch.isnan(outs[True][end:]).all() and not torch.isnan(outs[True][:end]).any()
    assert torch.equal(outs[True][:end], outs[False][:end])


def quantised_experts(w, block=None):
    """[E, N, K] float -> QuantExperts of f8e4m3 with one scale a row or per 128 x 128 block (the
    MoE's quantize_ layout), and the experts' W in float64."""
    from layerforge.runtime.moe import QuantExperts
    from layerforge.runtime.quant import dequantize, pack_fp8, quantize_fp8
    qws = [pack_fp8(*quantize_fp8(w[e], block), block) for e in range(w.shape[0])]
    E, n, k = w.shape
    qe = QuantExperts("f8e4m3", block or 0, torch.stack([qw.qweight for qw in qws]).contiguous(),
                      torch.stack([qw.wscale for qw in qws]).contiguous(), n, k, torch.bfloat16)
    return qe, torch.stack([dequantize(qw) for qw in qws])


@pytest.mark.parametrize("scales", ["token", "k128", "blocks"])
@pytest.mark.parametrize("gated", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("counts", [[128, 0, 129, 1, 127, 0, 0, 300], [0] * 7 + [5], [1000], [64, 65, 63, 200]])
@pytest.mark.parametrize("n,k", [(2 * 704, 2048), (1024, 1408), (2 * 64, 128)])
def test_grouped_fp8_gemm_against_float64(counts, n, k, gated, scales):
    """W8A8 grouped (an FP8 MoE's prefill): each sorted row's e4m3 bytes times its group's e4m3 W,
    scaled per row (and 128 k) and per W row (or 128 x 128 block), against float64 of the same
    operands; rows past the last group untouched; groups ending at and off multiples of 64 (both
    store paths)."""
    from layerforge.runtime.quant import dequantize_fp8_rows, quantize_fp8_rows_cuda
    gen = seeded_generator("grouped_fp8", tuple(counts), n, k, gated, scales)
    E = len(counts)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32, device="cuda")
    P = int(offsets[-1]) + 9
    xs = (torch.randn(P, k, generator=gen) * torch.logspace(-1, 1, P)[:, None]).bfloat16().cuda()
    w, wd = quantised_experts((torch.randn(E, n, k, generator=gen) * 0.05).cuda(), 128 if scales == "blocks" else None)
    group = k if scales == "token" else 128
    q, s = quantize_fp8_rows_cuda(xs, group=0 if scales == "token" else 128)
    out = torch.full((P, n // 2 if gated else n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = grouped_product(q, w, offsets, gated=gated, out=out, xscale=s)
    torch.cuda.synchronize()
    xd = dequantize_fp8_rows(q, s, group)
    ref, end = reference(xd, wd, offsets, gated)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y[:end]).any() and torch.isnan(y[end:]).all()
    err = ((y[:end].double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


def test_grouped_fp8_refuses_what_it_cannot_take():
    gen = seeded_generator("grouped_fp8_bad")
    w, _ = quantised_experts((torch.randn(4, 256, 512, generator=gen) * 0.05).cuda())
    offsets = torch.tensor([0, 10, 10, 20, 30], dtype=torch.int32, device="cuda")
    xs = torch.randn(30, 512, generator=gen).bfloat16().cuda()
    from layerforge.runtime.quant import quantize_fp8_rows_cuda
    q, s = quantize_fp8_rows_cuda(xs, group=0)
    with pytest.raises(LinearInputError, match="W8A8"):
        grouped_product(q, w, offsets)            # no xscale
    with pytest.raises(LinearInputError, match="W8A8"):
        grouped_product(xs, w, offsets, xscale=s)  # x not e4m3
    wb, _ = quantised_experts((torch.randn(4, 320, 512, generator=gen) * 0.05).cuda(), 128)
    with pytest.raises(LinearInputError, match="W8A8"):        # 128 x 128 blocks want x per 128 k, N whole blocks
        grouped_product(q, wb, offsets, xscale=s)
    qb, sb = quantize_fp8_rows_cuda(xs)
    with pytest.raises(LinearInputError, match="W8A8"):
        grouped_product(qb, wb, offsets, xscale=sb)
    with pytest.raises(LinearInputError, match="xscale only"):
        grouped_product(xs, torch.zeros(4, 256, 512, dtype=torch.bfloat16, device="cuda"), offsets, xscale=s)
