"""runtime/scan.py on the CPU (the references behind the API): the convolution against torch's
grouped conv1d, the selective scan against a plain step-by-step loop written here (transformers'
MambaMixer slow path, restated), state carried across any split of the sequence (prefill of L
then n decode steps equals a prefill of L + n, for the conv and the SSM state), the in-place
updates, and the input errors raised before anything runs."""
import pytest
import torch
import torch.nn.functional as F

from layerforge.runtime.scan import (ScanInputError, causal_conv1d, causal_conv1d_channels_last, causal_conv1d_update,
                                     selective_scan,
                                     selective_state_update)

F64 = torch.float64


def conv_inputs(b=2, d=6, length=11, k=4, dtype=F64):
    return torch.randn(b, d, length, dtype=dtype), torch.randn(d, k, dtype=dtype), torch.randn(d, dtype=dtype)


def scan_inputs(b=2, d=5, n=3, length=13, dtype=F64):
    u = torch.randn(b, d, length, dtype=dtype)
    delta = torch.randn(b, d, length, dtype=dtype) * 0.5
    A = -torch.exp(torch.randn(d, n, dtype=F64) * 0.5).to(dtype)
    B = torch.randn(b, n, length, dtype=dtype)
    C = torch.randn(b, n, length, dtype=dtype)
    D = torch.randn(d, dtype=dtype)
    z = torch.randn(b, d, length, dtype=dtype)
    bias = torch.randn(d, dtype=dtype) * 0.1
    return u, delta, A, B, C, D, z, bias


def loop_scan(u, delta, A, B, C, D, z, bias, h=None, softplus=True):
    """Mamba's recurrence one step at a time (as transformers' MambaMixer.slow_forward reads)."""
    b, d, length = u.shape
    dt = delta + bias[:, None] if bias is not None else delta
    dt = F.softplus(dt) if softplus else dt
    h = torch.zeros(b, d, A.shape[1], dtype=F64) if h is None else h.to(F64).clone()
    ys = []
    for t in range(length):
        h = torch.exp(A[None] * dt[:, :, t, None]) * h + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    y = y + u * D[:, None] if D is not None else y
    return (y * F.silu(z) if z is not None else y), h


# ---- causal conv -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_matches_grouped_conv1d(k, activation):
    x, w, bias = conv_inputs(k=k)
    want = F.conv1d(x, w[:, None, :], bias, padding=k - 1, groups=x.shape[1])[..., :x.shape[-1]]
    want = F.silu(want) if activation else want
    torch.testing.assert_close(causal_conv1d(x, w, bias, activation=activation), want, rtol=1e-12, atol=1e-12)


def test_conv_without_bias_and_final_state_is_last_inputs():
    x, w, _ = conv_inputs(length=9, k=4)
    y, state = causal_conv1d(x, w, None, activation=None, return_final_state=True)
    torch.testing.assert_close(y, F.conv1d(x, w[:, None, :], padding=3, groups=6)[..., :9])
    assert torch.equal(state, x[..., -3:])


def test_conv_short_sequence_state_keeps_older_inputs():
    x, w, bias = conv_inputs(length=1, k=4)
    s0 = torch.randn(2, 6, 3, dtype=F64)
    _, state = causal_conv1d(x, w, bias, initial_state=s0, return_final_state=True)
    assert torch.equal(state, torch.cat([s0[..., 1:], x], -1))


@pytest.mark.parametrize("split", [0, 1, 2, 5, 11])
def test_conv_state_carries_across_any_split(split):
    x, w, bias = conv_inputs(length=11, k=4)
    whole, last = causal_conv1d(x, w, bias, return_final_state=True)
    y1, s1 = causal_conv1d(x[..., :split].contiguous(), w, bias, return_final_state=True)
    y2, s2 = causal_conv1d(x[..., split:].contiguous(), w, bias, initial_state=s1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(s2, last)


@pytest.mark.parametrize("k", [2, 4])
def test_conv_prefill_then_updates_equal_longer_prefill(k):
    x, w, bias = conv_inputs(length=12, k=k)
    whole = causal_conv1d(x, w, bias)
    y, s = causal_conv1d(x[..., :8].contiguous(), w, bias, return_final_state=True)
    conv_state = torch.cat([torch.zeros(2, 6, 1, dtype=F64), s], -1)   # width K: the cache's layout
    steps = [causal_conv1d_update(x[..., t].contiguous(), conv_state, w, bias) for t in range(8, 12)]
    torch.testing.assert_close(torch.stack(steps, -1), whole[..., 8:], rtol=1e-12, atol=1e-12)
    assert torch.equal(conv_state, x[..., 12 - k:])   # in place, newest last


def test_conv_half_inputs_round_once():
    x, w, bias = conv_inputs(k=3, dtype=torch.bfloat16)
    want = F.silu(F.conv1d(x.double(), w.double()[:, None, :], bias.double(), padding=2, groups=6)[..., :11])
    got = causal_conv1d(x, w, bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.to(torch.bfloat16).double(), rtol=0, atol=0)


# ---- selective scan ----------------------------------------------------------------------------
def test_scan_matches_step_loop():
    args = scan_inputs()
    y, h = selective_scan(*args, return_final_state=True)
    want_y, want_h = loop_scan(*args)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    assert h.dtype == F64   # float64 inputs (the CPU only): a float64 state
    torch.testing.assert_close(h, want_h, rtol=1e-12, atol=1e-12)


def test_scan_without_optional_inputs():
    u, delta, A, B, C, *_ = scan_inputs()
    y = selective_scan(u, delta, A, B, C, delta_softplus=False)
    want, _ = loop_scan(u, delta, A, B, C, None, None, None, softplus=False)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_scan_initial_state():
    args = scan_inputs()
    h0 = torch.randn(2, 5, 3, dtype=F64)
    y, h = selective_scan(*args, initial_state=h0, return_final_state=True)
    want_y, want_h = loop_scan(*args, h=h0)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, want_h, rtol=1e-12, atol=1e-12)


def _cut(t, a, b):
    return t[..., a:b].contiguous()


@pytest.mark.parametrize("split", [0, 1, 7, 13])
def test_scan_state_carries_across_any_split(split):
    u, delta, A, B, C, D, z, bias = scan_inputs()
    whole, last = selective_scan(u, delta, A, B, C, D, z, bias, return_final_state=True)
    parts, h = [], None
    for a, b in ((0, split), (split, 13)):
        y, h = selective_scan(*(_cut(t, a, b) for t in (u, delta)), A, _cut(B, a, b), _cut(C, a, b), D,
                              _cut(z, a, b), bias, initial_state=h, return_final_state=True)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, last, rtol=1e-12, atol=1e-12)


def test_scan_prefill_then_updates_equal_longer_prefill():
    u, delta, A, B, C, D, z, bias = scan_inputs(length=12)
    whole = selective_scan(u, delta, A, B, C, D, z, bias)
    _, state = selective_scan(*(_cut(t, 0, 8) for t in (u, delta)), A, _cut(B, 0, 8), _cut(C, 0, 8), D,
                              _cut(z, 0, 8), bias, return_final_state=True)
    ptr = state.data_ptr()
    steps = [selective_state_update(state, *(t[..., i].contiguous() for t in (u, delta)), A, B[..., i].contiguous(),
                                    C[..., i].contiguous(), D, z[..., i].contiguous(), bias) for i in range(8, 12)]
    assert state.data_ptr() == ptr
    torch.testing.assert_close(torch.stack(steps, -1), whole[..., 8:], rtol=1e-12, atol=1e-12)
    _, want_h = loop_scan(u, delta, A, B, C, D, z, bias)
    torch.testing.assert_close(state, want_h, rtol=1e-12, atol=1e-12)


def test_f32_inputs_carry_an_f32_state_across_prefill_and_updates():
    u, delta, A, B, C, D, z, bias = scan_inputs(length=10, dtype=torch.float32)
    whole = selective_scan(u, delta, A, B, C, D, z, bias)
    _, state = selective_scan(*(_cut(t, 0, 7) for t in (u, delta)), A, _cut(B, 0, 7), _cut(C, 0, 7), D,
                              _cut(z, 0, 7), bias, return_final_state=True)
    assert state.dtype == torch.float32
    steps = [selective_state_update(state, *(t[..., i].contiguous() for t in (u, delta)), A, B[..., i].contiguous(),
                                    C[..., i].contiguous(), D, z[..., i].contiguous(), bias) for i in range(7, 10)]
    torch.testing.assert_close(torch.stack(steps, -1), whole[..., 7:], rtol=1e-5, atol=1e-5)


def test_scan_bf16_inputs_f32_state():
    u, delta, A, B, C, D, z, bias = scan_inputs(dtype=torch.bfloat16)
    A, D, bias = A.float(), D.float(), bias.float()   # parameters may stay f32 beside bf16 activations
    y, h = selective_scan(u, delta, A, B, C, D, z, bias, return_final_state=True)
    want_y, want_h = loop_scan(*(t.double() for t in (u, delta, A, B, C, D, z, bias)))
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y.double(), want_y.to(torch.bfloat16).double(), rtol=0, atol=0)


# ---- errors ----------------------------------------------------------------------------------
def test_channels_last_conv_is_the_conv_of_the_transpose():
    """x [B, L, D] as a column slice of a wider row: y [B, L, D] contiguous, the same final state."""
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(2, 33, 20, generator=g)
    x = wide[..., 3:15]
    w, b, s0 = torch.randn(12, 4, generator=g), torch.randn(12, generator=g), torch.randn(2, 12, 3, generator=g)
    y, s = causal_conv1d_channels_last(x, w, b, initial_state=s0, return_final_state=True)
    want_y, want_s = causal_conv1d(x.transpose(1, 2).contiguous(), w, b, initial_state=s0, return_final_state=True)
    assert y.shape == (2, 33, 12) and y.is_contiguous()
    torch.testing.assert_close(y, want_y.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    with pytest.raises(ScanInputError, match="channels adjacent"):
        causal_conv1d_channels_last(x[:, :, ::2], w[:6])


def test_conv_errors():
    x, w, bias = conv_inputs(k=4, dtype=torch.float32)
    with pytest.raises(ScanInputError, match="K must be one of"):
        causal_conv1d(x, torch.randn(6, 5), bias)
    with pytest.raises(ScanInputError, match=r"'weight' must have shape \[6, 4\]"):
        causal_conv1d(x, torch.randn(5, 4), bias)
    with pytest.raises(ScanInputError, match="'x' must be bfloat16, float16 or float32"):
        causal_conv1d(x.int(), w, bias)
    with pytest.raises(ScanInputError, match="'x' must have 3 dimensions"):
        causal_conv1d(x[0], w, bias)
    with pytest.raises(ScanInputError, match="contiguous"):
        causal_conv1d(x.transpose(0, 1), w, bias)
    with pytest.raises(ScanInputError, match=r"'initial_state' must have shape \[2, 6, 3\]"):
        causal_conv1d(x, w, bias, initial_state=torch.zeros(2, 6, 4))
    with pytest.raises(ScanInputError, match="activation"):
        causal_conv1d(x, w, bias, activation="gelu")
    with pytest.raises(ScanInputError, match="'bias' must be torch.float32"):
        causal_conv1d(x, w, bias.double())
    with pytest.raises(ScanInputError, match=r"'conv_state' must have shape \[2, 6, 4\]"):
        causal_conv1d_update(x[..., 0].contiguous(), torch.zeros(2, 6, 3), w, bias)


def test_scan_errors():
    u, delta, A, B, C, D, z, bias = scan_inputs(dtype=torch.float32)
    with pytest.raises(ScanInputError, match=r"'B' must have shape \[2, 3, 13\]"):
        selective_scan(u, delta, A, B[..., :12], C, D, z, bias)
    with pytest.raises(ScanInputError, match=r"'A' must be a \[D, N\] tensor with D = 5"):
        selective_scan(u, delta, A[:4], B, C)
    with pytest.raises(ScanInputError, match="'delta' must be torch.float32"):
        selective_scan(u, delta.half(), A, B, C)
    with pytest.raises(ScanInputError, match="'initial_state' must be torch.float32"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 5, 3, dtype=F64))
    with pytest.raises(ScanInputError, match=r"'z' must have shape \[2, 5, 13\]"):
        selective_scan(u, delta, A, B, C, D, z[:1])
    state = torch.zeros(2, 5, 3)
    with pytest.raises(ScanInputError, match=r"'B' must have shape \[2, 3\]"):
        selective_state_update(state, u[..., 0].contiguous(), delta[..., 0].contiguous(), A, B, C[..., 0].contiguous())
    with pytest.raises(ScanInputError, match="'state' must be torch.float32"):
        selective_state_update(state.half(), u[..., 0].contiguous(), delta[..., 0].contiguous(), A,
                               B[..., 0].contiguous(), C[..., 0].contiguous())
