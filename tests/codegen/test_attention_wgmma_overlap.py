"""The wgmma prefill's overlap schedule (WGTileConfig.overlap: S of tile t and P V of tile t - 1
as two wgmma groups in one turn, the softmax once S is in, P in two alternating buffers) renders
and compiles for sm_90a without spills or serialised wgmmas for every stdlib block at head dims
64/128/256 and the hooks; the planner takes it only where it is spill-free, never changes the
tile shape for it, and leaves every plan without it as it was (no GPU needed)."""
import dataclasses
import functools

import pytest

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention, tile_candidates

from .test_attention_compile import ATTENTION, nvrtc, specialise
from .test_attention_wgmma_compile import assert_spill_free


@functools.lru_cache(maxsize=None)
def compiled(plan):
    """One compile per plan: the planner's spill check and the test's own check share it."""
    return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))


def resources(plan):
    return compiled(plan).resources


def check_groups(plan, res):
    """In the SASS (where cuobjdump is at hand): the turn's partial wait is there, and no empty wgmma group (ptxas's
    commit of a group without a wgmma on its path) is waited behind: one would make wait_group 1 wait for the P V too
    (benchmarks/sass_loops.empty_groups_waited_behind)."""
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is None:
        return
    code = sass_loops.disassemble(res.cubin)[plan.kernel_name]
    assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in c.text for c in code)
    assert sass_loops.empty_groups_waited_behind(code) == []


def compile_main(plan):
    """The main kernel's resources; no setmaxnreg ignored (C7508 / C7510), no wgmma serialised
    (C7515), no wait injected (C7517)."""
    res = compiled(plan)
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}
    for code in ("C7508", "C7510", "C7515", "C7517"):
        assert code not in res.log, res.log
    return res.resources[plan.kernel_name], res


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(scope="module")
def mask_prog():
    from ..gpu.test_block_mask import SRC
    return lf.loads(SRC, "block_masks.lf", with_stdlib=False)


def overlapped(tiles: WGTileConfig) -> WGTileConfig:
    return dataclasses.replace(tiles, overlap=True)


def check_overlap_source(plan):
    src = plan.source()
    assert plan.config.overlap
    assert plan.key.endswith(f"_{plan.config.label}_" + ("dt_" if plan.rel_table else "")
                             + ("mb_" if plan.mask_split else "") + "sm90a")
    # S, then the previous tile's P V: two groups a turn; the softmax after the first is in
    turn = src.split("lf_wgmma_ss_n")[-1]
    # (the second group committed in each branch: one commit after the join is an empty group on both paths)
    second = turn.index("if (prev >= 0) {\n" + " " * 16 + "pv(pa_prev, prev);\n" + " " * 16 + "lf_wgmma_commit();\n"
                        + " " * 12 + "} else {\n" + " " * 16 + "lf_wgmma_commit();")
    assert turn.index("lf_wgmma_commit();") < second   # S's group first
    assert second < turn.index("lf_wgmma_wait<1>();")
    assert "unsigned pa0[BN / 16][4], pa1[BN / 16][4];" in src and "if (done++ & 1) tile(pa0, pa1);" in src
    # O is rescaled only after the P V that accumulates into it is waited for
    softmax = src.split("lf_wgmma_wait<1>();")[1]
    assert softmax.index("lf_wgmma_wait<0>();") < softmax.index("o[d * 4 + half * 2] *= o_corr[half];")
    assert "*= corr;" not in src


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_overlap_plans_compile_without_spills(prog, name, d):
    """Every stdlib block (T5 with its distance tables, the default) takes the overlap schedule
    at the tile shape the planner chooses without it."""
    layer = specialise(prog, name, 32, 8, d)
    plain = plan_wgmma_attention(layer, compile_fn=resources)
    plan = plan_wgmma_attention(layer, compile_fn=resources, overlap=True)
    if plain.config.consumers == 3:   # D64's three consumers: the overlap schedule spills there, they keep the plain one
        assert plan.config == plain.config
        return
    assert plan.config == overlapped(plain.config)
    assert (plan.abi.args, plan.abi.grid, plan.shared_bytes) == (plain.abi.args, plain.abi.grid, plain.shared_bytes)
    check_overlap_source(plan)
    kr, res = compile_main(plan)
    assert_spill_free(kr)
    assert kr.registers * plan.config.threads <= 65536
    check_groups(plan, res)


@pytest.mark.parametrize("d,tiles", [(d, overlapped(c)) for d in (64, 128, 256) for c in tile_candidates(d)
                                     if c.consumers == 2],   # (three consumers take the plain schedule)
                         ids=lambda x: getattr(x, "label", str(x)))
def test_every_overlap_tile_candidate_compiles(prog, d, tiles):
    plan = plan_wgmma_attention(specialise(prog, "gemma2_attn", 32, 8, d), tiles=tiles)
    assert plan.config.label.endswith("ov")
    assert_spill_free(compile_main(plan)[0])


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4), (32, 1)])
@pytest.mark.parametrize("page", [16, 64])
def test_overlap_gqa_pages_and_dtypes_compile(prog, hq, hkv, page, dtype):
    plan = plan_wgmma_attention(specialise(prog, "gemma2_attn", hq, hkv, 128, dtype), page_size=page,
                                compile_fn=resources, overlap=True)
    assert plan.config.overlap
    assert_spill_free(compile_main(plan)[0])


@pytest.mark.parametrize("name", ["prefix_lm", "sinks", "dilated", "natten", "by_head", "prefix_table", "head_window"])
def test_overlap_with_the_tile_classifier_compiles(name):
    from ..codegen.test_mask_tiles import MASKS
    layer = lf.loads(MASKS, "masks.lf", with_stdlib=False).specialise(name, Hq=8, Hkv=2, D=128, dtype="bf16")
    plan = plan_wgmma_attention(layer, compile_fn=resources, overlap=True)
    src = plan.source()
    check_overlap_source(plan)
    # empty tiles are skipped before the tile's turn: the P buffers alternate by tiles computed
    assert ("if (tile_cls == 0) continue;" in src) == (name != "dilated")
    assert_spill_free(compile_main(plan)[0])


def test_overlap_with_sinks_compiles():
    from ..dsl.test_attention_sinks import SINKS
    prog = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    plan = plan_wgmma_attention(prog.specialise("sink_attn", Hq=8, Hkv=2, D=128, dtype="bf16", window=40),
                                compile_fn=resources, overlap=True)
    assert plan.config.overlap and "lf_sink(" in plan.source()
    assert_spill_free(compile_main(plan)[0])


def overlap_or_three_consumers(plan):
    """The overlap schedule, or (D64) three consumer warpgroups, which keep the plain one (the overlap spills there)."""
    if plan.config.consumers == 3:
        assert not plan.config.overlap and "pa0[BN / 16][4]" not in plan.source()
    else:
        check_overlap_source(plan)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["doc_causal", "doc_heads"])
def test_overlap_over_the_block_mask_compiles(mask_prog, name, d):
    plan = plan_wgmma_attention(mask_prog.specialise(name, Hq=32, Hkv=8, D=d, dtype="bf16"), page_size=64,
                                compile_fn=resources, overlap=True)
    overlap_or_three_consumers(plan)
    assert plan.block_mask and "(bm_list[t_begin + t] & 1) != 0" in plan.source()
    assert (plan.block_mask_plan().rows, plan.block_mask_plan().keys) == (plan.config.rows, plan.config.keys)
    assert_spill_free(compile_main(plan)[0])


@pytest.mark.parametrize("d", [64, 128, 256])
def test_overlap_with_distance_tables_compiles(mask_prog, d):
    plan = plan_wgmma_attention(mask_prog.specialise("rel_bias", Hq=32, Hkv=8, D=d, dtype="bf16"),
                                compile_fn=resources, overlap=True)
    overlap_or_three_consumers(plan)
    assert plan.rel_table and "rel_tab[x] = lf_rel_term(" in plan.source()
    assert_spill_free(compile_main(plan)[0])


@pytest.mark.parametrize("name,d", [("t5_attn", 128), ("t5_attn", 256), ("rel_bias", 256)])
def test_planner_takes_overlap_only_where_it_is_spill_free(prog, mask_prog, name, d):
    """A distance term computed per score (distance_table=False) leaves few registers for a
    second P buffer (T5 beside 128-key tiles at D128 spills): the planner keeps the plain
    schedule and its tile shape where the overlap twin spills, and takes the twin where not."""
    layer = (specialise(prog, name, 32, 8, d) if name == "t5_attn"
             else mask_prog.specialise(name, Hq=32, Hkv=8, D=d, dtype="bf16"))
    plain = plan_wgmma_attention(layer, compile_fn=resources, distance_table=False)
    twin = plan_wgmma_attention(layer, tiles=overlapped(plain.config), distance_table=False)
    kr = resources(twin)[twin.kernel_name]
    plan = plan_wgmma_attention(layer, compile_fn=resources, distance_table=False, overlap=True)
    if kr.spill_stores > 0:
        assert plan == plain and not plan.config.overlap
    else:
        assert plan == twin and plan.config.overlap


def test_overlap_is_off_unless_asked_for(prog):
    """Off by default; asked for without a compile function (nothing shows it spill-free), the
    planner keeps the plain schedule; forced tiles are taken as given."""
    layer = specialise(prog, "llama_attn", 32, 8, 128)
    plan = plan_wgmma_attention(layer)
    assert not plan.config.overlap and not WGTileConfig(bn=128, stages=3).overlap
    assert plan.key == "llama_attn_d128_hkv8_hq32_bf16_p16_wgprefill_n128s3_sm90a"
    assert "pa_prev" not in plan.source() and "overlap" not in plan.describe()["tiles"]
    assert plan_wgmma_attention(layer, overlap=True) == plan
    forced = plan_wgmma_attention(layer, tiles=WGTileConfig(bn=128, stages=3, overlap=True))
    assert forced.key == "llama_attn_d128_hkv8_hq32_bf16_p16_wgprefill_n128s3ov_sm90a"
    assert forced.describe()["tiles"]["overlap"] is True
    assert forced.kernels[1].signature == plan.kernels[1].signature


def test_runtime_takes_overlap_by_default(prog, monkeypatch):
    from layerforge.runtime.attention import PagedAttention
    d64 = specialise(prog, "gpt2_attn", 16, 16, 64)
    # D64: three consumers, the overlap schedule with one P buffer (late_pack: the two-buffer one spills there); the
    # plain schedule with LATE_PACK off; two consumers with THREE_CONSUMERS off
    def label():
        return PagedAttention(d64, page_size=16, arch="sm_90", prefill="wgmma").tc_plan("prefill").config.label

    assert label() == "n128s3c3ovztflu"
    monkeypatch.setenv("LAYERFORGE_WGMMA_LATE_PACK", "0")
    assert label() == "n128s3c3tflu"
    monkeypatch.delenv("LAYERFORGE_WGMMA_LATE_PACK")
    monkeypatch.setenv("LAYERFORGE_WGMMA_THREE_CONSUMERS", "0")
    assert label() == "n128s3ovtflu"
    monkeypatch.delenv("LAYERFORGE_WGMMA_THREE_CONSUMERS")
    layer = specialise(prog, "gpt2_attn", 16, 16, 128)
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "0")
    assert not PagedAttention(layer, page_size=16, arch="sm_90", prefill="wgmma").tc_plan("prefill").config.overlap
    monkeypatch.delenv("LAYERFORGE_WGMMA_OVERLAP", raising=False)   # the default
    plan = PagedAttention(layer, page_size=16, arch="sm_90", prefill="wgmma").tc_plan("prefill")
    # with TMA tiles, the scale folded into the exponent (no score hook), the sectioned launch order and O staged, also
    # defaults
    assert plan.config.overlap and plan.config.label == "n128s3ovtflu"
    monkeypatch.setenv("LAYERFORGE_WGMMA_TMA", "0")
    no_tma = PagedAttention(layer, page_size=16, arch="sm_90", prefill="wgmma").tc_plan("prefill")
    assert no_tma.config.label == "n128s3ovflu"
    # forced tiles are as given; the mma.sync prefill is not affected
    forced = PagedAttention(layer, page_size=16, arch="sm_90", tiles={"prefill": WGTileConfig(bn=64, stages=4)})
    assert forced.tc_plan("prefill").config.label == "n64s4"
    assert PagedAttention(layer, page_size=16, arch="sm_90", prefill="tc").tc_plan("prefill").arch == "sm_90"


def test_switches_refuse_misspelt_values(monkeypatch):
    """LAYERFORGE_WGMMA_OVERLAP / _TMA (and LAYERFORGE_PDL) read 1/0, true/false, yes/no, on/off; unset or
    empty is the default; anything else is an error naming the variable, not a silent default."""
    from layerforge.codegen.attention_wgmma import overlap_default, tma_default
    from layerforge.runtime.launch import pdl_enabled
    for name, fn, default in (("LAYERFORGE_WGMMA_OVERLAP", overlap_default, True),
                              ("LAYERFORGE_WGMMA_TMA", tma_default, True), ("LAYERFORGE_PDL", pdl_enabled, False)):
        monkeypatch.delenv(name, raising=False)
        assert fn() is default
        monkeypatch.setenv(name, "")
        assert fn() is default
        for value, want in (("0", False), ("1", True), ("Off", False), ("TRUE", True)):
            monkeypatch.setenv(name, value)
            assert fn() is want
        monkeypatch.setenv(name, "of")
        with pytest.raises(ValueError, match=f"{name}='of'"):
            fn()


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["gpt2_attn", "llama_attn", "gemma2_attn", "bert_attn"])
def test_staged_out_compiles_and_stores_16_bytes(prog, name, d, monkeypatch):
    """O goes out through Q's buffer (WGTileConfig.staged_out, label u: the default) on the plan the other options
    give, spill-free; its cubin stores O's rows 16 bytes at a time (STG.E.128) beside the split-KV parts' fragment
    stores, and off (LAYERFORGE_WGMMA_STAGED_OUT=0) the source is the plan's as it was."""
    from layerforge.codegen.attention_wgmma import default_options
    from layerforge.runtime.launch import compile_fn
    consts = {"window": 64} if name == "gemma2_attn" else {}
    layer = prog.specialise(name, Hq=32, Hkv=8, D=d, dtype="bf16", **consts)
    monkeypatch.setenv("LAYERFORGE_WGMMA_STAGED_OUT", "0")
    plain = plan_wgmma_attention(layer, compile_fn=compile_fn(), **default_options(layer))
    assert not plain.config.staged_out and "STAGED_OUT" not in plain.source()
    monkeypatch.delenv("LAYERFORGE_WGMMA_STAGED_OUT")
    plan = plan_wgmma_attention(layer, compile_fn=compile_fn(), **default_options(layer))
    assert plan.config == dataclasses.replace(plain.config, staged_out=True) and plan.key.count("u_") == 1
    kr, res = compile_main(plan)
    assert_spill_free(kr)
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is not None:
        code = sass_loops.disassemble(res.cubin)[plan.kernel_name]
        assert any(c.opcode == "STG.E.128" for c in code) and any(c.opcode == "LDS.128" for c in code)
    with pytest.raises(ValueError, match="staged_out stages O in Q's buffer"):
        WGTileConfig(bn=128, stages=3, persist=True, q_next=True, staged_out=True)


@pytest.mark.parametrize("name,d", [("gpt2_attn", 128), ("llama_attn", 128), ("gpt2_attn", 64), ("gemma2_attn", 256),
                                    ("mistral_attn", 128)])
def test_tile_branch_keeps_the_pv_wait_after_the_softmax(prog, name, d, monkeypatch):
    """The full-tile branch around both rows' softmax (WGTileConfig.tile_branch, label j;
    LAYERFORGE_WGMMA_TILE_BRANCH=1, off until measured) on the plan the other options give, spill-free: in its SASS
    no exponential of a tile's softmax comes after the overlap schedule's wait for the previous P V, where without
    it ptxas put that wait early in the block after the second row's max and left about half of them behind it
    (benchmarks/sass_loops.sfu_after_full_wait). Off (the default), the source is the plan's as it was."""
    from layerforge.codegen.attention_wgmma import default_options
    from layerforge.runtime.launch import compile_fn
    consts = {"window": 64} if name in ("gemma2_attn", "mistral_attn") else {}
    layer = prog.specialise(name, Hq=32, Hkv=8, D=d, dtype="bf16", **consts)
    monkeypatch.delenv("LAYERFORGE_WGMMA_TILE_BRANCH", raising=False)
    plain = plan_wgmma_attention(layer, compile_fn=compile_fn(), **default_options(layer))
    assert plain.config.overlap and not plain.config.tile_branch and "TILE_BRANCH" not in plain.source()
    monkeypatch.setenv("LAYERFORGE_WGMMA_TILE_BRANCH", "1")
    plan = plan_wgmma_attention(layer, compile_fn=compile_fn(), **default_options(layer))
    assert plan.tile_branch_serves and plan.config == dataclasses.replace(plain.config, tile_branch=True)
    assert plan.key.count("j_") == 1 and plan.source().count("if (full_tile) {") == 1
    kr, res = compile_main(plan)
    assert_spill_free(kr)
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is not None:
        after = sass_loops.sfu_after_full_wait(sass_loops.disassemble(res.cubin)[plan.kernel_name])
        assert after and max(after) == 0, after
    with pytest.raises(ValueError, match="tile_branch keeps the overlap schedule's P V wait"):
        WGTileConfig(bn=128, stages=3, tile_branch=True)
