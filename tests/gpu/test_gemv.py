"""The generated small-token product on the GPU against float64: 1-16 tokens, bf16 and f16,
K and N not multiples of the tiles, bias, the fused gated activations and the residual add,
outputs poisoned with NaN first; and the Linear module's choice between it and torch."""
import pytest
import torch

from layerforge.runtime.linear import Linear, gemv

from ..seeding import seeded_generator
from .products import reference, replayed

pytestmark = pytest.mark.gpu

SHAPES = [(6144, 4096), (4096, 14336), (5632, 2048), (1000, 3000), (3000, 1000), (24, 8), (57344 // 8, 1024)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_against_float64(n, k, m, dtype):
    gen = seeded_generator("gemv", n, k, m, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    y = gemv(x, w, out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = reference(x, w, None, None, None)
    assert not torch.isnan(out).any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("gated", [None, "silu"])
@pytest.mark.parametrize("m", [1, 9, 16])
@pytest.mark.parametrize("n,k,extra", [(6144, 4096, 192), (2 * 5632, 2048, 128), (1000, 3000, 8)])
def test_gemv_reads_a_row_strided_weight_in_place(n, k, extra, m, gated, monkeypatch):
    """W a view of a wider buffer (rows K + extra apart: LoRA's K-extended storage), read at its
    row stride (the plan's ldw, STRIDED_W on), with the buffer's extra columns NaN: none of them
    may reach the output."""
    import layerforge.runtime.linear as linear
    monkeypatch.setattr(linear, "STRIDED_W", True)
    gen = seeded_generator("gemv-ldw", n, k, extra, m, gated)
    dtype = torch.bfloat16
    buf = torch.full((n, k + extra), float("nan"), dtype=dtype, device="cuda")
    w = buf[:, :k]
    w.copy_((torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype))
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    out = torch.full((m, n // 2 if gated else n), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, gated=gated, out=out)
    assert linear._row_stride(w) == k + extra
    ref = reference(x, w.contiguous(), None, gated, None)
    assert not torch.isnan(out).any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("gated", [None, "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(2 * 1000, 3000), (2 * 5632, 2048), (48, 8)])
def test_gemv_epilogues(n, k, m, gated):
    gen = seeded_generator("gemv-epi", n, k, m, gated)
    dtype = torch.bfloat16
    n_out = n // 2 if gated else n
    x = torch.randn(2, m, k, generator=gen).to(dtype).cuda()[1]          # a view: not the storage's start
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    r = torch.randn(m, n_out, generator=gen).to(dtype).cuda()
    out = torch.full((m, n_out), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, b, gated=gated, residual=r, out=out)
    ref = reference(x, w, b, gated, r)
    assert not torch.isnan(out).any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("gated", [None, "silu"])
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(2 * 1000, 3000), (6144, 4096), (40, 24)])
def test_gemv_norm_prologue(n, k, m, gated, offset):
    """RMSNorm of x fused in the prologue (gamma, or Gemma's 1 + gamma), with bias and residual,
    against float64; rows of very different scales (the per-token rstd)."""
    gen = seeded_generator("gemv-norm", n, k, m, gated, offset)
    dtype = torch.bfloat16
    n_out = n // 2 if gated else n
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    gamma = (torch.randn(k, generator=gen) * 0.5 + (0.0 if offset else 1.0)).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    r = torch.randn(m, n_out, generator=gen).to(dtype).cuda()
    out = torch.full((m, n_out), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, b, gated=gated, residual=r, norm=(gamma, 1e-5), norm_offset=offset, out=out)
    ref = reference(x, w, b, gated, r, (gamma, 1e-5), offset)
    assert not torch.isnan(out).any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    cpu = gemv(x.cpu().float(), w.cpu().float(), b.cpu().float(), gated=gated, residual=r.cpu().float(),
               norm=(gamma.cpu().float(), 1e-5), norm_offset=offset)   # the torch path, same meaning
    assert ((cpu.double() - ref.cpu()).norm() / ref.norm()) < 1e-4


def test_linear_module_picks_kernel_or_torch():
    """<= 16 rows on the kernel, more on torch; both agree with float64; 3-D inputs keep their shape."""
    lin = Linear(2048, 2 * 1376, bias=False, dtype=torch.bfloat16, device="cuda")
    for rows in (1, 16, 17, 300):
        x = torch.randn(rows, 1, 2048, dtype=torch.bfloat16, device="cuda")
        y = lin(x, gated="silu")
        assert y.shape == (rows, 1, 1376)
        ref = reference(x, lin.weight, None, "silu", None)
        assert (y.double() - ref).norm() / ref.norm() < 1e-2


def test_graph_capture():
    lin = Linear(4096, 4096, bias=True, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    y = replayed(lin, x)
    ref = reference(x, lin.weight, lin.bias, None, None)
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("graph", [False, True])
def test_chained_products_see_their_predecessors_writes(graph):
    """Each product reads what the kernel before it wrote (on sm_90 they are programmatic
    dependent launches: W is copied before griddepcontrol.wait, x after): a chain of products
    (norm, gated, residual) and torch ops writing their inputs in place, eager and replayed
    from a graph, against float64."""
    gen = seeded_generator("gemv-chain", graph)
    d, f = 2048, 2816
    ws = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16).cuda()
          for n, k in ((3 * d, d), (d, d), (2 * f, d), (d, f))]
    gamma = (1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16).cuda()
    x = torch.randn(4, d, generator=gen).to(torch.bfloat16).cuda()
    src = torch.randn(4, d, generator=gen).to(torch.bfloat16).cuda()

    def chain():
        x.copy_(src)                                        # a torch kernel writes x right before
        qkv = gemv(x, ws[0], norm=(gamma, 1e-5))
        r = gemv(qkv[:, :d], ws[1], residual=x)
        h = gemv(r, ws[2], gated="silu", norm=(gamma, 1e-5))
        return gemv(h, ws[3], residual=r)

    out = chain()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain()
        src.copy_(torch.randn(4, d, generator=gen).to(torch.bfloat16).cuda())
        g.replay()
    torch.cuda.synchronize()

    def ref():
        xd = src.double()
        qkv = reference(src, ws[0], None, None, None, (gamma, 1e-5)).to(torch.bfloat16)
        r = (qkv[:, :d].double() @ ws[1].double().T + xd).to(torch.bfloat16)
        h = reference(r, ws[2], None, "silu", None, (gamma, 1e-5)).to(torch.bfloat16)
        return h.double() @ ws[3].double().T + r.double()
    want = ref()
    err = (out.double() - want).norm() / want.norm()
    assert not torch.isnan(out).any() and err < 2e-2, err


@pytest.mark.parametrize("split", [(1, 8, 3), (2, 8, 3), (2, 8, 4), (2, 2, 3), (2, 4, 3), (1, 2, 6)])
@pytest.mark.parametrize("gated", [None, "silu"])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_every_swept_split_is_correct(split, gated, m):
    """The work splits the benchmark sweeps (16-column tiles per CTA, warps, stages), launched
    directly, against float64: a split the sweep finds fastest may become a default only if it is
    right (odd N and K: tails in both)."""
    from layerforge.codegen.gemv import plan_gemv
    from layerforge.runtime.launch import compile_plan, device_arch, load_kernels
    rt, warps, stages = split
    n, k = (2 * 1000, 3000) if gated else (1000, 3000)
    try:
        plan = plan_gemv("bf16", n=n, k=k, max_m=m, gated=gated, residual=True, arch=device_arch(), rt=rt,
                         warps=warps, stages=stages)
    except ValueError as e:   # more shared memory than a CTA has: the sweep skips it too
        pytest.skip(str(e))
    launch = load_kernels(compile_plan(plan).cubin, plan.kernels, torch.device("cuda"))[plan.kernel_name]
    gen = seeded_generator("gemv-split", split, gated, m)
    n_out = n // 2 if gated else n
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16).cuda()
    r = torch.randn(m, n_out, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    launch((), [x, w, r, out, m])
    ref = reference(x, w, None, gated, r)
    assert not torch.isnan(out).any()
    assert (out.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("m,bias,residual", [(17, False, False), (300, True, True), (5, False, True)])
def test_gated_calls_torch_serves_take_the_generated_row_kernel(gated, dtype, m, bias, residual, monkeypatch):
    """A gated call no generated product serves (past 16 rows, or routed to torch: here the small-token kernel
    switched off) runs torch's product, then act(gate) * up from the stdlib's gated row kernel (linear._torch_product):
    float64's result within bf16 / f16 rounding, and within a rounding step of torch's own epilogue (_reference),
    with the bias and the residual add; outputs poisoned with NaN first."""
    import layerforge.runtime.linear as linear
    monkeypatch.setattr(linear, "KERNEL_MAX_ROWS", 0)   # every row count on torch's product
    monkeypatch.setattr(linear, "_GATED_ROWS", {})
    n, k = 2 * 1000, 3000
    gen = seeded_generator("gated-rows", gated, dtype, m, bias, residual)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    r = torch.randn(m, n // 2, generator=gen).to(dtype).cuda() if residual else None
    out = torch.full((m, n // 2), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, b, gated=gated, residual=r, out=out)
    assert len(linear._GATED_ROWS) == 1   # the row kernel ran
    ref = reference(x, w, b, gated, r)
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    torch_epilogue = linear._reference(x, w, b, gated, r).double()
    assert ((out.double() - torch_epilogue).abs() <= 1e-2 * (torch_epilogue.abs() + 1)).all()
    assert gemv(x[:0], w, b, gated=gated).shape == (0, n // 2)   # no rows: torch's own, no launch
    linear._GATED_ROWS.clear()
    wg = w.detach().clone().requires_grad_()   # autograd records the call: torch's differentiable epilogue
    y = gemv(x, wg, b, gated=gated, residual=r)
    assert y.grad_fn is not None and not linear._GATED_ROWS


def test_gated_fallback_without_jit_or_cached_kernel_keeps_torchs_epilogue(monkeypatch, tmp_path):
    """LAYERFORGE_NO_JIT=1 and a cache without the row kernel: the gated call past 16 rows still runs (torch's
    epilogue, as before the row kernel), and keeps doing so without trying again."""
    import layerforge.runtime.linear as linear
    monkeypatch.setenv("LAYERFORGE_NO_JIT", "1")
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(linear, "_GATED_ROWS", {})
    monkeypatch.setattr(linear, "WGMMA_MIN_ROWS", 1 << 62)
    gen = seeded_generator("gated-nojit")
    x = torch.randn(40, 3000, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(2 * 1000, 3000, generator=gen) / 3000 ** 0.5).to(torch.bfloat16).cuda()
    for _ in range(2):
        y = gemv(x, w, gated="silu")
        assert torch.equal(y, linear._reference(x, w, None, "silu", None))
    assert list(linear._GATED_ROWS.values()) == [False]
