"""runtime/quant.py's fp8 W8A8 on the CPU: the activation quantisation is the kernel's (q = e4m3 of
x * (448 / amax) per token and 128 k), weight quantisation round trips per row and per 128 x 128
block, checkpoint layouts (per tensor, per channel, DeepSeek-V3's block scale_inv) repack to the
kernel's, and QuantLinear's torch path equals float64 of the dequantised operands."""
import pytest
import torch

from layerforge.runtime.linear import LinearInputError
from layerforge.runtime.quant import (FP8_MAX, QuantLinear, dequantize, dequantize_fp8_rows, pack_fp8, quantize_fp8,
                                      quantize_fp8_rows)

from ..seeding import seeded_generator

E4M3_STEP = 2.0 ** -3   # e4m3 keeps 3 mantissa bits: a normal value rounds within half of 2^-3 of itself


def test_rows_quantisation_is_per_token_and_128_k():
    gen = seeded_generator("fp8-rows")
    x = torch.randn(3, 300, generator=gen) * torch.tensor([1e-3, 1.0, 50.0])[:, None]
    x[1, 128:256] = 0.0                                 # an all-zero group: scale 0, q 0
    q, s = quantize_fp8_rows(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 300) and s.shape == (3, 3) and s.dtype == torch.float32
    xb = x.to(torch.bfloat16).float()
    for g in range(3):
        part = xb[:, 128 * g: 128 * (g + 1)]
        assert torch.equal(s[:, g], part.abs().amax(1) * (1.0 / 448))
        assert q[:, 128 * g: 128 * (g + 1)].float().abs().amax(1).tolist() == [0.0 if a == 0 else FP8_MAX
                                                                               for a in part.abs().amax(1).tolist()]
    assert s[1, 1] == 0 and q[1, 128:256].float().abs().max() == 0
    err = (dequantize_fp8_rows(q, s) - xb.double()).abs()
    # relative error of a normal e4m3 at most 2^-4; values below 2^-6 of the group's scale are subnormal
    bound = torch.maximum(xb.double().abs() * E4M3_STEP / 2, s.double().repeat_interleave(128, 1)[:, :300] * 2.0 ** -10)
    assert (err <= bound * (1 + 1e-6)).all()


def test_rows_quantisation_rounds_the_f32_product_once():
    """q is e4m3(x * f32(448 / amax)), the kernel's cvt.rn.satfinite of the f32 product."""
    gen = seeded_generator("fp8-rows-rounding")
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16)
    q, _ = quantize_fp8_rows(x)
    amax = x.float().abs().amax(1, keepdim=True)
    inv = torch.full_like(amax, 448.0) / amax
    assert torch.equal(q.view(torch.uint8), (x.float() * inv).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("block", [None, 128])
def test_weight_round_trip(block):
    gen = seeded_generator("fp8-weight", block)
    w = torch.randn(300, 384, generator=gen) * torch.logspace(-2, 1, 300)[:, None]
    q, s = quantize_fp8(w, block)
    assert s.shape == ((300,) if block is None else (3, 3))
    qw = pack_fp8(q, s, block)
    deq = dequantize(qw)
    rows = s.double()[:, None] if block is None else s.double().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)
    assert torch.equal(deq, q.double() * rows)
    bound = torch.maximum(w.double().abs() * E4M3_STEP / 2, rows * 2.0 ** -10)
    assert ((deq - w.double()).abs() <= bound * (1 + 1e-6)).all()
    assert q.float().abs().max() == FP8_MAX


def f32_scalar(v):
    return torch.tensor(v, dtype=torch.float32).double()


def test_checkpoint_scale_layouts():
    """compressed-tensors per tensor ([] or [1]) and per channel ([N, 1]) scales become the
    kernel's f32 row scales; DeepSeek-V3's weight_scale_inv [ceil(N / 128), K / 128] stays blocks."""
    gen = seeded_generator("fp8-layouts")
    q = (torch.randn(200, 256, generator=gen) * 40).to(torch.float8_e4m3fn)
    for scale in (torch.tensor(0.02), torch.tensor([0.02])):
        qw = pack_fp8(q, scale)
        assert qw.group == 0 and qw.wscale.shape == (200,) and torch.equal(dequantize(qw), q.double() * f32_scalar(0.02))
    ch = torch.rand(200, 1, generator=gen)
    qw = pack_fp8(q, ch)
    assert torch.equal(dequantize(qw), q.double() * ch.double())
    inv = torch.rand(2, 2, generator=gen)
    qw = pack_fp8(q, inv, block=[128, 128])
    assert qw.group == 128 and qw.kernel_tensors[1] is qw.wscale and qw.nbytes() == 200 * 256 + 4 * 4
    deq = dequantize(qw)
    assert torch.equal(deq[130, 200], q[130, 200].double() * inv[1, 1].double())
    assert torch.equal(deq[127, 127], q[127, 127].double() * inv[0, 0].double())




@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("gated", [None, "silu"])
@pytest.mark.parametrize("block", [0, 128])
def test_torch_path_matches_float64(block, gated, norm):
    """Off the kernel (CPU here) QuantLinear quantises x as the kernel does and multiplies the
    dequantised operands: float64 of the same operands agrees to f32 accumulation and the final
    bf16 rounding."""
    gen = seeded_generator("fp8-torch", block, gated, norm)
    n, k = 256, 384
    lin = QuantLinear.from_float(torch.randn(n, k, generator=gen) / k ** 0.5, block, torch.randn(n, generator=gen),
                                 wtype="f8e4m3")
    x = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    gamma = (1 + 0.2 * torch.randn(k, generator=gen)).to(torch.bfloat16)
    r = torch.randn(2, 3, n // 2 if gated else n, generator=gen).to(torch.bfloat16)
    y = lin(x, gated=gated, residual=r, norm=(gamma, 1e-5) if norm else None)
    xd = x.double()
    u = (x.float() * gamma.float()).to(torch.bfloat16) if norm else x
    ref = dequantize_fp8_rows(*quantize_fp8_rows(u)) @ lin.dequantized().T
    if norm:
        ref = ref * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = ref + lin.bias.double()
    if gated:
        g, up = ref.chunk(2, -1)
        ref = torch.nn.functional.silu(g) * up
    ref = ref + r.double()
    assert y.shape == r.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=8e-3)   # bf16's half step, not fp8's


def test_from_fp8_and_errors():
    gen = seeded_generator("fp8-from")
    q = (torch.randn(256, 128, generator=gen) * 20).to(torch.float8_e4m3fn)
    lin = QuantLinear.from_fp8(q, torch.rand(256, 1, generator=gen), torch.zeros(256), dtype=torch.float16)
    assert lin.qw.dtype == torch.float16 and lin.bias.dtype == torch.float16 and lin.wscale.dtype == torch.float32
    assert lin(torch.randn(4, 128, generator=gen).half()).dtype == torch.float16
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        QuantLinear.from_fp8(q.float(), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"block scales must be \[2, 1\]"):
        QuantLinear.from_fp8(q, torch.ones(2, 2), block=128)
    with pytest.raises(ValueError, match="128 x 128"):
        QuantLinear.from_fp8(q, torch.ones(2, 1), block=(64, 64))
    with pytest.raises(ValueError, match=r"scales must be \[\], \[1\], \[256\]"):
        QuantLinear.from_fp8(q, torch.ones(3))
    with pytest.raises(ValueError, match="group size must be one of"):
        QuantLinear.from_float(torch.randn(64, 128), 64, wtype="f8e4m3")
    with pytest.raises(LinearInputError, match="last dim 127"):
        lin(torch.randn(2, 127).half())
    with pytest.raises(TypeError, match="float8_e4m3fn with f32 scales"):
        lin.double()


def test_fp8_scaling_follows_the_scales_shapes():
    """runtime/quant.fp8_scaling: which Hopper FP8 GEMM the scales make (x one a row, or a row and 128 k;
    W per row or per 128 x 128 block)."""
    from layerforge.runtime.quant import fp8_scaling
    cpu = torch.device("cpu")
    f = lambda *shape: torch.ones(*shape)   # noqa: E731
    assert fp8_scaling(f(300), 300, 4096, 0, cpu) == "token"
    assert fp8_scaling(f(300, 1), 300, 4096, 0, cpu) == "token"
    assert fp8_scaling(f(300, 32), 300, 4096, 0, cpu) == "k128"
    assert fp8_scaling(f(300, 32), 300, 4096, 128, cpu) == "k128_blocks"
    assert fp8_scaling(f(300, 1), 300, 128, 128, cpu) == "k128_blocks"   # one k block: a row's scale is its block's
    assert fp8_scaling(f(300), 300, 4096, 128, cpu) is None                # blocks want x per 128 k
    assert fp8_scaling(f(300, 31), 300, 4096, 0, cpu) is None
    assert fp8_scaling(f(300).double(), 300, 4096, 0, cpu) is None
    assert fp8_scaling(None, 300, 4096, 0, cpu) is None


def test_fp8_gemm_refuses_bad_inputs_before_any_launch():
    """fp8_gemm's errors on the CPU (it runs on sm_90 only): each names what it wanted."""
    from layerforge.runtime.quant import fp8_gemm
    gen = seeded_generator("fp8-gemm-cpu")
    qw = pack_fp8(*quantize_fp8(torch.randn(256, 512, generator=gen)), None)
    q, s = quantize_fp8_rows(torch.randn(8, 512, generator=gen).to(torch.bfloat16), 512)
    with pytest.raises(LinearInputError, match="float8_e4m3fn"):
        fp8_gemm(q.float(), s, qw)
    with pytest.raises(LinearInputError, match="xscale"):
        fp8_gemm(q, s[:4], qw)
    with pytest.raises(LinearInputError, match="bias"):
        fp8_gemm(q, s, qw, torch.zeros(255, dtype=torch.bfloat16))
    with pytest.raises(LinearInputError, match="even number"):
        fp8_gemm(q, s, pack_fp8(*quantize_fp8(torch.randn(255, 512, generator=gen)), None), gated="silu")
    with pytest.raises(LinearInputError, match="sm_90"):
        fp8_gemm(q, s, qw)
    with pytest.raises(LinearInputError, match="f8e4m3"):
        fp8_gemm(q, s, QuantLinear.from_float(torch.randn(256, 512, generator=gen), 0, wtype="i8").qw)


def test_fp8_gemv_refuses_bad_inputs_before_any_launch():
    """fp8_gemv (x quantised first, the small-token e4m3 kernel over its bytes): its errors on the CPU, each
    naming what it wanted."""
    from layerforge.runtime.quant import fp8_gemv
    gen = seeded_generator("fp8-gemv-cpu")
    qw = pack_fp8(*quantize_fp8(torch.randn(256, 512, generator=gen)), None)
    blocks = pack_fp8(*quantize_fp8(torch.randn(256, 512, generator=gen), block=128), block=128)
    x = torch.randn(8, 512, generator=gen).to(torch.bfloat16)
    q, s = quantize_fp8_rows(x, 512)   # s [8, 1]
    qb, sb = quantize_fp8_rows(x)      # sb [8, 4]
    for bad_q, bad_s, what in ((q.float(), s, "float8_e4m3fn"), (q, s[:4], r"\[rows, 1\] or \[rows, 4\]"),
                               (q, s.double(), "f32"), (q, sb[:, :3], r"\[rows, 4\]"),
                               (torch.cat([q] * 3), torch.cat([s] * 3), "1 to 16 rows"),
                               (q[:, :496].contiguous(), s, "512")):
        with pytest.raises(LinearInputError, match=what):
            fp8_gemv(bad_q, bad_s, qw)
    with pytest.raises(LinearInputError, match="128 x 128 blocks need"):
        fp8_gemv(q, s, blocks)
    with pytest.raises(LinearInputError, match="gated must be one of"):
        fp8_gemv(q, s, qw, gated="relu")
    with pytest.raises(LinearInputError, match="sm_89"):
        fp8_gemv(qb, sb, blocks)
    with pytest.raises(LinearInputError, match="sm_89"):
        fp8_gemv(q, s, qw)


def test_fp8_x_first_switch(monkeypatch):
    """LAYERFORGE_FP8_QUANT_X_FIRST: on by default (measured faster), off with 0; a misspelt value is an error;
    on the CPU the W8A8 layers' torch routes are taken either way, with the same results."""
    from layerforge.runtime.quant import fp8_linear_per_token, fp8_x_first_default, gemv_quant
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST", raising=False)
    assert fp8_x_first_default() is True
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "0")
    assert fp8_x_first_default() is False
    gen = seeded_generator("fp8-x-first-switch")
    qw = pack_fp8(*quantize_fp8(torch.randn(64, 256, generator=gen)), None)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    off = fp8_linear_per_token(x, qw), gemv_quant(x, qw, gated="silu")
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1")
    assert fp8_x_first_default() is True
    assert torch.equal(fp8_linear_per_token(x, qw), off[0]) and torch.equal(gemv_quant(x, qw, gated="silu"), off[1])
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "sure")
    with pytest.raises(ValueError, match="LAYERFORGE_FP8_QUANT_X_FIRST"):
        fp8_x_first_default()


def test_fp8_x_first_by_rows(monkeypatch):
    """Unset, the switch leaves gemv_quant's calls of up to FP8_REGISTER_MAX_ROWS rows to the in-register kernel and
    the per-token layer's (rows None) to x first at every count; set, it decides every call."""
    from layerforge.runtime import quant
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST", raising=False)
    monkeypatch.setattr(quant, "FP8_REGISTER_MAX_ROWS", 8)
    assert [quant.fp8_x_first_default(r) for r in (1, 8, 9, 16, None)] == [False, False, True, True, True]
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1")
    assert all(quant.fp8_x_first_default(r) for r in (1, 8, 16, None))
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "0")
    assert not any(quant.fp8_x_first_default(r) for r in (1, 8, 16, None))
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST")
    monkeypatch.setattr(quant, "FP8_REGISTER_MAX_ROWS", 0)
    assert all(quant.fp8_x_first_default(r) for r in (1, 16, None))


@pytest.mark.parametrize("per_token", [False, True])
def test_x_first_routes_hand_the_kernel_its_operands(monkeypatch, per_token):
    """The x-first routes' plumbing on the CPU (LAYERFORGE_FP8_QUANT_X_FIRST=1, the GPU checks faked, the row
    quantiser and fp8_gemv replaced by torch stand-ins of their meaning): gemv_quant's W8A8 (x [2, 3, K] with bias,
    gate and residual, into a given out) and fp8_linear_per_token hand fp8_gemv x's rows quantised per 128 k / per
    token, the residual as rows, and give the torch route's result in the caller's shapes."""
    from layerforge.runtime import quant
    gen = seeded_generator("fp8-x-first-plumbing", per_token)
    n, k = 64, 384
    qw = pack_fp8(*quantize_fp8(torch.randn(n, k, generator=gen) / k ** 0.5), None)
    x = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    res = torch.randn(2, 3, n // 2, generator=gen).to(torch.bfloat16)
    want = (quant.fp8_linear_per_token(x, qw) if per_token else
            quant.gemv_quant(x, qw, bias, gated="silu", residual=res))   # the torch routes (no GPU)
    calls = []

    def fake_rows(x2, cache=None, group=quant.FP8_BLOCK):
        calls.append(("quantise", tuple(x2.shape), group))
        return quantize_fp8_rows(x2, group or x2.shape[-1])

    def fake_gemv(q, xscale, qw_, bias=None, *, gated=None, residual=None, out=None, cache=None):
        calls.append(("gemv", tuple(q.shape), tuple(xscale.shape), gated, None if residual is None else
                      tuple(residual.shape), out is not None))
        group = q.shape[1] if xscale.shape[1] == 1 else quant.FP8_BLOCK
        y = dequantize_fp8_rows(q, xscale, group).float() @ dequantize(qw_).float().T
        if bias is not None:
            y = y + bias.float()
        if gated:
            g, up = y.chunk(2, -1)
            y = torch.nn.functional.silu(g) * up
        if residual is not None:
            y = y + residual.float()
        y = y.to(qw_.dtype)
        return y if out is None else out.copy_(y)

    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1")
    monkeypatch.setattr(quant, "_gpu_ok", lambda x_, qw_: True)
    monkeypatch.setattr(quant, "quantize_fp8_rows_cuda", fake_rows)
    monkeypatch.setattr(quant, "fp8_gemv", fake_gemv)
    if per_token:
        got = quant.fp8_linear_per_token(x, qw)
        assert calls == [("quantise", (6, k), 0), ("gemv", (6, k), (6, 1), None, None, False)]
        assert got.shape == (2, 3, n)
    else:
        out = torch.full((2, 3, n // 2), float("nan"), dtype=torch.bfloat16)
        got = quant.gemv_quant(x, qw, bias, gated="silu", residual=res, out=out)
        assert got is out
        assert calls == [("quantise", (6, k), quant.FP8_BLOCK), ("gemv", (6, k), (6, 3), "silu", (6, n // 2), True)]
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def test_switch_set_sets_and_restores_the_switch(monkeypatch):
    """codegen.plan.switch_set (the tuner's and the benchmarks' A / B of a switch): the value inside the block, the
    environment as it was after, an earlier value kept, an error inside the block restoring it too; None leaves the
    switch alone."""
    import os

    from layerforge.codegen.plan import switch_set
    from layerforge.runtime.quant import fp8_x_first_default
    name = "LAYERFORGE_FP8_QUANT_X_FIRST"
    monkeypatch.delenv(name, raising=False)
    with switch_set(name, False):
        assert fp8_x_first_default(16) is False
    assert name not in os.environ
    monkeypatch.setenv(name, "1")
    with pytest.raises(RuntimeError):
        with switch_set(name, False):
            assert os.environ[name] == "0"
            raise RuntimeError
    assert os.environ[name] == "1"
    with switch_set(name, None):
        assert os.environ[name] == "1"
    assert os.environ[name] == "1"
