"""The decode-range Hopper GEMM (codegen/gemm_stream.py): every specialisation the benchmark's
default route and the tests use renders and compiles for sm_90a without register spills or
serialised wgmma (no GPU needed); the stream-K partition gives every unit to one CTA and every
split tile its slots; bad plans are clear errors."""
import pytest

from layerforge.codegen.gemm_stream import plan_gemm_stream, stream_units, token_tile

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

SHAPES = [(6144, 4096, None), (28672, 4096, "silu"), (4096, 14336, None), (10576, 2560, None), (2560, 5120, None),
          (1000, 3000, None), (3000, 1000, "gelu"), (24, 8, None)]


@pytest.mark.parametrize("mt", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("n,k,gated", SHAPES)
def test_stream_compiles_clean(n, k, gated, mt):
    if gated and mt == 256:
        pytest.skip("a gated plan takes at most 128 rows (max_rows)")
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemm_stream(dtype, n=n, k=k, mt=mt, gated=gated, bias=bias, residual=residual)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):   # wgmma serialised
            assert code not in res.log, (plan.key, res.log)
        assert "cp.async.bulk.tensor.2d" in res.ptx and f"m64n{mt}k16" in res.ptx, plan.key
        assert plan.abi.grid_for(mt, 132)[0] == min(132, plan.units)


@pytest.mark.parametrize("kw", [dict(n=6144, k=4096, mt=64, wtype="u4", group=128), dict(n=4096, k=4096, mt=128),
                                dict(n=28672, k=4096, mt=64, gated="silu", wtype="i8"), dict(n=10576, k=2560, mt=64)])
def test_stream_acqrel_counts_compile_clean_without_sc_fences(kw, monkeypatch):
    """acqrel (LAYERFORGE_STREAM_ACQREL): a split tile's segments count in by thread 0 between two fence.acq_rel.gpu,
    spill-free like the plain plan; the cubin has no sequentially consistent fence (every thread's __threadfence is
    MEMBAR.SC.GPU, which the plain plan has), and the source is the plain one but for the count."""
    monkeypatch.delenv("LAYERFORGE_STREAM_ACQREL", raising=False)
    plain = plan_gemm_stream("bf16", **kw)
    monkeypatch.setenv("LAYERFORGE_STREAM_ACQREL", "1")
    plan = plan_gemm_stream("bf16", **kw)
    assert plan.acqrel and not plain.acqrel and plan.key == plain.key.replace("_sm90a", "ar_sm90a")
    assert plan.source().count("fence.acq_rel.gpu") == 2 and "fence.acq_rel.gpu" not in plain.source()
    assert "__threadfence" not in plan.source() and plain.source().count("__threadfence();") == 2
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is not None:
        fences = {name: [i.opcode for i in code if i.opcode.startswith("MEMBAR")]
                  for name, code in sass_loops.disassemble(res.cubin).items()}
        assert "MEMBAR.SC.GPU" not in fences[plan.kernel_name] and "MEMBAR.ALL.GPU" in fences[plan.kernel_name]
        base = nvrtc.compile_cuda(plain.source(), plain.kernel_name, nvrtc.CompileOptions(plain.arch))
        assert "MEMBAR.SC.GPU" in [i.opcode for i in sass_loops.disassemble(base.cubin)[plain.kernel_name]]


@pytest.mark.parametrize("split", [dict(rb=2, cw=1, ctas=2), dict(rb=1, cw=1, ctas=2), dict(rb=2, cw=2, stages=3)])
def test_stream_splits_compile_clean(split):
    for n, k, gated in SHAPES[:5]:
        if gated and split["rb"] == 1:
            continue
        plan = plan_gemm_stream("bf16", n=n, k=k, mt=64, gated=gated, bias=True, residual=True, **split)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
        assert kr.registers * plan.threads * plan.ctas <= 65536, (plan.key, kr)


@pytest.mark.parametrize("units,grid,kt", [(3320, 132, 40), (1600, 264, 80), (24, 24, 1), (5, 5, 5), (963, 132, 3),
                                           (100, 7, 100)])
def test_stream_partition(units, grid, kt):
    """What the kernel computes (lf_owner, slots): CTA ranges tile [0, units); the owner formula
    inverts them; a CTA's partial segments are at most its first and its last tile (two slots)."""
    ranges = [stream_units(c, units, grid) for c in range(grid)]
    assert ranges[0][0] == 0 and ranges[-1][1] == units
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    owner = lambda u: ((u + 1) * grid - 1) // units   # noqa: E731
    for c, (a, b) in enumerate(ranges):
        assert all(owner(u) == c for u in range(a, b))
        partial = {u // kt for u in range(a, b) if not (a <= u - u % kt and u - u % kt + kt <= b)}
        assert partial <= {a // kt, (b - 1) // kt}


def test_token_tiles_and_plan_errors():
    assert [token_tile(r) for r in (1, 8, 9, 16, 17, 64, 65, 128, 200, 256)] == [8, 8, 16, 16, 32, 64, 128, 128, 256,
                                                                                   256]
    with pytest.raises(ValueError, match="at most 256"):
        token_tile(257)
    p = plan_gemm_stream("bf16", n=10576, k=2560, mt=64)
    assert p.key == "gemm_stream_n10576_k2560_bf16_mt64_r1w1s7c1a2_sm90a" and p.bw == 64 and p.tiles == 166
    assert p.units == 166 * 20 and p.tma_boxes == {"x": (64, 64), "w": (64, 64)}
    assert p.abi.launch_types[:2] == ("tmap", "tmap") and [a.role for a in p.abi.args[-2:]] == ["workspace"] * 2
    g = plan_gemm_stream("bf16", n=28672, k=4096, mt=16, gated="silu")
    assert g.rb == 2 and g.bw_out == 64 and g.tma_boxes["w"] == (64, 64)
    with pytest.raises(ValueError, match="rb = 2"):
        plan_gemm_stream("bf16", n=64, k=64, mt=8, gated="silu", rb=1)
    with pytest.raises(ValueError, match="mt must be"):
        plan_gemm_stream("bf16", n=64, k=64, mt=48)
    with pytest.raises(ValueError, match="shared memory"):
        plan_gemm_stream("bf16", n=64, k=64, mt=64, stages=8, ctas=2, ka=1)
    with pytest.raises(ValueError, match="accumulators"):
        plan_gemm_stream("bf16", n=64, k=64, mt=256, rb=2)
    with pytest.raises(ValueError, match="sm_90a"):
        plan_gemm_stream("bf16", n=64, k=64, mt=8, arch="sm_90")


@pytest.mark.parametrize("gated", [None, "silu"])
def test_pack_weight_layout(gated):
    """pack_weight puts element (row, k) of a tile's rows where the kernel's descriptors read it:
    unit (tile, k // (64 ka)), atom (k // 64) % ka, row r of the tile, 16-byte chunk ((k % 64) // 8) ^ (r % 8)."""
    import torch

    from layerforge.codegen.gemm_stream import pack_weight
    n, k = (2 * 100, 200) if gated else (150, 200)
    plan = plan_gemm_stream("bf16", n=n, k=k, mt=16, gated=gated, rb=2 if gated else 1, cw=1, ka=2, packed=True)
    w = torch.arange(n * k, dtype=torch.float32).view(n, k)
    p = pack_weight(w, plan)
    assert p.numel() == plan.units * plan.bw * 64 * plan.ka
    half = plan.bw_out
    for row in (0, 7, 63, n // 2 - 1, n // 2, n - 1):
        for kk in (0, 9, 63, 64, 130, k - 1):
            if gated:
                col, up = row % (n // 2), row >= n // 2
                tile, r = col // half, col % half + (half if up else 0)
            else:
                tile, r = row // plan.bw, row % plan.bw
            unit = tile * plan.kt + kk // (64 * plan.ka)
            atom = (kk // 64) % plan.ka
            at = ((unit * plan.ka + atom) * plan.bw + r) * 64 + ((((kk % 64) // 8) ^ (r % 8)) * 8) + kk % 8
            assert p[at] == w[row, kk], (row, kk)
    assert p.view(plan.tiles, -1)[-1].count_nonzero() < plan.kt * plan.ka * plan.bw * 64   # zero padding


@pytest.mark.parametrize("mt", [64, 128])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, None), (28672, 4096, "silu"), (4096, 14336, None),
                                       (2000, 1152, "gelu_tanh")])
def test_u4_stream_compiles_clean(n, k, gated, group, mt):
    """W converted in registers (wtype u4): no spills, no serialised wgmma (the A fragments of an atom
    in flight must not be overwritten: ptxas would warn C7515 and serialise)."""
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemm_stream(dtype, n=n, k=k, mt=mt, gated=gated, bias=bias, residual=residual, wtype="u4",
                                group=group)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515", "C7517"):
            assert code not in res.log, (plan.key, res.log)
        assert "cp.async.bulk.shared" in res.ptx and "lop3.b32" in res.ptx, plan.key
        assert plan.w_unit_bytes == plan.bw * 128 + plan.bw * 256 // group * 4


def test_u4_plan_errors():
    with pytest.raises(ValueError, match="groups of 32, 64 or 128"):
        plan_gemm_stream("bf16", n=64, k=256, mt=64, wtype="u4", group=0)
    with pytest.raises(ValueError, match="packed"):
        from layerforge.codegen.gemm_stream import StreamGemmPlan
        StreamGemmPlan(dtype="bf16", n=64, k=256, mt=64, wtype="u4", group=128)
    with pytest.raises(ValueError, match="needs wtype"):
        plan_gemm_stream("bf16", n=64, k=256, mt=64, group=128)
    p = plan_gemm_stream("bf16", n=64, k=256, mt=64, wtype="u4", group=128)
    assert p.ka == 4 and p.packed and "_u4g128_" in p.key and p.abi.args[1].ctype.startswith("const unsigned*")


@pytest.mark.parametrize("mt", [64, 128])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, None), (28672, 4096, "silu"), (2000, 1152, "gelu_tanh")])
def test_i8_stream_compiles_clean(n, k, gated, mt):
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemm_stream(dtype, n=n, k=k, mt=mt, gated=gated, bias=bias, residual=residual, wtype="i8")
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515", "C7517"):
            assert code not in res.log, (plan.key, res.log)
        assert [a.name for a in plan.abi.args[1:3]] == ["w", "wscale"] and plan.w_unit_bytes == plan.bw * 256
    with pytest.raises(ValueError, match="one scale a row"):
        plan_gemm_stream("bf16", n=n, k=k, mt=mt, wtype="i8", group=128)


def test_u4_defaults_follow_the_sweep():
    """u4: two W row blocks a warpgroup past 8192 k, two consumer warpgroups gated at <= 64 rows where K
    is whole units of 256 (benchmarks/NOTES.md); elsewhere the shared defaults; explicit splits win; each compiles clean."""
    down = plan_gemm_stream("bf16", n=4096, k=14336, mt=64, wtype="u4", group=128)
    gate = plan_gemm_stream("bf16", n=28672, k=4096, mt=64, gated="silu", wtype="u4", group=128)
    qkv = plan_gemm_stream("bf16", n=6144, k=4096, mt=64, wtype="u4", group=128)
    assert (down.rb, down.cw) == (2, 1) and (gate.rb, gate.cw) == (2, 2) and (qkv.rb, qkv.cw) == (1, 1)
    assert plan_gemm_stream("bf16", n=28672, k=4096, mt=128, gated="silu", wtype="u4", group=128).cw == 1
    # a partial last K unit: one consumer warpgroup (two spill under NVRTC 13.0 at 168 registers)
    assert plan_gemm_stream("bf16", n=2000, k=1152, mt=64, gated="gelu_tanh", wtype="u4", group=32).cw == 1
    assert plan_gemm_stream("bf16", n=4096, k=14336, mt=64, wtype="u4", group=128, rb=1).rb == 1
    assert plan_gemm_stream("bf16", n=4096, k=14336, mt=64, wtype="i8").rb == 1   # the rule is u4's
    for plan in (down, gate):
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
