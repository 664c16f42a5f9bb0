"""The weight-only quantised small-token product (codegen/gemv.py, wtype u4 / i8): every
specialisation compiles for sm_80 and sm_90 without register spills, W and its pairs reach the
tensor cores through the cp.async ring, the conversion is the documented instruction sequence,
the plain bf16/f16 plans are untouched, and bad plans are clear errors."""
import pytest

from layerforge.codegen.gemv import GemvPlan, plan_gemv

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

WTYPES = [("u4", 32), ("u4", 64), ("u4", 128), ("i8", 0), ("i8", 32), ("i8", 128)]


def resources(plan):
    (kr,) = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch)).resources.values()
    return kr


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("max_m", [8, 16, 32])   # runtime/quant.QUANT_KERNEL_MAX_ROWS: 32
@pytest.mark.parametrize("wtype,group", WTYPES)
def test_quant_gemv_compiles_without_spills(wtype, group, max_m, arch):
    for n, k, gated, extra in ((6144, 4096, None, {}), (28672, 4096, "silu", dict(bias=True, residual=True)),
                               (4096, 14336, None, dict(norm="rms")), (2000, 3072, "gelu_tanh", dict(norm="rms", norm_offset=1.0, bias=True))):
        plan = plan_gemv("bf16", n=n, k=k, max_m=max_m, gated=gated, arch=arch, wtype=wtype, group=group, **extra)
        kr = resources(plan)
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


@pytest.mark.parametrize("wtype,group", WTYPES)
def test_quant_gemv_f16_compiles(wtype, group):
    plan = plan_gemv("f16", n=5632, k=2048, max_m=16, arch="sm_80", wtype=wtype, group=group, residual=True)
    kr = resources(plan)
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_quant_keys_and_abi():
    u4 = plan_gemv("bf16", n=6144, k=4096, wtype="u4", group=128)
    assert u4.key == "gemv_n6144_k4096_m8_bf16_u4g128_r1w4s2_sm90"
    assert [(a.name, a.ctype) for a in u4.abi.args[:3]] == [
        ("x", "const __nv_bfloat16* __restrict__"), ("w", "const unsigned* __restrict__"),
        ("wgroup", "const unsigned* __restrict__")]
    i8 = plan_gemv("f16", n=4096, k=4096, wtype="i8", gated="silu", max_m=16)
    assert i8.key.startswith("gemv_n4096_k4096_m16_f16_i8ch_silu_")
    assert [a.name for a in i8.abi.args[:3]] == ["x", "w", "wscale"]
    for p in (u4, i8):
        assert p.shared_bytes == p.abi.shared_bytes == p.warps * p.stages * p.stage_bytes <= 160 * 1024
    # a u4 stage: 16 W rows of 256 k, 8 tokens x 4 rows of x, the chunk's 2 (scale, zero) words a W row
    assert u4.stage_bytes == 128 * (16 + 32) + 16 * 8


def test_quant_gemv_streams_w_and_pairs_through_shared_memory():
    """W, x and the pairs come in by cp.async only (no global loads in the loop; the row scales
    of i8 are read once each in the epilogue)."""
    for wtype, group in (("u4", 64), ("i8", 32)):
        plan = plan_gemv("bf16", n=6144, k=4096, arch="sm_90", wtype=wtype, group=group)
        ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
        assert "ld.global" not in ptx and "cp.async.cg.shared.global" in ptx and "cp.async.ca.shared.global" in ptx


def test_u4_conversion_is_lop3_then_two_ops_a_pair():
    """Groups of 32 / 64 k (and past 16 tokens): the u4 loop converts 8 k with 4 lop3 (the magic-number OR) and
    8 bf16x2 ops (subtract MAGIC + z, multiply by s): per chunk of 256 k a lane converts 2 pieces x 2 rows x 4
    words, and each word of row g with its row g + 8 partner feeds 2 mma (PTX of the loop)."""
    for group, m in ((64, 8), (128, 32)):
        plan = plan_gemv("bf16", n=6144, k=4096, max_m=m, arch="sm_90", wtype="u4", group=group)
        ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
        words = 2 * 2 * 4
        assert ptx.count("lop3.b32") >= 4 * words
        assert ptx.count("mma.sync.aligned.m16n8k16") == words * plan.mt
        assert "lf_dequant_m(" not in plan.source().split('extern "C"')[1]


@pytest.mark.parametrize("m", [1, 16])
def test_u4_group_sums_scaled_once(m):
    """Groups of 128 k (and more) up to 16 tokens: a lane's 4-lane piece set lies in one group, so the pairs are
    the lop3's MAGIC + q alone (no subtract or multiply), the mma sums (MAGIC + q) x and x (a unit of a token tile
    as the A of a product with a B of ones: one mma a unit and tile, its rows' totals shuffled to the accumulators'
    columns once a group); the group's s ((MAGIC + q) x - (MAGIC + z) x) is two FFMA an accumulator a group (PTX)."""
    plan = plan_gemv("bf16", n=6144, k=4096, max_m=m, arch="sm_90", wtype="u4", group=128)
    src = plan.source()
    assert "lf_dequant_m(lf_word(wv[t][0], j), a);" in src and "lf_mma(xs4[mt], xa, one2, one2);" in src
    ptx = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True).ptx
    words = 2 * 2 * 4
    assert ptx.count("lop3.b32") >= 4 * words
    mt = plan.mt   # W's mma (words x row tiles x token tiles), then x's sums (1 a unit and token tile, 8 units)
    assert ptx.count("mma.sync.aligned.m16n8k16") == words * plan.rt * mt + 8 * mt
    assert ptx.count("shfl.sync.idx") == 2 * 2 * mt   # a group's sums to columns 2 tig, 2 tig + 1: 2 groups a chunk
    loop = ptx[ptx.index("mma.sync"):ptx.rindex("mma.sync")]
    assert "sub.bf16x2" not in loop and "mul.bf16x2" not in loop and "fma.rn.bf16x2" not in loop


def test_plain_plans_unchanged():
    """A plan without wtype renders no quantised code and keeps its key."""
    plan = plan_gemv("bf16", n=6144, k=4096)
    assert plan.key == "gemv_n6144_k4096_m8_bf16_r1w4s4_sm90"
    assert "lf_dequant" not in plan.source() and "__launch_bounds__(NT)" in plan.source()
    assert "wtype" not in plan.describe()


def test_quant_plan_errors():
    with pytest.raises(ValueError, match="group size 128 must divide K = 1000"):
        plan_gemv("bf16", n=64, k=1000, wtype="i8", group=128)
    with pytest.raises(ValueError, match="group size 96 must divide|group size must be one of"):
        plan_gemv("bf16", n=64, k=4096, wtype="u4", group=96)
    with pytest.raises(ValueError, match="group size must be one of"):
        plan_gemv("bf16", n=64, k=4096, wtype="u4", group=0)
    with pytest.raises(ValueError, match="wtype"):
        plan_gemv("bf16", n=64, k=4096, wtype="u8", group=128)
    with pytest.raises(ValueError, match="needs a quantised wtype"):
        plan_gemv("bf16", n=64, k=4096, group=128)
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_gemv("bf16", n=64, k=104, wtype="i8")


@pytest.mark.parametrize("wtype,group", [("u4", 128), ("u4", 32)])
@pytest.mark.parametrize("rows,bucket", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8)])
def test_compact_x_buckets(wtype, group, rows, bucket, monkeypatch):
    """u4 below 8 tokens: plans of max_m 1, 2, 4 whose stages hold that many x rows (LAYERFORGE_GEMV_COMPACT_X=0:
    the n8 tile's 8); lane g reads x row g % XT, and the kernels compile without spills, gated and with the norm."""
    from layerforge.codegen.gemv import token_bucket
    from layerforge.runtime import nvrtc
    assert token_bucket(rows, wtype) == bucket and token_bucket(rows, None) == 8
    plan = plan_gemv("bf16", n=2 * 1000, k=3072, max_m=rows, gated="silu", norm="rms", arch="sm_90", wtype=wtype,
                     group=group)
    assert plan.max_m == bucket and plan.xt == bucket and plan.mt == 1 and f"_m{bucket}_" in plan.key
    wide = GemvPlan(**{**plan.__dict__, "max_m": 8})
    assert wide.stage_bytes - plan.stage_bytes == 128 * plan.xr * (8 - bucket)
    src = plan.source()
    assert f"XT = {bucket};" in src and "const int gx = XT < 8 ? g & (XT - 1) : g;" in src
    res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    r = res.resources[plan.kernel_name]
    assert r.spill_stores == 0 and r.spill_loads == 0
    monkeypatch.setenv("LAYERFORGE_GEMV_COMPACT_X", "0")
    assert token_bucket(rows, wtype) == 8
    assert plan_gemv("bf16", n=2000, k=3072, max_m=rows, arch="sm_90", wtype=wtype, group=group).max_m == 8


def test_compact_x_switch_refuses_a_misspelt_value(monkeypatch):
    from layerforge.codegen.gemv import token_bucket
    monkeypatch.setenv("LAYERFORGE_GEMV_COMPACT_X", "maybe")
    with pytest.raises(ValueError, match="LAYERFORGE_GEMV_COMPACT_X='maybe': expected 1 or 0"):
        token_bucket(1, "u4")


def test_compact_x_only_u4():
    for wtype, group in ((None, 0), ("i8", 0)):
        with pytest.raises(ValueError, match="max_m must be 8, 16, 32 or 64"):
            GemvPlan(dtype="bf16", n=4096, k=4096, max_m=1, wtype=wtype, group=group)
        assert plan_gemv("bf16", n=4096, k=4096, max_m=1, wtype=wtype, group=group).max_m == 8
    # one token over a long K, narrow (8B down): 2 column tiles x 16 warps on sm_90
    down = plan_gemv("bf16", n=4096, k=14336, max_m=1, arch="sm_90", wtype="u4", group=128)
    assert (down.max_m, down.rt, down.warps, down.stages) == (1, 2, 16, 2) and down.shared_bytes <= 200 * 1024


def test_quant_w_copies_before_the_pdl_wait():
    """sm_90 (programmatic dependent launch): u4's W and pairs' first chunks are copied before
    griddepcontrol.wait, x's after it (x comes from the kernel before, W does not), as the e4m3 kernel over
    x quantised first; i8's all after it (split, it measured slower), and f8e4m3's with x in T (not measured)."""
    for wtype, group, x_e4m3, split in (("u4", 128, False, True), ("i8", 0, False, False),
                                        ("f8e4m3", 0, False, False), ("f8e4m3", 0, True, True)):
        src = plan_gemv("bf16", n=6144, k=4096, max_m=1, arch="sm_90", wtype=wtype, group=group,
                        x_e4m3=x_e4m3).source()
        pre, post = src.split('extern "C"')[1].split('asm volatile("griddepcontrol.wait;" ::: "memory");')
        assert ("load(warp + s * WARPS, s, 1);" in pre and "load(warp + s * WARPS, s, 2);" in post) == split
        assert ("load(warp + s * WARPS, s);" in post) == (not split)


# the shared-x layout (xshare): 8B and 70B products, gated with the epilogue, K not a multiple of the chunk
XSHARE_CASES = [(6144, 4096, None, {}), (4096, 14336, None, {}), (28672, 4096, "silu", dict(bias=True, residual=True)),
                (10240, 8192, None, dict(bias=True)), (3000, 1152, "gelu_tanh", {})]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("max_m", [1, 4, 8, 16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_xshare_compiles_without_spills(group, max_m, arch):
    """The runtime's shared-x plans (runtime/linear.xshare_plan: fewer CTAs an SM where the most spill)."""
    from layerforge.runtime.linear import xshare_plan
    for n, k, gated, extra in XSHARE_CASES:
        plan = xshare_plan("bf16", n=n, k=k, max_m=max_m, gated=gated, bias=extra.get("bias", False),
                           residual=extra.get("residual", False), arch=arch, group=group)
        kr = resources(plan)
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_xshare_plan_key_abi_and_shared_bytes():
    """The key names the split, the grid is (row blocks of 16 rt warps rows, the split), a split over CTAs takes
    the part / counts workspace (sized by workspace()), and a stage holds x's rows once: at 16 tokens the default
    layout's 4 warps hold x 4 times."""
    from layerforge.codegen.gemv import xshare_split
    plan = plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="u4", group=128, xshare=4)
    assert plan.key == "gemv_n6144_k4096_m16_bf16_u4g128_r1w4s2x4b4_sm90"
    assert plan.abi.grid == ("96", "4", "1")
    names = [a.name for a in plan.abi.args]
    assert names[-2:] == ["part", "counts"] and plan.workspace() == (96 * 4 * 2 * 4 * 128, 96)
    xrows = 16 * 4 * 128   # 16 tokens x 4 rows of 128 bytes a 256-k chunk
    wrows = 4 * 16 * (128 + 8)   # 4 warps x 16 rows, each with its (scale, zero) pairs (2 groups x 4 bytes)
    assert plan.shared_bytes == 2 * (xrows + wrows)
    one = plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="u4", group=128, xshare=1)
    assert [a.name for a in one.abi.args][-2:] == ["out", "M"] and one.workspace() == (0, 0)
    src = plan.source()
    assert "threadIdx.x + NT * j" in src and "atomicAdd(&counts[blockIdx.x], 1)" in src
    assert "__ldcg" not in one.source()   # no split, no sums through global memory
    assert "__launch_bounds__(NT, 4)" in src and plan.min_blocks == 4   # registers for 16 warps an SM
    assert plan_gemv("bf16", n=28672, k=4096, max_m=16, gated="silu", wtype="u4", group=128, xshare=2).min_blocks == 1
    assert xshare_split(6144, 4096) == 4 and xshare_split(28672, 4096, "silu") == 2 and xshare_split(24, 128) == 1
    # the default layout, unchanged by the option
    assert "XSPLIT" not in plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="u4", group=128).source()


def test_xshare_plan_errors():
    for bad, match in ((dict(wtype="i8", group=0), "serves a u4 W"), (dict(norm="rms"), "without a norm"),
                       (dict(xshare=17), "splits 16 chunks"), (dict(xshare=-1), "non-negative"),
                       (dict(xshare=0, min_blocks=2), "with xshare only")):
        kw = dict(n=6144, k=4096, max_m=16, wtype="u4", group=128, xshare=2) | bad
        with pytest.raises(ValueError, match=match):
            GemvPlan(dtype="bf16", **{k: v for k, v in kw.items()})


def test_xshare_route_off_by_default(monkeypatch):
    from layerforge.codegen.gemv import xshare_default
    monkeypatch.delenv("LAYERFORGE_GEMV_XSHARE", raising=False)
    assert xshare_default() is False
    monkeypatch.setenv("LAYERFORGE_GEMV_XSHARE", "1")
    assert xshare_default() is True
