"""The Hopper (wgmma) prefill kernel renders and compiles for sm_90a without register spills,
for every stdlib attention block, head dims 64/128/256 (and 48-240 off them, value dims of their
own, in the native and padded swizzles), bf16 and f16, GQA ratios, pages of 16 and 64, and the
mask-tile / sink / table hooks (no GPU needed)."""
import dataclasses

import pytest

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention, supports, tile_candidates
from layerforge.codegen.row import LoweringError

from .test_attention_compile import ATTENTION, nvrtc, specialise


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def compile_main(plan):
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90a"))
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}
    for code in ("C7508", "C7510", "C7515", "C7517"):   # setmaxnreg ignored, wgmma serialised, a wait injected
        assert code not in res.log, res.log
    return res.resources[plan.kernel_name], res


def assert_spill_free(kr):
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, kr


def resources(plan):
    return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch)).resources


def no_spills(plan):
    """A compile function that reports every kernel spill-free without compiling (the planner's choices that
    hang on something else: whether a switch applies to the block at all)."""
    from layerforge.runtime.nvrtc import KernelResources
    return {k.name: KernelResources(registers=0, spill_stores=0, spill_loads=0, stack_frame=0, shared_mem=0)
            for k in plan.kernels}


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_wgmma_prefill_compiles_without_spills(prog, name, d):
    """The planner's choice (the first tile candidate without spills, as the runtime plans)."""
    plan = plan_wgmma_attention(specialise(prog, name, 32, 8, d), compile_fn=resources)
    assert plan.arch == "sm_90a" and plan.key.endswith("_sm90a")
    kr, res = compile_main(plan)
    assert_spill_free(kr)
    assert kr.registers * plan.config.threads <= 65536   # the register cap at launch: one CTA per SM


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4), (32, 1)])
@pytest.mark.parametrize("page", [4, 16, 64, 256])
def test_gqa_pages_and_dtypes_compile(prog, hq, hkv, page, dtype):
    plan = plan_wgmma_attention(specialise(prog, "gemma2_attn", hq, hkv, 128, dtype), page_size=page)
    assert_spill_free(compile_main(plan)[0])


CANDIDATES = [(d, c) for d in (64, 128, 256) for c in tile_candidates(d)]


@pytest.mark.parametrize("d,tiles", CANDIDATES, ids=lambda x: getattr(x, "label", str(x)))
def test_every_tile_candidate_compiles(prog, d, tiles):
    plan = plan_wgmma_attention(specialise(prog, "llama_attn", 32, 8, d), tiles=tiles)
    assert_spill_free(compile_main(plan)[0])
    assert plan.shared_bytes <= 227 * 1024


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("page", [16, 256])   # boxes of a page; one box of a 128-key tile
def test_tma_tiles_compile_without_spills(prog, name, d, page):
    """K/V tiles by TMA (WGTileConfig.tma, as LAYERFORGE_WGMMA_TMA=1 plans it): the maps are the
    kernel's last arguments; spill-free in both schedules."""
    layer = specialise(prog, name, 32, 8, d)
    plan = plan_wgmma_attention(layer, page_size=page, compile_fn=resources, overlap=True, tma=True)
    assert plan.tma and plan.abi.args[-1].name == "v_map" and plan.abi.args[-2].role == "tmap"
    assert "cp.async.bulk.tensor.2d" in plan.source()
    assert_spill_free(compile_main(plan)[0])
    plain = plan_wgmma_attention(layer, page_size=page, compile_fn=resources, tma=True)
    assert plain.tma and not plain.config.overlap
    assert_spill_free(compile_main(plain)[0])


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_kv_rings_compile_without_spills(prog, name, d, page=16):
    """K and V in rings of their own (WGTileConfig.kv_rings): the planner takes them at two stages (D256) on the
    default switches; forced at three (D64 / D128) they compile too. Two more barriers a stage, V's waited for
    before its P V; spill-free in both schedules. Without TMA they do not apply (cp.async keeps one ring)."""
    layer = specialise(prog, name, 32, 8, d)
    kw = dict(page_size=page, compile_fn=resources, tma=True, rope_step=True, fold=True, kv_rings=True)
    for overlap in (True, False):
        plan = plan_wgmma_attention(layer, overlap=overlap, **kw)
        assert plan.kv_rings == (plan.config.stages == 2) and plan.tma, plan.key
        forced = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, kv_rings=True))
        assert forced.kv_rings and forced.config.label.endswith("kv") and forced.config.overlap == plan.config.overlap
        src = forced.source()
        assert "full_v[prev]" in src and "empty_v[stage]" in src
        assert_spill_free(compile_main(forced)[0])
    assert plan_wgmma_attention(specialise(prog, name, 32, 8, 256), page_size=page, compile_fn=no_spills, tma=True,
                                kv_rings=True).kv_rings
    one = plan_wgmma_attention(layer, page_size=page, compile_fn=resources, tma=True, overlap=True)
    assert not one.kv_rings and "full_v" not in one.source()
    assert one.shared_bytes <= forced.shared_bytes <= 227 * 1024
    cp = plan_wgmma_attention(layer, page_size=page, tiles=WGTileConfig(bn=plan.config.bn, stages=plan.config.stages,
                                                                         kv_rings=True))
    assert not cp.kv_rings and "full_v" not in cp.source()


@pytest.mark.parametrize("overlap", [True, False])
def test_three_consumers_compile(prog, overlap):
    """Three consumer warpgroups (WGTileConfig.consumers: 192 query rows a CTA, turns in order, registers 32 / 160):
    D64 with 64-key tiles compiles without spills in both schedules; 512 threads, barriers past the two-consumer
    kernel's."""
    c = WGTileConfig(bn=64, stages=3, overlap=overlap, tma=True, fold=True, consumers=3)
    assert (c.rows, c.threads, c.producer_regs, c.consumer_regs) == (192, 512, 32, 160) and c.label.startswith("n64s3c3")
    plan = plan_wgmma_attention(specialise(prog, "gpt2_attn", 16, 16, 64), page_size=64, tiles=c)
    src = plan.source()
    assert "constexpr int NCW = 3;" in src and plan.abi.threads == 512
    assert_spill_free(compile_main(plan)[0])
    with pytest.raises(ValueError, match="consumers"):
        WGTileConfig(bn=64, stages=3, consumers=4)
    with pytest.raises(ValueError, match="register budgets"):
        WGTileConfig(bn=64, stages=3, consumers=3, consumer_regs=232)


def test_tma_only_where_it_applies(prog):
    """Pages under 8 keys: cp.async as before; 96 natively (64-byte swizzle) takes boxes of 32
    columns, padded to 128-byte rows whole 64-column boxes."""
    tiles = lambda d: WGTileConfig(bn=tile_candidates(d)[0].bn, stages=tile_candidates(d)[0].stages, tma=True)  # noqa: E731
    assert plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 96), tiles=tiles(96)).tma_box == (16, 32)
    padded = plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 96),
                                  tiles=WGTileConfig(bn=128, stages=3, swizzle=128, tma=True))
    assert padded.tma and "k_map" in padded.abi.signature
    assert_spill_free(compile_main(padded)[0])
    assert not plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 128), tiles=tiles(128), page_size=4).tma
    assert plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 128), tiles=tiles(128), page_size=8).tma
    assert "k_map" not in plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 128)).abi.signature


@pytest.mark.parametrize("d,page", [(80, 16), (96, 16), (160, 64), (96, 256)])
def test_tma_at_the_narrow_swizzles_compiles(prog, d, page):
    """TMA boxes of 16 / 32 columns (the 32- and 64-byte swizzles), asked for by tiles: spill-free;
    the planner takes them too (measured 22-26 % faster than cp.async at D80 / 96 / 160, H200)."""
    c = tile_candidates(d)[0]
    layer = specialise(prog, "gemma2_attn", 32, 8, d)
    plan = plan_wgmma_attention(layer, page_size=page, tiles=WGTileConfig(bn=c.bn, stages=c.stages, tma=True,
                                                                          overlap=True))
    assert plan.tma and plan.tma_box == (min(page, c.bn), plan.dims[0] // 2) and plan.dims[0] < 128
    assert_spill_free(compile_main(plan)[0])
    default = plan_wgmma_attention(layer, page_size=page, compile_fn=resources, tma=True)
    assert default.tma and default.dims[0] < 128


NEW_DIMS = [(80, 80), (96, 96), (160, 160), (192, 192), (192, 128), (128, 64), (96, 64)]


@pytest.mark.parametrize("d,dv", NEW_DIMS)
@pytest.mark.parametrize("swizzle", [0, 128])
@pytest.mark.parametrize("overlap", [False, True])
def test_other_head_dims_compile_without_spills(d, dv, swizzle, overlap):
    """Head dims off 64/128/256 and value dims of their own, every tile candidate, in the native
    swizzle (32 / 64 bytes where 128 does not divide the dims) and in padded 128-byte rows: no
    spills, no serialised wgmma; shared memory within 227 KB (a 2-stage 128-key n128 tile at
    D160 with the overlap schedule spills: the planner keeps it plain)."""
    from .test_attention_tc_dims import VALUE_DIM_BLOCKS
    layer = lf.loads(VALUE_DIM_BLOCKS, "mla.lf").specialise("mla_attn", Hq=16, Hkv=4, D=d, Dv=dv, dtype="bf16",
                                                           softcap=30.0)
    for c in tile_candidates(d, dv):
        tiles = WGTileConfig(bn=c.bn, stages=c.stages, swizzle=swizzle, overlap=overlap)
        try:
            plan = plan_wgmma_attention(layer, tiles=tiles)
        except LoweringError as e:   # padded 128-byte rows may not fit this candidate's stages
            assert swizzle and "shared memory" in str(e)
            continue
        assert plan.shared_bytes <= 227 * 1024
        kr, _ = compile_main(plan)
        if overlap and (d, c.bn, c.stages) == (160, 128, 2):
            continue
        assert_spill_free(kr)


@pytest.mark.parametrize("d", [48, 80, 96, 112, 160, 192, 224, 240])
def test_planner_choice_at_other_dims(prog, d):
    """The planner's choice (spill-free through the compile function) for llama's block."""
    plan = plan_wgmma_attention(specialise(prog, "llama_attn", 32, 8, d), compile_fn=resources, overlap=True)
    assert_spill_free(compile_main(plan)[0])


@pytest.mark.parametrize("name", ["prefix_lm", "sinks", "dilated", "natten", "by_head", "prefix_table", "head_window"])
def test_block_sparse_masks_compile(name):
    from ..codegen.test_mask_tiles import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    layer = prog.specialise(name, Hq=8, Hkv=2, D=128, dtype="bf16")
    src = plan_wgmma_attention(layer).source()
    # the producer and the consumers skip the same tiles (dilated: no tile is empty or full, no classifier)
    assert ("if (LF_TILE(k0) == 0) continue;" in src) == ("const int tile_cls = LF_TILE(k0);" in src) == (name != "dilated")
    assert_spill_free(compile_main(plan_wgmma_attention(layer))[0])


def test_sinks_compile():
    from ..dsl.test_attention_sinks import SINKS
    prog = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    plan = plan_wgmma_attention(prog.specialise("sink_attn", Hq=8, Hkv=2, D=128, dtype="bf16", window=40))
    assert "lf_sink(" in plan.source()
    assert_spill_free(compile_main(plan)[0])


def test_kernel_uses_the_hopper_instructions(prog):
    src = plan_wgmma_attention(specialise(prog, "llama_attn", 32, 8, 128)).source()
    for needle in ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", "setmaxnreg.inc", "setmaxnreg.dec",
                   "mbarrier.try_wait.parity", "fence.proxy.async"):
        assert needle in src, needle


def test_what_it_does_not_serve(prog):
    with pytest.raises(LoweringError, match="head dim 72"):
        plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 72))
    with pytest.raises(ValueError, match="swizzle"):
        WGTileConfig(bn=128, stages=2, swizzle=16)
    with pytest.raises(LoweringError, match="f32"):
        plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 64, "f32"))
    with pytest.raises(LoweringError, match="pages of at least"):
        plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 128), page_size=2)
    assert not supports(specialise(prog, "llama_attn", 8, 8, 128), 2)
    assert supports(specialise(prog, "llama_attn", 8, 8, 128), 16)
    with pytest.raises(ValueError, match="64K"):
        WGTileConfig(bn=128, stages=2, producer_regs=64, consumer_regs=240)


# ---- the block-mask lists (reachable when asked for) and the per-tile distance tables ---------
GQA = [(8, 8), (32, 8), (32, 4)]   # groups 1, 4, 8


@pytest.fixture(scope="module")
def mask_prog():
    from ..gpu.test_block_mask import SRC
    return lf.loads(SRC, "block_masks.lf", with_stdlib=False)


def check_block_mask_source(plan):
    src = plan.source()
    assert plan.block_mask and supports(plan.layer, plan.page_size)   # the default prefill (its key terms staged)
    assert [a.name for a in plan.abi.args if a.name.startswith("bm_")] == ["bm_num", "bm_idx", "bm_rows", "bm_cols"]
    # the producer and both consumers walk the list; no per-tile classifier of its own
    assert src.count("const int k0 = tile_k0(t);") == 2 and "LF_TILE" not in src
    assert "(bm_list[t_begin + t] & 1) != 0" in src
    bm = plan.block_mask_plan()
    assert (bm.rows, bm.keys) == (plan.config.rows, plan.config.keys)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_document_mask_walks_the_block_mask(mask_prog, hq, hkv, d):
    plan = plan_wgmma_attention(mask_prog.specialise("doc_causal", Hq=hq, Hkv=hkv, D=d, dtype="bf16"),
                                page_size=64, compile_fn=resources)
    check_block_mask_source(plan)
    assert_spill_free(compile_main(plan)[0])


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["doc_heads", "doc_pad", "doc"])
def test_other_document_masks_walk_the_block_mask(mask_prog, name, d):
    from layerforge.codegen.block_mask import mask_heads
    layer = mask_prog.specialise(name, Hq=16, Hkv=4, D=d, dtype="bf16")
    plan = plan_wgmma_attention(layer, compile_fn=resources)
    check_block_mask_source(plan)
    assert ("* 4 + kvh) * bm_rows" in plan.source()) == (mask_heads(layer) == 4) == (name == "doc_heads")
    assert_spill_free(compile_main(plan)[0])


def test_block_mask_tiles_follow_the_tile_config(mask_prog):
    layer = mask_prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    for c in tile_candidates(128):
        plan = plan_wgmma_attention(layer, tiles=c)
        check_block_mask_source(plan)
        assert_spill_free(compile_main(plan)[0])


def distance_blocks(prog, mask_prog, name, hq, hkv, d):
    if name == "t5_attn":
        return specialise(prog, "t5_attn", hq, hkv, d)
    return mask_prog.specialise(name, Hq=hq, Hkv=hkv, D=d, dtype="bf16")


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("name", ["t5_attn", "rel_bias"])
def test_distance_tables_compile(prog, mask_prog, name, hq, hkv, d):
    from layerforge.codegen.attention_wgmma import SHARED_LIMIT
    layer = distance_blocks(prog, mask_prog, name, hq, hkv, d)
    plan = plan_wgmma_attention(layer, compile_fn=resources)   # tables: the default
    heads, width = plan.rel_table
    assert heads == hq // hkv and width == plan.config.keys + 63 // (hq // hkv) + 1   # both read h
    assert plan.key.endswith("_dt_sm90a") and plan.shared_bytes <= SHARED_LIMIT
    src = plan.source()
    score_body = src.split("__device__ __forceinline__ float lf_score(")[1].split("{", 1)[1].split("}")[0]
    assert "rel_tab[x] = lf_rel_term(" in src
    assert "rel_v" in score_body and "[" not in score_body   # no gather per score
    assert_spill_free(compile_main(plan)[0])


def test_negated_distance_term_table(mask_prog):
    plan = plan_wgmma_attention(mask_prog.specialise("back_bias", Hq=32, Hkv=8, D=64, dtype="bf16"),
                                compile_fn=resources, distance_table=True)
    assert plan.rel_table == (1, plan.config.keys + 63 // 4 + 1)
    assert "lf_rel_term(-rel," in plan.source()
    assert_spill_free(compile_main(plan)[0])


def test_distance_tables_by_default(prog, mask_prog, monkeypatch):
    """Distance tables are the default (distance_table=False: the per-score kernel); no block
    mask for blocks that need none, documents take the default wgmma prefill only with their key
    terms staged (LAYERFORGE_WGMMA_KEY_STAGE=0: mma.sync), and the flag on a block without a
    distance term changes nothing."""
    t5 = specialise(prog, "t5_attn", 32, 8, 128)
    plan = plan_wgmma_attention(t5)
    assert plan.distance_table and plan.rel_table == (4, 144) and plan.config.label == "n128s2"
    assert plan.key.endswith("_n128s2_dt_sm90a") and "rel_tab[x] = lf_rel_term(" in plan.source()
    assert not plan.block_mask and "bm_list" not in plan.source()
    off = plan_wgmma_attention(t5, distance_table=False)
    assert off.rel_table is None and off.config.label == "n128s3" and "lf_rel_term" not in off.source()
    assert off.key == "t5_attn_d128_hkv8_hq32_nb32_bf16_p16_wgprefill_n128s3_sm90a"
    llama = specialise(prog, "llama_attn", 32, 8, 128)
    on, off = plan_wgmma_attention(llama), plan_wgmma_attention(llama, distance_table=False)
    assert on.rel_table is None and on.key == off.key and on.source() == off.source()
    doc = mask_prog.specialise("doc_causal", Hq=32, Hkv=8, D=128, dtype="bf16")
    assert supports(doc, 16)
    monkeypatch.setenv("LAYERFORGE_WGMMA_KEY_STAGE", "0")
    assert not supports(doc, 16)
    monkeypatch.delenv("LAYERFORGE_WGMMA_KEY_STAGE")
    # 3 stages of 128 keys leave no room for the tables: asked for, they are an error that says the way out
    with pytest.raises(LoweringError, match=r"shared memory beside the distance tables \(distance_table=False"):
        plan_wgmma_attention(t5, tiles=WGTileConfig(bn=128, stages=3))
    assert plan_wgmma_attention(t5, tiles=WGTileConfig(bn=128, stages=3), distance_table=False).rel_table is None


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name,hq,hkv", [("llama_attn", 32, 8), ("mistral_attn", 32, 32), ("llama_attn", 32, 1)])
def test_rope_by_steps_compiles_without_spills(prog, name, hq, hkv, d):
    """WGTileConfig.rope_step, as LAYERFORGE_WGMMA_ROPE_STEP=1 plans it (with overlap and TMA): the stepped
    rotation in the source, spill-free; blocks without RoPE never take it."""
    layer = specialise(prog, name, hq, hkv, d)
    plan = plan_wgmma_attention(layer, page_size=64, compile_fn=resources, overlap=True, tma=True, rope_step=True)
    assert plan.config.rope_step and plan.config.label.endswith("r")
    assert "lf_rope_step_sincos(RS, p, dsn, dcs);" in plan.source()
    assert_spill_free(compile_main(plan)[0])
    plain = plan_wgmma_attention(specialise(prog, "gpt2_attn", hq, hq, d), page_size=64, compile_fn=no_spills,
                                 rope_step=True)
    assert not plain.config.rope_step
    assert plan_wgmma_attention(layer, page_size=64, compile_fn=no_spills, rope_step=True).config.rope_step


@pytest.mark.parametrize("d", [80, 96, 160, 192])
def test_rope_steps_only_where_the_pairs_divide_a_warpgroup(prog, d):
    """A RoPE block whose pair count does not divide 128 (D 80 / 96 / 160 / 192) keeps the per-item rotation: the
    plan does not take rope_step (no second kernel key for the same code) and the source has no stepped form."""
    layer = specialise(prog, "llama_attn", 32, 8, d)
    plan = plan_wgmma_attention(layer, page_size=64, compile_fn=no_spills, rope_step=True)
    assert not plan.config.rope_step and "lf_rope_step_sincos" not in plan.source()


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["gpt2_attn", "llama_attn", "mistral_attn", "bert_attn"])
def test_scale_fold_compiles_without_spills(prog, name, d):
    """WGTileConfig.fold, as LAYERFORGE_WGMMA_FOLD=1 plans it: one FFMA a score into the exponent where the block
    has no score hook and a positive constant scale; blocks with a score hook (ALiBi, soft-cap) never take it."""
    layer = specialise(prog, name, 32, 8, d)
    plan = plan_wgmma_attention(layer, page_size=64, compile_fn=resources, overlap=True, tma=True, fold=True)
    assert plan.config.fold and "lf_ex2(fmaf(s[nt * 4 + half * 2], scale2, -mu))" in plan.source()
    assert_spill_free(compile_main(plan)[0])
    for other in ("bloom_attn", "gemma2_attn"):
        hooked = plan_wgmma_attention(specialise(prog, other, 32, 8, d), page_size=64, compile_fn=no_spills, fold=True)
        assert not hooked.config.fold and "fmaf(s[" not in hooked.source()
