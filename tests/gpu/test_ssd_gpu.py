"""Mamba2's SSD kernels (codegen/ssd.py through runtime/ssd.py) on the GPU against the float64
reference (runtime/ssd.py's chunked form, itself checked against transformers and a token-by-token
recurrence on the CPU): the chunked scan at L = 8192 and at lengths that end mid-chunk, bf16 / f16
(tensor cores) and f32 (CUDA cores), from a carried state and returning the final one, with and
without D, z and dt_bias; inputs as strided splits of one row, as the mixer passes them; the
decode step at batch 64 with the state in place; prefill then 16 steps against one longer
prefill; the gated norm's row kernel; CUDA-graph capture of a decode step; outputs poisoned
(NaN) first, through out= and through the caching allocator for the workspaces."""
import math

import pytest
import torch

from layerforge.runtime.ssd import (SSDInputError, gated_rms_norm, gated_rms_norm_reference, ssd_scan,
                                    ssd_scan_reference, ssd_state_update, ssd_state_update_reference)

from ..devices import requires_gpu
from ..runtime.test_ssd import ssd_inputs

pytestmark = [pytest.mark.gpu, requires_gpu]

# Relative to the largest reference value: bf16 / f16 operands of the tensor-core products (x
# scaled by the step, the masked scores and the carried start state are rounded to the input
# dtype, as the published kernels do) against float32 sums on CUDA cores.
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}
BIG = dict(heads=80, head_dim=64, groups=1, state=128)   # Mamba2-2.7B


def poison_allocator(nbytes: int = 1 << 30) -> None:
    """Fill the caching allocator's free blocks with NaN, so workspaces and outputs the call
    allocates start as NaN: an element a kernel fails to write shows as NaN."""
    big = torch.full((nbytes // 4,), math.nan, device="cuda")
    small = [torch.full((1 << 16,), math.nan, device="cuda") for _ in range(64)]
    del big, small


def assert_near(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert not torch.isnan(got).any(), f"{what}: NaN in the kernel's output"
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3e} against {tol:.0e} x {scale:.3e}"


def f64(tensors):
    """float64 copies (the same values: every input dtype is exact in float64)."""
    return [t.double() for t in tensors]


def case(bt, length, dims, dtype, seed, *, state=True):
    return ssd_inputs(bt, length, dims["heads"], dims["head_dim"], dims["groups"], dims["state"], dtype=dtype,
                      seed=seed, device="cuda", state=state)


def run_scan(inp, chunk, **kw):
    x = inp["x"]
    out = torch.full_like(x, math.nan)
    poison_allocator()
    y, final = ssd_scan(**inp, chunk_size=chunk, return_final_state=True, out=out, **kw)
    torch.cuda.synchronize()
    assert y is out
    ref_y, ref_final = ssd_scan_reference(**dict(zip(inp, f64(inp.values()))), chunk_size=chunk,
                                          return_final_state=True, **kw)
    return y, final, ref_y, ref_final


# ---- the chunked scan --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scan_at_8192_tokens_matches_float64(dtype):
    dims = dict(heads=16, head_dim=64, groups=2, state=128)
    inp = case(1, 8192, dims, dtype, ("long",))
    y, final, ref_y, ref_final = run_scan(inp, 256)
    assert final.dtype == torch.float32 and y.dtype == dtype
    assert_near(y, ref_y, TOL[dtype], "y")
    assert_near(final, ref_final, TOL[dtype], "final state")


@pytest.mark.parametrize("length", [1, 77, 256, 300, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scan_lengths_that_end_mid_chunk(length, dtype):
    dims = dict(heads=8, head_dim=64, groups=2, state=64)
    inp = case(2, length, dims, dtype, ("lengths",))
    y, final, ref_y, ref_final = run_scan(inp, 256)
    assert_near(y, ref_y, TOL[dtype], "y")
    assert_near(final, ref_final, TOL[dtype], "final state")


@pytest.mark.parametrize("options", ["none", "D", "z", "bias", "all", "limit"])
def test_scan_options(options):
    dims = dict(heads=4, head_dim=32, groups=4, state=32)
    inp = case(2, 200, dims, torch.bfloat16, ("options", options), state=options in ("all", "limit"))
    kw = {}
    if options == "none":
        inp = {k: v for k, v in inp.items() if k not in ("D", "z", "dt_bias")}
        inp["dt"] = inp["dt"].abs() * 0.05
        kw["dt_softplus"] = False
    elif options in ("D", "z", "bias"):
        keep = {"D": "D", "z": "z", "bias": "dt_bias"}[options]
        inp = {k: v for k, v in inp.items() if k not in {"D", "z", "dt_bias"} - {keep}}
    elif options == "limit":
        kw["dt_limit"] = (0.01, 0.03)
    y, final, ref_y, ref_final = run_scan(inp, 64, **kw)
    assert_near(y, ref_y, TOL[torch.bfloat16], f"y ({options})")
    assert_near(final, ref_final, TOL[torch.bfloat16], f"final state ({options})")


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_scan_small_chunks_and_one_warp_tiles(chunk):
    dims = dict(heads=8, head_dim=16, groups=2, state=16)
    inp = case(3, 333, dims, torch.bfloat16, ("chunks", chunk))
    y, final, ref_y, ref_final = run_scan(inp, chunk)
    assert_near(y, ref_y, TOL[torch.bfloat16], "y")
    assert_near(final, ref_final, TOL[torch.bfloat16], "final state")


def test_scan_at_mamba2_2p7b_dims_batch_8():
    inp = case(8, 2048 + 5, BIG, torch.bfloat16, ("big",))
    y, final, ref_y, ref_final = run_scan(inp, 256)
    assert_near(y, ref_y, TOL[torch.bfloat16], "y")
    assert_near(final, ref_final, TOL[torch.bfloat16], "final state")


@pytest.mark.parametrize("bt,length,dims,dtype,chunk", [
    (1, 8192, dict(heads=16, head_dim=64, groups=2, state=128), torch.bfloat16, 256),
    (2, 300, dict(heads=8, head_dim=64, groups=2, state=64), torch.float16, 256),
    (2, 77, dict(heads=8, head_dim=64, groups=2, state=64), torch.bfloat16, 256),
    (3, 333, dict(heads=8, head_dim=16, groups=2, state=16), torch.bfloat16, 16),
    (3, 333, dict(heads=8, head_dim=16, groups=2, state=16), torch.bfloat16, 64),
    (8, 2048 + 5, BIG, torch.bfloat16, 256)])
def test_scan_with_the_score_table(monkeypatch, bt, length, dims, dtype, chunk):
    """LAYERFORGE_SSD_CB=1: each chunk's scores C . B^T computed once per group into a table (codegen/ssd.py
    SSDChunkCBPlan) that every head's chunk-scan blocks read. Checked against float64, and equal bit for bit to
    the kernel that computes the scores itself (the same products in the same order)."""
    inp = case(bt, length, dims, dtype, ("cb-table", length, chunk))
    monkeypatch.setenv("LAYERFORGE_SSD_CB", "0")
    y0, final0 = ssd_scan(**inp, chunk_size=chunk, return_final_state=True)
    monkeypatch.setenv("LAYERFORGE_SSD_CB", "1")
    y, final, ref_y, ref_final = run_scan(inp, chunk)
    assert_near(y, ref_y, TOL[dtype], "y")
    assert_near(final, ref_final, TOL[dtype], "final state")
    assert torch.equal(y, y0) and torch.equal(final, final0)


def test_scan_reads_strided_splits_of_one_row_like_contiguous_inputs():
    heads, hp, groups, n = 8, 64, 2, 64
    inp = case(2, 300, dict(heads=heads, head_dim=hp, groups=groups, state=n), torch.bfloat16, ("splits",))
    row = torch.cat([inp["x"].flatten(2), inp["B"].flatten(2), inp["C"].flatten(2),
                     torch.zeros(2, 300, 8, dtype=torch.bfloat16, device="cuda")], -1)   # one wide row a token
    x, B, C, _ = row.split([heads * hp, groups * n, groups * n, 8], -1)
    split = dict(inp, x=x.unflatten(-1, (heads, hp)), B=B.unflatten(-1, (groups, n)), C=C.unflatten(-1, (groups, n)))
    assert not split["x"].is_contiguous()
    y1, f1 = ssd_scan(**inp, return_final_state=True)
    y2, f2 = ssd_scan(**split, return_final_state=True)
    assert torch.equal(y1, y2) and torch.equal(f1, f2)


def test_prefill_then_16_decode_steps_match_one_longer_prefill():
    length, steps = 500, 16
    dims = dict(heads=8, head_dim=64, groups=1, state=128)
    inp = case(4, length + steps, dims, torch.bfloat16, ("steps",))
    ref_y, ref_state = ssd_scan_reference(**dict(zip(inp, f64(inp.values()))), chunk_size=256, return_final_state=True)
    head = {k: (v[:, :length] if v.dim() >= 3 and k != "initial_state" else v) for k, v in inp.items()}
    y, state = ssd_scan(**head, chunk_size=256, return_final_state=True)
    assert_near(y, ref_y[:, :length], TOL[torch.bfloat16], "prefill")
    for t in range(length, length + steps):
        out = torch.full_like(inp["x"][:, t], math.nan)
        yt = ssd_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                              D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"], out=out)
        assert_near(yt, ref_y[:, t], TOL[torch.bfloat16], f"step {t}")
    assert_near(state, ref_state, TOL[torch.bfloat16], "state after the steps")


# ---- the decode step ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("full", [False, True])
def test_state_update_at_batch_64_matches_float64(dtype, full):
    inp = case(64, 1, BIG, dtype, ("update", full))
    x, dt, B, C = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0]
    kw = dict(D=inp["D"], z=inp["z"][:, 0], dt_bias=inp["dt_bias"]) if full else {}
    state = inp["initial_state"].clone()
    out = torch.full_like(x, math.nan)
    y = ssd_state_update(state, x, dt, inp["A"], B, C, out=out, **kw)
    ref_state = inp["initial_state"].double()
    ref = ssd_state_update_reference(ref_state, *f64((x, dt, inp["A"], B, C)), **dict(zip(kw, f64(kw.values()))))
    torch.cuda.synchronize()
    assert y is out
    assert_near(state, ref_state, 1e-5, "state")   # float32 state: one step, no operand rounding
    assert_near(y, ref, TOL[dtype], "y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_update_reads_a_log_and_model_dtype_parameters_in_place(dtype):
    """The mixer's decode step: A given as A_log (A = -exp(A_log) in the kernel), D and dt_bias in
    x's dtype, and x, dt, z, B, C as column views of one wide projection row (read through their
    batch strides): equal to the float64 reference on the same values."""
    inp = case(64, 1, BIG, dtype, ("update", "alog"))
    heads, p = inp["x"].shape[2], inp["x"].shape[3]
    n, g = inp["B"].shape[3], inp["B"].shape[2]
    widths = [heads * p, heads * p, g * n, g * n, heads]          # z, x, B, C, dt: in_proj's split
    row = torch.randn(64, sum(widths) + 8, generator=torch.Generator().manual_seed(5)).to("cuda", dtype)
    row[:, sum(widths) - heads:sum(widths)] *= 0.1                   # dt's columns: steps of ~softplus(0.1 N(0,1))
    z, x, B, C, dt = row[:, :sum(widths)].split(widths, dim=-1)     # views, rows sum(widths) + 8 apart
    z, x = z.unflatten(-1, (heads, p)), x.unflatten(-1, (heads, p))
    B, C = B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
    a_log = torch.log(-inp["A"]).to(dtype)
    D, dt_bias = inp["D"].to(dtype), inp["dt_bias"].to(dtype)
    state = inp["initial_state"].clone()
    out = torch.full((64, heads, p), math.nan, dtype=dtype, device="cuda")
    y = ssd_state_update(state, x, dt, a_log, B, C, D=D, z=z, dt_bias=dt_bias, out=out, a_log=True)
    ref_state = inp["initial_state"].double()
    ref = ssd_state_update_reference(ref_state, *f64((x, dt, a_log, B, C)), D=D.double(), z=z.double(),
                                     dt_bias=dt_bias.double(), a_log=True)
    torch.cuda.synchronize()
    assert y is out
    assert_near(state, ref_state, 1e-5, "state")
    assert_near(y, ref, TOL[dtype], "y")


@pytest.mark.parametrize("state_size,head_dim,groups", [(16, 16, 2), (64, 32, 4), (256, 64, 1)])
def test_state_update_lane_splits(state_size, head_dim, groups):
    dims = dict(heads=8, head_dim=head_dim, groups=groups, state=state_size)
    inp = case(5, 1, dims, torch.bfloat16, ("lanes", state_size))
    state = inp["initial_state"].clone()
    ref_state = inp["initial_state"].double()
    args = (inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])
    y = ssd_state_update(state, *args, D=inp["D"], dt_bias=inp["dt_bias"])
    ref = ssd_state_update_reference(ref_state, *f64(args), D=inp["D"], dt_bias=inp["dt_bias"])
    assert_near(state, ref_state, 1e-5, "state")
    assert_near(y, ref, TOL[torch.bfloat16], "y")


def test_decode_step_replays_under_cuda_graph_capture():
    inp = case(16, 1, BIG, torch.bfloat16, ("graph",))
    x, dt, B, C = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0]
    state = inp["initial_state"].clone()
    ref_state = inp["initial_state"].double()
    ssd_state_update(state.clone(), x, dt, inp["A"], B, C, D=inp["D"], dt_bias=inp["dt_bias"])   # load the kernel
    out = torch.empty_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ssd_state_update(state, x, dt, inp["A"], B, C, D=inp["D"], dt_bias=inp["dt_bias"], out=out)
    state.copy_(inp["initial_state"])
    for _ in range(3):
        graph.replay()
        ref = ssd_state_update_reference(ref_state, *f64((x, dt, inp["A"], B, C)), D=inp["D"], dt_bias=inp["dt_bias"])
    torch.cuda.synchronize()
    assert_near(state, ref_state, 1e-5, "state after 3 replays")
    assert_near(out, ref, TOL[torch.bfloat16], "y of the last replay")


# ---- the gated norm ----------------------------------------------------------------------------
@pytest.mark.parametrize("groups,gate", [(1, True), (8, True), (8, False), (1, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_rms_norm_row_kernel(groups, gate, dtype):
    g = torch.Generator().manual_seed(groups * 2 + gate)
    f = 5120
    x = torch.randn(300, f, generator=g).to(dtype).cuda()
    z = torch.randn(300, f, generator=g).to(dtype).cuda() if gate else None
    w = (torch.randn(f, generator=g) * 0.3 + 1).to(dtype).cuda()
    poison_allocator()
    got = gated_rms_norm(x, z, w, 1e-5, group_size=f // groups)
    ref = gated_rms_norm_reference(x.double(), None if z is None else z.double(), w.double(), 1e-5,
                                   group_size=f // groups)
    assert got.dtype == dtype
    assert_near(got, ref, 1e-2 if dtype == torch.bfloat16 else 1e-5, "gated norm")


# ---- errors --------------------------------------------------------------------------------------
def test_kernel_path_errors_before_any_launch():
    inp = case(1, 64, dict(heads=4, head_dim=32, groups=1, state=32), torch.bfloat16, ("errors",))
    odd = torch.zeros(1, 64, 4 * 32 + 1, dtype=torch.bfloat16, device="cuda")[..., 1:].unflatten(-1, (4, 32))
    with pytest.raises(SSDInputError, match="16-byte"):
        ssd_scan(**dict(inp, x=odd))
    with pytest.raises(SSDInputError, match="no SSD kernel"):
        ssd_scan(**inp, chunk_size=100)
    with pytest.raises(SSDInputError, match="initial_state must be"):
        ssd_scan(**dict(inp, initial_state=inp["initial_state"].transpose(2, 3)))
    state = inp["initial_state"].double()
    with pytest.raises(SSDInputError, match="state must be a contiguous float32"):
        ssd_state_update(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])
