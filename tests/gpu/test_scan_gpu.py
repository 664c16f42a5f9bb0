"""The scan kernels (codegen/scan.py through runtime/scan.py) against the float64 references on
fresh random inputs, the memory the outputs will take poisoned with NaN first: the causal conv
(K 2..4, bias, SiLU, states in and out) and its decode update, the selective scan (lengths of
8192 and off the 1024-step chunks, bf16 / f16 / f32, states in and out, channels whose state
barely decays so a chunk's carry shows) and the decode state update (N on and off the 16-byte
path); prefill then decode steps equal a longer prefill; the decode kernels under CUDA graph
capture; the errors raised before a launch."""
import pytest
import torch

from layerforge.runtime.scan import (ScanInputError, causal_conv1d, causal_conv1d_channels_last,
                                     causal_conv1d_reference, causal_conv1d_update,
                                     causal_conv1d_update_reference, selective_scan, selective_scan_reference,
                                     selective_state_update, selective_state_update_reference)

from ..devices import requires_gpu
from ..seeding import seeded_generator

pytestmark = [pytest.mark.gpu, requires_gpu]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# relative to an element and, as an absolute floor, to the output's largest magnitude (a long scan's
# slowly decaying states grow well past 1; an f32 state rounds once a step)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5}
F64 = torch.float64


def poison(*like: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Fill and free blocks of the outputs' sizes, so the caching allocator hands the kernels
    NaN-filled memory for their torch.empty outputs: an element a kernel skips stays NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in like]
    torch.cuda.synchronize()
    del blocks


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert not torch.isnan(got).any(), f"{what}: NaN in the kernel's output"
    tol = TOL[dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.to(F64), want.to(F64), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def draw(gen, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).cuda()


# ---- causal conv ---------------------------------------------------------------------------------
CONV_CASES = [  # (batch, channels, length, K)
    (1, 64, 8192, 4), (2, 96, 1, 4), (2, 96, 3, 4), (3, 40, 511, 2), (2, 64, 513, 3), (1, 128, 3000, 4)]


def conv_params(gen, b, d, k, dtype, full: bool):
    """(weight, bias, initial state, activation): f32 taps, a bias, a state and SiLU (full), or
    taps in the input dtype and nothing else."""
    w = draw(gen, d, k, dtype=torch.float32 if full else dtype, scale=0.5)
    if not full:
        return w, None, None, None
    return w, draw(gen, d, dtype=dtype), draw(gen, b, d, k - 1, dtype=dtype), "silu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d,length,k", CONV_CASES)
@pytest.mark.parametrize("options", ["silu_bias_states", "plain"])
def test_conv_matches_reference(b, d, length, k, dtype, options):
    gen = seeded_generator("scan_conv", b, d, length, k, dtype, options)
    full = options == "silu_bias_states"
    x = draw(gen, b, d, length, dtype=dtype)
    w, bias, s0, act = conv_params(gen, b, d, k, dtype, full)
    poison(((b, d, length), dtype), ((b, d, k - 1), dtype))
    y, s = causal_conv1d(x, w, bias, activation=act, initial_state=s0, return_final_state=True)
    want_y, want_s = causal_conv1d_reference(x, w, bias, activation=act, initial_state=s0, return_final_state=True)
    close(y, want_y, dtype, "y")
    assert torch.equal(s, want_s), "the final state is the last K - 1 inputs, copied exactly"


CL_CASES = [  # (batch, channels, length, K, columns of the wider row x is a slice of, its first column)
    (1, 5376, 8192, 4, 10576, 5120),   # Mamba2-2.7B's xBC inside in_proj's output: 16-byte vectors
    (8, 5376, 2048, 4, 10576, 5120),
    (2, 96, 1, 4, 96, 0), (2, 96, 3, 2, 200, 8), (3, 40, 130, 3, 40, 0),
    (2, 101, 77, 4, 130, 3),          # odd channels, unaligned start: one channel a thread
    (2, 64, 300, 4, 70, 2)]           # 16-byte multiple of channels, unaligned rows: one a thread


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d,length,k,cols,first", CL_CASES)
@pytest.mark.parametrize("options", ["silu_bias_states", "plain"])
def test_channels_last_conv_matches_reference(b, d, length, k, cols, first, dtype, options):
    """x [B, L, D] read in place as a column slice of a wider row; y [B, L, D] contiguous."""
    gen = seeded_generator("scan_conv_cl", b, d, length, k, dtype, options)
    full = options == "silu_bias_states"
    x = draw(gen, b, length, cols, dtype=dtype)[..., first:first + d]
    w, bias, s0, act = conv_params(gen, b, d, k, dtype, full)
    poison(((b, length, d), dtype), ((b, d, k - 1), dtype))
    y, s = causal_conv1d_channels_last(x, w, bias, activation=act, initial_state=s0, return_final_state=True)
    want_y, want_s = causal_conv1d_reference(x.transpose(1, 2), w, bias, activation=act, initial_state=s0,
                                             return_final_state=True)
    assert y.shape == (b, length, d) and y.is_contiguous() and y.dtype == dtype
    close(y, want_y.transpose(1, 2), dtype, "channels-last y")
    assert torch.equal(s, want_s), "the final state is the last K - 1 inputs, copied exactly"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("state_f32", [False, True])
def test_conv_update_matches_reference(dtype, state_f32):
    gen = seeded_generator("scan_conv_update", dtype, state_f32)
    b, d, k = 64, 320, 4
    x, w, bias = draw(gen, b, d, dtype=dtype), draw(gen, d, k, dtype=dtype, scale=0.5), draw(gen, d, dtype=dtype)
    state = draw(gen, b, d, k, dtype=torch.float32 if state_f32 else dtype)
    want_state = state.clone()
    want = causal_conv1d_update_reference(x, want_state, w, bias)
    poison(((b, d), dtype))
    y = causal_conv1d_update(x, state, w, bias)
    close(y, want, dtype, "y")
    assert torch.equal(state, want_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_conv_prefill_then_updates_equal_longer_prefill(dtype):
    gen = seeded_generator("scan_conv_chain", dtype)
    b, d, k, length, steps = 2, 128, 4, 1000, 16
    x, w, bias = draw(gen, b, d, length + steps, dtype=dtype), draw(gen, d, k, dtype=dtype), draw(gen, d, dtype=dtype)
    whole = causal_conv1d(x, w, bias)
    _, s = causal_conv1d(x[..., :length].contiguous(), w, bias, return_final_state=True)
    state = torch.cat([torch.zeros(b, d, 1, dtype=dtype, device="cuda"), s], -1)
    ys = [causal_conv1d_update(x[..., t].contiguous(), state, w, bias) for t in range(length, length + steps)]
    assert torch.equal(torch.stack(ys, -1), whole[..., length:]), "the same f32 sums in the same order"


# ---- selective scan ------------------------------------------------------------------------------
def scan_inputs(gen, b, d, n, length, dtype, *, params=torch.float32):
    u = draw(gen, b, d, length, dtype=dtype)
    delta = draw(gen, b, d, length, dtype=dtype, scale=0.5, shift=-1.0)
    A = -torch.exp(torch.rand(d, n, generator=gen) * 3.0 - 2.0)
    A[: d // 4] = -1e-3 * torch.arange(1, n + 1)   # a quarter of the channels barely decay: the carry shows
    A = A.to(params).cuda()
    B, C = draw(gen, b, n, length, dtype=dtype), draw(gen, b, n, length, dtype=dtype)
    D, z = draw(gen, d, dtype=params), draw(gen, b, d, length, dtype=dtype)
    bias = draw(gen, d, dtype=params, scale=0.1)
    return u, delta, A, B, C, D, z, bias


SCAN_CASES = [  # (batch, channels, N, length)
    (1, 64, 16, 8192), (2, 32, 16, 1), (2, 32, 16, 7), (2, 32, 16, 200), (2, 32, 16, 400), (2, 48, 16, 1023),
    (2, 48, 16, 1025), (1, 40, 5, 3000)]   # 200 and 400: chunks of 256 and 512 steps (codegen/scan.scan_tiles)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,d,n,length", SCAN_CASES)
def test_selective_scan_matches_reference(b, d, n, length, dtype):
    gen = seeded_generator("selective_scan", b, d, n, length, dtype)
    args = scan_inputs(gen, b, d, n, length, dtype)
    h0 = torch.randn(b, d, n, generator=gen).cuda()
    poison(((b, d, length), dtype), ((b, d, n), torch.float32))
    y, h = selective_scan(*args, initial_state=h0, return_final_state=True)
    want_y, want_h = selective_scan_reference(*args, initial_state=h0, return_final_state=True)
    close(y, want_y, dtype, "y")
    assert h.dtype == torch.float32
    close(h, want_h, torch.float32, "final state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_selective_scan_without_options(dtype):
    """No D, z, Δ bias or softplus; A, D in the input dtype; no states."""
    gen = seeded_generator("selective_scan_plain", dtype)
    u, delta, A, B, C, _, _, _ = scan_inputs(gen, 2, 64, 16, 2500, dtype, params=dtype)
    delta = torch.nn.functional.softplus(delta.float()).to(dtype)   # a positive step without the kernel's softplus
    poison(((2, 64, 2500), dtype))
    y = selective_scan(u, delta, A, B, C, delta_softplus=False)
    close(y, selective_scan_reference(u, delta, A, B, C, delta_softplus=False), dtype, "y")


@pytest.mark.parametrize("split", [1, 1024, 1500])
def test_scan_state_carries_between_calls(split):
    gen = seeded_generator("selective_scan_split", split)
    u, delta, A, B, C, D, z, bias = scan_inputs(gen, 2, 64, 16, 3000, torch.float32)
    whole, last = selective_scan(u, delta, A, B, C, D, z, bias, return_final_state=True)
    cut = [t[..., :split].contiguous() for t in (u, delta, B, C, z)]
    rest = [t[..., split:].contiguous() for t in (u, delta, B, C, z)]
    y1, h = selective_scan(cut[0], cut[1], A, cut[2], cut[3], D, cut[4], bias, return_final_state=True)
    y2, h = selective_scan(rest[0], rest[1], A, rest[2], rest[3], D, rest[4], bias, initial_state=h,
                           return_final_state=True)
    close(torch.cat([y1, y2], -1), whole, torch.float32, "y")
    close(h, last, torch.float32, "final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [16, 5, 64])
def test_state_update_matches_reference(dtype, n):
    gen = seeded_generator("selective_state_update", dtype, n)
    b, d = 64, 160
    u, delta, A, B, C, D, z, bias = scan_inputs(gen, b, d, n, 1, dtype)
    x, dt, B, C, z = (t[..., 0].contiguous() for t in (u, delta, B, C, z))
    state = torch.randn(b, d, n, generator=gen).cuda()
    want_state = state.clone()
    want = selective_state_update_reference(want_state, x, dt, A, B, C, D, z, bias)
    poison(((b, d), dtype))
    y = selective_state_update(state, x, dt, A, B, C, D, z, bias)
    close(y, want, dtype, "y")
    close(state, want_state, torch.float32, "state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_prefill_then_16_decode_steps_equal_a_longer_prefill(dtype):
    gen = seeded_generator("scan_chain", dtype)
    b, d, n, length, steps = 2, 64, 16, 1100, 16
    u, delta, A, B, C, D, z, bias = scan_inputs(gen, b, d, n, length + steps, dtype)
    whole, last = selective_scan(u, delta, A, B, C, D, z, bias, return_final_state=True)
    cut = [t[..., :length].contiguous() for t in (u, delta, B, C, z)]
    _, state = selective_scan(cut[0], cut[1], A, cut[2], cut[3], D, cut[4], bias, return_final_state=True)
    ys = [selective_state_update(state, *(t[..., i].contiguous() for t in (u, delta)), A, B[..., i].contiguous(),
                                 C[..., i].contiguous(), D, z[..., i].contiguous(), bias)
          for i in range(length, length + steps)]
    close(torch.stack(ys, -1), whole[..., length:], dtype, "decoded y")
    close(state, last, torch.float32, "state")


def test_decode_kernels_replay_under_graph_capture():
    gen = seeded_generator("scan_graph")
    b, d, n, k = 8, 128, 16, 4
    x, w, cb = draw(gen, b, d, dtype=torch.bfloat16), draw(gen, d, k, dtype=torch.bfloat16), draw(gen, d)
    u, delta, A, B, C, D, z, bias = scan_inputs(gen, b, d, n, 1, torch.bfloat16)
    dt, B, C, z = (t[..., 0].contiguous() for t in (delta, B, C, z))
    conv, ssm = draw(gen, b, d, k, dtype=torch.bfloat16), torch.randn(b, d, n, generator=gen).cuda()
    conv0, ssm0 = conv.clone(), ssm.clone()
    want = selective_state_update(ssm0.clone(), causal_conv1d_update(x, conv0.clone(), w, cb), dt, A, B, C, D, z, bias)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        y = selective_state_update(ssm, causal_conv1d_update(x, conv, w, cb), dt, A, B, C, D, z, bias)
    torch.cuda.current_stream().wait_stream(stream)
    conv.copy_(conv0)
    ssm.copy_(ssm0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)


# ---- errors before a launch ----------------------------------------------------------------------
def test_errors_before_launch():
    x = torch.randn(2, 8, 16, device="cuda")
    with pytest.raises(ScanInputError, match="float64 runs on the CPU only"):
        causal_conv1d(x.double(), torch.randn(8, 4, device="cuda", dtype=F64))
    with pytest.raises(ScanInputError, match="'weight' is on cpu"):
        causal_conv1d(x, torch.randn(8, 4))
    state = torch.zeros(2 * 8 * 16 + 1, device="cuda")[1:].view(2, 8, 16)   # 4 bytes off a 16-byte boundary
    args = [torch.randn(2, 8, device="cuda") for _ in range(2)]
    with pytest.raises(ScanInputError, match="16-byte boundary"):
        selective_state_update(state, *args, -torch.rand(8, 16, device="cuda"), torch.randn(2, 16, device="cuda"),
                               torch.randn(2, 16, device="cuda"))
