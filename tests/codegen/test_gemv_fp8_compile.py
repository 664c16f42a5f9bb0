"""The W8A8 fp8 small-token product (codegen/gemv.py, wtype f8e4m3): every specialisation compiles
for sm_89 and sm_90 without register spills, runs the e4m3 m16n8k32 mma on x converted in
registers, streams W and its block scales through the cp.async ring, and is refused below sm_89."""
import re

import pytest

from layerforge.codegen.gemv import plan_gemv

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

CASES = [  # (N, K, gated, epilogue and prologue)
    (6144, 4096, None, {}),
    (28672, 4096, "silu", dict(bias=True, residual=True)),
    (4096, 14336, None, dict(norm="rms")),
    (2048, 3072, "gelu_tanh", dict(norm="rms", norm_offset=1.0, bias=True, residual=True)),
    # the rules' widest splits: q/k/v with the decoder's norm prologue (4 column tiles x 8 warps at 9-16 rows), the
    # 70B products' long K (2-4 column tiles x 4 warps; gated 2 x 8, its norm's row in each stage)
    (6144, 4096, None, dict(norm="rms")),
    (10240, 8192, None, {}),
    (57344, 8192, "silu", dict(norm="rms")),
]


def compiled(plan, ptx=False):
    return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=ptx)


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("max_m", [8, 16])
@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("n,k,gated,extra", CASES)
def test_fp8_gemv_compiles_without_spills(n, k, gated, extra, group, max_m, arch):
    plan = plan_gemv("bf16", n=n, k=k, max_m=max_m, gated=gated, arch=arch, wtype="f8e4m3", group=group, **extra)
    (kr,) = compiled(plan).resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_fp8_gemv_f16_compiles():
    plan = plan_gemv("f16", n=5632, k=2048, max_m=16, arch="sm_89", wtype="f8e4m3", group=128, residual=True)
    (kr,) = compiled(plan).resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


@pytest.mark.parametrize("max_m,gated", [(8, None), (16, "silu")])
def test_fp8_loop_is_e4m3_mma_on_converted_x(max_m, gated):
    """Per 128-k chunk a lane reads 2 pieces of 16 k of each W row pair: 2 mma of 32 k per piece,
    tile (rt column tiles, each gate and up with a gated product) and token tile; its 32 k of each token become
    e4m3 by 16 cvt (2 values each), and no bf16 mma is left."""
    plan = plan_gemv("bf16", n=28672 if gated else 6144, k=4096, max_m=max_m, gated=gated, arch="sm_90",
                     wtype="f8e4m3")
    ptx = compiled(plan, ptx=True).ptx
    tiles, mt = (2 if gated else 1) * plan.rt, max_m // 8
    assert ptx.count("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32") == 2 * 2 * tiles * mt
    assert ptx.count("cvt.rn.satfinite.e4m3x2.f32") == 16 * mt
    assert "m16n8k16" not in ptx


def test_fp8_streams_w_and_block_scales_through_shared_memory():
    """With block scales, W, x and the chunk's scale of each W row come in by cp.async only (no
    global loads at all); per-row scales are read once each in the epilogue."""
    block = plan_gemv("bf16", n=7168, k=2048, arch="sm_90", wtype="f8e4m3", group=128)
    ptx = compiled(block, ptx=True).ptx
    assert "ld.global" not in ptx and "cp.async.cg.shared.global" in ptx and "cp.async.ca.shared.global [%r" in ptx
    row = plan_gemv("bf16", n=7168, k=2048, arch="sm_90", wtype="f8e4m3")
    assert "cp.async.ca" not in compiled(row, ptx=True).ptx


def test_fp8_keys_and_abi():
    ch = plan_gemv("bf16", n=6144, k=4096, wtype="f8e4m3")
    assert ch.key == "gemv_n6144_k4096_m8_bf16_f8e4m3ch_r1w4s2_sm90"
    assert [(a.name, a.ctype) for a in ch.abi.args[:3]] == [
        ("x", "const __nv_bfloat16* __restrict__"), ("w", "const unsigned char* __restrict__"),
        ("wscale", "const float* __restrict__")]
    blk = plan_gemv("bf16", n=7168, k=2048, max_m=16, wtype="f8e4m3", group=128, gated="silu", arch="sm_89")
    # the rules at 9-16 rows, gated, K < 8192: 2 column tiles x 2 warps x 2 stages
    assert blk.key == "gemv_n7168_k2048_m16_bf16_f8e4m3b128_silu_r2w2s2_sm89"
    assert not blk.pdl
    # a stage: 2 x 32 W rows of 128 k, 16 tokens x 2 rows of x, one f32 block scale a W row
    assert blk.stage_bytes == 128 * (64 + 32) + 64 * 4
    assert blk.shared_bytes == blk.abi.shared_bytes <= 101376
    # a split given whole is built as given or refused: 4 warps x 4 stages (133,120 bytes) pass the 101,376 a CTA
    # has on sm_89 (codegen/ops.shared_limit)
    with pytest.raises(ValueError, match="133120 bytes of shared memory"):
        plan_gemv("bf16", n=7168, k=2048, max_m=16, wtype="f8e4m3", group=128, gated="silu", arch="sm_89", rt=1,
                  warps=4, stages=4)


def test_fp8_plan_errors():
    with pytest.raises(ValueError, match="sm_89 and newer, not sm_80"):
        plan_gemv("bf16", n=64, k=4096, wtype="f8e4m3", arch="sm_80")
    with pytest.raises(ValueError, match="sm_89 and newer, not sm_86"):
        plan_gemv("bf16", n=64, k=4096, wtype="f8e4m3", group=128, arch="sm_86")
    with pytest.raises(ValueError, match="group size must be one of"):
        plan_gemv("bf16", n=64, k=4096, wtype="f8e4m3", group=64)
    with pytest.raises(ValueError, match="group size 128 must divide K = 1040"):
        plan_gemv("bf16", n=64, k=1040, wtype="f8e4m3", group=128)
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_gemv("bf16", n=64, k=1000, wtype="f8e4m3")


# ---- x quantised beforehand (x_e4m3): per token (fp8_linear_per_token's route) or per token and 128 k ------
XT_CASES = [(6144, 4096, None, {}), (28672, 4096, "silu", dict(bias=True, residual=True)),
            (4096, 14336, None, dict(residual=True)), (2000, 3008, "gelu_tanh", {})]


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("max_m", [8, 16])
@pytest.mark.parametrize("x_group,group", [(0, 0), (128, 0), (128, 128)])
@pytest.mark.parametrize("n,k,gated,extra", XT_CASES)
def test_fp8_gemv_over_e4m3_x_compiles_without_spills(n, k, gated, extra, x_group, group, max_m, arch):
    """Per 128-k chunk a lane reads 2 pieces of 16 k of each W row pair and of its token: 2 mma of 32 k per
    piece, tile and token tile on the bytes as they are (no cvt to e4m3, no amax); x, W (and the chunk's scales)
    by cp.async."""
    if group and n % 128:
        pytest.skip("W's 128 x 128 blocks: N a multiple of 128 here")
    plan = plan_gemv("bf16", n=n, k=k, max_m=max_m, gated=gated, arch=arch, wtype="f8e4m3", group=group,
                     x_e4m3=True, x_group=x_group, **extra)
    res = compiled(plan, ptx=True)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    tiles, mt = (2 if gated else 1) * plan.rt, max_m // 8
    assert res.ptx.count("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32") == 2 * 2 * tiles * mt
    assert "cvt.rn.satfinite" not in res.ptx and "shfl" not in res.ptx and "m16n8k16" not in res.ptx
    assert ("cp.async.ca.shared.global" in res.ptx) == bool(x_group or group)   # the chunk's scales


def test_fp8_gemv_over_e4m3_x_f16_compiles():
    plan = plan_gemv("f16", n=5632, k=2048, max_m=16, arch="sm_89", wtype="f8e4m3", x_e4m3=True, gated="silu")
    (kr,) = compiled(plan).resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_fp8_gemv_over_e4m3_x_plan():
    """x's stage rows: one 128-byte row a token (128 k of e4m3, against two of bf16); the ABI takes x as bytes
    and its per-token scales after W's; the key says so; the plan refuses what it does not serve."""
    p = plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="f8e4m3", x_e4m3=True)
    q = plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="f8e4m3", rt=1)   # one column tile, as p's
    assert p.key == "gemv_n6144_k4096_m16_bf16_f8e4m3chxt_r1w4s2_sm90" and p.key != q.key
    assert p.stage_bytes == 128 * (16 + 16) and q.stage_bytes == 128 * (16 + 32)
    assert [(a.name, a.ctype) for a in p.abi.args] == [
        ("x", "const unsigned char* __restrict__"), ("w", "const unsigned char* __restrict__"),
        ("wscale", "const float* __restrict__"), ("xscale", "const float* __restrict__"),
        ("out", "__nv_bfloat16* __restrict__"), ("M", "int")]
    assert "xscale[(long long)m]" in p.source() and "lf_e4m3x4(" not in p.source().split("lf_gemv")[-1]
    b = plan_gemv("bf16", n=7168, k=2048, max_m=16, wtype="f8e4m3", group=128, x_e4m3=True, x_group=128)
    assert b.key == "gemv_n7168_k2048_m16_bf16_f8e4m3b128xk128_r1w4s2_sm90"
    assert b.stage_bytes == 128 * (16 + 16) + 16 * 4 + 16 * 4   # W, x rows; W's block scales, x's (a row, a token)
    assert "xscale[(long long)m]" not in b.source() and b.abi.args[3].name == "xscale"
    with pytest.raises(ValueError, match="x_group"):
        plan_gemv("bf16", n=256, k=1024, wtype="f8e4m3", x_group=128)
    with pytest.raises(ValueError, match="x_group"):
        plan_gemv("bf16", n=256, k=1024, wtype="f8e4m3", x_e4m3=True, x_group=64)
    for bad, why in ((dict(wtype="f8e4m3", group=128), "group 128"), (dict(wtype="i8"), "'i8'"),
                     (dict(), "None"), (dict(wtype="f8e4m3", norm="rms"), "a norm")):
        with pytest.raises(ValueError, match=rf"x_e4m3 .*{re.escape(why)}"):
            plan_gemv("bf16", n=256, k=1024, x_e4m3=True, **bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_gemv("bf16", n=64, k=1000, wtype="f8e4m3", x_e4m3=True)


def test_x_first_overlaps_the_quantiser_on_sm90():
    """The per-token / 1 x 128 quantiser lets a programmatic dependent launch start (griddepcontrol.launch_dependents
    first thing, sm_90 only), and the product over its bytes copies W's first ring stages before its
    griddepcontrol.wait, x's after it (W does not come from the quantiser, x does)."""
    from layerforge.codegen.dequant import QuantRowsPlan
    for group in (0, 128):
        src = QuantRowsPlan(dtype="bf16", k=4096, arch="sm_90", group=group).source()
        body = src[src.index("{", src.index("__global__")):]   # from the kernel's opening brace
        assert body.count("griddepcontrol.launch_dependents") == 1
        assert body.index("griddepcontrol.launch_dependents") < body.index("const ")   # before any work
        assert "griddepcontrol" not in QuantRowsPlan(dtype="bf16", k=4096, arch="sm_89", group=group).source()
    p = plan_gemv("bf16", n=6144, k=4096, max_m=16, wtype="f8e4m3", x_e4m3=True, x_group=128, arch="sm_90")
    assert p.pdl and (p.stages, p.rt) == (2, 1)
    ptx = compiled(p, ptx=True).ptx
    before, after = ptx.split("griddepcontrol.wait", 1)
    assert before.count("cp.async.cg.shared.global") == 4 * (p.stages - 1)   # W: 16 rows = 4 pieces a lane a stage
    assert "cp.async.ca.shared.global" not in before and "cp.async.ca.shared.global" in after   # x's scales after
    assert after.count("cp.async.cg.shared.global") > 0
