"""The MLA kernels (codegen/mla.py) render and compile for sm_80 and sm_90 without register
spills, and within each arch's shared memory (no GPU needed); bad specialisations are clear
errors before anything renders."""
import re

import pytest

from layerforge.codegen.mla import MLADecodePlan, fine_order, plan_mla_append, plan_mla_decode
from layerforge.codegen.row import LoweringError
from layerforge.dsl.ir import RopeSpec
from layerforge.dsl.numerics import rope_scaling_from_hf

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}   # dynamic shared memory a block may opt into
YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def compile_clean(plan, arch):
    assert plan.arch.removesuffix("a") == arch
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
    assert set(res.resources) == {k.name for k in plan.kernels}
    for kr in res.resources.values():
        assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
    return res


def option_plans(option, **kw):
    """The wgmma decode plan with the schedule option `option` on, compiled spill-free for sm_90, and the same plan
    with it off; both take the same shared memory. Returns (plan, plain, compile result)."""
    plan = plan_mla_decode(arch="sm_90", **kw, **{option: True})
    assert plan.kernel == "wgmma" and getattr(plan, option)
    res = compile_clean(plan, "sm_90")
    plain = plan_mla_decode(arch="sm_90", **kw, **{option: False})
    assert not getattr(plain, option) and plan.shared_bytes == plain.shared_bytes
    return plan, plain, res


@pytest.mark.parametrize("arch,kernel", [("sm_80", None), ("sm_90", None), ("sm_90", "mma")])
@pytest.mark.parametrize("heads,latent,rope,page", [(128, 512, 64, 64), (16, 512, 64, 16), (4, 256, 64, 64),
                                                    (100, 512, 64, 1), (128, 512, 64, 32)])
def test_decode_compiles_without_spills(heads, latent, rope, page, arch, kernel):
    plan = plan_mla_decode(num_heads=heads, latent_dim=latent, rope_dim=rope, page_size=page, arch=arch, kernel=kernel)
    # sm_90's default is the Hopper kernel (built for sm_90a), full tiles by TMA from pages of 16 keys up
    assert plan.kernel == ("wgmma" if arch == "sm_90" and kernel is None else "mma")
    assert plan.tma == (plan.kernel == "wgmma" and page >= 16) and plan.tma_box == (min(page, plan.keys), 64)
    assert any(a.role == "tmap" for a in plan.abi.args) == plan.tma
    compile_clean(plan, arch)
    assert plan.abi.shared_bytes <= SMEM_LIMIT[arch]
    assert plan.abi.block == ((384 if plan.kernel == "wgmma" else 256), 1, 1)
    assert plan.kernels[1].block == (latent, 1, 1)   # the merge: a thread per latent channel


def test_key_tiles_follow_the_arch_shared_memory():
    """64-key tiles where Q and two of them fit (sm_90), else 32 (sm_80); both compile for sm_90."""
    big = plan_mla_decode(num_heads=128, arch="sm_90")
    assert big.keys == 64 and SMEM_LIMIT["sm_80"] < big.abi.shared_bytes <= SMEM_LIMIT["sm_90"]
    assert plan_mla_decode(num_heads=128, arch="sm_80").keys == 32
    assert plan_mla_decode(num_heads=128, arch="sm_90", keys=32).kernel == "mma"   # 32-key tiles: mma.sync
    compile_clean(plan_mla_decode(num_heads=128, arch="sm_90", keys=32), "sm_90")
    with pytest.raises(LoweringError, match="shared memory"):
        plan_mla_decode(num_heads=128, arch="sm_89")      # 99 KB: Q alone takes 72 KB


def test_decode_f16_compiles():
    compile_clean(plan_mla_decode(num_heads=128, dtype="f16", arch="sm_90"), "sm_90")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("scaling", [None, YARN])
@pytest.mark.parametrize("page", [1, 64])
def test_append_compiles_without_spills(scaling, page, arch):
    plan = plan_mla_append(page_size=page, rope=RopeSpec(10000.0, "gptj", 64, scaling and rope_scaling_from_hf(scaling, 163840)), arch=arch)
    compile_clean(plan, arch)
    assert ("yarn" in plan.key) == (scaling is not None)


def test_decode_grid_covers_heads_in_blocks_of_64():
    plan = plan_mla_decode(num_heads=100, arch="sm_90")
    assert plan.abi.grid_for(7, 3) == (7, 2, 3)
    assert plan.kernels[1].grid_for(7) == (700, 1, 1)
    assert plan.pair and plan.key == "mla_decode_h100_l512_r64_p64_bf16_n64_wgcl_sm90a"   # two blocks: a pair
    unpaired = plan_mla_decode(num_heads=100, arch="sm_90", pair=False)
    assert unpaired.key == "mla_decode_h100_l512_r64_p64_bf16_n64_wg_sm90a"
    assert plan_mla_decode(num_heads=100, arch="sm_90", kernel="mma").key == "mla_decode_h100_l512_r64_p64_bf16_n64_sm90"


def test_wgmma_decode_takes_latents_of_whole_column_block_pairs():
    """Latents of 128k channels up to 512 get the Hopper kernel; others (and other arches) mma.sync;
    asking for it where it cannot serve is a clear error."""
    assert plan_mla_decode(num_heads=16, latent_dim=384, arch="sm_90").kernel == "wgmma"
    assert plan_mla_decode(num_heads=16, latent_dim=160, rope_dim=32, arch="sm_90").kernel == "mma"
    with pytest.raises(LoweringError, match="128-channel"):
        plan_mla_decode(num_heads=16, latent_dim=160, rope_dim=32, arch="sm_90", kernel="wgmma")
    with pytest.raises(LoweringError, match="sm_90a"):
        MLADecodePlan(num_heads=16, keys=64, arch="sm_80", kernel="wgmma")


def test_wgmma_decode_shared_memory_fits_with_its_alignment():
    plan = plan_mla_decode(num_heads=128, arch="sm_90")
    off = plan.shared_layout.offsets
    assert all(v % 1024 == 0 for v in off.values())                 # swizzled tiles on 1024-byte boundaries
    assert plan.abi.shared_bytes == plan.shared_layout.bytes + 1024 <= SMEM_LIMIT["sm_90"]
    assert off["sKV"] - off["sQ"] == 64 * 576 * 2 and off["sP"] - off["sKV"] == 2 * 64 * 576 * 2


@pytest.mark.parametrize("kw,match", [
    (dict(latent_dim=544), "at most 512"), (dict(rope_dim=32), "multiple of 64"),
    (dict(dtype="f32"), "bf16 or f16"), (dict(arch="sm_75"), "sm_80"),
])
def test_bad_decode_specialisations_are_clear_errors(kw, match):
    with pytest.raises(LoweringError, match=match):
        MLADecodePlan(**{"num_heads": 16, "arch": "sm_90", **kw})


def test_bad_append_rope_is_an_error():
    with pytest.raises(LoweringError, match="interleaved"):
        plan_mla_append(rope=RopeSpec(10000.0, "neox", 64), arch="sm_90")
    with pytest.raises(ValueError, match="rotates 32"):
        plan_mla_append(rope=RopeSpec(10000.0, "gptj", 32), arch="sm_90")
    # rows of latent + rope in 16-byte pieces: a rope of 66 would put every other row's 16-byte stores off by 4
    with pytest.raises(LoweringError, match="multiples of 8"):
        plan_mla_append(rope_dim=66, rope=RopeSpec(10000.0, "gptj", 66), arch="sm_90")


@pytest.mark.parametrize("heads,latent,page,dtype", [(128, 512, 64, "bf16"), (16, 512, 16, "bf16"), (4, 256, 1, "bf16"),
                                                     (128, 512, 32, "f16"), (100, 384, 64, "bf16")])
def test_seesaw_decode_compiles_without_spills(heads, latent, page, dtype):
    """The wgmma kernel's seesaw schedule (the consumers take turns on the tiles): every shape the wgmma kernel takes
    compiles spill-free; its P lives in a stage's RoPE column block, so its shared memory is the default's."""
    plan, plain, _ = option_plans("seesaw", num_heads=heads, latent_dim=latent, rope_dim=64, page_size=page,
                                  dtype=dtype)
    assert plan.key.split("_")[-2] == "wgss"
    assert "dp0" in plan.source() and "dp0" not in plain.source()


@pytest.mark.parametrize("heads,latent,page,dtype,overlap", [(128, 512, 64, "bf16", False), (16, 512, 16, "bf16", False),
                                                             (4, 256, 1, "bf16", False), (128, 512, 32, "f16", False),
                                                             (128, 512, 64, "bf16", True)])
def test_sync_handoff_decode_compiles_without_spills(heads, latent, page, dtype, overlap):
    """The wgmma kernel with a sync on both sides of the consumers' hand-offs (sync_handoff): spill-free, the three
    hand-offs synced on both sides through the one barrier instruction both consumers call (bar.sync inlined at each
    side: two instructions of one barrier, which compute-sanitizer's synccheck reported as divergent threads), so
    the cubin has a single named-barrier sync of 256 threads, and none arrived at; consumer 1 hands its stage back
    before barrier 4; without the option the source is the default's (arrives, one bar.sync a hand-off)."""
    kw = dict(num_heads=heads, latent_dim=latent, rope_dim=64, page_size=page, dtype=dtype, arch="sm_90",
              overlap=overlap, seesaw=False, pair=False)
    plan = plan_mla_decode(**kw, sync_handoff=True)
    assert plan.sync_handoff and plan.key.split("_")[-2] == ("wgovsh" if overlap else "wgsh")
    res = compile_clean(plan, "sm_90")
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is not None:   # the hand-offs' syncs: one instruction of 256 threads, six calls to it
        (code,) = [c for name, c in sass_loops.disassemble(res.cubin).items() if name == plan.kernel_name]
        syncs = [i.text for i in code if i.opcode.startswith("BAR.SYNC") and i.text.endswith("0x100")]
        assert len(syncs) == 2 and sum("R" in t.split()[1] for t in syncs) == 1, syncs   # barrier 2 and the shared one
        assert sum(i.opcode.startswith("CALL") for i in code) >= 6
    src, plain = plan.source(), plan_mla_decode(**kw, sync_handoff=False).source()
    for bar in (3, 4, 5):
        assert src.count(f"lf_named_bar_sync_common({bar}, 256)") == 2, bar
        assert f"lf_named_bar_sync({bar}, 256)" not in src and f"lf_named_bar_arrive({bar}, 256)" not in src
        assert f"lf_named_bar_arrive({bar}, 256)" in plain and f"lf_named_bar_sync({bar}, 256)" in plain
        assert f"lf_named_bar_sync_common({bar}, 256)" not in plain
    assert src.index("// the stage back first") < src.index(
        "if (i + 1 < ntiles) lf_named_bar_sync_common(4, 256);")


@pytest.mark.parametrize("heads,latent,page,dtype,sync", [(128, 512, 64, "bf16", False), (16, 512, 16, "f16", False),
                                                          (4, 256, 1, "bf16", False), (100, 384, 64, "bf16", False),
                                                          (128, 512, 64, "bf16", True)])
def test_fine_decode_compiles_without_spills(heads, latent, page, dtype, sync):
    """The wgmma kernel's default schedule with fine barriers (a full barrier a 64-column block, an empty barrier a
    consumer): spill-free on every shape the kernel takes, the same shared memory as without; S waits on each of its
    column blocks once (consumer 0's V blocks and the RoPE blocks first), consumer 1 on its V blocks; without the
    option the source has none of it."""
    plan, plain, _ = option_plans("fine", num_heads=heads, latent_dim=latent, rope_dim=64, page_size=page, dtype=dtype,
                                  seesaw=False, sync_handoff=sync)
    assert plan.key.split("_")[-2] == ("wgshfg" if sync else "wgfg")
    src = plan.source()
    assert "lf_mbar_wait(&full[stage * KB + cb], phase);" in src and "VB0" not in plain.source()
    assert src.count("lf_mbar_arrive(&empty[stage * 2]);") == 1
    assert src.count("lf_mbar_arrive(&empty[stage * 2 + 1]);") == 1
    kb, vb0, vb1 = (latent + 64) // 64, latent // 128, latent // 64
    order = fine_order(latent, 64)
    assert sorted(order) == list(range(kb)) and order[: kb - (vb1 - vb0)] == [*range(vb0), *range(vb1, kb)]
    waits = [int(m) for m in re.findall(r"lf_mbar_wait\(&full\[stage \* KB \+ (\d+)\], phase\);", src)]
    assert waits == order   # S waits on each block once, in the copy order


@pytest.mark.parametrize("heads,latent,page,dtype,sync", [(128, 512, 64, "bf16", False), (100, 512, 16, "f16", False),
                                                          (256, 256, 32, "bf16", False), (128, 384, 64, "bf16", False),
                                                          (128, 512, 64, "bf16", True)])
def test_pair_decode_compiles_without_spills(heads, latent, page, dtype, sync):
    """The pair schedule (a token's two head blocks a cluster of (1, 2, 1) sharing each full key tile by TMA
    multicast): spill-free, the same shared memory; every consumer warp arrives on both CTAs' empty barriers
    (16 a stage), the CTAs sync as a cluster after the barriers' initialisation and before leaving."""
    plan, plain, res = option_plans("pair", num_heads=heads, latent_dim=latent, rope_dim=64, page_size=page,
                                    dtype=dtype, seesaw=False, sync_handoff=sync, fine=False)
    assert plan.key.split("_")[-2] == ("wgshcl" if sync else "wgcl")
    src = plan.source()
    assert "__cluster_dims__(1, 2, 1)" in src and "__cluster_dims__" not in plain.source()
    assert src.count("lf_cluster_sync();") == 2 and "lf_mbar_init(&empty[s], 16);" in src
    assert "lf_mbar_arrive(&empty[stage])" not in src and src.count("lf_mbar_arrive_pair(&empty[stage]);") == 2
    assert "lf_tma_load_2d_multicast_ef(" in src and "lf_tma_load_2d(dst" not in src
    from benchmarks import sass_loops   # a stage goes back without a GPU-scope fence: only the 2 cluster syncs have one
    if sass_loops.cuobjdump() is not None:
        code = sass_loops.disassemble(res.cubin)[plan.kernel_name]
        assert sum(i.opcode == "MEMBAR.ALL.GPU" for i in code) == 2


@pytest.mark.parametrize("kw", [dict(), dict(overlap=True), dict(seesaw=True), dict(sync_handoff=True), dict(pair=True),
                                dict(num_heads=100, latent_dim=256, page_size=8, dtype="f16")])
def test_staged_out_decode_compiles_without_spills(kw):
    """O through shared memory (Q's buffer, free past barrier 5) and out in 16-byte stores: spill-free on every
    schedule, the same shared memory; the cubin stores O's rows with STG.128 and a split's parts with STG.64, and
    has no 16-bit store (the default's pairs compile to two)."""
    args = dict(num_heads=128, latent_dim=512, rope_dim=64, page_size=64, dtype="bf16")
    args.update(kw)
    plan, plain, res = option_plans("staged_out", **args)
    assert not plan.key.split("_")[-2].endswith("ns") and plain.key.split("_")[-2].endswith("ns")
    assert plan.latent_dim // 2 * 2 * 64 * 2 <= 2 * 64 * plan.row_dim   # both consumers' O fit in Q's buffer
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is not None:
        (code,) = [c for name, c in sass_loops.disassemble(res.cubin).items() if name == plan.kernel_name]
        stores = {i.opcode for i in code if i.opcode.startswith("STG")}
        assert "STG.E.128" in stores and "STG.E.64" in stores and not any(".U16" in s for s in stores), stores


@pytest.mark.parametrize("kw", [dict(), dict(fine=True), dict(seesaw=True, num_heads=16), dict(overlap=True),
                                dict(sync_handoff=True), dict(staged_out=False),
                                dict(num_heads=100, latent_dim=256, page_size=16, dtype="f16")])
def test_evict_decode_compiles_without_spills(kw):
    """The key tiles' TMA copies hinted L2 evict_first: spill-free on every schedule that copies by TMA, the same shared
    memory; the policy is made once (before the producer's loop) and every TMA copy of a tile carries it, none without;
    the plan without it has neither."""
    args = dict(num_heads=128, latent_dim=512, rope_dim=64, page_size=64, dtype="bf16")
    args.update(kw)
    plan, plain, res = option_plans("evict", **args)
    assert "ne" not in plan.key.split("_")[-2] and "ne" in plain.key.split("_")[-2]
    src, bare = plan.source(), plain.source()
    assert src.count("lf_l2_evict_first();") == 1 and "createpolicy" not in bare and "cache_hint" not in bare
    hinted = src.count("lf_tma_load_2d_hint(dst")
    assert "lf_tma_load_2d(dst" not in src and hinted == bare.count("lf_tma_load_2d(dst") > 0
    assert src.count(", ef);") == hinted
    # otherwise the same kernel: the hinted source, its helpers, the policy and the hints taken out, is the plain one
    helpers = src[src.index("// An L2 cache policy under which"):src.index("// Copy `bytes` (a multiple of 16")]
    undone = (src.replace(helpers, "").replace("\n        const unsigned long long ef = lf_l2_evict_first();", "")
              .replace("lf_tma_load_2d_hint(dst", "lf_tma_load_2d(dst").replace(", ef);", ");")
              .replace(plan.key, plain.key).replace(plan.kernel_name, plain.kernel_name))
    assert re.sub(r"\s+", " ", undone) == re.sub(r"\s+", " ", bare)


SCHEDULE_SWITCHES = [
    # plan field, its switch, on by default, plans the planner gives it, plans it does not give it, plans that refuse it
    ("seesaw", "LAYERFORGE_MLA_SEESAW", False, [dict(num_heads=16)],
     [dict(num_heads=16, overlap=True), dict(num_heads=16, kernel="mma")],            # one schedule at a time
     [dict(num_heads=16, kernel="mma", arch="sm_90"), dict(num_heads=16, overlap=True)]),
    ("fine", "LAYERFORGE_MLA_FINE", False, [dict(num_heads=16)],
     [dict(num_heads=16, kernel="mma"), dict(num_heads=16, seesaw=True), dict(num_heads=16, overlap=True)],
     [dict(num_heads=16, kernel="mma", arch="sm_90"), dict(num_heads=16, seesaw=True),
      dict(num_heads=16, overlap=True)]),
    ("pair", "LAYERFORGE_MLA_PAIR", True, [dict(num_heads=128), dict(num_heads=100)],   # two head blocks
     [dict(num_heads=64), dict(num_heads=192), dict(num_heads=128, page_size=8), dict(num_heads=128, seesaw=True),
      dict(num_heads=128, kernel="mma"), dict(num_heads=128, evict=True), dict(num_heads=128, evict=False)],
     # one block, three (odd), no TMA tiles, other schedules, the unpaired kernel's hints asked for
     [dict(num_heads=64), dict(num_heads=128, page_size=8), dict(num_heads=128, seesaw=True),
      dict(num_heads=128, fine=True)]),
    ("evict", "LAYERFORGE_MLA_EVICT", True, [dict(num_heads=128, pair=False), dict(num_heads=16, seesaw=True)],
     [dict(num_heads=128, page_size=8), dict(num_heads=128), dict(num_heads=128, pair=True),
      dict(num_heads=128, kernel="mma")],
     [dict(num_heads=128, page_size=8), dict(num_heads=128, pair=True),
      dict(num_heads=16, kernel="mma", arch="sm_90")]),
    ("staged_out", "LAYERFORGE_MLA_STAGED_OUT", True, [dict(num_heads=128), dict(num_heads=16, seesaw=True)],
     [dict(num_heads=128, kernel="mma")], [dict(num_heads=16, kernel="mma", arch="sm_90")]),
]


@pytest.mark.parametrize("field,switch,default,takes,skips,refuses", SCHEDULE_SWITCHES,
                         ids=[s[0] for s in SCHEDULE_SWITCHES])
def test_schedule_switches_and_bad_plans(monkeypatch, field, switch, default, takes, skips, refuses):
    """Each wgmma schedule option: its switch's default, the plans plan_mla_decode gives it with the switch on (and
    those it leaves without: another schedule, another kernel, a shape it does not serve), and the plans that refuse
    it when asked directly (a ValueError naming it)."""
    for name in {s[1] for s in SCHEDULE_SWITCHES}:
        monkeypatch.delenv(name, raising=False)
    for kw in takes:
        assert getattr(plan_mla_decode(arch="sm_90", **kw), field) == default, kw
    monkeypatch.setenv(switch, "0")
    assert not any(getattr(plan_mla_decode(arch="sm_90", **kw), field) for kw in takes)
    monkeypatch.setenv(switch, "1")
    for kw in takes:
        assert getattr(plan_mla_decode(arch="sm_90", **kw), field), kw
    for kw in skips:
        assert not getattr(plan_mla_decode(arch="sm_90", **kw), field), kw
    for kw in refuses:
        args = dict(keys=64, kernel="wgmma", arch="sm_90a", **{field: True})
        args.update(kw)
        with pytest.raises(ValueError, match=field):
            MLADecodePlan(**args)


def test_sync_handoff_switch_and_bad_plans(monkeypatch):
    monkeypatch.delenv("LAYERFORGE_MLA_SYNC_HANDOFF", raising=False)
    monkeypatch.delenv("LAYERFORGE_MLA_SEESAW", raising=False)
    assert not plan_mla_decode(num_heads=16, arch="sm_90").sync_handoff
    monkeypatch.setenv("LAYERFORGE_MLA_SYNC_HANDOFF", "1")
    assert plan_mla_decode(num_heads=16, arch="sm_90").sync_handoff
    assert not plan_mla_decode(num_heads=16, arch="sm_90", kernel="mma").sync_handoff
    assert not plan_mla_decode(num_heads=16, arch="sm_90", seesaw=True).sync_handoff   # the seesaw has its own
    for kw in (dict(kernel="mma", arch="sm_90"), dict(kernel="wgmma", arch="sm_90a", seesaw=True)):
        with pytest.raises(ValueError, match="sync_handoff"):
            MLADecodePlan(num_heads=16, keys=64, sync_handoff=True, **kw)


def test_short_splits_run_the_unpaired_kernel(monkeypatch):
    """MLADecode.plan_for: the paired plan (the default at two head blocks) where a split holds PAIR_MIN_KEYS keys or
    more, else the same plan unpaired (made once); a pair asked for explicitly, or a plan that does not pair, always
    runs as planned."""
    from layerforge.runtime.mla_decode import MLADecode
    for name in ("LAYERFORGE_MLA_PAIR", "LAYERFORGE_MLA_EVICT", "LAYERFORGE_MLA_FINE", "LAYERFORGE_MLA_SEESAW"):
        monkeypatch.delenv(name, raising=False)
    dec = MLADecode(num_heads=128, page_size=64, arch="sm_90")
    least = MLADecode.PAIR_MIN_KEYS
    assert dec.plan.pair and not dec.plan.evict
    assert dec.plan_for(4096, 1) is dec.plan and dec.plan_for(4 * least, 4) is dec.plan
    short = dec.plan_for(4 * (least - 1), 4)
    assert not short.pair and short.evict and short.key != dec.plan.key
    assert dec.plan_for(100, 1) is short and dec.plan_for(32768, 64) is short
    fields = lambda p: {k: v for k, v in vars(p).items() if k not in ("pair", "evict")}  # noqa: E731
    assert fields(short) == fields(dec.plan)
    forced = MLADecode(num_heads=128, page_size=64, arch="sm_90", pair=True)
    assert forced.plan_for(4096, 32) is forced.plan
    for plain in (MLADecode(num_heads=64, arch="sm_90"), MLADecode(num_heads=128, page_size=8, arch="sm_90"),
                  MLADecode(num_heads=128, arch="sm_90", pair=False)):
        assert not plain.plan.pair and plain.plan_for(128, 2) is plain.plan
    monkeypatch.setenv("LAYERFORGE_MLA_PAIR", "0")
    off = MLADecode(num_heads=128, arch="sm_90")
    assert not off.plan.pair and off.plan_for(128, 2) is off.plan


@pytest.mark.parametrize("kw", [dict(), dict(sync_handoff=True), dict(num_heads=16, page_size=16)])
def test_overlap_decode_waits_for_s_only(kw):
    """The overlap schedule's turn (tile i's S, then tile i - 1's P V, committed in each branch): in the SASS the turn's
    wait_group 1 is there and no empty wgmma group is waited behind (a commit after the join compiled to one on both
    paths, and the wait then held the softmax behind the P V: benchmarks/sass_loops.empty_groups_waited_behind)."""
    args = dict(num_heads=128, latent_dim=512, rope_dim=64, page_size=64, dtype="bf16", arch="sm_90",
                overlap=True, seesaw=False, pair=False)
    args.update(kw)
    plan = plan_mla_decode(**args)
    res = compile_clean(plan, "sm_90")
    assert "} else {\n                    lf_wgmma_commit();" in plan.source()
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is not None:
        code = sass_loops.disassemble(res.cubin)[plan.kernel_name]
        assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in c.text for c in code)
        assert sass_loops.empty_groups_waited_behind(code) == []
