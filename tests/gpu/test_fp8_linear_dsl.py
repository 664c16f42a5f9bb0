"""The DSL's FP8 W8A8 layer with one activation scale a token (dsl/stdlib/quant.lf fp8_linear_per_token)
on the GPU, through its module (runtime/quant.py fp8_linear_per_token): 1 to 1000 rows, N and K off the
FP8 GEMM's tiles, bf16 and f16, against the layer evaluated in float64, outputs poisoned with NaN first
and a token of zeros among the rows (its output row zeros).

The float64 evaluation quantises x to the same e4m3 bytes and scales (the layer states them), so what is
left is the tensor cores' sums and the output's rounding: 1e-2 relative, as tests/gpu/test_fp8_gemm.py
holds the GEMM to. That alone would not tell per-token scales from 1 x 128 blocks (both are within e4m3's
error of x), so on sm_90 the route is checked too: the per-token quantiser's scales, one a row, reach the
Hopper FP8 GEMM at every row count (the small-token e4m3 kernels, x by 1 x 128 blocks, never run). K not
a multiple of 16 (no FP8 GEMM) takes the torch route, on any GPU."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime import quant
from layerforge.runtime.layers import module
from layerforge.runtime.quant import quantize_fp8

from ..seeding import seeded_generator

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
HOPPER = torch.cuda.get_device_capability() == (9, 0)

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def make(n, k, dt, gen):
    """The module with a fresh e4m3 weight whose row scales differ (W / sqrt(K) times 0.1 .. 10 a row)."""
    mod = module("fp8_linear_per_token", I=k, O=n, dtype=dt, device="cuda")
    assert mod.kernel_reason is None and mod._linear.xquant == "token"
    wq, ws = quantize_fp8(torch.randn(n, k, generator=gen) / k ** 0.5 * torch.logspace(-1, 1, n)[:, None])
    with torch.no_grad():
        mod.wq.copy_(wq)
        mod.ws.copy_(ws)
    return mod


def tokens(m, k, dt, gen):
    """m rows of very different sizes (each token's scale matters; f16 narrower, its range), one of zeros."""
    span = 2 if dt == "bf16" else 1
    x = torch.randn(m, k, generator=gen) * torch.logspace(-span, span, m)[:, None]
    if m >= 3:
        x[m // 2] = 0
    return x.to(DTYPES[dt]).cuda()


def check(mod, x, n):
    """The module's output into a NaN-poisoned out= against the layer in float64."""
    m = x.shape[0]
    (want,) = lf.evaluate(mod.function, {"x": x, "wq": mod.wq, "ws": mod.ws}, precision="float64")
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    y = mod(x, out=(out,))
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    if m >= 3:
        assert out[m // 2].abs().max() == 0   # a token of zeros: scale 0, q 0
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < 1e-2, err
    fresh = mod(x)   # without out=: an allocated output, the same values
    torch.cuda.synchronize()
    assert fresh.dtype == x.dtype and not torch.isnan(fresh).any() and torch.equal(fresh, out)


def record_calls(monkeypatch, fname):
    """runtime/quant's `fname` (fp8_gemm, fp8_gemv) wrapped: each call's (q's shape, xscale's shape, W's group,
    q's dtype), in a list the test reads after the module ran."""
    seen = []
    real = getattr(quant, fname)

    def spy(q, xscale, qw, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(xscale.shape), qw.group, q.dtype))
        return real(q, xscale, qw, *args, **kwargs)
    monkeypatch.setattr(quant, fname, spy)
    return seen


@pytest.mark.skipif(not HOPPER, reason="the per-token FP8 GEMM route needs an sm_90 GPU")
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("n,k", [(768, 2048), (1000, 3008), (24, 16)])
@pytest.mark.parametrize("m", [1, 3, 16, 127, 128, 1000])
def test_w8a8_layer_runs_the_fp8_gemm_with_per_token_scales(monkeypatch, m, n, k, dt):
    """The FP8 GEMM route at every row count (at 1-16 rows the default takes the small-token kernel over x
    quantised first: LAYERFORGE_FP8_QUANT_X_FIRST=0 keeps this route there, the test below takes the other)."""
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "0")
    gen = seeded_generator("fp8-token-dsl", m, n, k, dt)
    mod = make(n, k, dt, gen)
    x = tokens(m, k, dt, gen)
    seen = record_calls(monkeypatch, "fp8_gemm")
    check(mod, x, n)
    assert seen and all(s[:3] == ((m, k), (m, 1), 0) for s in seen), seen   # one scale a token, W per row


@pytest.mark.skipif(torch.cuda.get_device_capability() < (8, 9), reason="the e4m3 products need sm_89 or newer")
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("n,k", [(768, 2048), (1000, 3008), (24, 16), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_w8a8_layer_small_rows_on_the_small_token_kernel(monkeypatch, m, n, k, dt):
    """By default (LAYERFORGE_FP8_QUANT_X_FIRST unset): up to 16 rows, x quantised per token by the row kernel, then
    the small-token e4m3 kernel over those bytes (codegen/gemv.py x_e4m3) with x's and W's scales in its epilogue;
    the same check against float64, and the route: one scale a token reaches it, the FP8 GEMM is not called."""
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST", raising=False)
    gen = seeded_generator("fp8-token-gemv", m, n, k, dt)
    mod = make(n, k, dt, gen)
    x = tokens(m, k, dt, gen)
    seen, gemm = record_calls(monkeypatch, "fp8_gemv"), record_calls(monkeypatch, "fp8_gemm")
    check(mod, x, n)
    assert seen and all(s == ((m, k), (m, 1), 0, torch.float8_e4m3fn) for s in seen), seen
    assert not gemm, gemm   # the FP8 GEMM never ran


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m", [1, 5, 300])
def test_w8a8_layer_with_k_off_the_fp8_gemm_runs_torch(m, dt):
    """K = 200 (not a multiple of 16: the FP8 GEMM's 16-byte rows) and N = 36: the same e4m3 bytes and
    scales in torch's f32 product, on any GPU."""
    gen = seeded_generator("fp8-token-dsl-torch", m, dt)
    mod = make(36, 200, dt, gen)
    check(mod, tokens(m, 200, dt, gen), 36)


@pytest.mark.skipif(torch.cuda.get_device_capability() < (8, 9), reason="the e4m3 products need sm_89 or newer")
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("n,k", [(768, 2048), (1024, 3072)])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 128, 1000])
def test_w8a8_block_layer(m, n, k, dt):
    """fp8_block_w8a8_linear (x by 1 x 128 blocks, W by 128 x 128 blocks, DeepSeek-V3's W8A8) through its module
    (gemv_quant over pack_fp8(block=128): the small-token e4m3 kernel up to 16 rows, the FP8 GEMM / blockwise
    route past them) against the layer in float64, a token of zeros among the rows."""
    gen = seeded_generator("fp8-block-dsl", m, n, k, dt)
    mod = module("fp8_block_w8a8_linear", I=k, O=n, G=128, dtype=dt, device="cuda")
    assert mod.kernel_reason is None and mod._linear.xquant == "k128"
    wq, ws = quantize_fp8(torch.randn(n, k, generator=gen) / k ** 0.5 * torch.logspace(-1, 1, n)[:, None], block=128)
    with torch.no_grad():
        mod.wq.copy_(wq)
        mod.ws.copy_(ws)
    check(mod, tokens(m, k, dt, gen), n)
