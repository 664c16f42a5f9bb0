"""The Hopper GEMM (codegen/gemm.py): every specialisation the benchmark and the tests use
renders and compiles for sm_90a without register spills, serialised wgmma or ignored
setmaxnreg, with its TMA and persistent variants (no GPU needed); the persistent schedule
visits every tile once; bad plans are clear errors."""
import re

import pytest

from layerforge.codegen.gemm import BM, plan_gemm, tail_items, tile_order

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

# Llama-3-8B (q/k/v, o, gate/up, down), 70B gate/up, odd sizes
SHAPES = [(6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None),
          (57344, 8192, "silu"), (11264, 2048, "gelu_tanh"), (1000, 3000, None), (3000, 1000, "gelu")]


@pytest.mark.parametrize("bn", [128, 256])
@pytest.mark.parametrize("n,k,gated", SHAPES)
def test_gemm_compiles_clean(n, k, gated, bn):
    for bias, residual, dtype in ((False, False, "bf16"), (True, True, "f16")):
        plan = plan_gemm(dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, bn=bn)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):   # setmaxnreg ignored, wgmma serialised
            assert code not in res.log, (plan.key, res.log)
        assert plan.abi.grid_for(1000)[1] == 8 and plan.abi.shared_bytes == plan.shared_bytes


def test_gemm_plan_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_gemm("bf16", n=64, k=60)
    with pytest.raises(ValueError, match="sm_90a"):
        plan_gemm("bf16", n=64, k=64, arch="sm_90")
    with pytest.raises(ValueError, match="even number"):
        plan_gemm("bf16", n=63, k=64, gated="silu")
    with pytest.raises(ValueError, match="bn must be"):
        plan_gemm("bf16", n=64, k=64, bn=96)
    with pytest.raises(ValueError, match="shared memory"):
        plan_gemm("bf16", n=64, k=64, bn=256, stages=6)
    with pytest.raises(ValueError, match="dtype"):
        plan_gemm("f32", n=64, k=64)
    p = plan_gemm("bf16", n=28672, k=4096, gated="silu")
    assert p.key == "gemm_n28672_k4096_bf16_silu_bn256s4_sm90a" and p.bn_out == 128 and p.stages == 4


VARIANTS = [dict(tma=True), dict(tma=True, persistent=True), dict(tma=True, persistent=True, cluster=2),
            dict(tma=True, persistent=True, tma_store=True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["tma", "persistent", "cluster", "tma_store"])
@pytest.mark.parametrize("bn", [128, 192, 256])
@pytest.mark.parametrize("n,k,gated", SHAPES)
def test_gemm_tma_variants_compile_clean(n, k, gated, bn, variant):
    if bn == 192 and gated:   # refused: gated tiles are BN 128 or 256
        with pytest.raises(ValueError, match="192|multiple of 8"):
            plan_gemm("bf16", n=n, k=k, gated=gated, bn=bn, **variant)
        return
    if variant.get("tma_store") and (n // 2 if gated else n) % 8:   # no map of 16-byte rows: refused
        with pytest.raises(ValueError, match="multiple of 8"):
            plan_gemm("bf16", n=n, k=k, gated=gated, bn=bn, **variant)
        return
    for bias, residual, dtype in ((False, False, "bf16"), (True, not variant.get("tma_store"), "f16")):
        plan = plan_gemm(dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, bn=bn, **variant)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):
            assert code not in res.log, (plan.key, res.log)
        assert "cp.async.bulk.tensor.2d" in res.ptx and "cp.async.cg" not in res.ptx, plan.key
        assert "prefetch.tensormap" in res.ptx
        from benchmarks import sass_loops   # no empty wgmma group (a commit without a wgmma) before a partial wait
        if sass_loops.cuobjdump() is not None and bn == 256 and not bias:
            assert sass_loops.empty_groups_waited_behind(sass_loops.disassemble(res.cubin)[plan.kernel_name]) == []
        if variant.get("cluster"):   # W by multicast, both CTAs' barriers, the pair declared to the driver
            assert ".multicast::cluster" in res.ptx and "mapa.shared::cluster" in res.ptx, plan.key
            assert ".reqnctapercluster 2, 1, 1" in res.ptx and res.ptx.count("barrier.cluster.wait") == 2
            assert plan.tma_boxes["w"] == (plan.bn // 2, 64)
            from benchmarks import sass_loops   # the stages go back without a GPU-scope fence: only the 2 cluster syncs
            if sass_loops.cuobjdump() is not None and bn == 256 and not bias:
                code = sass_loops.disassemble(res.cubin)[plan.kernel_name]
                assert sum(i.opcode == "MEMBAR.ALL.GPU" for i in code) == 2, plan.key
        if variant.get("tma_store"):   # the epilogue by bulk tensor stores, waited for before the CTA ends
            assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in res.ptx, plan.key
            assert "cp.async.bulk.wait_group.read 0" in res.ptx and "cp.async.bulk.wait_group 0" in res.ptx
            assert plan.tma_boxes["out"] == (64, 64) and "out_map" in [a.name for a in plan.abi.args]
            assert "st" in plan.key.split("_") and plan.shared_bytes <= 227 * 1024


def test_tma_plan_takes_tensor_maps_for_x_and_w():
    plan = plan_gemm("bf16", n=28672, k=4096, gated="silu", bias=True, tma=True)
    assert plan.key == "gemm_n28672_k4096_bf16_silu_bias_bn256s4_tma_sm90a"
    assert plan.abi.launch_types == ("tmap", "tmap", "ptr", "ptr", "i32")
    assert [(a.name, a.role, a.ref) for a in plan.abi.args[:2]] == [("x_map", "tmap", "x"), ("w_map", "tmap", "w")]
    assert "const __grid_constant__ lf_tensor_map x_map" in plan.abi.signature
    assert plan.tma_boxes == {"x": (128, 64), "w": (128, 64)}          # gated: BN / 2 rows, twice
    assert plan_gemm("f16", n=4096, k=4096, bn=128, tma=True).tma_boxes["w"] == (128, 64)
    assert plan.abi.grid_for(1000) == (112, 8, 1) and plan.shared_bytes == plan_gemm("bf16", n=28672, k=4096,
                                                                                      gated="silu").shared_bytes


@pytest.mark.parametrize("bn", [64, 128, 256])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_tma_box_destinations_keep_the_swizzle_phase(bn, gated):
    """TMA's 128-byte swizzle XORs with address bits 7-9, lf_sw128_offset with the row % 8: they
    agree only where every box lands 1024-byte aligned (every stage; gated, the up rows' box)."""
    plan = plan_gemm("bf16", n=4096, k=4096, gated=gated, bn=bn, tma=True)
    offsets = plan.shared_layout.offsets
    box_rows = plan.tma_boxes["w"][0]
    starts = [offsets["sA"] + s * BM * 128 for s in range(plan.stages)]
    starts += [offsets["sB"] + s * bn * 128 + h * box_rows * 128 for s in range(plan.stages)
               for h in range(2 if gated else 1)]
    assert all(a % 1024 == 0 for a in starts), starts
    for r in range(16):   # the TMA pattern of a 128-byte row r, chunk c, against lf_sw128_offset
        for c in range(8):
            linear = r * 128 + c * 16
            tma = linear ^ (((linear >> 7) & 7) << 4)
            assert tma == r * 128 + (((c & 7) ^ (r & 7)) << 4)


def test_persistent_plan_grid_is_the_sms_or_the_tiles():
    plan = plan_gemm("bf16", n=6144, k=4096, tma=True, persistent=True)
    assert plan.abi.problem == ("M", "SMS") and plan.tiles_n == 24
    assert plan.abi.grid_for(4096, 132) == (132, 1, 1) and plan.abi.grid_for(100, 132) == (24, 1, 1)
    assert plan.band == 12 and plan.key.endswith("_tma_persist12_sm90a")   # 12 x 256 W rows x 8 KB: 24 MB
    assert plan_gemm("bf16", n=8192, k=28672, tma=True, persistent=True).band == 1


@pytest.mark.parametrize("tiles_m,tiles_n,band", [(1, 1, 1), (32, 24, 12), (7, 24, 12), (5, 13, 4), (3, 112, 12),
                                                  (9, 5, 8), (64, 1, 1)])
def test_tile_order_visits_every_tile_once_band_by_band(tiles_m, tiles_n, band):
    band = min(band, tiles_n)
    order = [tile_order(t, tiles_m, tiles_n, band) for t in range(tiles_m * tiles_n)]
    assert sorted(order) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]
    bands = [n // band for _, n in order]
    assert bands == sorted(bands)                      # a band is finished before the next starts
    first = order[:min(band, tiles_n)]                 # inside a band, columns fastest
    assert first == [(0, n) for n in range(len(first))]


def test_persistent_needs_tma():
    with pytest.raises(ValueError, match="needs tma"):
        plan_gemm("bf16", n=64, k=64, persistent=True)


def test_pick_bn_fills_the_rounds():
    """The planner's tile width: 8B qkv at 1024 tokens is 192 tiles of BN 256 on 132 SMs (two
    rounds, the second 45 % full), 256 of BN 192 (two, 97 % full), 384 of BN 128 (three, 97 %
    full): 192 (128 among the grouped product's widths, and gated: a 96-column output tile is not
    whole TMA-store boxes); at 4096 tokens the tiles fill their rounds alike and BN 256's wider
    tile wins; tiny problems take the narrower tile (one round either way, half the work a CTA)."""
    from layerforge.codegen.gemm import pick_bn
    assert pick_bn(1024, 6144, False, 132) == 192
    assert pick_bn(1024, 6144, False, 132, widths=(128, 256)) == 128
    assert pick_bn(1024, 2 * 3072, True, 132) in (128, 256)
    assert pick_bn(4096, 6144, False, 132) == 256
    assert pick_bn(8192, 14336, True, 132) == 256
    assert pick_bn(16, 4096, False, 132) == 128
    for m in (1, 100, 1000, 5000):
        for n in (24, 1000, 4096, 14336):
            assert pick_bn(m, n, False, 132) in (128, 192, 256) and pick_bn(m, n, True, 114) in (128, 256)


def test_even_outputs_store_pairs():
    """An even output width stores 4-byte pairs; an odd one single elements (PTX of the epilogue)."""
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    for n, width in ((1024, "32"), (1001, "16")):
        plan = plan_gemm("bf16", n=n, k=512, bias=True, residual=True, bn=128, tma=True)
        ptx = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90a"), want_ptx=True).ptx
        stores = set(re.findall(r"st\.global\.[bu](\d+)", ptx))
        assert stores == {width}, (n, stores)


# Mixtral-8x7B's gate/up and down, Qwen1.5-MoE's (60 experts), DeepSeek-V3's (256), odd sizes
GROUPED = [(28672, 4096, "silu", 8), (4096, 14336, None, 8), (2816, 2048, "silu", 60), (2048, 1408, None, 60),
           (4096, 7168, "silu", 256), (544, 1000, "gelu_tanh", 5)]


@pytest.mark.parametrize("bn", [128, 256])
@pytest.mark.parametrize("n,k,gated,groups", GROUPED)
def test_grouped_gemm_compiles_clean(n, k, gated, groups, bn):
    """The grouped product (runtime/moe.grouped_product): no spills, wgmma not serialised, TMA
    loads, the offsets its last argument and the grid bounded by every group's row tiles."""
    for dtype in ("bf16", "f16"):
        plan = plan_gemm(dtype, n=n, k=k, gated=gated, bn=bn, tma=True, persistent=True, groups=groups)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):
            assert code not in res.log, (plan.key, res.log)
        assert "cp.async.bulk.tensor.2d" in res.ptx and "shfl.sync.up" in res.ptx, plan.key
        assert plan.key.endswith(f"_g{groups}_sm90a")
        assert [a.name for a in plan.abi.args] == ["x_map", "w_map", "out", "M", "offsets"]
        tiles_n = -(-plan.n_out // plan.bn_out)
        assert plan.abi.grid_for(300, 1000)[0] == min(1000, (3 + groups) * tiles_n)
        assert plan.abi.grid_for(300, 132)[0] == min(132, (3 + groups) * tiles_n)


def test_grouped_gemm_bad_plans():
    with pytest.raises(ValueError, match="persistent"):
        plan_gemm("bf16", n=256, k=256, tma=True, groups=8)
    with pytest.raises(ValueError, match="groups"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, groups=5000)
    with pytest.raises(ValueError, match="bias or residual"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, groups=8, bias=True)
    a = plan_gemm("bf16", n=256, k=256, tma=True, persistent=True)
    b = plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, groups=8)
    assert a.source() != b.source() and "offsets" not in a.abi.signature and a.key + "" != b.key


def test_cluster_plans():
    """cluster=2: the persistent grid in CTA pairs (an even grid, tiles of 256 rows), keyed apart;
    refused without the persistent schedule."""
    p = plan_gemm("bf16", n=4096, k=4096, tma=True, persistent=True, cluster=2)
    assert p.key.endswith("_persist12_c2_sm90a") and p.describe()["cluster"] == 2
    assert p.abi.grid_for(1000, 132)[0] == min(132, 2 * 4 * 16) and p.abi.grid_for(100, 132)[0] == 2 * 16
    g = plan_gemm("bf16", n=4096, k=4096, tma=True, persistent=True, cluster=2, groups=8)
    assert g.abi.grid_for(1000, 132)[0] == 132 and g.abi.grid_for(10, 16)[0] == 16
    with pytest.raises(ValueError, match="cluster"):
        plan_gemm("bf16", n=256, k=256, tma=True, cluster=2)
    with pytest.raises(ValueError, match="cluster"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, cluster=4)


def test_tma_store_plans():
    """tma_store: a staging tile of the outputs in shared memory (a ring stage fewer at BN 256),
    out by its map (a grouped product's also its pointer: the groups' last rows); refused without the
    persistent schedule, with clusters or a residual, and where the output's rows are not 16-byte multiples."""
    p = plan_gemm("bf16", n=6144, k=4096, tma=True, persistent=True, tma_store=True)
    q = plan_gemm("bf16", n=6144, k=4096, tma=True, persistent=True)
    assert (p.stages, q.stages) == (3, 4) and p.key != q.key and p.key.endswith("_st_sm90a")
    assert p.shared_layout.offsets["sC"] % 1024 == 0 and "sC" not in q.shared_layout.offsets
    assert plan_gemm("bf16", n=28672, k=4096, gated="silu", tma=True, persistent=True, tma_store=True).stages == 4
    assert [a.name for a in p.abi.args] == ["x_map", "w_map", "out_map", "M"]
    g = plan_gemm("bf16", n=2 * 1408, k=2048, gated="silu", tma=True, persistent=True, groups=60, tma_store=True)
    assert [a.name for a in g.abi.args] == ["x_map", "w_map", "out_map", "out", "M", "offsets"]   # out: the groups' ends
    assert g.shared_bytes <= 227 * 1024 and g.stages == 3
    res = nvrtc.compile_cuda(g.source(), g.kernel_name, nvrtc.CompileOptions(g.arch), want_ptx=True)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0
    assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in res.ptx
    for bad in (dict(tma=True), dict(tma=True, persistent=True, cluster=2), dict(tma=True, persistent=True, residual=True)):
        with pytest.raises(ValueError, match="tma_store"):
            plan_gemm("bf16", n=256, k=256, tma_store=True, **bad)
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_gemm("bf16", n=1001, k=256, tma=True, persistent=True, tma_store=True)
    assert "out" not in q.tma_boxes and "tma_store" in p.describe()


FP8_SHAPES = [(6144, 4096, None), (4096, 14336, None), (28672, 4096, "silu"), (57344, 8192, "silu"),
              (1000, 3008, None), (2000, 3008, "gelu_tanh"), (24, 16, None)]


@pytest.mark.parametrize("bn", [128, 192, 256])
@pytest.mark.parametrize("n,k,gated", FP8_SHAPES)
def test_fp8_gemm_compiles_clean(n, k, gated, bn):
    """fp8 (W8A8 on e4m3 wgmma): 128-byte stage rows of 128 k (the boxes' columns), wgmma k32,
    the row x column scales in the TMA-store epilogue; no spills, wgmma not serialised."""
    if gated and bn == 192:
        return
    if k <= 128 and bn == 256:   # one k-slice: refused at BN 256 (its f16 bias epilogue spilled)
        with pytest.raises(ValueError, match="one 128-k slice"):
            plan_gemm("f16", n=n, k=k, bn=bn, tma=True, persistent=True, tma_store=True, fp8=True)
        return
    for bias, dtype in ((False, "bf16"), (True, "f16")):
        plan = plan_gemm(dtype, n=n, k=k, gated=gated, bias=bias, bn=bn, tma=True, persistent=True, tma_store=True,
                         fp8=True)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):
            assert code not in res.log, (plan.key, res.log)
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k32.f32.e4m3.e4m3" in res.ptx, plan.key
        assert "k16.f32.bf16" not in res.ptx and "k16.f32.f16" not in res.ptx
        assert plan.tma_boxes["x"] == (128, 128) and plan.tma_boxes["w"][1] == 128 and plan.tma_boxes["out"] == (64, 64)
        names = [a.name for a in plan.abi.args]
        assert names[:4] == ["x_map", "w_map", "xscale", "wscale"] and names[-2:] == ["out_map", "M"]
        assert ("bias" in names) == bias and plan.key.endswith("_st_f8_sm90a")


def test_fp8_gemm_plans():
    """fp8 keeps the bf16 plan's shared bytes a stage (128 one-byte k instead of 64 two-byte), so the
    same stage counts; a band holds twice the column tiles; refused without TMA stores, grouped, or
    with K not a multiple of 16."""
    kw = dict(tma=True, persistent=True, tma_store=True)
    p = plan_gemm("bf16", n=6144, k=4096, fp8=True, **kw)
    q = plan_gemm("bf16", n=6144, k=4096, **kw)
    assert p.stages == q.stages and p.shared_bytes == q.shared_bytes and p.band == min(p.tiles_n, 2 * q.band)
    assert p.describe()["fp8"] and "fp8" not in q.describe()
    with pytest.raises(ValueError, match="fp8"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, fp8=True)
    with pytest.raises(ValueError, match="fp8"):
        plan_gemm("bf16", n=256, k=264, fp8=True, **kw)
    with pytest.raises(ValueError, match="whole blocks"):   # grouped 128 x 128 blocks: N a multiple of 128
        plan_gemm("bf16", n=320, k=256, groups=4, fp8=True, fp8_scales="k128_blocks", bn=128, **kw)


@pytest.mark.parametrize("n,k,gated,groups", [(2 * 1408, 2048, "silu", 60), (2048, 1408, None, 60),
                                              (2 * 14336, 4096, "silu", 8), (4096, 14336, None, 8),
                                              (2 * 256, 128, "silu", 8)])
@pytest.mark.parametrize("bn", [128, 256])
@pytest.mark.parametrize("scales", ["token", "k128", "k128_blocks"])
def test_grouped_fp8_gemm_compiles_clean(n, k, gated, groups, bn, scales):
    """The grouped product in e4m3 (an FP8 MoE's experts at prefill): x's scales in sorted order, W's
    row scales offset by the group's first row (blocks: its block rows), in both store paths."""
    if (k <= 128 or scales != "token") and bn == 256 or (scales == "k128_blocks" and n % 128):
        return
    plan = plan_gemm("bf16", n=n, k=k, gated=gated, bn=bn, tma=True, persistent=True, groups=groups,
                     tma_store=True, fp8=True, fp8_scales=scales)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    for code in ("C7508", "C7510", "C7515"):
        assert code not in res.log, (plan.key, res.log)
    assert "k32.f32.e4m3.e4m3" in res.ptx and ("wscale + wrow + " in plan.source()) == (scales != "k128_blocks")
    assert [a.name for a in plan.abi.args] == ["x_map", "w_map", "xscale", "wscale", "out_map", "out", "M", "offsets"]


@pytest.mark.parametrize("scales", ["k128", "k128_blocks"])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, None), (4096, 14336, None), (28672, 4096, "silu"),
                                       (57344, 8192, "silu"), (1000, 3072, None), (2048, 3072, "gelu_tanh"),
                                       (24, 128, None)])
def test_fp8_promoted_gemm_compiles_clean(n, k, gated, scales):
    """fp8_scales k128 / k128_blocks: each 128-k slice's four k32 MMAs start from zero (the first
    with scale-d 0), are waited for, and are added scaled into f32 totals; BN 128, no spills."""
    for bias, dtype in ((False, "bf16"), (True, "f16")):
        plan = plan_gemm(dtype, n=n, k=k, gated=gated, bias=bias, tma=True, persistent=True, tma_store=True,
                         fp8=True, fp8_scales=scales)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
        for code in ("C7508", "C7510", "C7515"):
            assert code not in res.log, (plan.key, res.log)
        assert plan.bn == 128 and "wgmma.wait_group.sync.aligned 0" in res.ptx
        # two slices in flight (slice kt + 1's MMAs under slice kt's scaling) where there are two
        assert ("wgmma.wait_group.sync.aligned 1" in res.ptx) == (k > 128), plan.key
        assert "m64n128k32.f32.e4m3.e4m3" in res.ptx and plan.describe()["fp8"] == scales
        assert plan.key.endswith("_st_f8k_sm90a" if scales == "k128" else "_st_f8b_sm90a")


def test_fp8_promoted_plans_refuse_what_they_cannot_hold():
    kw = dict(tma=True, persistent=True, tma_store=True, fp8=True)
    with pytest.raises(ValueError, match="bn 128 only"):
        plan_gemm("bf16", n=4096, k=4096, bn=256, fp8_scales="k128", **kw)
    with pytest.raises(ValueError, match="multiple of 64"):
        plan_gemm("bf16", n=2 * 96, k=4096, gated="silu", fp8_scales="k128_blocks", **kw)
    with pytest.raises(ValueError, match="fp8_scales"):
        plan_gemm("bf16", n=4096, k=4096, fp8_scales="tensor", **kw)
    with pytest.raises(ValueError, match="fp8_scales"):
        plan_gemm("bf16", n=4096, k=4096, tma=True, persistent=True, tma_store=True, fp8_scales="k128")


@pytest.mark.parametrize("n,k,gated,bn,extra", [
    (28672, 4096, "silu", 256, dict(tma_store=True)), (6144, 4096, None, 192, dict(tma_store=True)),
    (4096, 14336, None, 256, dict(residual=True)), (1000, 3000, None, 256, dict(bias=True, residual=True)),
    (4096, 4096, None, 128, dict(bias=True, tma_store=True)), (6144, 4096, None, 256, dict(tma_store=True, fp8=True)),
    (28672, 4096, "silu", 128, dict(tma_store=True, fp8=True, fp8_scales="k128_blocks")),
    # Mamba2-2.7B's in / out projections in up to 16 parts (wgmma_split16: their 42 / 10 tiles at 64 rows)
    (10576, 2560, None, 256, dict(tma_store=True, parts=16)), (2560, 5120, None, 256, dict(tma_store=True, parts=16))])
def test_tail_split_compiles_clean(n, k, gated, bn, extra):
    """The persistent GEMM with its last round's tiles split along K (tail_split): no spills, wgmma not
    serialised; the parts' sums go to the workspace by L2 stores, the count after a GPU fence, the sums
    read back from L2; a grid of every SM; the default plan's source untouched by the option."""
    extra = dict(extra)
    parts = extra.pop("parts", 8)
    dtype = "f16" if extra.get("bias") else "bf16"
    plan = plan_gemm(dtype, n=n, k=k, gated=gated, bn=bn, tma=True, persistent=True, tail_split=parts, **extra)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    for code in ("C7508", "C7510", "C7515"):
        assert code not in res.log, (plan.key, res.log)
    assert "st.global.cg.v4.f32" in res.ptx and "ld.global.cg.v4.f32" in res.ptx and "atom.global.add" in res.ptx
    assert "membar.gl" in res.ptx or "fence.sc.gpu" in res.ptx
    assert [a.name for a in plan.abi.args][-2:] == ["part", "counts"] and f"ts{parts}" in plan.key.split("_")
    assert plan.abi.grid_for(1, 132) == (132, 1, 1) and plan.workspace(132) == (132 * 128 * bn, 132)
    base = plan_gemm(dtype, n=n, k=k, gated=gated, bn=bn, tma=True, persistent=True, **extra)
    assert "lf_tail_item" not in base.source() and "part" not in [a.name for a in base.abi.args]
    assert base.workspace(132) == (0, 0)


@pytest.mark.parametrize("tiles,grid,max_parts,kt", [(3584, 132, 8, 64), (16, 132, 8, 64), (256, 132, 8, 64),
                                                    (264, 132, 8, 64), (1, 132, 16, 3), (150, 132, 8, 47),
                                                    (7, 8, 8, 2), (40, 16, 4, 10), (768, 132, 8, 64),
                                                    (32, 132, 8, 224), (42, 132, 16, 40), (10, 132, 16, 80)])
def test_tail_items_cover_every_tile_and_k_slice_once(tiles, grid, max_parts, kt):
    """The split tail's walk (codegen/gemm.tail_items, the kernel's lf_tail_item): every (tile, k slice) once, a
    CTA with at most one part and it last, no part empty or under 4 slices where there are 4, every tile's part p
    over the same slices (the parts running at once share x's and W's slices in L2), and the last round's tiles
    split where they leave half the SMs idle or more (3584 tiles on 132 SMs: 20 tiles in 6 parts; 768: 108 tiles,
    not split; 32 tiles of K 14336: 4 parts)."""
    walks = tail_items(tiles, grid, max_parts, kt)
    seen = [[0] * kt for _ in range(tiles)]
    ranges = {}
    for items in walks:
        for i, (t, kb, ke) in enumerate(items):
            assert 0 <= kb < ke <= kt
            if (kb, ke) != (0, kt):
                assert i == len(items) - 1 and ke - kb >= min(4, kt)
                ranges.setdefault(t, []).append((kb, ke))
            for s in range(kb, ke):
                seen[t][s] += 1
    assert all(c == 1 for row in seen for c in row)
    assert len({tuple(sorted(r)) for r in ranges.values()}) <= 1   # every split tile cut at the same slices
    rest = tiles % grid
    parts = max(1, min(grid // rest, max_parts, kt // 4)) if rest else 1
    assert sum(len(r) for r in ranges.values()) == (rest * parts if parts > 1 else 0)
    expect = {(3584, 132): 6, (768, 132): 1, (32, 132): 4, (16, 132): 8}
    if (tiles, grid) in expect:
        assert parts == expect[tiles, grid]


def test_tail_split_plans():
    with pytest.raises(ValueError, match="tail_split"):
        plan_gemm("bf16", n=256, k=256, tma=True, tail_split=8)
    with pytest.raises(ValueError, match="tail_split"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, cluster=2, tail_split=8)
    with pytest.raises(ValueError, match="tail_split"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, groups=4, tail_split=8)
    with pytest.raises(ValueError, match="tail_split"):
        plan_gemm("bf16", n=256, k=256, tma=True, persistent=True, tail_split=1)
    p = plan_gemm("bf16", n=28672, k=4096, gated="silu", tma=True, persistent=True, tma_store=True, tail_split=8)
    assert p.describe()["tail_split"] == 8 and "flag" in p.shared_layout.offsets and p.stages == 4


@pytest.mark.parametrize("tail_split", [0, 8])
@pytest.mark.parametrize("n,k,gated,bn,extra", [
    (28672, 4096, "silu", 256, dict(tma_store=True)), (4096, 14336, None, 256, dict(residual=True)),
    (1000, 3000, None, 192, dict(bias=True, residual=True)), (6144, 4096, None, 256, dict(tma_store=True, fp8=True)),
    (24, 8, None, 128, dict())])
def test_skew_compiles_clean(n, k, gated, bn, extra, tail_split):
    """Consumer warpgroup 2 starting SKEW slices after warpgroup 1 (skew): one arrive and one wait on named
    barrier 4 of 256 threads, no spills, wgmma not serialised; alone and with the split tail."""
    dtype = "f16" if extra.get("bias") else "bf16"
    plan = plan_gemm(dtype, n=n, k=k, gated=gated, bn=bn, tma=True, persistent=True, skew=2, tail_split=tail_split,
                     **extra)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch), want_ptx=True)
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    for code in ("C7508", "C7510", "C7515"):
        assert code not in res.log, (plan.key, res.log)
    assert "sk2" in plan.key.split("_") and plan.describe()["skew"] == 2
    assert re.search(r"bar\.arrive\s+%r\d+,\s*%r\d+;|bar\.arrive\s+4,\s*256;", res.ptx), plan.key
    src = plan.source()
    assert src.count("lf_named_bar_arrive(4, 256)") == 2 and src.count("lf_named_bar_sync(4, 256)") == 1


def test_skew_plans():
    for bad in (dict(skew=4), dict(skew=2, persistent=False), dict(skew=2, cluster=2),
                dict(skew=1, fp8=True, tma_store=True, fp8_scales="k128", bn=128)):
        opts = dict(tma=True, persistent=True) | bad
        with pytest.raises(ValueError, match="skew"):
            plan_gemm("bf16", n=256, k=256, stages=4, **opts)
    assert "lf_named_bar_arrive(4" not in plan_gemm("bf16", n=256, k=256, tma=True, persistent=True).source()
