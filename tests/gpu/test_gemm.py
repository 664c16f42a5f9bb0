"""The Hopper GEMM (codegen/gemm.py, sm_90 only) against float64: M from 1 to 4097 (tiles of
128 rows, partial ones), N and K not multiples of the tiles, bf16 and f16, bias, the gated
activations and the residual add, outputs poisoned with NaN first; graph capture; each check
for the cp.async kernel and its TMA and persistent variants (runtime/linear.GEMM_KERNELS)."""
import pytest
import torch

from layerforge.runtime.linear import GEMM_KERNELS, gemv

from ..seeding import seeded_generator
from .products import operands, reference

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the wgmma GEMM needs an sm_90 GPU", allow_module_level=True)


VARIANTS = sorted(GEMM_KERNELS)   # wgmma, wgmma_cluster, wgmma_persistent, wgmma_tma


def check(m, n, k, dtype, gated=None, bias=False, residual=False, kernel="wgmma"):
    x, w, b, r = operands("gemm", m, n, k, dtype, gated, bias, residual)
    n_out = n // 2 if gated else n
    out = torch.full((m, n_out), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, b, gated=gated, residual=r, out=out, kernel=kernel)
    ref = reference(x, w, b, gated, r)
    assert not torch.isnan(out).any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("kernel", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 127, 128, 1000, 4097])
@pytest.mark.parametrize("n,k", [(4096, 14336), (5632, 2048), (1000, 3000), (24, 8)])
def test_gemm_against_float64(m, n, k, dtype, kernel):
    check(m, n, k, dtype, kernel=kernel)


@pytest.mark.parametrize("kernel", VARIANTS)
@pytest.mark.parametrize("gated", [None, "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m", [5, 300])
@pytest.mark.parametrize("n,k", [(2 * 1000, 3000), (2 * 5632, 2048), (48, 8)])
def test_gemm_epilogues(m, n, k, gated, kernel):
    check(m, n, k, torch.bfloat16, gated=gated, bias=True, residual=True, kernel=kernel)


@pytest.mark.parametrize("m", [129, 5000])
def test_persistent_grid_against_the_tile_count(m):
    """The persistent grid with fewer tiles than SMs (129 tokens: 2 x 24 tiles) and more (5000:
    40 x 24 on 132 SMs, each CTA walking several, the ring running on across them)."""
    check(m, 6144, 4096, torch.bfloat16, kernel="wgmma_persistent")


@pytest.mark.parametrize("kernel", VARIANTS)
def test_gemm_graph_capture(kernel):
    """The tensor maps are encoded before capture and copied into the graph like pointers: a
    replay reads the captured tensors' new contents."""
    x = torch.randn(512, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2 * 1024, 4096, dtype=torch.bfloat16, device="cuda") / 64
    gemv(x, w, gated="silu", kernel=kernel)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = gemv(x, w, gated="silu", kernel=kernel)
    x.copy_(torch.randn_like(x))
    g.replay()
    ref = reference(x, w, None, "silu", None)
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("bn", [128, 192, 256])
@pytest.mark.parametrize("kernel", VARIANTS)
@pytest.mark.parametrize("m,n,k,gated", [(1000, 1001, 3000, None), (300, 2 * 1001, 1000, "silu"),
                                         (4097, 6144, 4096, None), (129, 2 * 5632, 2048, "gelu_tanh"), (7, 24, 8, None)])
def test_gemm_tile_widths(monkeypatch, m, n, k, gated, kernel, bn):
    """The tile widths the planner picks from (codegen/gemm.pick_bn; 192 not gated), with an odd output width
    (the epilogue's element-wise path) and an even one (its pair loads and stores)."""
    from layerforge.runtime import linear
    monkeypatch.setattr(linear, "GEMM_BN", bn)
    if gated and bn == 192:   # gated tiles are 128 or 256 wide: refused before any launch
        with pytest.raises(ValueError, match="192"):
            check(m, n, k, torch.bfloat16, gated=gated, bias=True, residual=True, kernel=kernel)
        return
    check(m, n, k, torch.bfloat16, gated=gated, bias=True, residual=True, kernel=kernel)


def test_gemm_unaligned_out_and_residual():
    """out and residual as contiguous views at an odd element offset: the pair stores need
    4-byte alignment, so the call goes through aligned copies and still fills `out`."""
    gen = seeded_generator("gemm-unaligned")
    m, n, k = 300, 1024, 512
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16).cuda()
    r = torch.randn(m * n + 1, generator=gen).to(torch.bfloat16).cuda()[1:].view(m, n)
    buf = torch.full((m * n + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = buf[1:].view(m, n)
    y = gemv(x, w, residual=r, out=out, kernel="wgmma_tma")
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    ref = reference(x, w, None, None, r)
    assert (out.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("m,n,k,gated,bias", [
    (1, 4096, 512, None, False), (129, 6144, 1024, None, False), (1000, 1000, 3000, None, True),
    (4097, 2 * 1000, 1024, "silu", True), (300, 2 * 5632, 2048, "gelu", False), (64, 24, 8, None, True),
    (200, 2 * 512, 256, "gelu_tanh", True)])
def test_tma_store_epilogue_equals_register_stores(monkeypatch, m, n, k, gated, bias):
    """The persistent GEMM's epilogue through shared memory and TMA stores (the default where the
    output's columns are a multiple of 8 and no residual is added) writes the same bits as its
    epilogue from the registers, and nothing past out's rows: out is a view of a longer poisoned buffer."""
    from layerforge.runtime import linear
    x, w, b, r = operands("gemm", m, n, k, torch.bfloat16, gated, bias, False)
    n_out = n // 2 if gated else n
    outs = {}
    for store in (True, False):
        monkeypatch.setattr(linear, "GEMM_TMA_STORE", store)
        buf = torch.full((m + 70, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
        gemv(x, w, b, gated=gated, residual=r, out=buf[:m], kernel="wgmma_persistent")
        torch.cuda.synchronize()
        assert torch.isnan(buf[m:]).all(), "rows past out were written"
        outs[store] = buf[:m]
    assert not torch.isnan(outs[True]).any()
    assert torch.equal(outs[True], outs[False])
    ref = reference(x, w, b, gated, r)
    assert (outs[True].double() - ref).norm() / ref.norm() < 1e-2


def test_tma_store_plan_taken(monkeypatch):
    """The launcher picks the TMA-store plan for an output of 8k columns without a residual, and
    the plan with register stores otherwise (a map needs 16-byte rows)."""
    from layerforge.runtime import linear
    monkeypatch.setattr(linear, "GEMM_TMA_STORE", True)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    assert linear._gemm_launcher(x, 1024, 512, None, False, False, None, "wgmma_persistent", 256).plan.tma_store
    assert not linear._gemm_launcher(x, 1001, 512, None, False, False, None, "wgmma_persistent", 256).plan.tma_store
    assert not linear._gemm_launcher(x, 1024, 512, None, False, True, None, "wgmma_persistent", 256).plan.tma_store


@pytest.mark.parametrize("m,n,k,gated", [(4096, 28672, 4096, "silu"), (128, 4096, 4096, None), (1000, 1000, 3000, None),
                                         (4097, 6144, 4096, None), (300, 2 * 1001, 512, "gelu"), (64, 24, 8, None)])
def test_split_tail_against_float64_deterministic(m, n, k, gated):
    """The persistent GEMM with its last round's tiles split along K (wgmma_split: 8B gate/up at 4096 rows, 3584
    tiles on 132 SMs, its last 20 in 6 parts; 128 rows x 4096: 32 tiles of BN 128 in 4 parts; 1000 x 1000 x 3000:
    64 partial tiles in 2 parts, K not a multiple of the slices; 4097 x 6144: 768 tiles and a partial row tile, not
    split; K = 512: 2 parts of 4 slices; K = 8: one slice, not split): against float64, the same bits call after call
    (the parts summed in part order), the counters left zero for the next call, and with TMA stores nothing
    written past out's rows."""
    from layerforge.runtime import linear
    x, w, b, r = operands("gemm", m, n, k, torch.bfloat16, gated, True, True)
    n_out = n // 2 if gated else n
    outs = []
    for _ in range(3):
        out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
        gemv(x, w, b, gated=gated, residual=r, out=out, kernel="wgmma_split")
        outs.append(out)
    torch.cuda.synchronize()
    ref = reference(x, w, b, gated, r)
    assert not torch.isnan(outs[0]).any()
    assert (outs[0].double() - ref).norm() / ref.norm() < 1e-2
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert int(linear._SPLIT_WS[x.device.index][1].abs().sum()) == 0
    y = torch.full((m + 70, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")   # TMA stores: no row past M
    gemv(x, w, b, gated=gated, out=y[:m], kernel="wgmma_split")
    torch.cuda.synchronize()
    assert torch.isnan(y[m:]).all() and not torch.isnan(y[:m]).any()
    assert (y[:m].double() - reference(x, w, b, gated, None)).norm() / ref.norm() < 2e-2
