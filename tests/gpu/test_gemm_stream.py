"""The decode-range Hopper GEMM (codegen/gemm_stream.py, sm_90 only) against float64: 1 to 256
rows (every token tile, rows short of it), N and K not multiples of the tiles, bf16 and f16,
bias, the gated activations and the residual add, outputs poisoned with NaN first; every work
split (row blocks, consumer warpgroups, CTAs an SM) on shapes whose tiles are split over several
CTAs and whole in others; repeated calls (the per-tile counters must come back to zero); graph
capture; determinism of the split sums."""
import pytest
import torch

from layerforge.codegen.gemm_stream import pack_weight, plan_gemm_stream, token_tile
from layerforge.runtime.linear import _StreamLauncher, gemv

from ..seeding import seeded_generator
from .products import operands as product_operands, reference

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the decode-range GEMM needs an sm_90 GPU", allow_module_level=True)


def operands(m, n, k, dtype, gated, bias, residual):
    return product_operands("gemm_stream", m, n, k, dtype, gated, bias, residual)


def close(out, ref):
    assert not torch.isnan(out).any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


def check(m, n, k, dtype, gated=None, bias=False, residual=False):
    x, w, b, r = operands(m, n, k, dtype, gated, bias, residual)
    out = torch.full((m, n // 2 if gated else n), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, b, gated=gated, residual=r, out=out, kernel="stream")
    close(out, reference(x, w, b, gated, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 31, 64, 100, 128, 129, 256])
@pytest.mark.parametrize("n,k", [(4096, 14336), (10576, 2560), (1000, 3000), (24, 8)])
def test_stream_against_float64(m, n, k, dtype):
    check(m, n, k, dtype)


@pytest.mark.parametrize("gated", [None, "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m", [5, 64, 128])
@pytest.mark.parametrize("n,k", [(2 * 1000, 3000), (2 * 5632, 2048), (48, 8), (2560, 5120)])
def test_stream_epilogues(m, n, k, gated):
    check(m, n, k, torch.bfloat16, gated=gated, bias=True, residual=True)


SPLITS = [dict(rb=1, cw=1, ctas=1), dict(rb=1, cw=2, ctas=2), dict(rb=2, cw=1, ctas=2), dict(rb=2, cw=2, ctas=1),
          dict(rb=1, cw=2, stages=2, ctas=1), dict(rb=1, cw=1, ctas=1, ka=2), dict(rb=1, cw=1, ctas=1, stages=2, ka=4),
          dict(rb=1, cw=1, ctas=1, packed=True), dict(rb=2, cw=1, ctas=1, ka=2, packed=True)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "r{rb}w{cw}c{ctas}".format(**s) + str(s.get("stages", "")) + f"a{s.get('ka', 1)}"
                         + ("p" if s.get("packed") else ""))
@pytest.mark.parametrize("m,n,k,gated", [(64, 2560, 5120, None), (33, 2 * 1001, 1000, "silu"), (7, 6144, 4096, None),
                                         (128, 300, 64, None), (64, 4096, 200, None)])
def test_every_split_and_repeated_calls(m, n, k, gated, split):
    """Tiles split over up to ~10 CTAs (2560 x 5120), tiles whole in one CTA (K = 64: one unit a
    tile, or K 200); three calls in a row with fresh inputs: a counter left non-zero by a call
    would make the next one finish its tiles early with partial sums."""
    if gated and split["rb"] == 1:
        pytest.skip("a gated plan has rb = 2")
    dev = torch.device("cuda")
    plan = plan_gemm_stream("bf16", n=n, k=k, mt=token_tile(m), gated=gated, bias=True, residual=True, **split)
    from layerforge.runtime.launch import load_plan
    launch = _StreamLauncher(plan, load_plan(plan, dev), torch.cuda.get_device_properties(0).multi_processor_count,
                             dev)
    for call in range(3):
        x, w, b, r = operands(m, n, k, torch.bfloat16, gated, True, True)
        x = x + call
        out = torch.full_like(r, float("nan"))
        launch(m, [x, pack_weight(w, plan) if plan.packed else w, b, r, out, m])
        close(out, reference(x, w, b, gated, r))
    assert int(launch.counts.abs().sum()) == 0


def test_split_sums_are_deterministic():
    x, w, _, r = operands(64, 2560, 5120, torch.bfloat16, None, False, True)
    a = gemv(x, w, residual=r, kernel="stream")
    for _ in range(5):
        assert torch.equal(gemv(x, w, residual=r, kernel="stream"), a)


def test_stream_graph_capture():
    """The tensor maps and the workspace are fixed before capture: a replay reads the captured
    tensors' new contents and leaves the counters at zero for the next replay."""
    x = torch.randn(64, 2560, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2 * 5120, 2560, dtype=torch.bfloat16, device="cuda") / 50
    gemv(x, w, gated="silu", kernel="stream")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = gemv(x, w, gated="silu", kernel="stream")
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        g.replay()
        close(y, reference(x, w, None, "silu", None))


def test_stream_rejects_too_many_rows():
    from layerforge.runtime.linear import LinearInputError
    x = torch.randn(257, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(LinearInputError, match="at most 256"):
        gemv(x, torch.randn(64, 64, dtype=torch.bfloat16, device="cuda"), kernel="stream")
    with pytest.raises(LinearInputError, match="at most 128 rows gated"):
        gemv(x[:129], torch.randn(64, 64, dtype=torch.bfloat16, device="cuda"), gated="silu", kernel="stream")


# ---- u4 weights converted in registers (wtype "u4"; runtime/quant.gemv_quant past 32 rows) ----
def quant_linear(n, k, wtype, group, dtype, gen, bias):
    from layerforge.runtime.quant import QuantLinear
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_float(w, group, b, wtype=wtype, dtype=dtype).cuda()


def check_quant_stream(lin, m, gated, dtype, gen):
    """lin's product of m fresh rows, with its bias and a residual, through the decode-range route,
    against float64 of the dequantised W; outputs poisoned first."""
    from layerforge.runtime import quant
    x = torch.randn(m, lin.qw.k, generator=gen).to(dtype).cuda()
    r = torch.randn(m, lin.qw.n // 2 if gated else lin.qw.n, generator=gen).to(dtype).cuda()
    assert quant._stream_ok(x, lin.qw, m, gated)
    out = torch.full_like(r, float("nan"))
    quant.gemv_quant(x, lin.qw, lin.bias, gated=gated, residual=r, out=out)
    close(out, reference(x, quant.dequantize(lin.qw), lin.bias, gated, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [33, 64, 100, 128])
@pytest.mark.parametrize("n,k,gated", [(4096, 4096, None), (2 * 1000, 2048, "silu"), (1000, 3072, None),
                                       (2 * 5632, 1152, "gelu_tanh"), (1000, 14336, None)])
def test_u4_stream_against_the_dequantised_reference(n, k, gated, m, group, dtype):
    """W's nibbles and (scale, zero) pairs from the packed unit, converted in registers into the
    wgmma's A fragments, against float64 of dequantize (K 3072 and 1152: a last unit past K; K 14336:
    two row blocks a warpgroup by default; gated at <= 64 rows: two consumer warpgroups)."""
    if k % group:
        pytest.skip("the group size must divide K")
    gen = seeded_generator("gemm-stream-u4", n, k, gated, m, group, dtype)
    check_quant_stream(quant_linear(n, k, "u4", group, dtype, gen, bias=True), m, gated, dtype, gen)


@pytest.mark.parametrize("m", [17, 20, 25, 32])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, None), (2 * 5120, 4096, "silu"), (8192, 8192, None)])
def test_u4_stream_from_17_rows_on_wide_weights(n, k, gated, m, monkeypatch):
    """The default (LAYERFORGE_U4_STREAM_WIDE on, pinned here): u4 weights of more than quant.STREAM_U4_WIDE_ELEMENTS take the decode-range GEMM
    from 25 rows, gated or huge ones from 17 (32-token tiles, rows past m never stored), against float64 of the
    dequantised W; 4096 x 4096 keeps the small-token kernel there."""
    from layerforge.runtime import quant
    monkeypatch.setenv("LAYERFORGE_U4_STREAM_WIDE", "1")
    if m < 25 and not gated and n * k < quant.STREAM_U4_HUGE_ELEMENTS:
        pytest.skip("the small-token kernel's rows")
    gen = seeded_generator("gemm-stream-u4-wide", n, k, gated, m)
    check_quant_stream(quant_linear(n, k, "u4", 128, torch.bfloat16, gen, bias=True), m, gated, torch.bfloat16, gen)
    small = quant_linear(4096, 4096, "u4", 128, torch.bfloat16, gen, bias=False)
    assert not quant._stream_ok(torch.empty(m, 4096, device="cuda", dtype=torch.bfloat16), small.qw, m, None)


def test_u4_stream_graph_capture_and_pack_cache():
    from layerforge.runtime import quant
    gen = seeded_generator("gemm-stream-u4-graph")
    lin = quant_linear(2 * 1024, 2048, "u4", 128, torch.bfloat16, gen, bias=False)
    x = torch.randn(64, 2048, generator=gen).to(torch.bfloat16).cuda()
    lin(x, gated="silu")   # packs W (outside the capture)
    packs = len(quant._STREAM_PACKS)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = lin(x, gated="silu")
    assert len(quant._STREAM_PACKS) == packs
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        g.replay()
        close(y, reference(x, quant.dequantize(lin.qw), None, "silu", None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [33, 64, 128])
@pytest.mark.parametrize("n,k,gated", [(4096, 4096, None), (2 * 1000, 2048, "silu"), (1000, 3072, None),
                                       (2 * 5632, 1152, "gelu_tanh")])
def test_i8_stream_against_the_dequantised_reference(n, k, gated, m, dtype, monkeypatch):
    """i8 with row scales on the same path (quant.STREAM_WTYPES)."""
    from layerforge.runtime import quant
    monkeypatch.setattr(quant, "STREAM_WTYPES", ("u4", "i8"))
    gen = seeded_generator("gemm-stream-i8", n, k, gated, m, dtype)
    check_quant_stream(quant_linear(n, k, "i8", 0, dtype, gen, bias=True), m, gated, dtype, gen)
